"""Gradients of the delta rules L5 (DeltaNet) and L6 (gated DeltaNet) (docs/catalog.md) in
chunked (WY) form, as flash-linear-attention's `chunk_gated_delta_rule_bwd` computes them: four
generated Triton kernels.

1. `linear_backward_delta_wy.py.j2`, grid (chunks, B * H or H): every chunk's WY
   representation, T = (I + A)^{-1}, W = T (K beta e^b), U = T (V beta) (fla's prepare_wy_repr +
   recompute_w_u_fwd).
   Also the output's part of dv_new, P^T dO (fla's chunk_bwd_dv_local).
2. `linear_backward_delta_states.py.j2`, grid (B * H or N * H, cdiv(Dv, DV_BLOCK)): the
   sequential part, one chunk per step: the states h_c and v_new = U - W h_c by a forward
   sweep, then the states' gradients dh_c and dv_new by a reverse sweep (fla's
   chunk_gated_delta_rule_fwd_h + chunk_gated_delta_rule_bwd_dhu).
3. `linear_backward_delta_dqk.py.j2`, grid (key blocks, chunks, B * H or H): dq, the output's
   and the state's part of dk and of the gate's gradient, and dW (fla's chunk_bwd_dqkwg).
4. `linear_backward_delta_wy_bwd.py.j2`, grid (chunks, B * H or H): the WY backward, finishing
   dk and dg and giving dv, dbeta (fla's prepare_wy_repr_bwd and the chunk-local reverse cumsum
   of dg).

Supported: delta (L5) and gated_delta (L6) (phi identity, the only feature map of the delta
rules); dense or packed varlen inputs; initial state and final-state gradient.

Non-finite inputs (k, v, beta): no masking like the forward's (linear_split_wy.py.j2):
gradients flow backward in time through every later token's transition, so the recurrence's own
gradient is not finite before the bad token either, and a NaN reaches all of its chunk here
through the products with T. Gates of -inf or very negative are exact (clamped sums, as the
forward).

Memory besides the gradients: the states and their gradients at every chunk boundary, fp32
[chunks + sequences, H, Dk, Dv] each, and fp32 token-row buffers: T [.., L, chunk], W, dk', dW
[.., L, Dk], U (then v_new), dv_new [.., L, Dv], dbeta, dg' [key blocks, .., L]. Dot operands
are the inputs' 16-bit type on a GPU (fp32 accumulation); fp32 under the interpreter.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from attncc.backends.keys import triton_type
from attncc.backends.triton.aot import CompiledArtifact, compile_artifact
from attncc.backends.triton.linear.backward import to_input_layout, view_strides
from attncc.backends.triton.linear.backward_chunked import (GATE_FLOOR, ChunkedBackwardBase,
                                                            contiguous_strides)
from attncc.backends.triton.linear.recurrent import kernel_name, source_key
from attncc.backends.triton.source import CachedSource
from attncc.backends.triton.templating import environment
from attncc.ir.linear import LinearState
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import backward_chunked_chunk, backward_delta_tiles

BACKEND = "triton-linear-backward-delta"
PARTS = ("wy", "states", "dqk", "wy_bwd")
TEMPLATES = tuple(f"linear_backward_delta_{p}.py.j2" for p in PARTS) + (
    "linear_backward_chunk.py.j2", "helpers.py.j2")

# the gate: b, the inclusive cumulative log gate inside the chunk, and b_last, its value at the
# last real token (padded rows carry g = 0); summed clamped at -GATE_FLOOR as the forward does
_CUMSUM = [f"b = tl.cumsum(tl.maximum(g_c, -{GATE_FLOOR}), 0)  # inclusive",
           "b_last = tl.min(b, 0)"]
_GATE = {
    "none": ["g_c = tl.zeros([CHUNK], dtype=tl.float32)  # L5: b = 0, every factor e^0 = 1",
             *_CUMSUM],
    "scalar": ["g_c = tl.load(g_base + rows * stride_gl, mask=mask_t, other=0.0).to(tl.float32)",
               *_CUMSUM],
}
# the gate's gradient (L6 only): part 3's partial sums per key block, part 4 the rest
_DG_DQK = [
    "dg = tl.cumsum(tl.sum(q_c * dq - k_c * dk, 1), 0, reverse=True) + tl.sum(dgl, 0)",
    "tl.store(DGP + pid_k * stride_en + r, dg, mask=mask_t)"]
_DG_WY = [
    "ada = dM * kk * beta_c[:, None]  # dA * A (kk = K K^T)",
    "dgb += tl.sum(ada, 1) - tl.sum(ada, 0)",
    "dg = tl.cumsum(dgb, 0, reverse=True) + tl.load(DGP + r, mask=mask_t, other=0.0)",
    "tl.store(DG + r, dg, mask=mask_t)"]


def unsupported_delta(node: LinearState) -> str | None:
    """Why `node` has no chunked delta-rule backward, or None (L5, L6: a delta write with no
    gate or a scalar one; the delta rules take phi identity only)."""
    if node.write != "delta" or node.block is not None or node.gate not in _GATE:
        return f"rule {node.rule!r} ({node.catalog_id}) has no chunked delta-rule backward"
    return None


def render(node: LinearState, part: str) -> str:
    """Triton source of one part ("wy", "states", "dqk", "wy_bwd") for `node`."""
    gated = node.gate == "scalar"
    dg = {"dqk": _DG_DQK, "wy_bwd": _DG_WY}.get(part, []) if gated else []
    return environment().get_template(f"linear_backward_delta_{part}.py.j2").render(
        kernel_name=kernel_name(node, f"backward_delta_{part}"), node_text=node.text(),
        gate_lines=_GATE[node.gate], dg_lines=dg)


def _source(node: LinearState, part: str, render_part: Callable[[LinearState, str], str]
            ) -> CachedSource:
    backend = f"{BACKEND}-{part}"
    return CachedSource(source_key(node, TEMPLATES, backend),
                        kernel_name(node, f"backward_delta_{part}"),
                        lambda: {"kernel.py": render_part(node, part).encode()},
                        {"backend": backend, "spec": node.text()})


class TritonDeltaChunkedBackward(ChunkedBackwardBase):
    """One delta-rule LinearState's chunked backward: four kernels, `wy`, `states`, `dqk` (also
    `kernel`) and `wy_bwd`. chunk: tokens per chunk (a power of two >= 16); block_v: value
    columns per program or loop step of every kernel (a power of two >= 16); defaults from
    `select_tiles_linear.backward_chunked_chunk` / `backward_delta_tiles`."""

    why_unsupported = staticmethod(unsupported_delta)
    untiled = "the WY kernels"

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        super().__init__(node, chunk=chunk, block_v=block_v)
        self.parts = {p: _source(node, p, render) for p in PARTS}
        self.kernel = self.parts["dqk"]
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
        tiles = backward_delta_tiles(Dk, Dv, self.block_v)
        nk, nv = -(-Dk // tiles.block_k), -(-Dv // tiles.block_v["states"])

        def rows(width: int, *lead: int) -> Tensor:  # fp32 token rows [*lead, Bv, H, Lv, width]
            return torch.zeros(*lead, Bv, H, Lv, width, dtype=f32, device=dev)

        tt, w, u, dvn, dkp, dw = (rows(chunk), rows(Dk), rows(Dv), rows(Dv), rows(Dk), rows(Dk))
        db = torch.zeros(Bv, H, Lv, dtype=f32, device=dev)
        dgp = torch.zeros(nk, Bv, H, Lv, dtype=f32, device=dev)
        dg = torch.zeros_like(db)
        dq = torch.zeros(Bv, H, Lv, Dk, dtype=q.dtype, device=dev)
        dk = torch.zeros_like(dq)
        dvv = torch.zeros(Bv, H, Lv, Dv, dtype=v.dtype, device=dev)
        g32 = None if run.g is None else run.g.to(f32)
        b32 = run.beta.to(f32)
        blocks = tiles.block_v
        common = {"D_K": Dk, "D_V": Dv, "CHUNK": chunk,
                  "DOT_PRECISION": "ieee" if interpreted or q.dtype == f32 else "tf32",
                  "DOT16": not interpreted, "num_stages": tiles.num_stages, "VARLEN": varlen}
        warps = tiles.num_warps
        anyp = run.q  # a pointer for absent tensors (never read)
        gp = anyp if g32 is None else g32
        cu = anyp if run.cu is None else run.cu
        cidx = anyp if table.cidx is None else table.cidx
        rst = [0 if varlen else H * Lv, Lv]  # token rows: b * stride_rb + h * stride_rh + row

        def st(x: Tensor | None, n: int = 4) -> list[int]:
            return view_strides(x, n, varlen)

        bh = H if varlen else run.nb * H
        live = Dv > 0 and Dk > 0 and H > 0
        if table.chunks > 0 and live:
            self.parts["wy"].jit_function()[(table.chunks, bh)](
                run.q, run.k, run.v, run.do, gp, b32, tt, w, u, dvn, cu, table.soff, cidx,
                *st(run.q), *st(run.k), *st(run.v), *st(run.do), *st(g32), *st(b32, 3), *rst,
                H, Lv, Lv, run.scale, DK_PAD=padded(Dk), DV_BLOCK=blocks["wy"], **common,
                num_warps=warps["wy"])
        if run.nb * H > 0 and live:
            self.parts["states"].jit_function()[(run.nb * H, nv)](
                run.q, run.k, run.do, gp, w, u, dvn, ds0 if run.s0 is None else run.s0,
                ds0 if run.dsn is None else run.dsn, hs, dhs, ds0, cu, table.soff,
                *st(run.q), *st(run.k), *st(run.do), *st(g32), *ds0.stride(), *rst,
                H, Lv, Lv, run.scale, DK_PAD=padded(Dk), DV_BLOCK=blocks["states"], **common,
                num_warps=warps["states"],
                HAS_INITIAL=run.s0 is not None, HAS_DFINAL=run.dsn is not None)
        elif run.dsn is not None:
            ds0.copy_(run.dsn)
        if table.chunks > 0 and live:
            self.parts["dqk"].jit_function()[(nk, table.chunks, bh)](
                run.q, run.k, run.do, gp, u, dvn, hs, dhs, dq, dkp, dw, dgp, cu, table.soff,
                cidx, *st(run.q), *st(run.k), *st(run.do), *st(g32), *st(dq), *rst,
                dgp.stride(0), H, Lv, Lv, run.scale, BLOCK_K=tiles.block_k,
                DV_BLOCK=blocks["dqk"], **common, num_warps=warps["dqk"])
            self.parts["wy_bwd"].jit_function()[(table.chunks, bh)](
                run.k, run.v, gp, b32, tt, dw, dvn, dkp, dgp.sum(0), dk, dvv, db, dg, cu,
                table.soff, cidx, *st(run.k), *st(run.v), *st(g32), *st(b32, 3), *st(dk),
                *st(dvv), *rst, H, Lv, Lv, BLOCK_K=tiles.block_k, DV_BLOCK=blocks["wy_bwd"],
                **common, num_warps=warps["wy_bwd"])
        return {"q": to_input_layout(dq, q, varlen), "k": to_input_layout(dk, k, varlen),
                "v": to_input_layout(dvv, v, varlen),
                "g": None if g is None else to_input_layout(dg, g, varlen),
                "beta": to_input_layout(db, beta, varlen),
                "initial_state": None if initial_state is None
                else ds0.to(initial_state.dtype)}


def compile_delta_backward_for_target(kernel: TritonDeltaChunkedBackward, part: str, arch: int,
                                      dtype: str, head_dim_k: int, head_dim_v: int, *,
                                      varlen: bool = False, chunk: int | None = None
                                      ) -> CompiledArtifact:
    """Compile one part ("wy", "states", "dqk" or "wy_bwd") of a chunked delta-rule backward for
    sm_<arch> with the launch's arguments: q/k/v/do and dq/dk/dv are `dtype`; gates, betas,
    the token-row buffers, states and dg fp32; offsets int32."""
    node = kernel.node
    t = "*" + triton_type(dtype)
    f = "*fp32"
    tiles = backward_delta_tiles(head_dim_k, head_dim_v, kernel.block_v)
    bhld = "bhld"
    extra: dict[str, Any] = {"DK_PAD": padded(head_dim_k)}
    flags: dict[str, Any] = {}
    if part == "wy":
        pointers = {"Q": t, "K": t, "V": t, "DO": t, "G": f, "BETA": f, "TT": f, "W": f, "U": f,
                    "DVN": f, "CU": "*i32", "SOFF": "*i32", "CIDX": "*i32"}
        strides = [f"stride_{x}{d}" for x in "qkvog" for d in bhld] + \
            [f"stride_b{d}" for d in "bhl"] + ["stride_rb", "stride_rh"]
        scalars = ["H", "L", "LT", "scale"]
    elif part == "states":
        pointers = {"Q": t, "K": t, "DO": t, "G": f, "W": f, "U": f, "DVN": f,
                    **{n: f for n in ("S0", "DSN", "HS", "DHS", "DS0")},
                    "CU": "*i32", "SOFF": "*i32"}
        strides = [f"stride_{x}{d}" for x in "qkog" for d in bhld] + \
            [f"stride_s{d}" for d in "bhfv"] + ["stride_rb", "stride_rh"]
        scalars = ["H", "L", "LT", "scale"]
        flags = {"HAS_INITIAL": True, "HAS_DFINAL": True}
    elif part == "dqk":
        pointers = {"Q": t, "K": t, "DO": t, "G": f, "VN": f, "DVN": f, "HS": f, "DHS": f,
                    "DQ": t, "DKP": f, "DW": f, "DGP": f, "CU": "*i32", "SOFF": "*i32",
                    "CIDX": "*i32"}
        strides = [f"stride_{x}{d}" for x in "qkogx" for d in bhld] + \
            ["stride_rb", "stride_rh", "stride_en"]
        scalars = ["H", "L", "LT", "scale"]
        extra = {"BLOCK_K": tiles.block_k}
    elif part == "wy_bwd":
        pointers = {"K": t, "V": t, "G": f, "BETA": f, "TT": f, "DW": f, "DVN": f, "DKP": f,
                    "DGP": f, "DK": t, "DV": t, "DB": f, "DG": f, "CU": "*i32", "SOFF": "*i32",
                    "CIDX": "*i32"}
        strides = [f"stride_{x}{d}" for x in "kvg" for d in bhld] + \
            [f"stride_b{d}" for d in "bhl"] + [f"stride_{x}{d}" for x in "xw" for d in bhld] + \
            ["stride_rb", "stride_rh"]
        scalars = ["H", "L", "LT"]
        extra = {"BLOCK_K": tiles.block_k}
    else:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    signature = {**pointers, **{name: "i32" for name in strides},
                 **{n: "fp32" if n == "scale" else "i32" for n in scalars}}
    chunk = chunk or kernel.chunk or backward_chunked_chunk(node, False)
    constexprs = {"D_K": head_dim_k, "D_V": head_dim_v, **extra, "DV_BLOCK": tiles.block_v[part],
                  "CHUNK": chunk, "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32",
                  "DOT16": True, **flags, "VARLEN": varlen}  # in the kernels' order
    launch = Schedule(num_warps=tiles.num_warps[part], num_stages=tiles.num_stages)
    # the JIT's specialisation of a contiguous launch: a stride of 1 is a constexpr, one that
    # is a multiple of 16 gets the divisibility hint
    heads, length = 16, 4096
    values = contiguous_strides(node, head_dim_k, head_dim_v, tiles.block_k, varlen, heads,
                                 length)
    b = 0 if varlen else heads * length
    values.update({"stride_bb": b, "stride_bh": 1 if varlen else length,
                   "stride_bl": heads if varlen else 1, "stride_rb": b, "stride_rh": length,
                   "stride_en": (1 if varlen else 2) * heads * length})
    unit = {n: 1 for n in strides if values[n] == 1}
    divisible = [n for n in strides if n not in unit and values[n] % 16 == 0]
    constexprs.update(unit)
    source = kernel.parts[part]
    job = {"path": str(source.entry.files["kernel.py"]), "name": source.name,
           "aligned": list(pointers), "divisible": divisible}
    return compile_artifact(job, arch, signature, constexprs, launch,
                            f"{part}, {dtype}, head dims {head_dim_k}/{head_dim_v}, chunk {chunk}, "
                            f"varlen {varlen}", dtype=dtype, head_dims=(head_dim_k, head_dim_v))
