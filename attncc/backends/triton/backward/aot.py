"""Ahead-of-time compilation of the backward kernels for a named NVIDIA GPU, no GPU needed.

`compile_backward_for_target(backward, "dkdv", "float16", 128, 128, 90)` runs Triton's whole
pipeline, ptxas included, in a child process with the interpreter off (the machinery of
`attncc.backends.triton.aot`), with the argument list and constexprs that
`TritonBackward.launch` passes on a CUDA device of that compute capability.
"""

from __future__ import annotations

from attncc.backends.triton.launch_spec import backward_spec
from attncc.backends.triton.aot import CompiledArtifact, compile_spec
from attncc.backends.triton.backward.kernel import TritonBackward


def compile_backward_for_target(backward: TritonBackward, kernel: str, dtype: str,
                                head_dim_qk: int, head_dim_v: int, arch: int
                                ) -> CompiledArtifact:
    """Compile `backward`'s `kernel` ("dq" or "dkdv") for sm_<arch> and one call signature
    (contiguous launches: `launch_spec.BACKWARD_ALIGNED`); raises `triton_aot.AOTCompileError`
    with Triton's message when it does not compile."""
    spec = backward_spec(backward, kernel, dtype, head_dim_qk, head_dim_v, arch)
    what = f"{dtype}, head dims {head_dim_qk}/{head_dim_v}, {spec.schedule.text()}"
    return compile_spec(spec, arch, what, dtype=dtype, head_dims=(head_dim_qk, head_dim_v))
