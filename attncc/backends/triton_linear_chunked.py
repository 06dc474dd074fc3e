"""The chunked form of the linear-recurrence axis (CATALOG 5) as one generated Triton kernel.

`templates/triton/linear_chunked.py.j2` lays out lines this module chooses per rule; the
semantics are `reference_linear.recurrent_reference` (the spec and the test oracle) and the maths
is `reference_linear_chunked._gla_chunk`. Same API as `TritonRecurrentLinear`, whose decode step
continues a state this kernel leaves (and the other way round).

Supported: linear (L1; phi identity or elu1; optional normaliser), decay (L2), scalar_gate (L3).
Not yet: vector_gate (L4, per-key-dim decay matrix), delta and gated_delta (L5, L6: the UT
transform), block_causal (L7) and phi taylor2, which raise NotImplementedError at construction
and point to TritonRecurrentLinear.

Kernel: grid (B * H, cdiv(Dv, DV_BLOCK)); each program loops over chunks of CHUNK tokens with its
slice of the state S [F, DV_BLOCK] in fp32 registers; the last chunk is partial under masks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attncc.backends.reference_linear import check_inputs
from attncc import config
from attncc.backends import triton_linear as recurrent
from attncc.backends.triton_source import CachedSource
from attncc.backends.triton_render import _environment
from attncc.ir.linear import LinearState
from attncc.passes.select_tiles import padded

BACKEND = "triton-linear-chunked"
TEMPLATE = "linear_chunked.py.j2"
TEMPLATES = (TEMPLATE, "helpers.py.j2")  # every file the source depends on
DV_BLOCK_MAX = 64  # S [128, 64] fp32 is 64 registers a thread at 4 warps
CHUNK_GPU = 64
CHUNK_INTERPRETER = 32  # fewer, smaller tiles: the interpreter's cost is per element
# sm_90 AOT, Dk = Dv = 64, chunk 64: 8 warps with tf32 dots spill nothing; ieee fp32 dots (FMA,
# no tensor cores) spill ~7 KB at 8 warps and ~10 KB at 4, so they are kept for fp32 inputs only
NUM_WARPS = 8

_ELU1 = "tl.where(mask_q, tl.where({x} > 0, {x} + 1.0, tl.exp({x})), 0.0)"  # phi(pad) = 0
_LOAD_G = ("g_c = tl.load(g_base + rows * stride_gl, mask=mask_t, other=0.0)"
           ".to(tl.float32)")
_RECURRENT_ONLY = {
    "vector_gate": "rule 'vector_gate' (L4) needs a per-key-dim decay matrix",
    "delta": "rule 'delta' (L5) needs the UT transform (a triangular solve per chunk)",
    "gated_delta": "rule 'gated_delta' (L6) needs the UT transform (a triangular solve per chunk)",
    "block_causal": "rule 'block_causal' (L7) needs a block mask inside the chunk",
}


def _lines(node: LinearState) -> tuple[list[str], list[str]]:
    """(setup lines before the chunk loop, lines per chunk after the loads) for `node`'s rule."""
    setup: list[str] = []
    step: list[str] = []
    if node.feature_map == "elu1":
        step += [f"q_c = {_ELU1.format(x='q_c')}", f"k_c = {_ELU1.format(x='k_c')}"]
    if node.rule == "decay":
        setup.append("log_lam = tl.log(tl.load(LAM + off_h).to(tl.float32))")
        step.append("g_c = tl.where(mask_t, log_lam, 0.0)")
    elif node.rule == "scalar_gate":
        step.append(_LOAD_G)
    if node.rule in ("decay", "scalar_gate"):
        step.append("b = tl.cumsum(g_c, 0)  # inclusive: token i has decayed by its own gate")
    return setup, step


def kernel_name(node: LinearState) -> str:
    """e.g. `linear_chunked_scalar_gate_identity_1a2b3c4d5e`."""
    return recurrent.kernel_name(node, "chunked")


def render(node: LinearState) -> str:
    """Triton source of the chunked kernel for `node` (dtype-, shape- and chunk-independent)."""
    setup, step = _lines(node)
    return _environment().get_template(TEMPLATE).render(
        kernel_name=kernel_name(node), node_text=node.text(), normalize=node.normalize,
        decayed=node.rule in ("decay", "scalar_gate"), setup_lines=setup, chunk_lines=step)


def cache_key(node: LinearState) -> str:
    return recurrent.cache_key(node, TEMPLATES, BACKEND)


def _unsupported(node: LinearState) -> str | None:
    if node.rule in _RECURRENT_ONLY:
        return f"{_RECURRENT_ONLY[node.rule]}, which is not written yet"
    if node.feature_map == "taylor2":
        return "feature_map 'taylor2' (F = 1 + D + D^2) has no Triton kernel yet"
    return None


