"""Gradients of the additive linear rules L1-L4 (docs/catalog.md) in chunked (matrix) form, as
flash-linear-attention computes them: two generated Triton kernels.

1. `linear_backward_states.py.j2`, grid (B * H or N * H, cdiv(Dv, DV_BLOCK)): the sequential
   part, one chunk per step. A forward sweep stores the state before every chunk (and the final
   state), then a reverse sweep stores the state's gradient at every chunk boundary (fla's
   `chunk_fwd_h` + `chunk_bwd_dh`); both are one [Dk, C] x [C, DV_BLOCK] product per chunk.
2. `linear_backward_chunked.py.j2`, grid (chunks, B * H) (varlen: (all chunks, H)): every
   chunk's dq, dk, dv and the gate's gradient at once (fla's `chunk_bwd_dqkwg` +
   `chunk_bwd_dv`), the gate's by the cumulative-sum identity dg_s = sum_{t >= s} (q_t dq_t -
   k_t dk_t) + (the state after the chunk) . (its gradient).

Supported: linear (L1; phi identity or elu1, with or without the normaliser through
`backward_norm.augment`), decay (L2), scalar_gate (L3), vector_gate (L4); dense or packed varlen
inputs; initial state and final-state gradient. The delta rules (L5, L6), taylor2 and L7 are not
here (`unsupported_chunked`): the family routes L5 / L6 to the chunked WY backward
(`backward_delta.TritonDeltaChunkedBackward`), the others to the reference
(docs/performance.md).

Memory besides the gradients: the states and their gradients at every chunk boundary, fp32
[chunks + sequences, H, Dk, Dv] each. Dot operands are the inputs' 16-bit type on a GPU (fp32
accumulation, states kept fp32 between chunks); fp32 under the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from attncc import config
from attncc.backends.keys import triton_type
from attncc.backends.triton.aot import CompiledArtifact, compile_artifact
from attncc.backends.triton.linear.backward import (prepare_backward, to_input_layout,
                                                    view_strides)
from attncc.backends.triton.linear.recurrent import check_power_of_two, kernel_name, source_key
from attncc.backends.triton.source import CachedSource, GeneratedKernel
from attncc.backends.triton.templating import environment
from attncc.ir.linear import LinearState
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import backward_chunked_chunk, backward_chunked_tiles

BACKEND = "triton-linear-backward-chunked"
TEMPLATE_STATES = "linear_backward_states.py.j2"
TEMPLATE_DQK = "linear_backward_dqk.py.j2"
TEMPLATE_DV = "linear_backward_dv.py.j2"
TEMPLATES = (TEMPLATE_STATES, TEMPLATE_DQK, TEMPLATE_DV, "linear_backward_chunk.py.j2",
             "helpers.py.j2")
DK_MAX = 256  # the key dim is never split: [CHUNK, DK_PAD] fp32 tiles per program
# gates are summed clamped at -GATE_FLOOR, as the forward chunked kernel sums them: e^-128 is 0
# in fp32 (a factor across a clamped gate is exactly 0) and -inf never meets -inf
GATE_FLOOR = 128.0

_LOAD = ("{x}_{suffix} = tl.load({x}_base + rows[:, None] * stride_{x}l, mask=mask_q, "
         "other=0.0).to(tl.float32)")
_ELU1 = "{x}_c = tl.where(mask_q, tl.where({x}_raw > 0, {x}_raw + 1.0, tl.exp({x}_raw)), 0.0)"
_DELU1 = "d{x} = d{x} * tl.where({x}_raw > 0, 1.0, tl.exp({x}_raw))"  # elu1'(x)
_DOT = "input_precision=DOT_PRECISION"
_CUMSUM = [f"b = tl.cumsum(tl.maximum(g_c, -{GATE_FLOOR}), 0)  # inclusive",
           "b_last = tl.min(b, 0)  # padded rows carry g = 0: the last real token's b"]
_LOAD_G = "g_c = tl.load(g_base + rows * stride_gl, mask=mask_t, other=0.0).to(tl.float32)"
_LOAD_G_VEC = ("g_c = tl.load(g_base + rows[:, None] * stride_gl + offs_k[None, :] * stride_gd, "
               "mask=mask_q, other=0.0).to(tl.float32)")
# (dA * D) for the vector gate, one key token j at a time: exponents relative to token j
_VECTOR_TOKEN = [
    "    sel = offs_c == j",
    "    k_j = tl.sum(tl.where(sel[:, None], k_c, 0.0), 0)",
    "    b_j = tl.sum(tl.where(sel[:, None], b, 0.0), 0)",
    "    e_j = tl.exp(tl.minimum(b - b_j[None, :], 0.0))  # rows t >= j: e^{b_t - b_j} <= 1",
]


class GateLines(NamedTuple):
    """How one gate kind enters the kernels: `setup` before the loops; `loads` per chunk
    (leaving b and b_last); `forward` / `backward` the states kernel's update of S / dS;
    `scores` the dv kernel's A and k_w (the keys decayed to the chunk's end); `grads` the dqk
    kernel's dq, dk from the value-loop sums; `dg_pre` / `dg_post` its gate gradient before and
    after them (L3, L4: the gate is an input; empty otherwise)."""

    setup: list[str]
    loads: list[str]
    forward: list[str]
    backward: list[str]
    scores: list[str]
    grads: list[str]
    dg_pre: list[str]
    dg_post: list[str]


_NONE = GateLines(
    [], [],
    [f"S = tl.dot(tl.trans(k_c.to(DT)), v_c.to(DT), S, {_DOT})"],
    [f"dS = tl.dot(tl.trans((q_c * scale).to(DT)), do_c.to(DT), dS, {_DOT})"],
    [f"A = tl.dot(q_c.to(DT), tl.trans(k_c.to(DT)), {_DOT})",
     "A = tl.where(causal, A * scale, 0.0)",
     "k_w = k_c"],
    [f"dq = tl.dot(dA.to(DT), k_c.to(DT), dq * scale, {_DOT})",
     f"dk = tl.dot(tl.trans(dA.to(DT)), q_c.to(DT), dk, {_DOT})"],
    [], [])
_DECAY = ("decay = tl.where(causal, tl.exp(tl.where(causal, b[:, None] - b[None, :], 0.0)), "
          "0.0)")
_SCALAR_UPDATES = dict(
    forward=["k_w = k_c * tl.exp(b_last - b)[:, None]",
             f"S = tl.dot(tl.trans(k_w.to(DT)), v_c.to(DT), S * tl.exp(b_last), {_DOT})"],
    backward=["q_w = q_c * (scale * tl.exp(b))[:, None]",
              f"dS = tl.dot(tl.trans(q_w.to(DT)), do_c.to(DT), dS * tl.exp(b_last), {_DOT})"],
    scores=[_DECAY,
            f"A = tl.dot(q_c.to(DT), tl.trans(k_c.to(DT)), {_DOT}) * decay * scale",
            "k_w = k_c * tl.exp(b_last - b)[:, None]"],
    grads=[_DECAY,
           "dA = dA * decay",
           f"dq = tl.dot(dA.to(DT), k_c.to(DT), dq * (scale * tl.exp(b))[:, None], {_DOT})",
           f"dk = tl.dot(tl.trans(dA.to(DT)), q_c.to(DT), dk * tl.exp(b_last - b)[:, None], "
           f"{_DOT})"])
# rowsum(h_{c+1} * dh_{c+1}) = e^{b_C} rowsum(h_c * dh_{c+1}) + colsum(k_w * (V dh_{c+1}^T)),
# the second sum taken while dk still holds V dh^T
_DG_PRE = "dgl = dgl * tl.exp(b_last) + tl.sum(k_w * dk, 0)"
_SCALAR_DG = (
    ["k_w = k_c * tl.exp(b_last - b)[:, None]", _DG_PRE],
    ["dg = tl.cumsum(tl.sum(q_c * dq - k_c * dk, 1), 0, reverse=True) + tl.sum(dgl, 0)",
     "tl.store(DG + pid_k * stride_en + off_b * stride_eb + off_h * stride_eh "
     "+ (bos + rows) * stride_el, dg, mask=mask_t)  # partial sums over key blocks"])
_VECTOR_DG = (
    ["k_w = k_c * tl.exp(b_last[None, :] - b)", _DG_PRE],
    ["dg = tl.cumsum(q_c * dq - k_c * dk, 0, reverse=True) + dgl[None, :]",
     "tl.store(DG + off_b * stride_eb + off_h * stride_eh + (bos + rows)[:, None] * stride_el "
     "+ offs_k[None, :] * stride_ed, dg, mask=mask_q)"])
_VECTOR = GateLines(
    [], [_LOAD_G_VEC, *_CUMSUM],
    ["k_w = k_c * tl.exp(b_last[None, :] - b)",
     f"S = tl.dot(tl.trans(k_w.to(DT)), v_c.to(DT), S * tl.exp(b_last)[:, None], {_DOT})"],
    ["q_w = q_c * scale * tl.exp(b)",
     f"dS = tl.dot(tl.trans(q_w.to(DT)), do_c.to(DT), dS * tl.exp(b_last)[:, None], {_DOT})"],
    ["A = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)",
     "for j in range(0, CHUNK):",
     *_VECTOR_TOKEN,
     "    A = tl.where(sel[None, :] & causal, tl.sum(q_c * k_j[None, :] * e_j, 1)[:, None], A)",
     "A = A * scale",
     "k_w = k_c * tl.exp(b_last[None, :] - b)"],
    ["dq = dq * scale * tl.exp(b)",
     "dk = dk * tl.exp(b_last[None, :] - b)",
     "for j in range(0, CHUNK):",
     *_VECTOR_TOKEN,
     "    da_j = tl.sum(tl.where(sel[None, :], dA, 0.0), 1)  # column j (rows t >= j)",
     "    dq += da_j[:, None] * k_j[None, :] * e_j",
     "    dk = tl.where(sel[:, None], dk + tl.sum(da_j[:, None] * q_c * e_j, 0)[None, :], dk)"],
    *_VECTOR_DG)

# gate kind -> its lines
_GATES: dict[str, GateLines] = {
    "none": _NONE,
    "constant": GateLines(["log_lam = tl.log(tl.load(LAM + off_h).to(tl.float32))"],
                          ["g_c = tl.where(mask_t, log_lam, 0.0)", *_CUMSUM],
                          dg_pre=[], dg_post=[], **_SCALAR_UPDATES),
    "scalar": GateLines([], [_LOAD_G, *_CUMSUM], dg_pre=_SCALAR_DG[0], dg_post=_SCALAR_DG[1],
                        **_SCALAR_UPDATES),
    "vector": _VECTOR,
}
# the gate's gradient: e^{b_C} rowsum(h_c * dh_{c+1}) summed over the value blocks, then _DG_PRE
_DG_INIT = ["dgl = tl.zeros([BLOCK_K], dtype=tl.float32)"]
_DG_STEP = ["dgl += tl.sum(h * dh, 1)"]


def unsupported_chunked(node: LinearState) -> str | None:
    """Why `node` has no chunked backward, or None (additive L1-L4, phi identity or elu1)."""
    if node.write != "additive" or node.block is not None:
        return f"rule {node.rule!r} ({node.catalog_id}) has no chunked backward"
    if node.feature_map not in ("identity", "elu1"):
        return f"feature map {node.feature_map!r} has no chunked backward (identity, elu1 do)"
    return None


def _phi(node: LinearState, x: str) -> list[str]:
    """Lines loading phi(x) of one chunk as `{x}_c` [CHUNK, DK_PAD] fp32 (`{x}_raw`: x)."""
    if node.feature_map == "elu1":
        return [_LOAD.format(x=x, suffix="raw"), _ELU1.format(x=x)]
    return [_LOAD.format(x=x, suffix="c")]


def render_states(node: LinearState) -> str:
    """Triton source of the state-sweep kernel for `node`."""
    gate = _GATES[node.gate]
    return environment().get_template(TEMPLATE_STATES).render(
        kernel_name=kernel_name(node, "backward_states"), node_text=node.text(),
        setup_lines=gate.setup, gate_lines=gate.loads, key_lines=_phi(node, "k"),
        query_lines=_phi(node, "q"), forward_lines=gate.forward, backward_lines=gate.backward)


def render_dqk(node: LinearState) -> str:
    """Triton source of the chunk-parallel dq, dk (and dg) kernel for `node`."""
    gate = _GATES[node.gate]
    grads = [*gate.dg_pre, *gate.grads, *gate.dg_post]
    if node.feature_map == "elu1":
        grads += [_DELU1.format(x="q"), _DELU1.format(x="k")]
    return environment().get_template(TEMPLATE_DQK).render(
        kernel_name=kernel_name(node, "backward_dqk"), node_text=node.text(),
        setup_lines=gate.setup, query_lines=_phi(node, "q"), key_lines=_phi(node, "k"),
        gate_lines=gate.loads, gate_grad_init=_DG_INIT if gate.dg_post else [],
        gate_grad_step=_DG_STEP if gate.dg_post else [], grad_lines=grads)


def render_dv(node: LinearState) -> str:
    """Triton source of the chunk-parallel dv kernel for `node`."""
    gate = _GATES[node.gate]
    return environment().get_template(TEMPLATE_DV).render(
        kernel_name=kernel_name(node, "backward_dv"), node_text=node.text(),
        setup_lines=gate.setup, query_lines=_phi(node, "q"), key_lines=_phi(node, "k"),
        gate_lines=gate.loads, score_lines=gate.scores)


class ChunkTable(NamedTuple):
    """Where chunks and their state slots are: `soff` int32 [N] (sequence n's first slot; it
    has chunks + 1), `cidx` int32 [chunks, 2] (sequence, chunk within it; varlen only),
    `chunks` along the chunk kernel's grid axis, `slots` in all."""

    soff: Tensor
    cidx: Tensor | None
    chunks: int
    slots: int


