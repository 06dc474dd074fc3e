"""Gradients of the linear-recurrence rules L1-L6 (docs/catalog.md) as one generated Triton kernel.

`attncc/backends/triton/templates/linear_backward.py.j2` lays out lines this module chooses per rule (the same
IR flags as `triton_linear`: gate kind, delta correction, feature map); its header derives the
formulas. The oracle is torch.autograd through `reference_linear.recurrent_reference` in fp64
(`attncc.backends.reference.linear_backward.reference_backward`).

Supported: L1 (phi identity or elu1, with or without the normaliser: `triton_linear_backward_norm`),
L2, L3, L4, L5, L6; dense [B, H, L, D] or packed varlen inputs. taylor2 and L7 raise
NotImplementedError at construction.

Kernel: grid (B * H or N * H, NV = cdiv(Dv, DV_BLOCK)). Memory besides the gradients: fp32
checkpoints [programs, cdiv(L, CHUNK), F, DV_BLOCK] and scratch [programs, CHUNK, F, DV_BLOCK]
(together programs * (L / CHUNK + CHUNK) state tiles: CHUNK ~ sqrt(L) by default), and fp32
partials [NV, B, H, L, Dk] for dq, dk (and L4's dg) summed over the NV value blocks.
Sequential work: about three forward passes (the forward, the per-chunk recompute, the backward
step), one token at a time. The family (`family.backward_kernel`) routes no catalog rule here:
L1-L4 take the chunked matrix form (`backward_chunked.py`), L5, L6 the chunked WY form
(`backward_delta.py`); this kernel covers the combinations neither has (a delta write with a
vector gate, say: tests/test_linear_parts.py) and checks both independently (tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from attncc.backends.triton.linear.recurrent import (
    _ELU1,
    check_power_of_two,
    kernel_name,
    source_key,
)
from attncc.backends.triton.linear.backward_norm import augment
from attncc.backends.triton.source import CachedSource, GeneratedKernel
from attncc.backends.triton.templating import environment
from attncc.ir.linear import LinearState
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import backward_chunk, backward_value_block
from attncc.validate.linear import check_inputs, varlen_views

BACKEND = "triton-linear-backward"
TEMPLATE = "linear_backward.py.j2"
TEMPLATES = (TEMPLATE, "helpers.py.j2")

_LOAD = ("{x}_raw = tl.load({x}_row + t * stride_{x}l + offs_f * stride_{x}d, mask=mask_f, "
         "other=0.0).to(tl.float32)")
_LOAD_V = "v_t = tl.load(v_ptrs + t * stride_vl, mask=mask_v, other=0.0).to(tl.float32)"
_LOAD_DO = "do_t = tl.load(do_ptrs + t * stride_ol, mask=mask_v, other=0.0).to(tl.float32)"
_LOAD_G = "g_t = tl.load(g_base + t * stride_gl).to(tl.float32)"
_LOAD_G_VEC = ("g_t = tl.load(g_base + t * stride_gl + offs_f * stride_gd, mask=mask_f, "
               "other=0.0).to(tl.float32)")
_LOAD_BETA = "beta_t = tl.load(beta_base + t * stride_bl).to(tl.float32)"
# d elu1(x) / dx: 1 above 0, exp(x) below (padded lanes are never stored)
_DELU1 = "tl.where({x}_raw > 0, 1.0, tl.exp({x}_raw))"


def _phi(x: str, feature_map: str) -> str:
    if feature_map == "elu1":
        return f"{x}_t = {_ELU1.format(x=f'{x}_raw')}"
    return f"{x}_t = {x}_raw"


class GateLines(NamedTuple):
    """How one gate kind enters the backward kernel: `setup` lines before the loops, `loads`
    per token (leaving the factor in `a_t`), `factor` the decay applied to a [F, DV] tile (None:
    no decay), and `store_dg` the line storing the gate's gradient from dS and Sp (None: no g)."""

    setup: list[str]
    loads: list[str]
    factor: str | None
    store_dg: str | None


# gate kind -> its lines
_GATES: dict[str, GateLines] = {
    "none": GateLines([], [], None, None),
    "constant": GateLines(["lam = tl.load(LAM + off_h).to(tl.float32)"], [], "lam", None),
    "scalar": GateLines([], [_LOAD_G, "a_t = tl.exp(g_t)"], "a_t",
                        "tl.store(DG + r_row + t * stride_rl, tl.sum(tl.sum(dS * Sp, 1), 0))"),
    "vector": GateLines([], [_LOAD_G_VEC, "a_t = tl.exp(g_t)"], "a_t[:, None]",
                        "tl.store(DG + p_row + t * stride_pl + offs_f, tl.sum(dS * Sp, 1), "
                        "mask=mask_f)"),
}


