"""Check the ahead-of-time path against another Triton version, with no GPU.

    python scripts/triton_compat.py /path/to/other/venv/bin/python

The other Python needs only `triton` (e.g. the GPU image's 3.6: `python -m venv /tmp/t36 &&
/tmp/t36/bin/pip install triton==3.6.0`). This script, run with attncc's own Python, renders a
causal forward kernel, then under the other Python:
1. compiles it for sm_90 with `attncc/backends/triton/aot.py`'s child (TTIR .. ptxas);
2. loads the result into that Triton's `CompiledKernel` through `triton_direct.DirectKernel`
   and launches it against a fake CUDA driver, printing what the launcher was given.
It exits non-zero when either step fails on that version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_job(out: Path) -> None:
    import attncc
    from attncc.backends.triton.launch_spec import forward_spec

    forward = attncc.compile(attncc.Attention(mask=attncc.causal())).kernels.kernel
    spec = forward_spec(forward, "float16", 64, 64, 90)
    job = {"path": spec.path, "name": spec.name, "aligned": list(spec.aligned), "arch": 90,
           "signature": spec.signature, "constexprs": spec.constexprs, "out": str(out),
           "options": {"num_warps": spec.schedule.num_warps,
                       "num_stages": spec.schedule.num_stages}}
    (out / "job.json").write_text(json.dumps(job))


def launch_under_fake_driver(out: Path) -> None:
    """Runs under the other Python: attncc's two launch modules without attncc's package (which
    would import torch), the kernel module, and a driver that records instead of launching."""
    for name in ("attncc", "attncc.backends"):
        package = types.ModuleType(name)
        package.__path__ = []
        sys.modules[name] = package
    launch_spec = _load("attncc.backends.triton.launch_spec", ROOT / "attncc/backends/triton/launch_spec.py")
    direct = _load("attncc.backends.triton.direct", ROOT / "attncc/backends/triton/direct.py")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    job = json.loads((out / "job.json").read_text())
    result = json.loads((out / "result.json").read_text())
    (out / "triton.json").write_text(result["triton_metadata"])
    fn = getattr(_load("compat_kernel", Path(job["path"])), job["name"])
    spec = launch_spec.LaunchSpec(job["path"], job["name"], job["signature"], job["constexprs"],
                                  tuple(job["aligned"]), None)
    calls: list = []

    class Launcher:
        def __init__(self, src, metadata):
            self.types = list(src.signature.values())

        def __call__(self, gx, gy, gz, stream, function, packed, launch_metadata, enter, leave,
                     *args):
            calls.append({"grid": [gx, gy, gz], "function": function,
                          "args": [a for a, t in zip(args, self.types) if t != "constexpr"]})

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            calls.append({"load": name, "sha": hashlib.sha256(kernel).hexdigest()[:12],
                          "shared": shared})
            return 1, 2, 64, 0, 1024

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448}

        def unload_module(self, module):
            pass

    class Driver:
        utils, launcher_cls = Utils(), Launcher

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Driver())
    files = {f: out / f for f in ("triton.json", "kernel.cubin", "kernel.ptx")}
    kernel = direct.DirectKernel(fn, spec, files)
    values = dict(job["constexprs"])
    for name, kind in job["signature"].items():
        if kind != "constexpr":
            values[name] = {"i32": 7, "fp32": 0.5}.get(kind, 4096)
    kernel((3, 4), values)
    cubin = hashlib.sha256((out / "kernel.cubin").read_bytes()).hexdigest()[:12]
    print(f"triton {triton.__version__}: compiled {job['name']} for sm_90 (cubin {cubin}, "
          f"{result['shared']} B shared, {result['n_regs']} registers, {result['stack']} B stack)")
    print(f"triton {triton.__version__}: launcher calls {json.dumps(calls)}")
    loaded, launched = calls
    assert loaded["sha"] == cubin and loaded["shared"] == result["shared"], calls
    assert launched["grid"] == [3, 4, 1] and launched["function"] == 2, calls


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(python: str) -> int:
    with tempfile.TemporaryDirectory(prefix="attncc-compat-") as tmp:
        out = Path(tmp)
        write_job(out)
        env = {"TRITON_CACHE_DIR": str(out / "triton"), "PATH": "/usr/bin:/bin"}
        steps = [[python, str(ROOT / "attncc/backends/triton/aot.py"), str(out / "job.json")],
                 [python, __file__, "--launch", str(out)]]
        for step in steps:
            run = subprocess.run(step, cwd=out, env=env, capture_output=True, text=True)
            print(run.stdout, end="")
            if run.returncode != 0:
                print(run.stderr[-4000:], file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--launch"]:
        launch_under_fake_driver(Path(sys.argv[2]))
    elif len(sys.argv) == 2:
        sys.exit(main(sys.argv[1]))
    else:
        sys.exit(__doc__)
