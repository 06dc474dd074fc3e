"""The backward kernels compile for real GPUs (sm_80, sm_90), with no GPU present.

`compile_backward_for_target` runs Triton's whole pipeline, ptxas included, in a child process
with the interpreter off, so a kernel that only works under TRITON_INTERPRET=1 fails here. Each
compile takes 5-9 s on one CI core, so a handful of representative variants is compiled, both
kernels (dq, dk/dv) of each, all started together, os.cpu_count() at a time:

- closed-form pieces without a score mod (causal), fp16 d128, sm_90;
- every kind of capture gradient at once (reduced: ALiBi slopes; per key: calibration; per
  element: relative table, bias) with a softcap chain rule, bf16 d64, sm_90 and sm_80;
- a block map (the transposed map in dk/dv) from a data-dependent mask with the sink, fp16 d128;
- a reordered kernel (M12 in Hilbert order, gathered rows), fp16 d64;
- fp32 d256 (the smallest tiles), sm_90.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

import attncc
from attncc.backends.triton.backward.aot import compile_backward_for_target
from attncc.backends.triton.backward.launch import backward_kernels

HQ, L = 4, 256
_g = torch.Generator().manual_seed(0)
SPECS = {  # name -> (spec, captures that require grad)
    "causal": (attncc.Attention(mask=attncc.causal()), ()),
    "softcap-alibi-relbias-bias-calib": (attncc.Attention(
        mask=attncc.causal() & attncc.sliding_window(128),
        score=attncc.softcap(30.0).then(attncc.alibi(torch.rand(HQ, generator=_g))).then(
            attncc.relative_bias(torch.randn(HQ, 33, generator=_g))).then(
            attncc.bias(torch.randn(1, HQ, L, L, generator=_g))).then(
            attncc.calibration(torch.rand(L, generator=_g) + 0.5))),
        ("alibi_slopes", "rel_table", "bias", "calibration")),
    "document-sink": (attncc.Attention(
        mask=attncc.document(torch.sort(torch.randint(0, 4, (L,), generator=_g))[0]),
        normaliser=attncc.sink(torch.randn(HQ, generator=_g))), ("sink",)),
    "M12-hilbert": (attncc.Attention(mask=attncc.neighbourhood_2d(16, 16, 7, 7),
                                     reorder=attncc.Hilbert2D(16, 16)), ()),
}


@dataclass(frozen=True)
class Case:
    arch: int
    spec: str
    kernel: str  # "dq" | "dkdv"
    dtype: str = "float16"
    d: int = 128

    def __str__(self) -> str:
        short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[self.dtype]
        return f"sm{self.arch}-{self.spec}-{self.kernel}-{short}-d{self.d}"


CASES = [Case(arch, spec, kernel, dtype, d)
         for arch, spec, dtype, d in [(90, "causal", "float16", 128),
                                      (90, "softcap-alibi-relbias-bias-calib", "bfloat16", 64),
                                      (80, "softcap-alibi-relbias-bias-calib", "bfloat16", 64),
                                      (80, "document-sink", "float16", 128),
                                      (90, "M12-hilbert", "float16", 64),
                                      (90, "causal", "float32", 256)]
         for kernel in ("dq", "dkdv")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Case -> Future[CompiledArtifact]; fresh cache dirs, so every compile runs in full."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNCC_CACHE_DIR", str(tmp_path_factory.mktemp("attncc-cache")))
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        kernels = {name: backward_kernels(attncc.compile(spec).kernels, grads)
                   for name, (spec, grads) in SPECS.items()}
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures: dict[Case, Future] = {
                case: pool.submit(compile_backward_for_target, kernels[case.spec], case.kernel,
                                  case.dtype, case.d, case.d, case.arch) for case in CASES}
            yield futures
            for future in futures.values():
                future.cancel()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_kernel_compiles_for_gpu(case: Case, compiled):
    art = compiled[case].result()
    assert art.arch == case.arch and art.dtype == case.dtype and len(art.cubin) > 0
    assert re.search(rf"\.entry\s+{art.name}\s*\(", art.ptx), "kernel entry missing from the PTX"
    assert re.search(rf"^\.target\s+sm_{case.arch}", art.ptx, re.MULTILINE), "another target"
    assert art.shared_bytes > 0
    if case.arch == 90 and case.dtype != "float32":
        # each kernel's tiles keep its multiplies on Hopper's warpgroup MMA: dq's 128 query
        # rows, dk/dv's 128 keys (32-row query tiles in dq fell back to mma.sync)
        assert "wgmma.mma_async" in art.ptx, f"{case}: no warpgroup MMA"
