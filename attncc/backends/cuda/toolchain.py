"""The CUDA backend's compiler: nvcc and the CUTLASS/CuTe headers, found at run time.

nvcc: $ATTNCC_NVCC, else `nvcc` on PATH, else /usr/local/cuda/bin/nvcc. The headers: the
`nvidia-cutlass` package (`pip install attncc[cuda]`) ships them under
`cutlass_library/source/include`. Either missing is a `ToolchainError` that says what to install
(or that `attncc build --backend cuda` on a machine that has them ships the cubins instead).
Their versions enter every cubin's cache key (`versions`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CUTLASS_DIST = "nvidia-cutlass"
# what nvcc compiles for each arch `attncc build` names: sm_90 takes the arch-specific sm_90a
NVCC_ARCHS = {80: "sm_80", 86: "sm_86", 89: "sm_89", 90: "sm_90a"}
FLAGS = ("-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--resource-usage",
         "-DNDEBUG", "-w")


class ToolchainError(RuntimeError):
    """nvcc or the CUTLASS headers are missing, or nvcc failed on a generated source."""


def nvcc_path() -> str:
    found = (os.environ.get("ATTNCC_NVCC") or shutil.which("nvcc")
             or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists()
                 else None))
    if found is not None and not os.access(found, os.X_OK):
        raise ToolchainError(f"nvcc: {found} (ATTNCC_NVCC) is not an executable file")
    if found is None:
        raise ToolchainError("the CUDA backend compiles with nvcc, which was not found (set "
                             "ATTNCC_NVCC or put nvcc on PATH), or load cubins that "
                             "`attncc build --backend cuda` made on a machine with nvcc")
    return found


@functools.cache
def nvcc_version(nvcc: str) -> str:
    """"13.0.88" (the `release ... V<version>` of `nvcc --version`)."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                          check=True).stdout
    found = re.search(r"V(\d+\.\d+\.\d+)", text)
    return found.group(1) if found else text.strip().splitlines()[-1]


def cutlass_include() -> Path:
    """The CUTLASS/CuTe include directory of the installed `nvidia-cutlass` package."""
    spec = importlib.util.find_spec("cutlass_library")
    include = (Path(next(iter(spec.submodule_search_locations))) / "source" / "include"
               if spec is not None and spec.submodule_search_locations else None)
    if include is None or not (include / "cute" / "tensor.hpp").exists():
        raise ToolchainError("the CUDA backend needs the CUTLASS/CuTe headers of the "
                             f"{CUTLASS_DIST!r} package: pip install 'attncc[cuda]' (or "
                             f"{CUTLASS_DIST}), or load cubins that `attncc build --backend "
                             "cuda` made elsewhere")
    return include


def cutlass_version() -> str:
    try:
        return importlib.metadata.version(CUTLASS_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def versions() -> list[str]:
    """The toolchain lines of a cubin's cache key (nvcc's version needs nvcc: a machine without
    it finds prebuilt cubins by the key `attncc build` stored, see `binary.load_or_build`)."""
    return [f"nvcc={nvcc_version(nvcc_path())}", f"cutlass={cutlass_version()}",
            f"flags={' '.join(FLAGS)}"]


@dataclass(frozen=True)
class Cubin:
    image: bytes
    registers: int
    spill_bytes: int  # spill stores + loads reported by ptxas
    stack_bytes: int
    log: str


def compile_cubin(source: str, headers: dict[str, str], arch: int,
                  defines: dict[str, str]) -> Cubin:
    """nvcc `source` (which includes `headers`, written beside it) into a cubin for sm_<arch>."""
    nvcc, include = nvcc_path(), cutlass_include()
    with tempfile.TemporaryDirectory(prefix="attncc-nvcc-") as tmp:
        for name, text in {**headers, "kernel.cu": source}.items():
            Path(tmp, name).write_text(text)
        cmd = [nvcc, *FLAGS, f"-arch={NVCC_ARCHS.get(arch, f'sm_{arch}')}", f"-I{include}", f"-I{tmp}",
               *(f"-D{k}={v}" for k, v in defines.items()), "-o", f"{tmp}/kernel.cubin",
               f"{tmp}/kernel.cu"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ToolchainError(f"nvcc failed on a generated source (sm_{arch}, {defines}): "
                                 + done.stderr.strip()[-4000:])
        image = Path(tmp, "kernel.cubin").read_bytes()
    return Cubin(image, *resource_usage(done.stdout + done.stderr), done.stdout + done.stderr)


def resource_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill bytes, stack bytes) from nvcc --resource-usage output."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) + int(spills.group(2)) if spills else 0,
            int(stack.group(1)) if stack else 0)
