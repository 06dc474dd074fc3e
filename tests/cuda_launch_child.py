"""Run by tests/test_cuda_backend.py (`python -m tests.cuda_launch_child` from the repository
root) in a new process, after `attncc build --backend cuda` put an sm_90 fp16 d64 causal cubin
into ATTNCC_CACHE_DIR. The fake CUDA driver of benchmarks/fake_cuda.py stands in for the GPU,
so all of a CUDA-backend launch runs for real on a CPU except the driver calls: finding the
cubin in the cache, loading it (Triton's `load_binary`, faked), and handing the grid, block,
shared memory and the packed arguments to `cuLaunchKernel` (faked), after encoding K's and V's
TMA tensor maps (`cuTensorMapEncodeTiled`, faked and recorded). It prints one JSON record.
"""

from __future__ import annotations

import json
import os

import torch

import attncc
from attncc.backends import cache
from attncc.backends.cuda import render, toolchain
from benchmarks import fake_cuda

COMPILES = [0]


def main() -> None:
    fake_cuda.install(record=True)
    compile_cubin = toolchain.compile_cubin

    def counted(*args, **kwargs):
        COMPILES[0] += 1
        return compile_cubin(*args, **kwargs)

    toolchain.compile_cubin = counted
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 200, 64, generator=gen).half() for h in (4, 2, 2))
    causal = attncc.compile(attncc.Attention(mask=attncc.causal()))
    causal(q, k, v, return_lse=True, backend="cuda")
    causal(q, k, v, backend="cuda")  # the second launch reuses the loaded kernel
    out = {"compiles": COMPILES[0], "cache_builds": cache.stats.builds,
           "renders": render.RENDERS[0], "loads": list(fake_cuda.LOADS),
           "launches": [r for r in fake_cuda.RECORDED if r.get("backend") == "cuda"],
           "tensor_maps": list(fake_cuda.TENSOR_MAPS)}

    # a signature no build made: offline, an error that says how to build it
    os.environ["ATTNCC_OFFLINE"] = "1"
    try:
        causal(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="cuda")
        out["offline_error"] = None
    except Exception as e:  # NotPrebuiltError
        out["offline_error"] = str(e)
    # K broadcast over the batch (stride 0): no tensor map; the cp.async cubin, which no build
    # made (offline: an error naming it)
    try:
        causal(q, k[:1].expand(2, -1, -1, -1), v, backend="cuda")
        out["broadcast_error"] = None
    except Exception as e:  # NotPrebuiltError
        out["broadcast_error"] = str(e)
    del os.environ["ATTNCC_OFFLINE"]

    # a head dim that is not contiguous: refused before any launch
    try:
        causal(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, backend="cuda")
        out["layout_error"] = None
    except ValueError as e:
        out["layout_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
