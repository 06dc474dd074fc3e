"""PBS-Attn (permuted block-sparse attention, Wang et al., 2025): segment-wise permutation by
key importance, then block-sparse attention (R5 & a block-sparse mask on permuted blocks).

Attention mass concentrates on a few keys scattered over the sequence, so a block-sparse
kernel in the original order must read many blocks to catch them. PBS-Attn permutes tokens
inside segments of `SEGMENT` tokens by key importance (most important first), which packs the
important keys into the first block of each segment; causality stays exact across segments
(a token never leaves its segment), and inside a segment the causal mask is evaluated on the
original positions. Then a block-sparse pattern is chosen on the permuted blocks.

Here, all in PyTorch (the estimates are the example's, not attncc's):
- key importance: the attention mass each key receives from the last `BLOCK` queries;
- block selection: per query block of the permuted order, the `TOPK` kv blocks of highest
  pooled score `mean(q_block) . mean(k_block)` among the blocks of its segment and earlier
  segments, plus its own block.
attncc runs the layer as one kernel per head: `reorder=attncc.segment_sort(SEGMENT)` with
`key_score=importance`, and a traced mask `kv <= q and sel[pb[q], pb[kv]]` (`pb`: a token's
block in the permuted order, `sel`: the chosen block pairs; both captured tensors).
R5's `key_score` has no head axis, so each head is one call with its own tensors.

Checked against an independent dense PyTorch version (the permuted block pattern mapped back
to original positions as a boolean [L, L] mask, causal, masked softmax in fp64): fp32 within
1e-4 (max abs error; exit 1 beyond). Prints, for the same attention, the tiles the kernel read
and their density without and with the permutation, and the attention mass the top blocks
catch before and after it (what the permutation is for).

    TRITON_INTERPRET=1 python examples/pbs_attention.py      # about 10 s on a CPU
"""

from __future__ import annotations

import math
import sys

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, check_abs, perturbed

import attncc