class TritonChunkedLinear:
    """One LinearState's chunked kernel. Building it renders (or loads) the source on disk.

    chunk: tokens per chunk (a power of two >= 16, tl.dot's least tile side); default 64 on a
    GPU, 32 under the interpreter. block_v: value columns per program; default min(padded Dv, 64).
    """

    def __init__(self, node: LinearState, *, chunk: int | None = None,
                 block_v: int | None = None) -> None:
        if not isinstance(node, LinearState):
            raise ValueError(f"node: expected a LinearState, got {type(node).__name__}")
        if (why := _unsupported(node)) is not None:
            raise NotImplementedError(f"TritonChunkedLinear: {why}; use "
                                      "triton_linear.TritonRecurrentLinear (same API)")
        recurrent.check_power_of_two("chunk", chunk, 16)
        recurrent.check_power_of_two("block_v", block_v, 16)
        self.node = node
        self.chunk = chunk
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

    def chunk_for(self, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        interpreted = device.type != "cuda" or config.triton_interpret()
        return CHUNK_INTERPRETER if interpreted else CHUNK_GPU

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None,
                 beta: Tensor | None = None, scale: float | None = None,
                 initial_state: Tensor | None = None,
                 return_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """q, k [B, H, L, Dk]; v [B, H, L, Dv]; g [B, H, L] (scalar_gate); initial_state as in
        `reference_linear`. Returns o [B, H, L, Dv] in q's dtype, and with `return_state` the
        final state [B, H, Dk, Dv'] in fp32 (Dv' = Dv + 1 when normalising; last column z)."""
        node = self.node
        check_inputs(q, k, v, node, g, beta, initial_state)
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        dev = q.device
        scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
        o = torch.empty(B, H, L, Dv, dtype=q.dtype, device=dev)
        s_in = None if initial_state is None else initial_state.to(dev, torch.float32).contiguous()
        s_out = torch.empty(B, H, Dk, node.state_dv(Dv), dtype=torch.float32, device=dev) \
            if return_state else None
        lam = None
        if node.decay is not None:
            vals = node.decay if isinstance(node.decay, tuple) else (node.decay,) * H
            lam = torch.tensor(vals, dtype=torch.float32, device=dev)
        if B * H == 0:  # nothing to launch; the state has no entries either
            return (o, s_out) if return_state else o
        dv_pad = padded(Dv)
        dv_block = min(dv_pad, DV_BLOCK_MAX if self.block_v is None else self.block_v)
        # s_in and s_out are both contiguous [B, H, F, Dv']: one set of strides serves both
        s_strides = (s_out if s_out is not None else s_in if s_in is not None else o).stride()
        g_strides = list(g.stride()) if g is not None else [0, 0, 0]
        grid = (B * H, -(-Dv // dv_block))
        self.jit_function()[grid](
            q, k, v, o, g if g is not None else q, lam if lam is not None else q,
            s_in if s_in is not None else o, s_out if s_out is not None else o,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *g_strides, *s_strides,
            H, L, scale,
            **launch_constexprs(Dk, Dv, dv_block, self.chunk_for(dev),
                                dot_precision(q.dtype, dev)),
            HAS_INITIAL=s_in is not None, STORE_FINAL=s_out is not None, num_warps=NUM_WARPS,
        )
        return (o, s_out) if return_state else o


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tf32 for 16-bit inputs on a GPU (their 10- or 7-bit mantissas fit tf32's 10; the fp32
    decay-weighted tiles round to it, as fla rounds them to the input dtype); ieee for fp32
    inputs and under the interpreter."""
    interpreted = device.type != "cuda" or config.triton_interpret()
    return "ieee" if interpreted or dtype == torch.float32 else "tf32"


def launch_constexprs(dk: int, dv: int, dv_block: int, chunk: int,
                      precision: str) -> dict[str, Any]:
    """The shape constexprs a launch passes (HAS_INITIAL and STORE_FINAL aside)."""
    return {"D_K": dk, "D_V": dv, "DK_PAD": padded(dk), "DV_BLOCK": dv_block, "CHUNK": chunk,
            "DOT_PRECISION": precision}


def compile_chunked_for_target(kernel: TritonChunkedLinear, arch: int, dtype: str,
                               head_dim_k: int, head_dim_v: int, *, chunk: int = CHUNK_GPU):
    """Compile a `TritonChunkedLinear` kernel for sm_<arch> with no GPU present, as
    `triton_aot.compile_linear_for_target` does for the recurrent one (g, lam and the states
    are fp32; q/k/v/o are `dtype`). Returns a `CompiledArtifact`; raises `AOTCompileError`."""
    from attncc.backends.triton_aot import _SHORT, CompiledArtifact, _compile_in_child
    from attncc.ir.nodes import Schedule

    t = "*" + _SHORT[dtype]
    pointers = {"Q": t, "K": t, "V": t, "O": t, "G": "*fp32", "LAM": "*fp32", "S0": "*fp32",
                "SN": "*fp32"}
    strides = [f"stride_{x}{d}" for x, dims in (("q", "bhld"), ("k", "bhld"), ("v", "bhld"),
                                                ("o", "bhld"), ("g", "bhl"), ("s", "bhfv"))
               for d in dims]
    signature = {**pointers, **{name: "i32" for name in strides}, "H": "i32", "L": "i32",
                 "scale": "fp32"}
    dv_block = min(padded(head_dim_v), DV_BLOCK_MAX)
    precision = "ieee" if dtype == "float32" else "tf32"  # as `dot_precision` on a GPU
    constexprs = {**launch_constexprs(head_dim_k, head_dim_v, dv_block, chunk, precision),
                  "HAS_INITIAL": True, "STORE_FINAL": True}
    launch = Schedule(num_warps=NUM_WARPS, num_stages=3)  # num_stages: Triton's default
    job = {"path": str(kernel.entry.files["kernel.py"]), "name": kernel.name,
           "aligned": list(pointers)}
    result, ptx, cubin = _compile_in_child(
        job, arch, signature, constexprs, launch,
        f"{dtype}, head dims {head_dim_k}/{head_dim_v}, chunk {chunk}")
    return CompiledArtifact(
        name=kernel.name, arch=arch, dtype=dtype, head_dim_qk=head_dim_k, head_dim_v=head_dim_v,
        schedule=launch, shared_bytes=result["shared"], n_regs=result["n_regs"],
        stack_bytes=result["stack"], ptx=ptx, cubin=cubin)
