"""The recurrent form of the linear rules (docs/catalog.md) as one generated Triton kernel.

`attncc/backends/triton/templates/linear_recurrent.py.j2` lays out lines this module chooses from
one table per part of the rule (`_GATE_LINES` by gate kind, `_WRITE_LINES` by write kind); the
semantics are `reference_linear.recurrent_reference` (the spec and the test oracle).

Supported: linear (L1; phi identity, elu1 or taylor2 with F = 1 + D + D^2 <= F_MAX; optional
normaliser), decay (L2), scalar_gate (L3), vector_gate (L4), delta (L5), gated_delta (L6); dense
[B, H, L, D] or packed varlen inputs (`cu_seqlens`). block_causal (L7) has no one-token form
(a token reads later tokens of its block) and raises NotImplementedError at construction.

Kernel: grid (B * H or N * H, cdiv(Dv, DV_BLOCK)); each program loops over the tokens with its
slice of the state S [F, DV_BLOCK] in fp32 registers. Decode is the same kernel with L = 1 and a
state in. taylor2 builds phi(x)_f from two gathered loads of x (x_a x_b / sqrt 2), so the
feature vector is never stored.
"""

from __future__ import annotations

from torch import Tensor

from attncc.backends import keys
from attncc.backends.triton.linear.launch import prepare_launch
from attncc.backends.triton.source import CachedSource, GeneratedKernel
from attncc.backends.triton.templating import environment, template_hash
from attncc.ir.linear import LinearState
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import value_block

BACKEND = "triton-linear"
TEMPLATE = "linear_recurrent.py.j2"
TEMPLATES = (TEMPLATE, "helpers.py.j2")  # every file the source depends on
F_MAX = 1 + 16 + 16 * 16  # taylor2 up to D = 16: S [512, DV_BLOCK] is the largest state tile

_ELU1 = "tl.where(mask_f, tl.where({x} > 0, {x} + 1.0, tl.exp({x})), 0.0)"  # phi(pad) = 0
_LOAD = ("{x}_t = tl.load({x}_row + t * stride_{x}l + offs_f * stride_{x}d, mask=mask_f, "
         "other=0.0).to(tl.float32)")
# taylor2: f = 0 -> 1; 1 <= f <= D -> x[f - 1]; f > D -> x[a] x[b] / sqrt 2, f - 1 - D = a D + b
_TAYLOR_SETUP = [
    "quad = tl.maximum(offs_f - 1 - D_K, 0)",
    "lin_f = (offs_f >= 1) & (offs_f <= D_K)",
    "quad_f = (offs_f > D_K) & mask_f",
    "fa = tl.where(lin_f, offs_f - 1, quad // D_K)",
    "fb = quad % D_K",
]
_TAYLOR_LOAD = [
    ("{x}_a = tl.load({x}_row + t * stride_{x}l + fa * stride_{x}d, mask=lin_f | quad_f, "
     "other=0.0).to(tl.float32)"),
    ("{x}_b = tl.load({x}_row + t * stride_{x}l + fb * stride_{x}d, mask=quad_f, "
     "other=0.0).to(tl.float32)"),
    ("{x}_t = tl.where(offs_f == 0, 1.0, tl.where(quad_f, {x}_a * {x}_b * 0.7071067811865476, "
     "{x}_a))"),
]
_LOAD_G = "g_t = tl.load(g_base + t * stride_gl).to(tl.float32)"
_LOAD_G_VEC = ("g_t = tl.load(g_base + t * stride_gl + offs_f * stride_gd, mask=mask_f, "
               "other=0.0).to(tl.float32)")
_LOAD_BETA = "beta_t = tl.load(beta_base + t * stride_bl).to(tl.float32)"
# (I - beta k k^T) S + beta k v^T  =  S + k (beta (v - S^T k))^T, as in _token_step
_DELTA = "v_t = beta_t * (v_t - tl.sum(S * k_t[:, None], 0))"
_WRITE = "S = S + k_t[:, None] * v_t[None, :]"


def _loads(node: LinearState) -> tuple[str, list[str], list[str]]:
    """(the feature mask line, setup lines, per-token lines loading q_t and k_t as phi(x))."""
    if node.feature_map == "taylor2":
        loads = [line.format(x=x) for x in "qk" for line in _TAYLOR_LOAD]
        return "mask_f = offs_f < 1 + D_K + D_K * D_K", list(_TAYLOR_SETUP), loads
    return "mask_f = offs_f < D_K", [], [_LOAD.format(x=x) for x in "qk"]


