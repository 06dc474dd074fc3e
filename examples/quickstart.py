"""attncc quickstart: compile catalogue variants, explain them, run them, check them.

Runs the compiled Triton kernels on a CUDA GPU if there is one, else the same kernels under
Triton's CPU interpreter, and compares every output with the fp64 reference.
"""

from __future__ import annotations

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import attncc  # noqa: E402
from attncc.backends.reference.forward import attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16
B, HQ, HKV, L, D = 1, 4, 2, 257, 64


def main() -> int:
    torch.manual_seed(0)
    doc = torch.sort(torch.randint(0, 4, (L,)))[0].to(DEVICE)

    def doc_causal(b, h, q_idx, kv_idx):  # a FlexAttention-style mask_mod
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    def capped(score, b, h, q_idx, kv_idx):  # a FlexAttention-style score_mod
        return 30.0 * torch.tanh(score / 30.0)

    variants = {
        "causal + sliding window + soft-cap (Gemma 2)":
            attncc.Attention(mask=attncc.causal() & attncc.sliding_window(64),
                             score=attncc.softcap(50.0)),
        "sinks + window, sink logits (StreamingLLM / gpt-oss)":
            attncc.Attention(mask=attncc.sinks_window(4, 96),
                             normaliser=attncc.sink(torch.zeros(HQ, device=DEVICE))),
        "traced document mask (packed sequences)": attncc.Attention(mask=doc_causal),
        "prefix-LM + ALiBi": attncc.Attention(mask=attncc.prefix_lm(32), score=attncc.alibi()),
        "chunked local + traced soft-cap": attncc.Attention(mask=attncc.chunked(64),
                                                            score=capped),
    }
    q = torch.randn(B, HQ, L, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, HKV, L, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, HKV, L, D, device=DEVICE, dtype=DTYPE)
    where = "GPU " + torch.cuda.get_device_name() if DEVICE == "cuda" else "Triton interpreter"
    print(f"attncc quickstart: B={B} Hq={HQ} Hkv={HKV} L={L} D={D} {DTYPE} on {where}\n")
    failures = 0
    for title, spec in variants.items():
        attn = attncc.compile(spec)
        start = time.perf_counter()
        out, lse = attn(q, k, v, return_lse=True)
        seconds = time.perf_counter() - start
        ref, ref_lse = attention_reference(spec, q.double().cpu(), k.double().cpu(),
                                           v.double().cpu())
        err = (out.double().cpu() - ref).abs().max().item()
        lse_err = (lse.double().cpu() - ref_lse).abs().nan_to_num(0.0).max().item()
        ok = err < 2e-3 and lse_err < 1e-3
        failures += not ok
        print(f"== {title}\n   kernel {attn.name}")
        print("   " + attncc.explain(spec, shape=(L, L), block=(64, 64)).replace("\n", "\n   "))
        print(f"   max |o - ref| = {err:.2e}, max |lse - ref| = {lse_err:.2e}, "
              f"{seconds:.2f} s  {'OK' if ok else 'MISMATCH'}\n")
    print("all variants match the fp64 reference" if not failures
          else f"{failures} variant(s) do NOT match the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
