"""Ahead-of-time compilation of the backward kernels for a named NVIDIA GPU, no GPU needed.

`compile_backward_for_target(backward, "dkdv", "float16", 128, 128, 90)` runs Triton's whole
pipeline, ptxas included, in a child process with the interpreter off (the machinery of
`attncc.backends.triton_aot`), with the argument list and constexprs that
`TritonBackward.launch` passes on a CUDA device of that compute capability.
"""

from __future__ import annotations

from attncc.backends.triton_aot import CompiledArtifact, compile_artifact
from attncc.backends.triton_backward import TritonBackward, backward_constexprs
from attncc.backends.triton_backward_render import backward_arguments, fixed_arguments

KERNELS = ("dq", "dkdv")
# contiguous launches: 16-byte aligned tensors and unit head-dim strides
ALIGNED = ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "DK", "DV")
UNIT_STRIDES = tuple(f"stride_{x}d" for x in ("q", "k", "v", "do", "dq", "dk", "dv"))


def compile_backward_for_target(backward: TritonBackward, kernel: str, dtype: str,
                                head_dim_qk: int, head_dim_v: int, arch: int
                                ) -> CompiledArtifact:
    """Compile `backward`'s `kernel` ("dq" or "dkdv") for sm_<arch> and one call signature;
    raises `triton_aot.AOTCompileError` with Triton's message when it does not compile."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    sched = backward.schedule(dtype, head_dim_qk, head_dim_v, f"sm{arch}")
    signature = dict(fixed_arguments(dtype) + backward_arguments(backward.plan, backward.loads))
    constexprs = backward_constexprs(sched, head_dim_qk, head_dim_v)
    constexprs.update({name: 1 for name in UNIT_STRIDES})
    name = f"{backward.name}_{kernel}"
    job = {"path": str(backward.entry.files["kernel.py"]), "name": name,
           "aligned": list(ALIGNED)}
    what = f"{dtype}, head dims {head_dim_qk}/{head_dim_v}, {sched.text()}"
    return compile_artifact(job, arch, signature, constexprs, sched, what,
                            dtype=dtype, head_dims=(head_dim_qk, head_dim_v))
