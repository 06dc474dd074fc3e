"""The recurrent form of the linear-recurrence axis (CATALOG 5) as one generated Triton kernel.

`templates/triton/linear_recurrent.py.j2` lays out lines this module chooses per rule; the
semantics are `reference_linear.recurrent_reference` (the spec and the test oracle).

Supported: linear (L1; phi identity or elu1; optional normaliser), decay (L2), scalar_gate (L3),
vector_gate (L4), delta (L5), gated_delta (L6). Not yet: phi taylor2 and block_causal (L7),
which raise NotImplementedError at construction.

Kernel: grid (B * H, cdiv(Dv, DV_BLOCK)); each program loops over the tokens with its slice of
the state S [F, DV_BLOCK] in fp32 registers. Decode is the same kernel with L = 1 and a state in.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from attncc.backends.reference_linear import check_inputs
from attncc.backends.triton_backend import _versions
from attncc.backends.triton_source import CachedSource
from attncc.backends.triton_render import _environment, template_source
from attncc.ir.linear import LinearState
from attncc.passes.select_tiles import padded

BACKEND = "triton-linear"
TEMPLATE = "linear_recurrent.py.j2"
TEMPLATES = (TEMPLATE, "helpers.py.j2")  # every file the source depends on
DV_BLOCK_MAX = 64  # S [128, 64] fp32 is 64 registers a thread at 4 warps

_ELU1 = "tl.where(mask_k, tl.where({x} > 0, {x} + 1.0, tl.exp({x})), 0.0)"  # phi(pad) = 0
_LOAD_G = "g_t = tl.load(g_base + t * stride_gl).to(tl.float32)"
_LOAD_G_VEC = ("g_t = tl.load(g_base + t * stride_gl + offs_k * stride_gd, mask=mask_k, "
               "other=0.0).to(tl.float32)")
_LOAD_BETA = "beta_t = tl.load(beta_base + t * stride_bl).to(tl.float32)"
# (I - beta k k^T) S + beta k v^T  =  S + k (beta (v - S^T k))^T, as in _token_step
_DELTA = "v_t = beta_t * (v_t - tl.sum(S * k_t[:, None], 0))"
_WRITE = "S = S + k_t[:, None] * v_t[None, :]"


def _lines(node: LinearState) -> tuple[list[str], list[str]]:
    """(setup lines before the token loop, step lines per token) for `node`'s rule."""
    rule = node.rule
    setup: list[str] = []
    step: list[str] = []
    if node.feature_map == "elu1":
        step += [f"q_t = {_ELU1.format(x='q_t')}", f"k_t = {_ELU1.format(x='k_t')}"]
    if rule == "decay":
        setup.append("lam = tl.load(LAM + off_h).to(tl.float32)")
        step.append("S = S * lam")
    elif rule in ("scalar_gate", "gated_delta"):
        step += [_LOAD_G, "S = S * tl.exp(g_t)"]
    elif rule == "vector_gate":
        step += [_LOAD_G_VEC, "S = S * tl.exp(g_t)[:, None]"]
    if rule in ("delta", "gated_delta"):
        step += [_LOAD_BETA, _DELTA]
    step.append(_WRITE)
    return setup, step


def kernel_name(node: LinearState, form: str = "recurrent") -> str:
    """Readable name plus content hash, e.g. `linear_recurrent_gated_delta_identity_1a2b3c4d5e`."""
    norm = "_norm" if node.normalize else ""
    return f"linear_{form}_{node.rule}_{node.feature_map}{norm}_{node.key[:10]}"


def render(node: LinearState) -> str:
    """Triton source of the recurrent kernel for `node` (dtype- and shape-independent)."""
    setup, step = _lines(node)
    return _environment().get_template(TEMPLATE).render(
        kernel_name=kernel_name(node), node_text=node.text(), normalize=node.normalize,
        setup_lines=setup, step_lines=step)


