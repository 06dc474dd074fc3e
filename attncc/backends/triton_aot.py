"""Ahead-of-time compilation of a forward kernel for a named NVIDIA GPU, with no GPU present.

`compile_for_target(forward, "float16", 128, 128, 90)` runs Triton's full pipeline (TTIR, TTGIR,
LLVM IR, PTX, then ptxas to a cubin) on the cached source with the exact argument list and
constexprs that `TritonForward.launch` uses on a CUDA device of that compute capability. CI uses
it to prove every generated kernel compiles for real GPUs, not just under the interpreter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import triton

from attncc import config
from attncc.backends.triton_backend import TritonForward
from attncc.backends.triton_render import fixed_arguments, kernel_arguments
from attncc.ir.nodes import Schedule
from attncc.ir.plan import Signature
from attncc.passes.select_tiles import padded

_POINTERS = ("Q", "K", "V", "O", "LSE", "VISITS")  # torch allocations: 16-byte aligned
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class CompiledArtifact:
    """One kernel compiled for one GPU. `n_regs`/`stack_bytes` are per thread, read from the cubin
    by `cuobjdump -res-usage` (None when Triton ships no cuobjdump); a non-zero `stack_bytes`
    usually means register spills. `shared_bytes` is Triton's dynamic shared memory."""

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

    @property
    def file_stem(self) -> str:
        """`<name>.sm90.fp16.d128` (`.d192_128` when the head dims differ)."""
        d = (f"d{self.head_dim_qk}" if self.head_dim_qk == self.head_dim_v
             else f"d{self.head_dim_qk}_{self.head_dim_v}")
        return f"{self.name}.sm{self.arch}.{_SHORT[self.dtype]}.{d}"


@contextlib.contextmanager
def _compiled_mode() -> Iterator[None]:
    """Interpreter off for this block, env and knobs restored after. `@triton.jit` picks
    InterpretedFunction vs JITFunction from `knobs.runtime.interpret` at decoration time (the
    TRITON_INTERPRET env var unless code set the knob), and code generation reads it again
    (constexpr functions), so both loading and compiling run inside this block."""
    knobs = triton.knobs
    with knobs.runtime.scope(), knobs.cache.scope():
        knobs.runtime.interpret = False
        if "TRITON_CACHE_DIR" not in os.environ:  # binaries beside the source, as the launcher
            knobs.cache.dir = str(config.cache_dir() / "triton")
        yield


def _jit_function(forward: TritonForward) -> triton.runtime.JITFunction:
    """The cached source loaded as its own module (never the launcher's, which may be an
    interpreted one), so this works whatever TRITON_INTERPRET says."""
    path = forward.entry.files["kernel.py"]
    module_name = f"attncc_aot_kernels.{forward.name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton reads the source back through the module
    spec.loader.exec_module(module)
    fn = getattr(module, forward.name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{forward.name}: expected a triton.JITFunction, got {type(fn).__name__}")
    return fn


def launch_constexprs(sched: Schedule, dqk: int, dv: int, write_lse: bool) -> dict[str, object]:
    """The constexprs `TritonForward.launch` passes on a CUDA device (keep the two in step)."""
    return dict(D_QK=dqk, D_V=dv, D_QK_PAD=padded(dqk), D_V_PAD=padded(dv),
                BLOCK_M=sched.block_m, BLOCK_N=sched.block_n,
                DOT_PRECISION="tf32" if sched.allow_tf32 else "ieee",
                UPCAST_DOT=False, WRITE_LSE=write_lse, COUNT_VISITS=False)


def _resource_usage(cubin: bytes, name: str) -> tuple[int | None, int | None]:
    tool = triton.knobs.nvidia.cuobjdump.path
    if not tool or not os.path.exists(tool):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    match = _RES_USAGE.search(text.split(f"Function {name}:", 1)[-1])
    return (int(match[1]), int(match[2])) if match else (None, None)


def compile_for_target(forward: TritonForward, dtype: str, head_dim_qk: int, head_dim_v: int,
                       arch: int, *, write_lse: bool = True) -> CompiledArtifact:
    """Compile `forward` for `sm_<arch>` (e.g. 80, 90) and the call signature (dtype, head dims);
    raises whatever Triton raises (CompilationError, ptxas errors) when the kernel does not
    compile. Pointers Q..VISITS are compiled as 16-byte aligned, as a contiguous launch is."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    sched = forward.plan_for(Signature(dtype, head_dim_qk, head_dim_v, f"sm{arch}")).schedule
    constexprs = launch_constexprs(sched, head_dim_qk, head_dim_v, write_lse)
    with _compiled_mode():
        fn = _jit_function(forward)
        signature = dict(fixed_arguments(dtype) + kernel_arguments(forward.plan))
        signature.update({name: "constexpr" for name in constexprs})
        if list(signature) != list(fn.arg_names):
            raise ValueError(f"{forward.name}: the kernel takes {fn.arg_names}, but the launch "
                             f"signature is {list(signature)}")
        index = {name: i for i, name in enumerate(fn.arg_names)}
        # keyed by argument-index paths, the form every triton 3.x ASTSource stores internally
        src = ASTSource(fn, signature, {(index[n],): v for n, v in constexprs.items()},
                        {(index[n],): BaseBackend.parse_attr("D") for n in _POINTERS})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={
            "num_warps": sched.num_warps, "num_stages": sched.num_stages})
        n_regs, stack = _resource_usage(compiled.asm["cubin"], forward.name)
    return CompiledArtifact(
        name=forward.name, arch=arch, dtype=dtype, head_dim_qk=head_dim_qk, head_dim_v=head_dim_v,
        schedule=sched, shared_bytes=int(compiled.metadata.shared), n_regs=n_regs,
        stack_bytes=stack, ptx=compiled.asm["ptx"], cubin=bytes(compiled.asm["cubin"]))


def save_artifacts(forward: TritonForward, artifacts: list[CompiledArtifact]) -> list[Path]:
    """Write `<name>.sm90.fp16.d128.cubin` (and `.ptx`) next to the cached source: temp file,
    then `os.replace`, so a reader never sees half a file. Not listed in the entry's meta.json."""
    out = []
    for art in artifacts:
        for ext, data in (("cubin", art.cubin), ("ptx", art.ptx.encode())):
            path = forward.entry.path / f"{art.file_stem}.{ext}"
            tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            out.append(path)
    return out
