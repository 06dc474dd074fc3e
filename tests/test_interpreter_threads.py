"""Several threads of one process launching kernels at once: under Triton's CPU interpreter
(not thread-safe) every launch must hold one process-wide lock (`triton_source.load_module`)."""

from __future__ import annotations

import threading

import pytest
import torch

import attncc
from attncc import config
from attncc.backends.reference.forward import attention_reference

THREADS, CALLS = 6, 3
TOL = 2e-3  # fp16 outputs against the fp64 reference


@pytest.mark.skipif(not config.triton_interpret(), reason="checks the CPU interpreter's lock")
def test_six_threads_launch_one_compiled_attention_concurrently():
    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(8),
                            score=attncc.softcap(20.0))
    attn = attncc.compile(spec)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, dtype=torch.float16) for _ in range(3))
    ref, ref_lse = attention_reference(spec, q.double(), k.double(), v.double())
    barrier, errors = threading.Barrier(THREADS), []

    def work(i: int) -> None:
        try:
            barrier.wait()  # every thread launches at the same moment
            for _ in range(CALLS):
                o, lse = attn(q, k, v, return_lse=True)
                err = max((o.double() - ref).abs().max().item(),
                          (lse.double() - ref_lse).abs().max().item())
                assert err < TOL, f"error {err:.2e}"
        except Exception as e:  # reported below, with the thread that saw it
            errors.append(f"thread {i}: {type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
