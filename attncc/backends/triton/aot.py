"""Ahead-of-time compilation of a forward kernel for a named NVIDIA GPU, with no GPU present.

`compile_for_target(forward, "float16", 128, 128, 90)` runs Triton's whole pipeline (TTIR, TTGIR,
LLVM IR, PTX, ptxas) on the cached source with the argument list and constexprs that
`TritonForward.launch` passes on a CUDA device of that compute capability. CI uses it to prove
every generated kernel compiles for real GPUs, not only under the interpreter.

Each compile runs in a child Python with TRITON_INTERPRET=0: once a process has imported triton
with TRITON_INTERPRET=1, triton.language's own helpers (tl.cdiv, ...) are interpreted functions
for good and cannot be compiled. The child runs `aot_child.py` as a script, which imports only
the standard library and triton (it must not pay for importing torch or attncc); this module is
the parent side and imports attncc at the top like any other.

The linear-state kernels compile through `compile_artifact` from `linear/aot.py`, the backward
kernels from `backward/aot.py`: this module knows no kernel family but the forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attncc import config
from attncc.backends.keys import triton_type
from attncc.backends.triton import aot_child
from attncc.backends.triton.launch_spec import (LaunchSpec, Variant, block_map_spec,
                                                forward_spec, forward_tiles)
from attncc.ir.nodes import Schedule

if TYPE_CHECKING:
    from attncc.backends.triton.forward import TritonForward

# runs a file as __main__ with argv [file, job.json]; cwd is a temp dir, so nothing shadows
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
    d = f"d{head_dim_qk}" if head_dim_qk == head_dim_v else f"d{head_dim_qk}_{head_dim_v}"
    return f"{name}.sm{arch}.{triton_type(dtype)}.{d}"


def compile_for_target(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                       arch: int, *, write_lse: bool = True, contiguous: bool = True,
                       divisible: bool = True, variant: Variant | None = None
                       ) -> CompiledArtifact:
    """Compile `forward` for sm_<arch> and one call signature; raises `AOTCompileError` with
    Triton's message when it does not compile. `variant` (default: from `write_lse`,
    `contiguous` and `divisible`) is the specialisation compiled: `contiguous` is the one a
    launch with aligned, unit-stride last dims gets (see `launch_spec.ALIGNED`), False the one
    for any strides; `divisible`, strides that are multiples of 16 (`launch_spec.STRIDES`)."""
    variant = variant or Variant(write_lse=write_lse, contiguous=contiguous, divisible=divisible)
    spec = forward_spec(forward, dtype, head_dim_qk, head_dim_v, arch, variant)
    what = f"{dtype}, head dims {head_dim_qk}/{head_dim_v}, {spec.schedule.text()}"
    return compile_spec(spec, arch, what, dtype=dtype, head_dims=(head_dim_qk, head_dim_v))


def compile_block_map_for_target(forward: TritonForward, arch: int, dtype: str = "float16",
                                 head_dim: int = 128, head_dim_v: int | None = None
                                 ) -> CompiledArtifact:
    """Compile `forward`'s block-map kernel (plans whose tiles come from a device-built block
    map) with the tile sizes the forward kernel of (dtype, head_dim, head_dim_v) uses on
    sm_<arch>; `head_dim_v` defaults to `head_dim`."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    spec = block_map_spec(forward, arch, forward_tiles(forward, dtype, head_dim, head_dim_v, arch))
    what = f"tiles {spec.constexprs['BLOCK_M']}x{spec.constexprs['BLOCK_N']}"
    return compile_spec(spec, arch, what, dtype=dtype, head_dims=(head_dim, head_dim_v))


def compile_spec(spec: LaunchSpec, arch: int, what: str, *, dtype: str,
                 head_dims: tuple[int, int]) -> CompiledArtifact:
    job = {"path": spec.path, "name": spec.name, "aligned": list(spec.aligned),
           "divisible": list(spec.divisible)}
    return compile_artifact(job, arch, dict(spec.signature), dict(spec.constexprs),
                            spec.schedule, what, dtype=dtype, head_dims=head_dims)


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
    """Compile `job` in a child Python (TRITON_INTERPRET=0) running `aot_child.py`; returns its
    result record, the PTX and the cubin, or raises `AOTCompileError` with its stderr."""
    signature.update({name: "constexpr" for name in constexprs})
    with tempfile.TemporaryDirectory(prefix="attncc-aot-") as tmp:
        job = {**job, "arch": arch, "signature": signature, "constexprs": constexprs,
               "out": tmp,
               "options": {"num_warps": sched.num_warps, "num_stages": sched.num_stages}}
        Path(tmp, "job.json").write_text(json.dumps(job))
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_CACHE_DIR", str(config.cache_dir() / "triton"))
        run = subprocess.run(
            [sys.executable, "-c", _BOOT, aot_child.__file__, str(Path(tmp, "job.json"))],
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