# gate kind -> (setup lines before the token loop, step lines decaying S before the write)
_GATE_LINES: dict[str, tuple[list[str], list[str]]] = {
    "none": ([], []),
    "constant": (["lam = tl.load(LAM + off_h).to(tl.float32)"], ["S = S * lam"]),
    "scalar": ([], [_LOAD_G, "S = S * tl.exp(g_t)"]),
    "vector": ([], [_LOAD_G_VEC, "S = S * tl.exp(g_t)[:, None]"]),
}
# write kind -> step lines turning v_t into the value row written along k_t
_WRITE_LINES: dict[str, list[str]] = {"additive": [], "delta": [_LOAD_BETA, _DELTA]}


def _lines(node: LinearState) -> tuple[list[str], list[str]]:
    """(setup lines before the token loop, step lines per token) for `node`'s parts."""
    setup, decay = _GATE_LINES[node.gate]
    step: list[str] = []
    if node.feature_map == "elu1":
        step += [f"q_t = {_ELU1.format(x='q_t')}", f"k_t = {_ELU1.format(x='k_t')}"]
    return list(setup), step + decay + _WRITE_LINES[node.write] + [_WRITE]


def kernel_name(node: LinearState, form: str = "recurrent") -> str:
    """Readable name plus content hash, e.g. `linear_recurrent_gated_delta_identity_1a2b3c4d5e`."""
    norm = "_norm" if node.normalize else ""
    return keys.kernel_name(f"linear_{form}", f"{node.rule}_{node.feature_map}{norm}", node.key)


def render(node: LinearState) -> str:
    """Triton source of the recurrent kernel for `node` (dtype- and shape-independent)."""
    feature_mask, load_setup, loads = _loads(node)
    setup, step = _lines(node)
    return environment().get_template(TEMPLATE).render(
        kernel_name=kernel_name(node), node_text=node.text(), normalize=node.normalize,
        feature_mask=feature_mask, setup_lines=load_setup + setup, load_lines=loads,
        step_lines=step)


def source_key(node: LinearState, templates: tuple[str, ...] = TEMPLATES,
               backend: str = BACKEND) -> str:
    """The cache key of a linear kernel's source: the node's text and the family's templates
    (the chunked and backward kernels pass theirs)."""
    return keys.cache_key(backend, node.text(), templates=template_hash(templates))


def check_power_of_two(name: str, x: int | None, least: int) -> None:
    if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < least
                          or x & (x - 1)):
        raise ValueError(f"{name}: expected a power of two >= {least}, got {x!r}")


def _unsupported(node: LinearState) -> str | None:
    if node.block is not None:
        return (f"rule {node.rule!r} ({node.catalog_id}) has no one-token recurrent kernel (a "
                "token reads later tokens of its block): its kernel is the chunked one")
    return None


class TritonRecurrentLinear(GeneratedKernel):
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
        self.kernel = CachedSource(source_key(node), kernel_name(node),
                                   lambda: {"kernel.py": render(node).encode()},
                                   {"backend": BACKEND, "spec": node.text()})
        self.name, self.entry = self.kernel.name, self.kernel.entry

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None, return_state: bool = False,
                 cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """q, k [B, H, L, Dk]; v [B, H, L, Dv]; g, beta, initial_state as in `reference_linear`;
        or packed q, k [T, H, Dk], v [T, H, Dv] with `cu_seqlens` [N + 1] and states
        [N, H, F, Dv'] (`reference_linear_varlen`).

        Returns o (q's layout and dtype), and with `return_state` the final state
        [B or N, H, F, Dv'] in fp32 (Dv' = Dv + 1 when normalising; the last column is z).
        """
        node = self.node
        run = prepare_launch(node, q, k, v, g, beta, scale, initial_state, return_state,
                             cu_seqlens)
        f_dim = node.feature_dim(run.dk)
        if f_dim > F_MAX:
            raise ValueError(f"q: expected feature dim F <= {F_MAX} (taylor2: head dim <= 16), "
                             f"got head dim {run.dk} (F = {f_dim})")
        if run.nbh > 0 and run.dv > 0:  # else nothing to launch; the state has no entries
            dv_block = value_block(f_dim, run.dv, self.block_v)
            grid = (run.nbh, -(-run.dv // dv_block))
            self.jit_function()[grid](
                *run.args, run.scale,
                D_K=run.dk, D_V=run.dv, F_PAD=padded(f_dim), DV_BLOCK=dv_block,
                HAS_INITIAL=initial_state is not None, STORE_FINAL=return_state,
                VARLEN=run.varlen,
            )
        return (run.o, run.s_out) if return_state else run.o
