"""Run by tests/test_direct_launch.py (`python -m tests.direct_launch_child` from the
repository root) in a new process with TRITON_INTERPRET=0, after the test built sm_90 kernels
into ATTNCC_CACHE_DIR. The fake CUDA driver of benchmarks/fake_cuda.py stands in for the GPU,
so all of a prebuilt launch runs for real on a CPU except the driver calls: choosing the
variant, loading the cache entry into Triton's `CompiledKernel`, and handing the arguments to a
launcher with the contract of Triton's (`CudaLauncher(src, metadata)`, then
`launcher(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
exit_hook, *arguments)`, constexprs among the arguments). It prints one JSON record.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import triton

import attncc
from attncc.backends.triton import prebuilt
from attncc.backends import cache
from attncc.backends.triton import aot as triton_aot

from benchmarks import fake_cuda

LAUNCHES = fake_cuda.RECORDED
LOADS = fake_cuda.LOADS
COMPILES = {"triton.compile": 0, "compile_in_child": 0}


def counted(name, fn):
    def wrapper(*args, **kwargs):
        COMPILES[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    # this CPU plays an sm_90 GPU: its tensors launch the sm_90 prebuilt binaries
    fake_cuda.install(record=True)
    triton.compile = counted("triton.compile", triton.compile)
    triton_aot.compile_in_child = counted("compile_in_child", triton_aot.compile_in_child)
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("attncc").addHandler(handler)

    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen).half() for _ in range(3))
    causal = attncc.compile(attncc.Attention(mask=attncc.causal()))
    doc = torch.tensor([0] * 13 + [1] * 20 + [2] * 7, dtype=torch.int32)
    document = attncc.compile(attncc.Attention(mask=attncc.document(doc)))
    causal(q, k, v, backend="triton")
    causal(q, k, v, backend="triton")  # the second launch reuses the loaded binary
    document(q, k, v, backend="triton")
    out["prebuilt"] = {"compiles": dict(COMPILES), "cache_builds": cache.stats.builds,
                       "launches": list(LAUNCHES), "loads": list(LOADS), "logged": list(logged)}

    # training: the backward's dq and dk/dv kernels (and the document mask's block map at the
    # backward's tiles) run their prebuilt binaries too
    before = len(LAUNCHES)
    for attn in (causal, document):
        qg = q.clone().requires_grad_()
        attn(qg, k, v, backend="triton").float().sum().backward()
    out["backward"] = {"compiles": dict(COMPILES), "cache_builds": cache.stats.builds,
                       "launches": LAUNCHES[before:], "logged": list(logged)}

    # another spelling of causal() (one canonical key): offline, its launch runs the binary
    # built for causal(), though its own kernel has another readable name
    os.environ["ATTNCC_OFFLINE"] = "1"
    before = len(LAUNCHES)
    respelt = attncc.compile(attncc.Attention(mask=attncc.causal() & attncc.causal()))
    respelt(q, k, v, backend="triton")
    del os.environ["ATTNCC_OFFLINE"]
    out["respelt"] = {"compiles": dict(COMPILES), "launches": LAUNCHES[before:],
                      "name": respelt.name, "logged": list(logged)}

    # a launch whose head-dim stride is not 1 needs the ".strided" variant, which no build made
    strided_q = torch.randn(1, 2, 32, 40, generator=gen).half().transpose(2, 3)
    os.environ["ATTNCC_OFFLINE"] = "1"
    try:
        causal(strided_q, k, v, backend="triton")
        out["offline_error"] = None
    except prebuilt.NotPrebuiltError as e:
        out["offline_error"] = str(e)
    del os.environ["ATTNCC_OFFLINE"]
    before = len(LAUNCHES)
    causal(strided_q, k, v, backend="triton")  # compiled now, with a log line
    causal(strided_q, k, v, backend="triton")  # and then reused
    out["strided"] = {"compiles": dict(COMPILES), "launches": LAUNCHES[before:],
                      "logged": list(logged)}

    # rows 40 elements apart (a head-dim slice of a wider tensor): contiguous, but a row stride
    # that is no multiple of 16 needs the ".oddstrides" variant, compiled once with a log line
    before = len(LAUNCHES)
    odd_q = torch.randn(1, 2, 40, 40, generator=gen).half()[..., :32]
    causal(odd_q, k, v, backend="triton")
    causal(odd_q, k, v, backend="triton")
    out["oddstrides"] = {"compiles": dict(COMPILES), "launches": LAUNCHES[before:],
                         "logged": list(logged)}

    # a launch that does not match the binary's constexprs or integer widths never reaches it
    target = prebuilt.forward_target(causal.kernels.kernel, "forward", "float16", 32, 32, 90)
    kernel = prebuilt.direct_kernel(target, causal.kernels.kernel.jit_function())
    values = {name: 0 for name in kernel.spec.signature} | kernel.spec.constexprs
    errors = []
    for change in ({"D_QK": 64}, {"stride_qb": 2**31}):
        try:
            kernel((1, 1), values | change)
        except ValueError as e:
            errors.append(str(e))
    out["refused"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()