def chunk_table(nb: int, max_len: int, chunk: int, cu: Tensor | None,
                device: torch.device) -> ChunkTable:
    """The chunk table of a dense batch (nb sequences of max_len) or of packed sequences
    (cu: int32 offsets [N + 1]): O(N) tensor ops, one host sync when packed."""
    if cu is None:
        nch = -(-max_len // chunk)
        soff = torch.arange(nb, device=device, dtype=torch.int32) * (nch + 1)
        return ChunkTable(soff, None, nch, nb * (nch + 1))
    counts = (cu[1:] - cu[:-1] + chunk - 1).div(chunk, rounding_mode="floor").long()
    first = torch.cumsum(counts, 0) - counts  # the sequence's first chunk
    total = int(counts.sum().item())
    seq = torch.repeat_interleave(torch.arange(nb, device=device), counts)
    within = torch.arange(total, device=device) - first[seq]
    cidx = torch.stack([seq, within], 1).to(torch.int32).contiguous()
    soff = (first + torch.arange(nb, device=device)).to(torch.int32)
    return ChunkTable(soff, cidx, total, total + nb)


def _source(node: LinearState, part: str, render: Any) -> CachedSource:
    backend = f"{BACKEND}-{part}"
    return CachedSource(source_key(node, TEMPLATES, backend), kernel_name(node, f"backward_{part}"),
                        lambda: {"kernel.py": render(node).encode()},
                        {"backend": backend, "spec": node.text()})


class ChunkStart(NamedTuple):
    """What a chunked backward call sets up before its launches: the prepared inputs, head dims,
    whether it runs interpreted, the chunk length and table, and the fp32 state buffers (the
    state before each chunk, its gradient, and the initial state's gradient)."""

    run: Any
    dk: int
    dv: int
    interpreted: bool
    chunk: int
    table: ChunkTable
    hs: Tensor
    dhs: Tensor
    ds0: Tensor


class ChunkedBackwardBase(GeneratedKernel):
    """What the additive and the delta-rule chunked backwards share: the constructor's checks,
    the chunk length, and `start`, a call's set-up. A subclass names the rules it covers with
    `why_unsupported` (None: covered) and the kernel whose key dim is untiled with `untiled`."""

    why_unsupported: Callable[[LinearState], str | None]
    untiled: str

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise TypeError(f"node: expected a LinearState, got {type(node).__name__}")
        if (why := type(self).why_unsupported(node)) is not None:
            raise NotImplementedError(f"{type(self).__name__}: {why}")
        check_power_of_two("chunk", chunk, 16)
        check_power_of_two("block_v", block_v, 16)
        self.node, self.chunk, self.block_v = node, chunk, block_v

    def chunk_for(self, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        return backward_chunked_chunk(self.node, device.type != "cuda" or config.triton_interpret())

    def start(self, q: Tensor, k: Tensor, v: Tensor, do: Tensor, **inputs: Any) -> ChunkStart:
        """Check and lay out the inputs (`backward.prepare_backward`), then the chunk table and
        the state buffers every chunked backward fills."""
        run = prepare_backward(self.node, q, k, v, do, **inputs)
        H, Dk, Dv = run.q.shape[1], run.q.shape[-1], run.v.shape[-1]
        if Dk > DK_MAX:
            raise ValueError(f"q: expected head dim Dk <= {DK_MAX} for the chunked backward (the "
                             f"key dim of {self.untiled} is not tiled), got {Dk}")
        dev = q.device
        chunk = self.chunk_for(dev)
        table = chunk_table(run.nb, run.max_len, chunk, run.cu, dev)
        hs = torch.empty(table.slots, H, Dk, Dv, dtype=torch.float32, device=dev)
        return ChunkStart(run, Dk, Dv, dev.type != "cuda" or config.triton_interpret(), chunk,
                          table, hs, torch.empty_like(hs),
                          torch.zeros(run.nb, H, Dk, Dv, dtype=torch.float32, device=dev))


class TritonChunkedLinearBackward(ChunkedBackwardBase):
    """One additive LinearState's chunked backward: three kernels, `states` (the sweep), `dqk`
    (also `kernel`) and `dv`. chunk: tokens per chunk (a power of two >= 16); block_v: value
    columns per program or loop step (a power of two >= 16); defaults from
    `select_tiles_linear.backward_chunked_chunk` / `backward_chunked_value_block`."""

    why_unsupported = staticmethod(unsupported_chunked)
    untiled = "the dv kernel"

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        super().__init__(node, chunk=chunk, block_v=block_v)
        self.states = _source(node, "states", render_states)
        self.dqk = self.kernel = _source(node, "dqk", render_dqk)
        self.dv = _source(node, "dv", render_dv)
        self.name, self.entry = self.kernel.name, self.kernel.entry

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None, d_final_state: Tensor | None = None,
                 cu_seqlens: Tensor | None = None, o: Tensor | None = None
                 ) -> dict[str, Tensor | None]:
        """As `backward.TritonLinearBackward.__call__` (same arguments, same results)."""
        run, Dk, Dv, interpreted, chunk, table, hs, dhs, ds0 = self.start(
            q, k, v, do, g=g, beta=beta, scale=scale, initial_state=initial_state,
            d_final_state=d_final_state, cu_seqlens=cu_seqlens, o=o)
        Bv, H, Lv, _ = run.q.shape
        dev, f32, varlen = q.device, torch.float32, run.varlen
        tiles = backward_chunked_tiles(Dk, Dv, self.block_v)
        nk, nv = -(-Dk // tiles.block_k), -(-Dv // tiles.block_v)
        dq = torch.zeros(Bv, H, Lv, Dk, dtype=q.dtype, device=dev)
        dk = torch.zeros_like(dq)
        dvv = torch.zeros(Bv, H, Lv, Dv, dtype=v.dtype, device=dev)
        g32 = None if run.g is None else run.g.to(f32)
        # the vector gate's gradient is whole per key block; a scalar one's is summed over them
        dg = None if g32 is None else torch.zeros(
            (1 if g32.dim() == 4 else nk, *g32.shape), dtype=f32, device=dev)
        common = {"D_K": Dk, "D_V": Dv, "DV_BLOCK": tiles.block_v, "CHUNK": chunk,
                  "DOT_PRECISION": "ieee" if interpreted or q.dtype == f32 else "tf32",
                  "DOT16": not interpreted, "num_stages": tiles.num_stages}
        warps = tiles.num_warps
        anyp = run.q  # a pointer for absent tensors (never read)
        gp = anyp if g32 is None else g32
        lam = anyp if run.lam is None else run.lam
        cu = anyp if run.cu is None else run.cu
        cidx = anyp if table.cidx is None else table.cidx

        def st(x: Tensor | None, n: int = 4) -> list[int]:
            return view_strides(x, n, varlen)

        if run.nb * H > 0 and Dv > 0 and Dk > 0:
            self.states.jit_function()[(run.nb * H, nv)](
                run.q, run.k, run.v, run.do, gp, lam, ds0 if run.s0 is None else run.s0,
                ds0 if run.dsn is None else run.dsn, hs, dhs, ds0, cu, table.soff,
                *st(run.q), *st(run.k), *st(run.v), *st(run.do), *st(g32), *ds0.stride(),
                H, Lv, run.scale, DK_PAD=padded(Dk), **common, num_warps=warps["states"],
                HAS_INITIAL=run.s0 is not None, HAS_DFINAL=run.dsn is not None, VARLEN=varlen)
        elif run.dsn is not None:
            ds0.copy_(run.dsn)
        if table.chunks > 0 and H > 0 and Dv > 0 and Dk > 0:
            bh = H if varlen else run.nb * H
            dg_st = [0, 0, 0, 0, 0] if dg is None else [dg.stride(0), *st(dg[0])]
            self.dqk.jit_function()[(nk, table.chunks, bh)](
                run.q, run.k, run.v, run.do, gp, lam, hs, dhs, dq, dk,
                dq if dg is None else dg, cu, table.soff, cidx,
                *st(run.q), *st(run.k), *st(run.v), *st(run.do), *st(g32), *st(dq), *dg_st,
                H, Lv, run.scale, BLOCK_K=tiles.block_k, **common, num_warps=warps["dqk"],
                VARLEN=varlen)
            self.dv.jit_function()[(nv, table.chunks, bh)](
                run.q, run.k, run.do, gp, lam, dhs, dvv, cu, table.soff, cidx,
                *st(run.q), *st(run.k), *st(run.do), *st(g32), *st(dvv),
                H, Lv, run.scale, DK_PAD=padded(Dk), **common, num_warps=warps["dv"],
                VARLEN=varlen)
        return {"q": to_input_layout(dq, q, varlen), "k": to_input_layout(dk, k, varlen),
                "v": to_input_layout(dvv[..., :v.shape[-1]], v, varlen),
                "g": None if g is None else to_input_layout(dg.sum(0), g, varlen),
                "beta": None,
                "initial_state": None if initial_state is None
                else ds0.to(initial_state.dtype)}


def compile_chunked_backward_for_target(kernel: TritonChunkedLinearBackward, part: str, arch: int,
                                        dtype: str, head_dim_k: int, head_dim_v: int, *,
                                        varlen: bool = False, chunk: int | None = None
                                        ) -> CompiledArtifact:
    """Compile one part ("states", "dqk" or "dv") of a chunked backward for sm_<arch> with the
    launch's arguments: q/k/v/do and dq/dk/dv are `dtype` (do fp32 with the normaliser); gates,
    decays, states and dg fp32; offsets int32. `head_dim_v` is v's (the z column is added here
    when normalising)."""
    node = kernel.node
    t = "*" + triton_type(dtype)
    dv = node.state_dv(head_dim_v)
    tiles = backward_chunked_tiles(head_dim_k, dv, kernel.block_v)
    do = "*fp32" if node.normalize else t
    bhld = "bhld"
    if part == "states":
        pointers = {"Q": t, "K": t, "V": t, "DO": do, "G": "*fp32", "LAM": "*fp32",
                    **{n: "*fp32" for n in ("S0", "DSN", "HS", "DHS", "DS0")},
                    "CU": "*i32", "SOFF": "*i32"}
        strides = [f"stride_{x}{d}" for x in "qkvog" for d in bhld] + \
            [f"stride_s{d}" for d in "bhfv"]
        extra: dict[str, Any] = {"DK_PAD": padded(head_dim_k)}
        flags = {"HAS_INITIAL": True, "HAS_DFINAL": True}
        source = kernel.states
    elif part == "dqk":
        pointers = {"Q": t, "K": t, "V": t, "DO": do, "G": "*fp32", "LAM": "*fp32",
                    "HS": "*fp32", "DHS": "*fp32", "DQ": t, "DK": t, "DG": "*fp32", "CU": "*i32",
                    "SOFF": "*i32", "CIDX": "*i32"}
        strides = [f"stride_{x}{d}" for x in "qkvogx" for d in bhld] + \
            [f"stride_e{d}" for d in "nbhld"]
        extra, flags, source = {"BLOCK_K": tiles.block_k}, {}, kernel.dqk
    elif part == "dv":
        pointers = {"Q": t, "K": t, "DO": do, "G": "*fp32", "LAM": "*fp32", "DHS": "*fp32",
                    "DV": t, "CU": "*i32", "SOFF": "*i32", "CIDX": "*i32"}
        strides = [f"stride_{x}{d}" for x in "qkogw" for d in bhld]
        extra, flags, source = {"DK_PAD": padded(head_dim_k)}, {}, kernel.dv
    else:
        raise ValueError(f"part: expected 'states', 'dqk' or 'dv', got {part!r}")
    signature = {**pointers, **{name: "i32" for name in strides}, "H": "i32", "L": "i32",
                 "scale": "fp32"}
    chunk = chunk or kernel.chunk or backward_chunked_chunk(node, False)
    constexprs = {"D_K": head_dim_k, "D_V": dv, **extra, "DV_BLOCK": tiles.block_v,
                  "CHUNK": chunk, "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32",
                  "DOT16": True, **flags, "VARLEN": varlen}  # in the kernels' order
    launch = Schedule(num_warps=tiles.num_warps[part], num_stages=tiles.num_stages)
    # the JIT's specialisation of a contiguous launch: a stride of 1 is a constexpr, one that
    # is a multiple of 16 gets the divisibility hint (`contiguous_strides`)
    values = contiguous_strides(node, head_dim_k, dv, tiles.block_k, varlen)
    unit = {n: 1 for n in strides if values[n] == 1}
    divisible = [n for n in strides if n not in unit and values[n] % 16 == 0]
    constexprs.update(unit)
    job = {"path": str(source.entry.files["kernel.py"]), "name": source.name,
           "aligned": list(pointers), "divisible": divisible}
    return compile_artifact(job, arch, signature, constexprs, launch,
                            f"{part}, {dtype}, head dims {head_dim_k}/{head_dim_v}, chunk {chunk}, "
                            f"varlen {varlen}", dtype=dtype, head_dims=(head_dim_k, head_dim_v))


def contiguous_strides(node: LinearState, dk: int, dv: int, block_k: int, varlen: bool,
                        heads: int = 16, length: int = 4096) -> dict[str, int]:
    """Every stride argument's value in a launch on contiguous inputs (dense [2, heads, length,
    D] or packed [T, heads, D]; `length` a multiple of 16), by name."""
    def rows(d: int) -> tuple[int, int, int, int]:  # [b, h, l, d] of a [B, H, L, d] tensor
        return (0, d, heads * d, 1) if varlen else (heads * length * d, length * d, d, 1)

    gate = node.input_axes("g") or ()
    g = rows(dk) if "Dk" in gate else (0, 0, 0, 0)
    if g[0] == 0 and "L" in gate:  # a scalar gate [B, H, L] (packed [T, H])
        g = (0, 1, heads, 0) if varlen else (heads * length, length, 1, 0)
    o = rows(dv) if not node.normalize else rows(dv + 1)  # do' is fp32 [.., Dv + 1]
    # dg: fp32 [NK, Bv, H, Lv] (scalar gate) or [1, Bv, H, Lv, Dk], head-major when packed
    b = 0 if varlen else heads * length
    e = (0, b * dk, length * dk, dk, 1) if "Dk" in gate else (2 * b, b, length, 1, 0)
    out = {}
    for x, d in (("q", rows(dk)), ("k", rows(dk)), ("v", rows(dv)), ("o", o), ("g", g),
                 ("x", rows(dk)), ("w", rows(dv))):
        out.update({f"stride_{x}{a}": n for a, n in zip("bhld", d)})
    out.update({f"stride_e{a}": n for a, n in zip("nbhld", e)})
    out.update({f"stride_s{a}": n for a, n in zip("bhfv", (heads * dk * dv, dk * dv, dv, 1))})
    return out
