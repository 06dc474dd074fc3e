"""The child side of an ahead-of-time compile: `aot.compile_in_child` runs this file as a script
in a fresh Python with TRITON_INTERPRET=0, and it compiles one kernel and writes the results.

A file of its own because the child must import nothing but the standard library and triton:
once triton is imported with TRITON_INTERPRET=1 its helpers stay interpreted and cannot be
compiled, and the child should not pay for importing torch or attncc. It is run by path
(`runpy.run_path`), never imported as part of the attncc package there.

Input (job.json): path, name, arch, signature, constexprs, aligned, divisible (integer
arguments that are multiples of 16, optional), options, out. Output under
`out`: kernel.cubin, kernel.ptx and result.json (shared bytes, registers and stack per thread
from `cuobjdump -res-usage` when Triton ships it, Triton's metadata file).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")


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
    # "D": a pointer 16-byte aligned, an integer a multiple of 16 (what Triton's JIT infers)
    hinted = [*job["aligned"], *job.get("divisible", ())]
    src = ASTSource(fn, job["signature"], {(index[n],): v for n, v in job["constexprs"].items()},
                    {(index[n],): BaseBackend.parse_attr("D") for n in hinted})
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
