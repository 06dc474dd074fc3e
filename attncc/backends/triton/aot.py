"""Ahead-of-time compilation of a forward kernel for a named NVIDIA GPU, with no GPU present.

`compile_for_target(forward, "float16", 128, 128, 90)` runs Triton's whole pipeline (TTIR, TTGIR,
LLVM IR, PTX, ptxas) on the cached source with the argument list and constexprs that
`TritonForward.launch` passes on a CUDA device of that compute capability. CI uses it to prove
every generated kernel compiles for real GPUs, not only under the interpreter.

Each compile runs in a child Python with TRITON_INTERPRET=0: once a process has imported triton
with TRITON_INTERPRET=1, triton.language's own helpers (tl.cdiv, ...) are interpreted functions
for good and cannot be compiled. So this module imports only the standard library and triton at
the top (the child runs this file and must not pay for importing torch); attncc is imported
inside the parent-side functions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attncc.backends.triton.launch_spec import Variant, LaunchSpec
    from attncc.backends.triton.forward import TritonForward
    from attncc.ir.nodes import Schedule

# compute capabilities `attncc build` and `precompile` accept (each has a select-tiles table)
SUPPORTED_ARCHS = (80, 86, 89, 90)
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
# runs this file as __main__ with argv [file, job.json]; cwd is a temp dir, so nothing shadows
_BOOT = ("import runpy, sys; sys.argv = sys.argv[1:]; "
         "runpy.run_path(sys.argv[0], run_name='__main__')")


class AOTCompileError(RuntimeError):
    """Triton or ptxas rejected a kernel; the message ends with the child's stderr."""


@dataclass(frozen=True)
class CompiledArtifact:
    """One kernel compiled for one GPU. `n_regs`/`stack_bytes` are per thread, read from the cubin
    by Triton's `cuobjdump -res-usage` (None without it); stack bytes usually mean register
    spills. `shared_bytes` is the dynamic shared memory Triton asks for at launch."""

    name: str
    arch: int  # compute capability, e.g. 90 for sm_90
    dtype: str  # "float16" | "bfloat16" | "float32"
    head_dim_qk: int
    head_dim_v: int
    schedule: Schedule
    shared_bytes: int
    n_regs: int | None
    stack_bytes: int | None
    ptx: str = field(repr=False)
    cubin: bytes = field(repr=False)
    # Triton's own metadata file for the binary: what `triton.compiler.CompiledKernel` loads
    triton_metadata: str = field(default="", repr=False)

    @property
    def file_stem(self) -> str:
        """`<name>.sm90.fp16.d128`, or `.d192_128` when the head dims differ."""
        return artifact_stem(self.name, self.arch, self.dtype, self.head_dim_qk, self.head_dim_v)


def artifact_stem(name: str, arch: int, dtype: str, head_dim_qk: int, head_dim_v: int) -> str:
    """`<name>.sm90.fp16.d128`, or `.d192_128` when the head dims differ."""
    from attncc.backends.keys import triton_type

    d = f"d{head_dim_qk}" if head_dim_qk == head_dim_v else f"d{head_dim_qk}_{head_dim_v}"
    return f"{name}.sm{arch}.{triton_type(dtype)}.{d}"


def compile_for_target(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                       arch: int, *, write_lse: bool = True, contiguous: bool = True,
                       variant: Variant | None = None) -> CompiledArtifact:
    """Compile `forward` for sm_<arch> and one call signature; raises `AOTCompileError` with
    Triton's message when it does not compile. `variant` (default: from `write_lse` and
    `contiguous`) is the specialisation compiled: `contiguous` is the one a launch with aligned,
    unit-stride last dims gets (see `launch_spec.ALIGNED`); False, the one for any strides."""
    from attncc.backends.triton.launch_spec import Variant, forward_spec

    variant = variant or Variant(write_lse=write_lse, contiguous=contiguous)
    spec = forward_spec(forward, dtype, head_dim_qk, head_dim_v, arch, variant)
    what = f"{dtype}, head dims {head_dim_qk}/{head_dim_v}, {spec.schedule.text()}"
    return compile_spec(spec, arch, what, dtype=dtype, head_dims=(head_dim_qk, head_dim_v))


