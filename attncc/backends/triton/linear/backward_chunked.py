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
here (`unsupported_chunked`): the family routes L5 / L6 to the token sweep
(`backward.TritonLinearBackward`), the others to the reference (docs/performance.md).

Memory besides the gradients: the states and their gradients at every chunk boundary, fp32
[chunks + sequences, H, Dk, Dv] each. Dot operands are the inputs' 16-bit type on a GPU (fp32
accumulation, states kept fp32 between chunks); fp32 under the interpreter.
"""

from __future__ import annotations

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
from attncc.passes.select_tiles_linear import (BACKWARD_CHUNKED_NUM_WARPS, backward_chunked_chunk,
                                               backward_chunked_value_block)

BACKEND = "triton-linear-backward-chunked"
TEMPLATE_STATES = "linear_backward_states.py.j2"
TEMPLATE_CHUNKS = "linear_backward_chunked.py.j2"
TEMPLATES = (TEMPLATE_STATES, TEMPLATE_CHUNKS, "helpers.py.j2")
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
    """How one gate kind enters both kernels. `flag`: "none", "scalar" (one log decay per
    token: L2, L3) or "vector" (L4); `setup` before the loops; `loads` per chunk (leaving b and
    b_last); `forward` / `backward` the states kernel's update of S / dS; `scores` the chunk
    kernel's A (and k_w, the keys decayed to the chunk's end); `grads` its dq, dk from the
    value-loop sums; `dg` computes and stores the gate's gradient (L3, L4: the gate is an
    input; empty otherwise)."""

    setup: list[str]
    loads: list[str]
    forward: list[str]
    backward: list[str]
    scores: list[str]
    grads: list[str]
    dg: list[str]


_NONE = GateLines(
    [], [],
    [f"S = tl.dot(tl.trans(k_c.to(DT)), v_c.to(DT), S, {_DOT})"],
    [f"dS = tl.dot(tl.trans((q_c * scale).to(DT)), do_c.to(DT), dS, {_DOT})"],
    [f"A = tl.dot(q_c.to(DT), tl.trans(k_c.to(DT)), {_DOT})",
     "A = tl.where(causal, A * scale, 0.0)",
     "k_w = k_c"],
    [f"dq = tl.dot(dA.to(DT), k_c.to(DT), dq * scale, {_DOT})",
     f"dk = tl.dot(tl.trans(dA.to(DT)), q_c.to(DT), dk, {_DOT})"],
    [])
_SCALAR_UPDATES = dict(
    forward=["k_w = k_c * tl.exp(b_last - b)[:, None]",
             f"S = tl.dot(tl.trans(k_w.to(DT)), v_c.to(DT), S * tl.exp(b_last), {_DOT})"],
    backward=["q_w = q_c * (scale * tl.exp(b))[:, None]",
              f"dS = tl.dot(tl.trans(q_w.to(DT)), do_c.to(DT), dS * tl.exp(b_last), {_DOT})"],
    scores=["decay = tl.where(causal, tl.exp(tl.where(causal, b[:, None] - b[None, :], 0.0)), "
            "0.0)",
            f"A = tl.dot(q_c.to(DT), tl.trans(k_c.to(DT)), {_DOT}) * decay * scale",
            "k_w = k_c * tl.exp(b_last - b)[:, None]"],
    grads=["dA = dA * decay",
           f"dq = tl.dot(dA.to(DT), k_c.to(DT), dq * (scale * tl.exp(b))[:, None], {_DOT})",
           f"dk = tl.dot(tl.trans(dA.to(DT)), q_c.to(DT), dk * tl.exp(b_last - b)[:, None], "
           f"{_DOT})"])
_SCALAR_DG = [
    "dg = tl.cumsum(tl.sum(q_c * dq - k_c * dk, 1), 0, reverse=True) + tl.sum(dgl, 0)",
    "tl.store(DG + off_b * stride_eb + off_h * stride_eh + (bos + rows) * stride_el, dg, "
    "mask=mask_t)"]
_VECTOR_DG = [
    "dg = tl.cumsum(q_c * dq - k_c * dk, 0, reverse=True) + dgl[None, :]",
    "tl.store(DG + off_b * stride_eb + off_h * stride_eh + (bos + rows)[:, None] * stride_el "
    "+ offs_k[None, :] * stride_ed, dg, mask=mask_q)"]
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
    _VECTOR_DG)

# gate kind -> its lines
_GATES: dict[str, GateLines] = {
    "none": _NONE,
    "constant": GateLines(["log_lam = tl.log(tl.load(LAM + off_h).to(tl.float32))"],
                          ["g_c = tl.where(mask_t, log_lam, 0.0)", *_CUMSUM], dg=[],
                          **_SCALAR_UPDATES),
    "scalar": GateLines([], [_LOAD_G, *_CUMSUM], dg=_SCALAR_DG, **_SCALAR_UPDATES),
    "vector": _VECTOR,
}
# the gate's gradient: rowsum(h_{c+1} * dh_{c+1}) per value block (the part after the chunk)
_DG_INIT = ["dgl = tl.zeros([DK_PAD], dtype=tl.float32)"]
_DG_STEP = ["hn = tl.load(HS + h_base + h_step + h_offs, mask=mask_s, other=0.0)",
            "dgl += tl.sum(hn * dh, 1)"]


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


def render_chunks(node: LinearState) -> str:
    """Triton source of the chunk-parallel gradient kernel for `node`."""
    gate = _GATES[node.gate]
    grads = list(gate.grads) + list(gate.dg)
    if node.feature_map == "elu1":
        grads += [_DELU1.format(x="q"), _DELU1.format(x="k")]
    return environment().get_template(TEMPLATE_CHUNKS).render(
        kernel_name=kernel_name(node, "backward_chunked"), node_text=node.text(),
        setup_lines=gate.setup, query_lines=_phi(node, "q"), key_lines=_phi(node, "k"),
        gate_lines=gate.loads, score_lines=gate.scores,
        gate_grad_init=_DG_INIT if gate.dg else [], gate_grad_step=_DG_STEP if gate.dg else [],
        grad_lines=grads)


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


class TritonChunkedLinearBackward(GeneratedKernel):
    """One additive LinearState's chunked backward (two kernels: `states`, `chunks`). chunk:
    tokens per chunk (a power of two >= 16); block_v: value columns per dot (a power of two
    >= 16); defaults from `select_tiles_linear.backward_chunked_chunk` / `_value_block`."""

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise TypeError(f"node: expected a LinearState, got {type(node).__name__}")
        if (why := unsupported_chunked(node)) is not None:
            raise NotImplementedError(f"TritonChunkedLinearBackward: {why}")
        check_power_of_two("chunk", chunk, 16)
        check_power_of_two("block_v", block_v, 16)
        self.node, self.chunk, self.block_v = node, chunk, block_v
        self.states = CachedSource(source_key(node, TEMPLATES, BACKEND + "-states"),
                                   kernel_name(node, "backward_states"),
                                   lambda: {"kernel.py": render_states(node).encode()},
                                   {"backend": BACKEND + "-states", "spec": node.text()})
        self.kernel = CachedSource(source_key(node, TEMPLATES, BACKEND),
                                   kernel_name(node, "backward_chunked"),
                                   lambda: {"kernel.py": render_chunks(node).encode()},
                                   {"backend": BACKEND, "spec": node.text()})
        self.name, self.entry = self.kernel.name, self.kernel.entry

    def chunk_for(self, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        return backward_chunked_chunk(self.node, device.type != "cuda" or config.triton_interpret())

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, do: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None, d_final_state: Tensor | None = None,
                 cu_seqlens: Tensor | None = None, o: Tensor | None = None
                 ) -> dict[str, Tensor | None]:
        """As `backward.TritonLinearBackward.__call__` (same arguments, same results)."""
        node = self.node
        run = prepare_backward(node, q, k, v, do, g=g, beta=beta, scale=scale,
                               initial_state=initial_state, d_final_state=d_final_state,
                               cu_seqlens=cu_seqlens, o=o)
        Bv, H, Lv, Dk = run.q.shape
        Dv = run.v.shape[-1]
        if Dk > DK_MAX:
            raise ValueError(f"q: expected head dim Dk <= {DK_MAX} for the chunked backward (the "
                             f"key dim is not tiled), got {Dk}")
        dev, f32, varlen = q.device, torch.float32, run.varlen
        interpreted = dev.type != "cuda" or config.triton_interpret()
        chunk = self.chunk_for(dev)
        dv_block = backward_chunked_value_block(Dk, Dv, self.block_v)
        table = chunk_table(run.nb, run.max_len, chunk, run.cu, dev)
        hs = torch.empty(table.slots, H, Dk, Dv, dtype=f32, device=dev)
        dhs = torch.empty_like(hs)
        ds0 = torch.zeros(run.nb, H, Dk, Dv, dtype=f32, device=dev)
        dq = torch.zeros(Bv, H, Lv, Dk, dtype=q.dtype, device=dev)
        dk = torch.zeros_like(dq)
        dvv = torch.zeros(Bv, H, Lv, Dv, dtype=v.dtype, device=dev)
        g32 = None if run.g is None else run.g.to(f32)
        dg = None if g32 is None else torch.zeros(g32.shape, dtype=f32, device=dev)
        shape = {"D_K": Dk, "D_V": Dv, "DK_PAD": padded(Dk), "DV_BLOCK": dv_block,
                 "CHUNK": chunk, "DOT_PRECISION": "ieee" if interpreted or q.dtype == f32
                 else "tf32", "DOT16": not interpreted, "num_warps": BACKWARD_CHUNKED_NUM_WARPS}
        st = [*view_strides(run.q, 4, varlen), *view_strides(run.k, 4, varlen),
              *view_strides(run.v, 4, varlen), *view_strides(run.do, 4, varlen),
              *view_strides(g32, 4, varlen)]
        anyp = run.q  # a pointer for absent tensors (never read)
        lam = anyp if run.lam is None else run.lam
        cu = anyp if run.cu is None else run.cu
        if run.nb * H > 0 and Dv > 0 and Dk > 0:
            self.states.jit_function()[(run.nb * H, -(-Dv // dv_block))](
                run.q, run.k, run.v, run.do, anyp if g32 is None else g32, lam,
                ds0 if run.s0 is None else run.s0, ds0 if run.dsn is None else run.dsn, hs, dhs,
                ds0, cu, table.soff, *st, *ds0.stride(), H, Lv, run.scale, **shape,
                HAS_INITIAL=run.s0 is not None, HAS_DFINAL=run.dsn is not None, VARLEN=varlen)
        elif run.dsn is not None:
            ds0.copy_(run.dsn)
        if table.chunks > 0 and H > 0 and Dv > 0 and Dk > 0:
            grid = (table.chunks, H if varlen else run.nb * H)
            self.jit_function()[grid](
                run.q, run.k, run.v, run.do, anyp if g32 is None else g32, lam, hs, dhs, dq, dk,
                dvv, dq if dg is None else dg, cu, table.soff,
                anyp if table.cidx is None else table.cidx, *st,
                *view_strides(dq, 4, varlen), *view_strides(dvv, 4, varlen),
                *view_strides(dg, 4, varlen), H, Lv, run.scale, **shape, VARLEN=varlen)
        return {"q": to_input_layout(dq, q, varlen), "k": to_input_layout(dk, k, varlen),
                "v": to_input_layout(dvv[..., :v.shape[-1]], v, varlen),
                "g": None if g is None else to_input_layout(dg, g, varlen),
                "beta": None,
                "initial_state": None if initial_state is None
                else ds0.to(initial_state.dtype)}


def compile_chunked_backward_for_target(kernel: TritonChunkedLinearBackward, part: str, arch: int,
                                        dtype: str, head_dim_k: int, head_dim_v: int, *,
                                        varlen: bool = False, chunk: int | None = None
                                        ) -> CompiledArtifact:
    """Compile one part ("states" or "chunks") of a chunked backward for sm_<arch> with the
    launch's arguments: q/k/v/do and dq/dk/dv are `dtype` (do fp32 with the normaliser); gates,
    decays, states and dg fp32; offsets int32. `head_dim_v` is v's (the z column is added here
    when normalising)."""
    node = kernel.node
    t = "*" + triton_type(dtype)
    dv = node.state_dv(head_dim_v)
    inputs = {"Q": t, "K": t, "V": t, "DO": "*fp32" if node.normalize else t, "G": "*fp32",
              "LAM": "*fp32"}
    strides = [f"stride_{x}{d}" for x in "qkvog" for d in "bhld"]
    if part == "states":
        pointers = {**inputs, **{n: "*fp32" for n in ("S0", "DSN", "HS", "DHS", "DS0")},
                    "CU": "*i32", "SOFF": "*i32"}
        strides += [f"stride_s{d}" for d in "bhfv"]
        flags: dict[str, Any] = {"HAS_INITIAL": True, "HAS_DFINAL": True}
        source = kernel.states
    elif part == "chunks":
        pointers = {**inputs, "HS": "*fp32", "DHS": "*fp32", "DQ": t, "DK": t, "DV": t,
                    "DG": "*fp32", "CU": "*i32", "SOFF": "*i32", "CIDX": "*i32"}
        strides += [f"stride_{x}{d}" for x in "xwe" for d in "bhld"]
        flags, source = {}, kernel.kernel
    else:
        raise ValueError(f"part: expected 'states' or 'chunks', got {part!r}")
    signature = {**pointers, **{name: "i32" for name in strides}, "H": "i32", "L": "i32",
                 "scale": "fp32"}
    chunk = chunk or kernel.chunk or backward_chunked_chunk(node, False)
    constexprs = {"D_K": head_dim_k, "D_V": dv, "DK_PAD": padded(head_dim_k),
                  "DV_BLOCK": backward_chunked_value_block(head_dim_k, dv, kernel.block_v),
                  "CHUNK": chunk, "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32",
                  "DOT16": True, **flags, "VARLEN": varlen}
    launch = Schedule(num_warps=BACKWARD_CHUNKED_NUM_WARPS, num_stages=3)
    job = {"path": str(source.entry.files["kernel.py"]), "name": source.name,
           "aligned": list(pointers)}
    return compile_artifact(job, arch, signature, constexprs, launch,
                            f"{part}, {dtype}, head dims {head_dim_k}/{head_dim_v}, chunk {chunk}, "
                            f"varlen {varlen}", dtype=dtype, head_dims=(head_dim_k, head_dim_v))
