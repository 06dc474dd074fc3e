"""fla's chunked backward of the scalar-gate rule (L3, `chunk_simple_gla_bwd`: `chunk_fwd_h`,
`chunk_bwd_dh`, `chunk_bwd_dqkwg`, `chunk_bwd_dv`) as plain `triton.JITFunction`s, with the
arguments fla passes at K = V = 128, chunk 64, bf16, H = 16, for `benchmarks/static.py`'s
linear-backward rows (the anchors of attncc's `backward_chunked` kernels).

The ahead-of-time compile child (attncc/backends/triton/aot_child.py) loads this file by path
and compiles the attribute named in its job, so the kernels are module attributes under their
own names (the cubin's function names). fla picks BK / BV, warps and stages with an autotuner on
a GPU; with none here each kernel gets one config from fla's lists for Hopper: the state sweeps
BK = BV = 64 at 4 warps, 2 stages; dqkwg and dv BK = BV = 128 (fla's CONST_TILING on Hopper)
at 4 warps, 2 stages. States and their gradients fp32 (`states_in_fp32=True`, as
`chunk_simple_gla_bwd` asks), g fp32 (the chunk-local cumulative sum).
"""

from __future__ import annotations

import importlib

import triton

from attncc.backends.triton.aot import CompiledArtifact, compile_artifact
from attncc.ir.nodes import Schedule

# kernel -> its fla module: imported on first use (module __getattr__), so that importing this
# file (benchmarks/static.py does) needs no fla
_MODULES = {"chunk_fwd_kernel_h": "fla.ops.common.chunk_h",
            "chunk_bwd_kernel_dh": "fla.ops.common.chunk_h",
            "chunk_bwd_kernel_dqkwg": "fla.ops.common.chunk_o",
            "chunk_bwd_kernel_dv": "fla.ops.common.chunk_o"}


def __getattr__(name: str) -> triton.runtime.JITFunction:
    if name not in _MODULES:
        raise AttributeError(name)
    kernel = getattr(importlib.import_module(_MODULES[name]), name)
    while not isinstance(kernel, triton.runtime.JITFunction):  # strip heuristics / autotune
        kernel = kernel.fn
    return kernel

_SHAPE = {"H": 16, "K": 128, "V": 128, "BT": 64}
_NONE = {"g_gamma": None, "gk": None, "gv": None, "cu_seqlens": None}
# name -> (pointer types, constexprs, num_warps, num_stages)
FLA_BWD = {
    "chunk_fwd_kernel_h": (
        {"k": "*bf16", "v": "*bf16", "h": "*fp32", "g": "*fp32", "h0": "*fp32"},
        {**_NONE, "ht": None, "split_offsets": None, **_SHAPE, "BS": 64, "BK": 64, "BV": 64,
         "USE_G": True, "USE_G_GAMMA": False, "USE_GK": False, "USE_GV": False,
         "USE_INITIAL_STATE": True, "STORE_FINAL_STATE": False, "IS_VARLEN": False,
         "STATE_V_FIRST": False}, 4, 2),
    "chunk_bwd_kernel_dh": (
        {"q": "*bf16", "g": "*fp32", "do": "*bf16", "dh": "*fp32", "dht": "*fp32",
         "dh0": "*fp32"},
        {**_NONE, "split_offsets": None, "HQ": 16, **_SHAPE, "BS": 64, "BK": 64, "BV": 64,
         "NG": 1, "USE_G": True, "USE_G_GAMMA": False, "USE_GK": False, "USE_GV": False,
         "STORE_INITIAL_STATE_GRADIENT": True, "USE_FINAL_STATE_GRADIENT": True,
         "IS_VARLEN": False, "STATE_V_FIRST": False}, 4, 2),
    "chunk_bwd_kernel_dqkwg": (
        {"q": "*bf16", "k": "*bf16", "v": "*bf16", "g": "*fp32", "h": "*fp32", "do": "*bf16",
         "dh": "*fp32", "dq": "*bf16", "dk": "*bf16", "dg": "*fp32"},
        {"g_gamma": None, "cu_seqlens": None, "dw": None, "dv": None, "chunk_indices": None,
         "B": 2, "HV": 16, **_SHAPE,
         "BK": 128, "BV": 128, "USE_G": True, "USE_G_GAMMA": False, "USE_DW": False,
         "STATE_V_FIRST": False, "IS_VARLEN": False}, 4, 2),
    "chunk_bwd_kernel_dv": (
        {"q": "*bf16", "k": "*bf16", "g": "*fp32", "do": "*bf16", "dv": "*bf16",
         "dh": "*fp32"},
        {"g_gamma": None, "cu_seqlens": None, "chunk_indices": None, "HV": 16, **_SHAPE,
         "BK": 128, "BV": 128,
         "USE_G": True, "USE_G_GAMMA": False, "IS_VARLEN": False, "STATE_V_FIRST": False},
        4, 2),
}


def fla_bwd_kernel(arch: int, name: str) -> CompiledArtifact:
    """One of fla's L3 backward kernels compiled for sm_<arch>; pointers 16-byte aligned as the
    JIT sees torch's allocations; T (and scale) runtime scalars, as fla passes them."""
    pointers, constexprs, warps, stages = FLA_BWD[name]
    fn = __getattr__(name)
    scalars = {"T": "i32", "scale": "fp32"}
    signature = {a: pointers.get(a) or scalars.get(a) or "constexpr" for a in fn.arg_names}
    job = {"path": __file__, "name": name, "aligned": list(pointers)}
    return compile_artifact(job, arch, signature, constexprs,
                            Schedule(num_warps=warps, num_stages=stages), "fla L3 bf16 K=V=128",
                            dtype="bfloat16", head_dims=(128, 128))