H, L, D = 2, 128, 32
SEGMENT, BLOCK, TOPK = 32, 16, 2  # 4 segments of 2 blocks; the kernel's tiles are BLOCK x BLOCK
HEAVY = 6  # important keys per head, scattered
TOL = 1e-4  # fp32, max abs error against the fp64 oracle


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
                    ) -> torch.Tensor:
    """fp64 masked softmax attention of one head ([L, D] each, allowed bool [L, L])."""
    s = (q.double() @ k.double().T / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.double()


def segment_permutation(importance: torch.Tensor) -> torch.Tensor:
    """perm[new] = original: inside each segment, most important first (ties keep order)."""
    order = []
    for start in range(0, L, SEGMENT):
        part = importance[start:start + SEGMENT]
        order.append(start + torch.sort(part, descending=True, stable=True).indices)
    return torch.cat(order)


def select_blocks(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """bool [n, n] on permuted blocks: per query block its own block and the TOPK best by
    pooled score among blocks in its segment or earlier ones."""
    n, per_segment = L // BLOCK, SEGMENT // BLOCK
    score = qp.view(n, BLOCK, D).mean(1) @ kp.view(n, BLOCK, D).mean(1).T
    seg = torch.arange(n) // per_segment
    score = score.masked_fill(seg[None, :] > seg[:, None], float("-inf"))
    best = score.topk(TOPK, dim=-1).indices
    sel = torch.zeros(n, n, dtype=torch.bool).scatter_(1, best, True)
    sel &= score > float("-inf")
    return sel | torch.eye(n, dtype=torch.bool)


def mass_caught(attn: torch.Tensor, order: torch.Tensor) -> float:
    """Share of the attention mass in the TOPK + 1 heaviest kv blocks of each query block,
    tokens laid out in `order` (perm[new] = original)."""
    n = L // BLOCK
    a = attn[order][:, order].reshape(n, BLOCK, n, BLOCK).sum((1, 3))  # [n, n] block mass
    return (a.topk(TOPK + 1, dim=-1).values.sum() / a.sum()).item()


def main() -> int:
    perturb = perturbed(__doc__)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(H, L, D, generator=gen) for _ in range(3))
    for h in range(H):  # a few heavy keys that most queries attend to (attention sinks-like)
        heavy = torch.randperm(L, generator=gen)[:HEAVY]
        k[h, heavy] += 3 * q[h].mean(0) / q[h].mean(0).norm() * math.sqrt(D)

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    schedule = attncc.Schedule(block_m=BLOCK, block_n=BLOCK)
    n = L // BLOCK
    sel = torch.zeros(n, n, dtype=torch.bool, device=DEVICE)  # each call passes its own
    pb = torch.zeros(L, dtype=torch.int64, device=DEVICE)

    def pbs_mask(b, h, q_idx, kv_idx):  # the chosen permuted blocks, causal on positions
        return (kv_idx <= q_idx) & sel[pb[q_idx], pb[kv_idx]]

    orders = {"original order": None, "segment-permuted (R5)": attncc.segment_sort(SEGMENT)}
    kernels = {name: attncc.compile(attncc.Attention(mask=pbs_mask, reorder=order,
                                                     schedule=schedule))
               for name, order in orders.items()}
    worst, tiles = 0.0, {name: 0 for name in orders}
    pairs, caught = 0, [0.0, 0.0]
    for h in range(H):
        probe = torch.softmax((q[h, -BLOCK:] @ k[h].T) / math.sqrt(D), dim=-1)
        importance = probe.sum(0)
        perm = segment_permutation(importance)
        rank = torch.empty(L, dtype=torch.int64)
        rank[perm] = torch.arange(L)
        chosen = select_blocks(q[h, perm], k[h, perm])
        block_of = rank // BLOCK  # a token's block in the permuted order
        allowed = chosen[block_of[:, None], block_of[None, :]] & causal
        pairs += int(allowed.sum())
        ref_allowed = allowed.clone()
        if perturb:  # a wrong oracle (one more block pair) must be caught
            ref_allowed |= (block_of[:, None] == n - 1) & (block_of[None, :] == 0) & causal
        ref = dense_attention(q[h], k[h], v[h], ref_allowed)
        full = torch.softmax((q[h] @ k[h].T / math.sqrt(D)).masked_fill(~causal, float("-inf")),
                             dim=-1)
        caught[0] += mass_caught(full, torch.arange(L)) / H
        caught[1] += mass_caught(full, perm) / H
        args_h = {"sel": chosen.to(DEVICE), "pb": block_of.to(DEVICE)}
        for name, attn in kernels.items():
            extra = {"key_score": importance.to(DEVICE)} if orders[name] is not None else {}
            visits = torch.zeros(1, n, n, dtype=torch.int8, device=DEVICE)
            out = attn(*(t[h][None, None].to(DEVICE) for t in (q, k, v)), backend="triton",
                       _visits=visits, **args_h, **extra)
            err = (out[0, 0].double().cpu() - ref).abs().max().item()
            worst = max(worst, err)
            tiles[name] += int((visits > 0).sum())
            print(f"head {h}, {name:22s}: {int((visits > 0).sum()):2d} of {n * n} tiles read, "
                  f"max |o - dense PyTorch| = {err:.2e}")
    before, after = (tiles[name] for name in orders)
    area = BLOCK * BLOCK
    print(f"top-{TOPK + 1} blocks per query block catch {caught[0]:.0%} of the causal attention "
          f"mass in the original order, {caught[1]:.0%} after the permutation")
    print(f"attncc saved: the same block-sparse attention reads {before} tiles of {BLOCK}x{BLOCK} "
          f"over {H} heads in the original order (density {pairs / (before * area):.0%}) and "
          f"{after} permuted (density {pairs / (after * area):.0%}); causal {H * n * (n + 1) // 2}"
          f", dense {H * n * n}")
    ok = check_abs("o - dense PyTorch PBS attention", worst, TOL, over=" over both orders")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
