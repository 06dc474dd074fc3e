"""MiniCPM-SALA-style sparse + linear hybrid [L8 with one alpha per head; M16 block top-k; L2]:
sparse softmax heads and linear-attention heads in one layer, as one spec (docs/catalog.md).

MiniCPM-SALA combines sparse attention (block selection: each query block attends its own block
and the top-k earlier key blocks chosen by a cheap gate, as InfLLM-v2 / MoBA do) with linear
attention (Lightning-style: a constant per-head decay lambda_h). The paper mixes the kinds by
LAYER; here, as issue 19 asks, they are heads of ONE layer: `attncc.hybrid(sparse_spec,
linear_state, alpha=(1, 1, 0, 0))` (alpha_h = 1: a sparse softmax head, 0: a linear head). A
layer schedule is simply one spec per layer.

  sparse head h:  o_i = softmax_j over {j <= i : j // b == i // b or j // b in top_k(h, i // b)}
                  of q_i . k_j / sqrt(d), weighting v_j; the gate scores key block J by
                  mean(q over query block I) . mean(k over block J), J < I, and keeps the best k
  linear head h:  o_t = (1 / sqrt(d)) sum_{j <= t} lambda_h^(t - j) (q_t . k_j) v_j

The gate is computed in PyTorch (it is the model's, not attention); attncc runs the attention
(block top-k reads the chosen blocks' tiles only, no dense mask) and the linear recurrence.
CompiledHybrid runs the linear part on the linear heads only; the block top-k softmax reads
per-head indices, so it runs on every head (a head-dependent spec cannot be cut to a subset):
the linear heads get no picked blocks (-1), so for them it visits only the diagonal tiles.

The independent check is the formulas above, dense, in fp64 (the sparse heads through an
explicit boolean [L, L] mask built from the gate's choice). Exit status 1 on any mismatch
(`--perturb` changes one input of the independent computation, to show the check can fail).
"""

from __future__ import annotations

import sys
import time

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, RUNS_ON, perturbed, report, result, visited

import attncc

B, H, L, D = 1, 4, 128, 16
BLOCK, TOPK = 16, 2
ALPHA = (1.0, 1.0, 0.0, 0.0)  # heads 0, 1 sparse softmax; heads 2, 3 linear
DECAYS = (0.9, 0.95, 0.97, 0.99)  # lambda_h (read for the linear heads only)
N_BLOCKS = L // BLOCK
TOL = 1e-4  # fp32 kernels against fp64, of max(|expected|, 1)


def block_gate(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """int64 [B, H, N_BLOCKS, TOPK]: per query block, the TOPK earlier key blocks whose mean key
    scores highest against the block's mean query; -1 where fewer earlier blocks exist."""
    qm = q.reshape(B, H, N_BLOCKS, BLOCK, D).mean(3)
    km = k.reshape(B, H, N_BLOCKS, BLOCK, D).mean(3)
    s = qm @ km.transpose(-1, -2)
    earlier = torch.arange(N_BLOCKS)[None, :] < torch.arange(N_BLOCKS)[:, None]
    top = s.masked_fill(~earlier, float("-inf")).topk(TOPK, -1)
    return torch.where(top.values.isfinite(), top.indices, -1)


def paper_sparse(q, k, v, picks) -> torch.Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            chosen = torch.zeros(N_BLOCKS, N_BLOCKS, dtype=torch.bool)
            for qb in range(N_BLOCKS):
                for kb in picks[b, h, qb].tolist():
                    if kb >= 0:
                        chosen[qb, kb] = True
            allowed = (j <= i) & ((i // BLOCK == j // BLOCK) | chosen[i // BLOCK, j // BLOCK])
            s = (q[b, h] @ k[b, h].T / D ** 0.5).masked_fill(~allowed, float("-inf"))
            out[b, h] = torch.softmax(s, -1) @ v[b, h]
    return out


def paper_lightning(q, k, v) -> torch.Tensor:
    lam = torch.tensor(DECAYS, dtype=q.dtype)[:, None, None]
    t, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    decay = torch.where(j <= t, lam ** (t - j).clamp(min=0), 0)
    return ((q @ k.transpose(-1, -2)) * decay / D ** 0.5) @ v


def main(perturb: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    picks = block_gate(q, k)
    want_sparse = paper_sparse(q, k, v + 0.05 * perturb * (torch.arange(L) == 3)[:, None],
                               picks)
    want_linear = paper_lightning(q, k, v)
    a = torch.tensor(ALPHA, dtype=torch.float64)[:, None, None]
    want = a * want_sparse + (1 - a) * want_linear

    sparse_spec = attncc.Attention(mask=attncc.block_topk(picks.to(torch.int32), BLOCK))  # M16
    node = attncc.hybrid(sparse_spec, attncc.recurrent_state(decay=DECAYS), ALPHA)  # L8
    attn = attncc.compile(node)
    print(f"L8 hybrid, alpha per head {ALPHA}: sparse heads M16 block_topk(block={BLOCK}, "
          f"k={TOPK}) -> {attn.softmax.name}; linear heads L2 {node.linear.text()} -> "
          f"{attn.linear.chunked.name}")
    x = [t.float().to(DEVICE) for t in (q, k, v)]
    start = time.perf_counter()
    linear_heads = torch.tensor(ALPHA) == 0
    idx = picks.masked_fill(linear_heads[None, :, None, None], -1)  # no picks: linear heads
    o, state = attn(*x, scale=D ** -0.5, return_state=True,
                    block_idx=idx.to(torch.int32).to(DEVICE))  # the gate's choice, this call
    took = time.perf_counter() - start

    ok = report("hybrid layer vs paper formulas", o, want, TOL)
    ok &= report("sparse heads (block top-k) vs dense masked softmax", o[:, :2], want[:, :2], TOL)
    ok &= report("linear heads (Lightning) vs dense decay matrix", o[:, 2:], want[:, 2:], TOL)
    seen, total = visited(sparse_spec, L, L, BLOCK)
    first_linear = ALPHA.index(0.0)  # its indices as head 0 of a spec, for explain's tile map
    lin_seen, _ = visited(attncc.Attention(mask=attncc.block_topk(
        idx[:, first_linear:].to(torch.int32), BLOCK)), L, L, BLOCK)
    causal_seen, _ = visited(attncc.Attention(mask=attncc.causal()), L, L, BLOCK)
    n_linear = ALPHA.count(0.0)
    print(f"saved: a sparse head visits {seen}/{total} {BLOCK}x{BLOCK} tiles (causal softmax: "
          f"{causal_seen}); a linear head keeps {D * D * 4} bytes of fp32 state instead of "
          f"{2 * L * D * 4} bytes of KV at L={L} ({n_linear} of {H} heads); the linear kernel "
          f"ran on heads {attn.linear_heads} only; the top-k softmax on every head (per-head "
          f"indices), {lin_seen}/{total} tiles for a linear head (no picks: the diagonal)")
    print(f"B={B} H={H} L={L} D={D} {RUNS_ON}: the block top-k softmax and L2 "
          f"chunked Triton kernels; {took:.1f} s")
    return result(ok)


if __name__ == "__main__":
    sys.exit(main(perturbed(__doc__)))
