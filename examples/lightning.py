"""Lightning Attention (L2, docs/catalog.md): linear attention, constant per-head decay, run as the
generated chunked Triton kernel, then decoded token by token with the recurrent kernel.

Lightning Attention-2 / RetNet use lambda_h = 2^(-8 h / H)-style decays (here a spread of per-head
constants). Runs on a CUDA GPU if there is one, else the same kernels under Triton's CPU
interpreter; every output and the final state are compared with the fp64 one-token recurrence
and the max errors printed. Exit status 0 only when every check passes.
"""

from __future__ import annotations

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import attncc
from attncc.backends.reference.linear import recurrent_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16
B, H, L, D, DECODE = 1, 4, 300, 64, 4  # L: not a multiple of the chunk
TOL = 2e-2  # fp16 inputs, fp32 state: of max(reference max magnitude, 1)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = (actual.double().cpu() - expected).abs().max().item()
    return err / max(expected.abs().max().item(), 1.0)


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    decays = tuple(1 - 2.0 ** (-5 - h) for h in range(H))  # 0.969 .. 0.996 per head
    node = attncc.recurrent_state(decay=decays)
    attn = attncc.compile(attncc.Attention(memory=node))
    print(f"{node.catalog_id} {node.text()}\n  chunked kernel: {attn.chunked.name}\n"
          f"  recurrent kernel: {attn.recurrent.name}")
    T = L + DECODE
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    q, k, v = (x.to(DTYPE) for x in (q, k, v))
    s0 = 0.1 * torch.randn(B, H, D, D, generator=gen)
    ro, rs = recurrent_reference(q.double(), k.double(), v.double(), node,
                                 initial_state=s0.double(), output_final_state=True)

    dev = [x.to(DEVICE) for x in (q, k, v)]
    start = time.perf_counter()
    o_pre, state = attn(*(x[:, :, :L] for x in dev), initial_state=s0.to(DEVICE),
                        return_state=True)  # prefill: the chunked kernel
    outs = [o_pre]
    for t in range(L, T):  # decode: one token at a time, the recurrent kernel
        o_t, state = attn(*(x[:, :, t:t + 1] for x in dev), initial_state=state,
                          return_state=True)
        outs.append(o_t)
    took = time.perf_counter() - start
    errs = {"prefill o": rel_err(o_pre, ro[:, :, :L]),
            "decode o": rel_err(torch.cat(outs[1:], dim=2), ro[:, :, L:]),
            "final state": rel_err(state, rs)}
    ok = True
    for name, err in errs.items():
        ok &= err <= TOL
        print(f"  {name:12s} max error {err:.2e} (of max |ref|; tolerance {TOL:.0e}) "
              f"{'ok' if err <= TOL else 'FAIL'}")
    print(f"B={B} H={H} L={L}+{DECODE} D={D} {DTYPE} on {DEVICE}: {took:.2f} s "
          f"({'interpreter' if DEVICE == 'cpu' else 'GPU'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
