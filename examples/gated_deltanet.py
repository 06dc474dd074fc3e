"""Gated DeltaNet (L6 in docs/catalog.md): S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1}
+ beta_t k_t v_t^T, run as the generated chunked Triton kernel (WY / UT representation) on packed
variable-length sequences (`cu_seqlens`), then decoded with the recurrent kernel.

Inputs as Gated DeltaNet makes them: L2-normalised keys, beta = sigmoid(.), g = logsigmoid(.)
(log-space gates: long sequences never underflow). Runs on a CUDA GPU if there is one, else the
same kernels under Triton's CPU interpreter; every output and final state is compared with the
fp64 one-token recurrence and the max errors printed. Exit status 0 only when all pass.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import attncc
from attncc.backends.reference.linear_varlen import varlen_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16
H, DK, DV = 2, 64, 64
SEQLENS = [130, 1, 65]  # packed: one long, one single-token, one just past a chunk
TOL = 4e-2  # bf16 inputs, fp32 state: of max(reference max magnitude, 1)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = (actual.double().cpu() - expected).abs().max().item()
    return err / max(expected.abs().max().item(), 1.0)


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    node = attncc.recurrent_state(update="delta", decay="scalar")
    attn = attncc.compile(attncc.Attention(memory=node))
    print(f"{node.catalog_id} {node.text()}\n  chunked kernel: {attn.chunked.name}\n"
          f"  recurrent kernel: {attn.recurrent.name}")
    N, T = len(SEQLENS), sum(SEQLENS) + len(SEQLENS)  # one more token per sequence to decode
    q = torch.randn(T, H, DK, generator=gen)
    k = F.normalize(torch.randn(T, H, DK, generator=gen), dim=-1)
    v = torch.randn(T, H, DV, generator=gen)
    beta = torch.sigmoid(torch.randn(T, H, generator=gen))
    g = F.logsigmoid(torch.randn(T, H, generator=gen) + 3)  # mostly keep: e^g ~ 0.95
    q, k, v = (x.to(DTYPE) for x in (q, k, v))
    s0 = 0.1 * torch.randn(N, H, DK, DV, generator=gen)
    cu = torch.tensor([0] + [n + 1 for n in SEQLENS]).cumsum(0).to(torch.int32)
    ro, rs = varlen_reference(q.double(), k.double(), v.double(), node, cu_seqlens=cu,
                              g=g.double(), beta=beta.double(), initial_state=s0.double(),
                              output_final_state=True)
    last = (cu[1:] - 1).long()
    pre = torch.ones(T, dtype=torch.bool)
    pre[last] = False
    cu_pre = torch.tensor([0] + SEQLENS).cumsum(0).to(torch.int32)
    start = time.perf_counter()
    d = {"device": DEVICE}
    o_pre, state = attn(q[pre].to(**d), k[pre].to(**d), v[pre].to(**d), g=g[pre].to(**d),
                        beta=beta[pre].to(**d), initial_state=s0.to(**d), return_state=True,
                        cu_seqlens=cu_pre.to(**d))  # packed prefill: the chunked kernel
    o_dec, state = attn(q[last].to(**d), k[last].to(**d), v[last].to(**d), g=g[last].to(**d),
                        beta=beta[last].to(**d), initial_state=state, return_state=True,
                        cu_seqlens=torch.arange(N + 1, dtype=torch.int32, device=DEVICE))
    took = time.perf_counter() - start
    errs = {"prefill o": rel_err(o_pre, ro[pre]), "decode o": rel_err(o_dec, ro[last]),
            "final state": rel_err(state, rs)}
    ok = True
    for name, err in errs.items():
        ok &= err <= TOL
        print(f"  {name:12s} max error {err:.2e} (of max |ref|; tolerance {TOL:.0e}) "
              f"{'ok' if err <= TOL else 'FAIL'}")
    print(f"N={N} sequences {SEQLENS} (+1 decode each) H={H} Dk={DK} Dv={DV} {DTYPE} on "
          f"{DEVICE}: {took:.2f} s ({'interpreter' if DEVICE == 'cpu' else 'GPU'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