def compile_block_map_for_target(forward: TritonForward, arch: int, dtype: str = "float16",
                                 head_dim: int = 128, head_dim_v: int | None = None
                                 ) -> CompiledArtifact:
    """Compile `forward`'s block-map kernel (plans whose tiles come from a device-built block
    map) with the tile sizes the forward kernel of (dtype, head_dim, head_dim_v) uses on
    sm_<arch>; `head_dim_v` defaults to `head_dim`."""
    from attncc.backends.triton.launch_spec import block_map_spec, forward_tiles

    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    spec = block_map_spec(forward, arch, forward_tiles(forward, dtype, head_dim, head_dim_v, arch))
    what = f"tiles {spec.constexprs['BLOCK_M']}x{spec.constexprs['BLOCK_N']}"
    return compile_spec(spec, arch, what, dtype=dtype, head_dims=(head_dim, head_dim_v))


def compile_spec(spec: LaunchSpec, arch: int, what: str, *, dtype: str,
                 head_dims: tuple[int, int]) -> CompiledArtifact:
    job = {"path": spec.path, "name": spec.name, "aligned": list(spec.aligned)}
    return compile_artifact(job, arch, dict(spec.signature), dict(spec.constexprs),
                            spec.schedule, what, dtype=dtype, head_dims=head_dims)


def linear_signature(dtype: str) -> tuple[dict[str, str], list[str]]:
    """(signature, aligned pointers) of the linear-state kernels' shared argument list
    (`attncc.backends.triton.linear.launch`): q/k/v/o are `dtype`; g, beta, lam and the states
    fp32; cu_seqlens int32."""
    from attncc.backends.keys import triton_type

    t = "*" + triton_type(dtype)
    pointers = {"Q": t, "K": t, "V": t, "O": t, "G": "*fp32", "BETA": "*fp32", "LAM": "*fp32",
                "S0": "*fp32", "SN": "*fp32", "CU": "*i32"}
    strides = [f"stride_{x}{d}" for x, dims in (("q", "bhld"), ("k", "bhld"), ("v", "bhld"),
                                                ("o", "bhld"), ("g", "bhld"), ("b", "bhl"),
                                                ("s", "bhfv")) for d in dims]
    signature = {**pointers, **{name: "i32" for name in strides}, "H": "i32", "L": "i32",
                 "scale": "fp32"}
    return signature, list(pointers)


def compile_linear_for_target(kernel: Any, arch: int, dtype: str, head_dim_k: int,
                              head_dim_v: int, *, varlen: bool = False) -> CompiledArtifact:
    """Compile a `TritonRecurrentLinear` kernel for sm_<arch> with the launch's constexprs
    (gates, betas, decays and states are fp32 tensors; q/k/v/o are `dtype`)."""
    from attncc.ir.nodes import Schedule
    from attncc.passes.select_tiles import padded
    from attncc.passes.select_tiles_linear import value_block

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


def compile_linear_backward_for_target(kernel: Any, arch: int, dtype: str, head_dim_k: int,
                                       head_dim_v: int, *, varlen: bool = False,
                                       chunk: int = 64) -> CompiledArtifact:
    """Compile a `TritonLinearBackward` kernel for sm_<arch> with its launch's constexprs:
    q/k/v/do are `dtype` (do fp32 with the normaliser: dL/do' is built in fp32); gates, betas,
    decays, states, checkpoints and gradients fp32. `head_dim_v` is v's (the z column is added
    here when normalising). `chunk`: the checkpoint interval when the kernel's is the default."""
    from attncc.backends.keys import triton_type
    from attncc.ir.nodes import Schedule
    from attncc.passes.select_tiles import padded
    from attncc.passes.select_tiles_linear import backward_value_block

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


def compile_artifact(job: dict[str, Any], arch: int, signature: dict[str, str],
                     constexprs: dict[str, Any], sched: Schedule, what: str, *, dtype: str,
                     head_dims: tuple[int, int]) -> CompiledArtifact:
    """`compile_in_child` for one kernel of `job`, returned as the artifact every ahead-of-time
    compile produces (cubin, PTX, registers, shared memory, stack)."""
    result, ptx, cubin = compile_in_child(job, arch, signature, constexprs, sched, what)
    return CompiledArtifact(
        name=job["name"], arch=arch, dtype=dtype, head_dim_qk=head_dims[0],
        head_dim_v=head_dims[1], schedule=sched, shared_bytes=result["shared"],
        n_regs=result["n_regs"], stack_bytes=result["stack"], ptx=ptx, cubin=cubin,
        triton_metadata=result["triton_metadata"])