def cache_key(node: LinearState, templates: tuple[str, ...] = TEMPLATES,
              backend: str = BACKEND) -> str:
    """IR text + template bytes + backend + versions, as `triton_backend.cache_key`."""
    text = "\n".join([node.text(), "".join(template_source(n) for n in templates), backend,
                      _versions()])
    return hashlib.sha256(text.encode()).hexdigest()


def check_power_of_two(name: str, x: int | None, least: int) -> None:
    if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < least
                          or x & (x - 1)):
        raise ValueError(f"{name}: expected a power of two >= {least}, got {x!r}")


def _unsupported(node: LinearState) -> str | None:
    if node.rule == "block_causal":
        return "rule 'block_causal' (L7) has no recurrent Triton kernel yet"
    if node.feature_map == "taylor2":
        return "feature_map 'taylor2' has no recurrent Triton kernel yet (F = 1 + D + D^2)"
    return None


class TritonRecurrentLinear:
    """One LinearState's recurrent kernel. Building it renders (or loads) the source on disk.

    block_v: value columns per program (a power of two >= 16); default min(padded Dv, 64).
    """

    def __init__(self, node: LinearState, *, block_v: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise ValueError(f"node: expected a LinearState, got {type(node).__name__}")
        if (why := _unsupported(node)) is not None:
            raise NotImplementedError(f"TritonRecurrentLinear: {why}; use "
                                      "reference_linear.recurrent_reference")
        check_power_of_two("block_v", block_v, 16)
        self.node = node
        self.block_v = block_v
        self.kernel = CachedSource(cache_key(node), kernel_name(node),
                                   lambda: {"kernel.py": render(node).encode()},
                                   {"backend": BACKEND, "spec": node.text()})
        self.name, self.entry = self.kernel.name, self.kernel.entry

    @property
    def source(self) -> str:
        return self.kernel.source

    def jit_function(self):
        return self.kernel.jit_function()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None,
                 return_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """q, k [B, H, L, Dk]; v [B, H, L, Dv]; g, beta, initial_state as in `reference_linear`.

        Returns o [B, H, L, Dv] in q's dtype, and with `return_state` the final state
        [B, H, Dk, Dv'] in fp32 (Dv' = Dv + 1 when normalising; the last column is z).
        """
        node = self.node
        check_inputs(q, k, v, node, g, beta, initial_state)
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        sdv = node.state_dv(Dv)
        dev = q.device
        scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
        o = torch.empty(B, H, L, Dv, dtype=q.dtype, device=dev)
        s_in = None if initial_state is None else initial_state.to(dev, torch.float32).contiguous()
        s_out = torch.empty(B, H, Dk, sdv, dtype=torch.float32, device=dev) if return_state \
            else None
        lam = None
        if node.decay is not None:
            vals = node.decay if isinstance(node.decay, tuple) else (node.decay,) * H
            lam = torch.tensor(vals, dtype=torch.float32, device=dev)
        if B * H == 0:  # nothing to launch; the state has no entries either
            return (o, s_out) if return_state else o
        dk_pad, dv_pad = padded(Dk), padded(Dv)
        dv_block = min(dv_pad, DV_BLOCK_MAX) if self.block_v is None else min(self.block_v,
                                                                              dv_pad)
        # s_in and s_out are both contiguous [B, H, F, Dv']: one set of strides serves both
        s_strides = (s_out if s_out is not None else s_in if s_in is not None else o).stride()
        g_strides = (list(g.stride()) + [0])[:4] if g is not None else [0, 0, 0, 0]
        b_strides = list(beta.stride()) if beta is not None else [0, 0, 0]
        grid = (B * H, -(-Dv // dv_block))
        self.jit_function()[grid](
            q, k, v, o,
            g if g is not None else q, beta if beta is not None else q,
            lam if lam is not None else q, s_in if s_in is not None else o,
            s_out if s_out is not None else o,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            *g_strides, *b_strides, *s_strides,
            H, L, scale,
            D_K=Dk, D_V=Dv, DK_PAD=dk_pad, DV_BLOCK=dv_block,
            HAS_INITIAL=s_in is not None, STORE_FINAL=s_out is not None,
        )
        return (o, s_out) if return_state else o
