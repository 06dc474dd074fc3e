"""Ahead-of-time compilation of the linear-state kernels for a named NVIDIA GPU, no GPU needed.

`compile_linear_for_target(TritonRecurrentLinear(node), 90, "float16", 64, 64)` (and
`compile_linear_backward_for_target` for `TritonLinearBackward`) compile with the argument list
and constexprs the launch passes, through the child-process machinery of
`attncc.backends.triton.aot`. They live with the linear kernels, above them, so that `aot` itself
depends on no kernel family and every kernel module can import it.
"""

from __future__ import annotations

from attncc.backends.keys import triton_type
from attncc.backends.triton.aot import CompiledArtifact, compile_artifact
from attncc.backends.triton.linear.backward import TritonLinearBackward
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.ir.nodes import Schedule
from attncc.passes.select_tiles import padded
from attncc.passes.select_tiles_linear import backward_value_block, value_block


def linear_signature(dtype: str) -> tuple[dict[str, str], list[str]]:
    """(signature, aligned pointers) of the linear-state kernels' shared argument list
    (`attncc.backends.triton.linear.launch`): q/k/v/o are `dtype`; g, beta, lam and the states
    fp32; cu_seqlens int32."""
    t = "*" + triton_type(dtype)
    pointers = {"Q": t, "K": t, "V": t, "O": t, "G": "*fp32", "BETA": "*fp32", "LAM": "*fp32",
                "S0": "*fp32", "SN": "*fp32", "CU": "*i32"}
    strides = [f"stride_{x}{d}" for x, dims in (("q", "bhld"), ("k", "bhld"), ("v", "bhld"),
                                                ("o", "bhld"), ("g", "bhld"), ("b", "bhl"),
                                                ("s", "bhfv")) for d in dims]
    signature = {**pointers, **{name: "i32" for name in strides}, "H": "i32", "L": "i32",
                 "scale": "fp32"}
    return signature, list(pointers)


def compile_linear_for_target(kernel: TritonRecurrentLinear, arch: int, dtype: str, head_dim_k: int,
                              head_dim_v: int, *, varlen: bool = False) -> CompiledArtifact:
    """Compile a `TritonRecurrentLinear` kernel for sm_<arch> with the launch's constexprs
    (gates, betas, decays and states are fp32 tensors; q/k/v/o are `dtype`)."""
    signature, pointers = linear_signature(dtype)
    f_dim = kernel.node.feature_dim(head_dim_k)
    constexprs = {"D_K": head_dim_k, "D_V": head_dim_v, "F_PAD": padded(f_dim),
                  "DV_BLOCK": value_block(f_dim, head_dim_v, kernel.block_v), "HAS_INITIAL": True,
                  "STORE_FINAL": True, "VARLEN": varlen}
    launch = Schedule(num_warps=4, num_stages=3)  # Triton's defaults: the launch sets neither
    job = {"path": str(kernel.entry.files["kernel.py"]), "name": kernel.name,
           "aligned": pointers}
    return compile_artifact(job, arch, signature, constexprs, launch,
                            f"{dtype}, head dims {head_dim_k}/{head_dim_v}, varlen {varlen}",
                            dtype=dtype, head_dims=(head_dim_k, head_dim_v))


def compile_linear_backward_for_target(kernel: TritonLinearBackward, arch: int, dtype: str,
                                       head_dim_k: int, head_dim_v: int, *,
                                       varlen: bool = False, chunk: int = 64
                                       ) -> CompiledArtifact:
    """Compile a `TritonLinearBackward` kernel for sm_<arch> with its launch's constexprs:
    q/k/v/do are `dtype` (do fp32 with the normaliser: dL/do' is built in fp32); gates, betas,
    decays, states, checkpoints and gradients fp32. `head_dim_v` is v's (the z column is added
    here when normalising). `chunk`: the checkpoint interval when the kernel's is the default."""
    t = "*" + triton_type(dtype)
    pointers = {"Q": t, "K": t, "V": t, "DO": "*fp32" if kernel.node.normalize else t,
                **{n: "*fp32" for n in ("G", "BETA", "LAM", "S0", "DSN", "CK", "SCR", "DQ", "DK",
                                        "DV", "DG", "DB", "DS0")}, "CU": "*i32"}
    strides = [f"stride_{x}{d}" for x, dims in (
        ("q", "bhld"), ("k", "bhld"), ("v", "bhld"), ("o", "bhld"), ("g", "bhld"), ("b", "bhl"),
        ("s", "bhfv"), ("p", "nbhl"), ("r", "nbhl"), ("w", "bhld")) for d in dims]
    signature = {**pointers, **{name: "i32" for name in strides}, "H": "i32", "L": "i32",
                 "NCH": "i32", "scale": "fp32"}
    dv = kernel.node.state_dv(head_dim_v)
    constexprs = {"D_K": head_dim_k, "D_V": dv, "F_PAD": padded(head_dim_k),
                  "DV_BLOCK": backward_value_block(head_dim_k, dv, kernel.block_v),
                  "CHUNK": kernel.chunk or chunk, "HAS_INITIAL": True, "HAS_DFINAL": True,
                  "VARLEN": varlen}
    launch = Schedule(num_warps=4, num_stages=3)  # Triton's defaults: the launch sets neither
    job = {"path": str(kernel.entry.files["kernel.py"]), "name": kernel.name,
           "aligned": list(pointers)}
    return compile_artifact(job, arch, signature, constexprs, launch,
                            f"{dtype}, head dims {head_dim_k}/{head_dim_v}, varlen {varlen}",
                            dtype=dtype, head_dims=(head_dim_k, head_dim_v))