def compile_in_child(job: dict[str, Any], arch: int, signature: dict[str, str],
                      constexprs: dict[str, Any], sched: Schedule, what: str
                      ) -> tuple[dict[str, Any], str, bytes]:
    from attncc import config

    signature.update({name: "constexpr" for name in constexprs})
    with tempfile.TemporaryDirectory(prefix="attncc-aot-") as tmp:
        job = {**job, "arch": arch, "signature": signature, "constexprs": constexprs,
               "out": tmp,
               "options": {"num_warps": sched.num_warps, "num_stages": sched.num_stages}}
        Path(tmp, "job.json").write_text(json.dumps(job))
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_CACHE_DIR", str(config.cache_dir() / "triton"))
        run = subprocess.run(
            [sys.executable, "-c", _BOOT, __file__, str(Path(tmp, "job.json"))],
            env=env, cwd=tmp, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise AOTCompileError(f"{job['name']} does not compile for sm_{arch} ({what}):\n"
                                  f"{run.stderr[-6000:]}")
        result = json.loads(Path(tmp, "result.json").read_text())
        ptx, cubin = Path(tmp, "kernel.ptx").read_text(), Path(tmp, "kernel.cubin").read_bytes()
    return result, ptx, cubin


def save_artifacts(forward: TritonForward, artifacts: list[CompiledArtifact]) -> list[Path]:
    """Write `<file_stem>.cubin` and `.ptx` next to the cached source, each through a temp file
    and `os.replace`. They are extras: the entry's meta.json does not list them."""
    out = []
    for art in artifacts:
        for ext, data in (("cubin", art.cubin), ("ptx", art.ptx.encode())):
            path = forward.entry.path / f"{art.file_stem}.{ext}"
            tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            out.append(path)
    return out


def _child(job_path: str) -> None:
    """In the child (TRITON_INTERPRET=0): load the source as a module, compile, write results."""
    import importlib.util

    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    job = json.loads(Path(job_path).read_text())
    spec = importlib.util.spec_from_file_location(f"attncc_aot.{job['name']}", job["path"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # triton reads the source back through the module
    spec.loader.exec_module(module)
    fn = getattr(module, job["name"])
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{job['name']}: expected a triton.JITFunction, got {type(fn).__name__}")
    if list(job["signature"]) != list(fn.arg_names):
        raise ValueError(f"{job['name']}: the kernel takes {fn.arg_names}, the launch signature "
                         f"is {list(job['signature'])}")
    index = {name: i for i, name in enumerate(fn.arg_names)}
    # keys as argument-index paths: the form triton 3.x's ASTSource stores (it converts names)
    src = ASTSource(fn, job["signature"], {(index[n],): v for n, v in job["constexprs"].items()},
                    {(index[n],): BaseBackend.parse_attr("D") for n in job["aligned"]})
    compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                              options=job["options"])
    out = Path(job["out"])
    (out / "kernel.cubin").write_bytes(compiled.asm["cubin"])
    (out / "kernel.ptx").write_text(compiled.asm["ptx"])
    n_regs = stack = None
    tool = triton.knobs.nvidia.cuobjdump.path
    if tool and os.path.exists(tool):
        text = subprocess.run([tool, "-res-usage", str(out / "kernel.cubin")], check=True,
                              capture_output=True, text=True).stdout
        found = _RES_USAGE.search(text.split(f"Function {job['name']}:", 1)[-1])
        n_regs, stack = (int(found[1]), int(found[2])) if found else (None, None)
    metadata = next(Path(p) for f, p in compiled.metadata_group.items() if f.endswith(".json"))
    (out / "result.json").write_text(json.dumps(
        {"shared": int(compiled.metadata.shared), "n_regs": n_regs, "stack": stack,
         "triton_metadata": metadata.read_text()}))


if __name__ == "__main__":
    _child(sys.argv[1])