class WriteLines(NamedTuple):
    """How one write kind enters the backward kernel: `forward` turns v_t into the value row
    written (on the decayed S), `value` does the same in the backward step (as u_t, from Sp),
    and `backward` turns du = dS^T k_t into dv_t (and the write's own gradients)."""

    forward: list[str]
    value: list[str]
    backward: list[str]


# write kind -> its lines
_WRITES: dict[str, WriteLines] = {
    "additive": WriteLines([], ["u_t = v_t"], ["dv_t = du"]),
    "delta": WriteLines(
        [_LOAD_BETA, "v_t = beta_t * (v_t - tl.sum(S * k_t[:, None], 0))"],
        [_LOAD_BETA, "kS = tl.sum(Sp * k_t[:, None], 0)", "u_t = beta_t * (v_t - kS)"],
        ["dv_t = beta_t * du",
         "db_t = tl.sum(du * (v_t - kS), 0)",
         "dk_t = dk_t - beta_t * tl.sum(Sp * du[None, :], 1)",
         "dS = dS - beta_t * k_t[:, None] * du[None, :]",
         "tl.store(DB + r_row + t * stride_rl, db_t)"]),
}


def _forward_lines(node: LinearState) -> list[str]:
    """One token's state update (S_{t-1} -> S_t), as the forward kernel does it."""
    gate = _GATES[node.gate]
    lines = [_LOAD.format(x="k"), _phi("k", node.feature_map), _LOAD_V, *gate.loads]
    if gate.factor is not None:
        lines.append(f"S = S * {gate.factor}")
    lines += _WRITES[node.write].forward
    lines.append("S = S + k_t[:, None] * v_t[None, :]")
    return lines


def _backward_lines(node: LinearState) -> list[str]:
    """One token backward, from S_prev = S_{t-1} and dS = dL/dS_t (header of the template)."""
    gate, write = _GATES[node.gate], _WRITES[node.write]
    a = gate.factor
    lines = [_LOAD.format(x="q"), _phi("q", node.feature_map), _LOAD.format(x="k"),
             _phi("k", node.feature_map), _LOAD_V, _LOAD_DO, *gate.loads]
    lines.append(f"Sp = S_prev * {a}" if a is not None else "Sp = S_prev")
    lines += write.value
    lines += [
        "S_t = Sp + k_t[:, None] * u_t[None, :]",
        "dS = dS + scale * q_t[:, None] * do_t[None, :]",
        "dq_t = tl.sum(S_t * do_t[None, :], 1) * scale",
        "du = tl.sum(dS * k_t[:, None], 0)",
        "dk_t = tl.sum(dS * u_t[None, :], 1)",
    ]
    lines += write.backward
    if gate.store_dg is not None:
        lines.append(gate.store_dg)
    if a is not None:
        lines.append(f"dS = dS * {a}")
    if node.feature_map == "elu1":
        lines += [f"dq_t = dq_t * {_DELU1.format(x='q')}", f"dk_t = dk_t * {_DELU1.format(x='k')}"]
    lines += [
        "tl.store(DQ + p_row + t * stride_pl + offs_f, dq_t, mask=mask_f)",
        "tl.store(DK + p_row + t * stride_pl + offs_f, dk_t, mask=mask_f)",
        "tl.store(dv_ptrs + t * stride_wl, dv_t, mask=mask_v)",
    ]
    return lines


def render(node: LinearState) -> str:
    """Triton source of the backward kernel for `node` (dtype- and shape-independent)."""
    return environment().get_template(TEMPLATE).render(
        kernel_name=kernel_name(node, "backward"), node_text=node.text(),
        setup_lines=_GATES[node.gate].setup,
        forward_lines=_forward_lines(node), backward_lines=_backward_lines(node))


def unsupported(node: LinearState) -> str | None:
    """Why `node` has no backward kernel, or None."""
    if node.block is not None:
        return f"rule {node.rule!r} ({node.catalog_id}) has no backward kernel"
    if node.feature_map not in ("identity", "elu1"):
        return f"feature map {node.feature_map!r} has no backward kernel (identity, elu1 do)"
    return None


