"""BASED [L8 = L1 with the Taylor feature map + M2 sliding-window softmax] (docs/catalog.md):
the hybrid layer as one spec, `attncc.hybrid(softmax, linear, alpha)`, then decoded token by
token with the linear state carried and a KV cache of only the window.

BASED (Arora et al. 2024) pairs
  - linear attention with the 2nd-order Taylor approximation of exp as its kernel,
        phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d),
        o_i = sum_{j <= i} phi(q_i).phi(k_j) v_j / sum_{j <= i} phi(q_i).phi(k_j)
    (feature dimension d = 16: the state is (1 + d + d^2) x dv per head), and
  - exact softmax attention over a small sliding window of w tokens (M2).
The paper stacks the two as separate layers; attncc's L8 puts both in one spec and mixes them,
o = alpha * o_softmax + (1 - alpha) * o_linear (alpha = 0.5 here; alpha = 1 or 0 per head gives
the paper's split into softmax and linear heads: examples/minicpm_sala.py). Both parts are
checked separately against the formulas above, and the mix.

attncc's taylor2 feature map is [1, x, flatten(x x^T) / sqrt(2)], whose dot product is
1 + q.k + (q.k)^2 / 2: BASED's 1 / sqrt(d) goes in by scaling q and k by d^(-1/4) before the
call (so the softmax part takes scale 1). The independent check is the formulas above written
as dense masked matrix products in fp64. Exit status 1 on any mismatch (`--perturb` changes one
input of the independent computation, to show the check can fail).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, RUNS_ON, perturbed, report, result, visited

import attncc

B, H, L, D, DV = 1, 2, 64, 16, 16  # D = 16: BASED's feature dimension
WINDOW, PREFILL = 16, 60  # decode the last L - PREFILL tokens one at a time
ALPHA = 0.5
TOL = 1e-4  # fp32 kernels against fp64 formulas, of max(|expected|, 1)


def paper_taylor_linear(q, k, v) -> torch.Tensor:
    x = q @ k.transpose(-1, -2) / D ** 0.5
    w = (1 + x + x * x / 2).tril()  # causal
    return (w @ v) / w.sum(-1, keepdim=True)


def paper_window_softmax(q, k, v) -> torch.Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (j <= i) & (i - j < WINDOW)
    s = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def main(perturb: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, DV, generator=gen, dtype=torch.float64)
    want_lin, want_soft = paper_taylor_linear(q, k, v), paper_window_softmax(q, k, v)
    if perturb:  # the independent computation sees a different key: the check must fail
        want_lin = paper_taylor_linear(q, k + 0.05 * (torch.arange(L) == 7)[:, None], v)
    want = ALPHA * want_soft + (1 - ALPHA) * want_lin

    soft_spec = attncc.Attention(mask=attncc.sliding_window(WINDOW), scale=1.0)  # M2
    node = attncc.hybrid(soft_spec, attncc.recurrent_state(feature_map="taylor2", normalize=True),
                         ALPHA)  # L8: one spec
    attn = attncc.compile(node)
    print(f"L8 hybrid: softmax part {soft_spec.mask.text()}, linear part {node.linear.text()}, "
          f"alpha={node.alpha}\n  softmax kernel: {attn.softmax.name}\n"
          f"  linear kernels: {attn.linear.chunked.name} (chunked, prefill), "
          f"{attn.linear.recurrent.name} (recurrent, decode)")
    r = D ** -0.25  # BASED's 1 / sqrt(d), split over q and k
    x = [t.float().to(DEVICE) for t in (q * r, k * r, v)]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, state = attn(*x, return_state=True)  # prefill, the whole sequence
        soft_part = attn.softmax(*x)
        lin_part = attn.linear(*x)
        o_pre, S = attn.linear(*(t[:, :, :PREFILL] for t in x), return_state=True)
        dec_outs = []
        for t in range(PREFILL, L):  # decode: linear state carried, KV cache = the window only
            sl = slice(t, t + 1)
            o_t, S = attn.linear(*(u[:, :, sl] for u in x), initial_state=S, return_state=True)
            win = slice(max(0, t + 1 - WINDOW), t + 1)
            s_t = attn.softmax(x[0][:, :, sl], x[1][:, :, win], x[2][:, :, win])
            dec_outs.append(ALPHA * s_t + (1 - ALPHA) * o_t)
    took = time.perf_counter() - start
    for w in caught:  # attncc's own warnings (e.g. a reference fallback) are shown, not hidden
        print(f"warning from attncc: {w.message}")

    ok = report("hybrid (one spec) vs paper formulas", o, want, TOL)
    ok &= report("softmax part (M2 window) vs dense masked softmax", soft_part, want_soft, TOL)
    ok &= report("linear part (Taylor, normalised) vs dense kernel matrix", lin_part, want_lin, TOL)
    ok &= report("decode: window KV cache + carried state", torch.cat(dec_outs, 2),
                 want[:, :, PREFILL:], TOL)
    ok &= report("decode state == prefill state", S, state.double().cpu(), TOL)

    seen, total = visited(soft_spec, L, L, 16)
    causal_seen, _ = visited(attncc.Attention(mask=attncc.causal()), L, L, 16)
    F = 1 + D + D * D
    state_bytes = B * H * F * (DV + 1) * 4
    kv_window = 2 * B * H * WINDOW * D * 4
    print(f"saved: the window visits {seen}/{total} 16x16 tiles (causal softmax: {causal_seen}); "
          f"decode keeps {kv_window} bytes of fp32 window KV + {state_bytes} bytes of Taylor "
          f"state (F = 1 + d + d^2 = {F}) per layer, constant, vs 2*B*H*D*4 = "
          f"{2 * B * H * D * 4} bytes more KV per token for full softmax")
    print(f"B={B} H={H} L={L} (decode {L - PREFILL}) D={D} Dv={DV} w={WINDOW} {RUNS_ON}: "
          f"taylor2 runs as Triton kernels (chunked and recurrent) in the forward; its backward "
          f"is the PyTorch reference, with a warning (no gradient taken here); {took:.1f} s")
    return result(ok)


if __name__ == "__main__":
    sys.exit(main(perturbed(__doc__)))