class TritonLinearBackward(GeneratedKernel):
    """One LinearState's backward kernel. block_v: value columns per program (a power of two
    >= 16; default `select_tiles_linear.backward_value_block`); chunk: tokens per checkpoint (a
    power of two; default `select_tiles_linear.backward_chunk` of the longest sequence: one
    compiled variant per chunk size)."""

    def __init__(self, node: LinearState, *, block_v: int | None = None,
                 chunk: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise TypeError(f"node: expected a LinearState, got {type(node).__name__}")
        if (why := unsupported(node)) is not None:
            raise NotImplementedError(f"TritonLinearBackward: {why}; differentiate "
                                      "reference_linear.recurrent_reference instead")
        check_power_of_two("block_v", block_v, 16)
        check_power_of_two("chunk", chunk, 1)
        self.node, self.block_v, self.chunk = node, block_v, chunk
        name = kernel_name(node, "backward")
        self.kernel = CachedSource(source_key(node, TEMPLATES, BACKEND), name,
                                   lambda: {"kernel.py": render(node).encode()},
                                   {"backend": BACKEND, "spec": node.text()})
        self.name, self.entry = self.kernel.name, self.kernel.entry

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None, d_final_state: Tensor | None = None,
                 cu_seqlens: Tensor | None = None, o: Tensor | None = None
                 ) -> dict[str, Tensor | None]:
        """Gradients for o = f(q, k, v, g, beta, initial_state) given do (o's shape) and the
        final state's gradient (fp32 [B or N, H, F, Dv'] or None). Shapes as the forward's
        (`TritonRecurrentLinear.__call__`); with the normaliser, `o` is the forward's output.
        Returns {"q", "k", "v", "g", "beta", "initial_state"}: each in its input's dtype and
        shape (None for absent inputs)."""
        node = self.node
        run = prepare_backward(node, q, k, v, do, g=g, beta=beta, scale=scale,
                               initial_state=initial_state, d_final_state=d_final_state,
                               cu_seqlens=cu_seqlens, o=o)
        qv, kv, vv, dov, gv, bv, nb, cu = (run.q, run.k, run.v, run.do, run.g, run.beta, run.nb,
                                           run.cu)
        varlen, max_len, s0, dsn, scale = run.varlen, run.max_len, run.s0, run.dsn, run.scale
        Bv, H, Lv, Dk = qv.shape
        dev, f32 = q.device, torch.float32
        Dv = vv.shape[-1]
        state_shape = [nb, H, Dk, Dv]
        dv_block = backward_value_block(Dk, Dv, self.block_v)
        nv = -(-Dv // dv_block) if Dv > 0 else 0
        chunk = self.chunk or backward_chunk(max_len)
        f_pad, nch = padded(Dk), max(1, -(-max_len // chunk))
        nprog = nb * H * nv
        ck = torch.empty(nprog * nch * f_pad * dv_block, dtype=f32, device=dev)
        scr = torch.empty(nprog * chunk * f_pad * dv_block, dtype=f32, device=dev)
        dq_p = torch.zeros(nv, Bv, H, Lv, Dk, dtype=f32, device=dev)
        dk_p = torch.zeros_like(dq_p)
        dg_axes = node.input_axes("g") or ()  # the gate's partials: per key dim for a vector one
        dg_p = torch.zeros_like(dq_p) if "Dk" in dg_axes else \
            torch.zeros(nv, Bv, H, Lv, dtype=f32, device=dev)
        db_p = torch.zeros(nv, Bv, H, Lv, dtype=f32, device=dev)
        dvv = torch.zeros(Bv, H, Lv, Dv, dtype=f32, device=dev)
        ds0 = torch.zeros(state_shape, dtype=f32, device=dev)
        g32 = None if gv is None else gv.to(f32)
        b32 = None if bv is None else bv.to(f32)
        lam = run.lam

        def strides(x: Tensor | None, n: int) -> list[int]:
            return view_strides(x, n, varlen)

        def part(x: Tensor) -> list[int]:  # [NV, B, H, L, ...]: no batch stride when varlen
            st = list(x.stride())[:4]
            return [st[0], 0, *st[2:]] if varlen else st

        if nprog > 0 and max_len > 0:
            self.jit_function()[(nb * H, nv)](
                qv, kv, vv, dov, q if g32 is None else g32, q if b32 is None else b32,
                q if lam is None else lam, ds0 if s0 is None else s0,
                ds0 if dsn is None else dsn, ck, scr, dq_p, dk_p, dvv, dg_p, db_p, ds0,
                q if cu is None else cu,
                *strides(qv, 4), *strides(kv, 4), *strides(vv, 4), *strides(dov, 4),
                *strides(g32, 4), *strides(b32, 3), *ds0.stride(), *part(dq_p), *part(db_p),
                *strides(dvv, 4), H, Lv, nch,
                scale,
                D_K=Dk, D_V=Dv, F_PAD=f_pad, DV_BLOCK=dv_block, CHUNK=chunk,
                HAS_INITIAL=s0 is not None, HAS_DFINAL=dsn is not None, VARLEN=varlen)
        elif dsn is not None:  # nothing to step through: the final state is the initial one
            ds0.copy_(dsn)

        def back(x: Tensor, like: Tensor) -> Tensor:
            return to_input_layout(x, like, varlen)

        grads = {"q": back(dq_p.sum(0), q), "k": back(dk_p.sum(0), k),
                 "v": back(dvv[..., :v.shape[-1]], v),
                 "g": None if g is None else back(dg_p.sum(0), g),
                 "beta": None if beta is None else back(db_p.sum(0), beta),
                 "initial_state": None if initial_state is None else ds0.to(initial_state.dtype)}
        return grads


class BackwardInputs(NamedTuple):
    """A backward call's checked inputs as [Bv, H, Lv, .] views (Bv = 1 when packed: `cu`
    holds the int32 offsets; `nb` sequences or batch entries), `max_len` the longest sequence,
    s0 / dsn the fp32 initial state and final-state gradient (or None), lam the fp32 per-head
    decays (or None), `scale` resolved. With the normaliser, v and do are already augmented
    (`backward_norm.augment`: v' = [v, 1], do' fp32)."""

    q: Tensor
    k: Tensor
    v: Tensor
    do: Tensor
    g: Tensor | None
    beta: Tensor | None
    nb: int
    cu: Tensor | None
    varlen: bool
    max_len: int
    s0: Tensor | None
    dsn: Tensor | None
    lam: Tensor | None
    scale: float


def prepare_backward(node: LinearState, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *,
                     g: Tensor | None, beta: Tensor | None, scale: float | None,
                     initial_state: Tensor | None, d_final_state: Tensor | None,
                     cu_seqlens: Tensor | None, o: Tensor | None) -> BackwardInputs:
    """Check a backward call's inputs (ValueError before any launch) and lay them out as the
    backward kernels read them (shared by the token sweep and the chunked backward)."""
    varlen = cu_seqlens is not None
    if varlen:
        qv, kv, vv, gv, bv, nb = varlen_views(q, k, v, node, g, beta, initial_state,
                                              cu_seqlens)
        cu = cu_seqlens.to(q.device, torch.int32)
        lengths = cu[1:] - cu[:-1]
        max_len = int(lengths.max().item()) if nb > 0 else 0
    else:
        check_inputs(q, k, v, node, g, beta, initial_state)
        qv, kv, vv, gv, bv, nb, cu = q, k, v, g, beta, q.shape[0], None
        max_len = q.shape[2]
    dov = do.transpose(0, 1).unsqueeze(0) if varlen else do
    if list(dov.shape) != list(vv.shape):
        raise ValueError(f"do: expected o's shape {list(v.shape)}, got {list(do.shape)}")
    H, Dk = qv.shape[1], qv.shape[3]
    dev, f32 = q.device, torch.float32
    s0 = None if initial_state is None else initial_state.to(dev, f32).contiguous()
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    if node.normalize:  # the additive rule's kernel on v' = [v, 1] (its z column)
        if o is None or list(o.shape) != list(do.shape):
            got = None if o is None else list(o.shape)
            raise ValueError(f"o: expected the forward's output {list(do.shape)} for "
                             f"normalize=True, got {got}")
        ov = o.transpose(0, 1).unsqueeze(0) if varlen else o
        vv, dov = augment(node, qv, kv, vv, dov, ov, s0, scale, cu)
    state_shape = [nb, H, Dk, vv.shape[-1]]
    if d_final_state is not None and list(d_final_state.shape) != state_shape:
        raise ValueError(f"d_final_state: expected {state_shape}, "
                         f"got {list(d_final_state.shape)}")
    dsn = None if d_final_state is None else d_final_state.to(dev, f32).contiguous()
    lam = None
    if node.decay is not None:
        vals = node.decay if isinstance(node.decay, tuple) else (node.decay,) * H
        lam = torch.tensor(vals, dtype=f32, device=dev)
    return BackwardInputs(qv, kv, vv, dov, gv, bv, nb, cu, varlen, max_len, s0, dsn, lam, scale)


def view_strides(x: Tensor | None, n: int, varlen: bool) -> list[int]:
    """x's first n strides (zeros for None); packed views have no batch stride (the launch's
    batch axis is the sequence index)."""
    if x is None:
        return [0] * n
    st = (list(x.stride()) + [0])[:n]
    return [0] + st[1:] if varlen else st


def to_input_layout(x: Tensor, like: Tensor, varlen: bool) -> Tensor:
    """A gradient in view shape [Bv, H, Lv, ...] back to its input's layout and dtype."""
    if varlen:  # [1, H, T, ...] -> [T, H, ...]
        x = x[0].transpose(0, 1)
    return x.to(like.dtype).reshape(like.shape)
