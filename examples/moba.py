"""MoBA (Lu et al., 2025) block top-k attention, and a block-level gate (SeerAttention-style).

The gate stays in PyTorch, here in the example: keys are cut into blocks of `BLOCK`, each block
mean-pooled; a query scores every pooled block (`q . mean(k_block)`), future blocks are
excluded, its own block is always on, and it keeps the `TOPK` best blocks (its own among them).
The attention over the chosen blocks is one attncc kernel (M16, `attncc.block_topk`), causal
inside the query's own block, with no dense mask:

1. MoBA: every query token routes itself: `block_topk(idx, BLOCK, per_token=True)` with
   `idx [B, Hq, L, TOPK]`; tiles come from the generated block-map kernel.
2. Block-level gate: one choice per query block from the block's mean-pooled queries:
   `block_topk(idx, BLOCK)` with `idx [B, Hq, L / BLOCK, TOPK]`; the index tensor becomes the
   kernel's kv-tile lists directly.

Each is checked against an independent dense PyTorch version (a boolean [B, H, L, L] mask from
the gate's selection, masked softmax in fp64): fp32 within 1e-4 (max abs error; exit 1 beyond).
Prints the kv tiles the kernel read (its own record) against causal attention.

    TRITON_INTERPRET=1 python examples/moba.py      # about 10 s on a CPU
"""

from __future__ import annotations

import math
import sys

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, check_abs, perturbed

import attncc

B, HQ, HKV, L, D = 1, 2, 1, 128, 32
BLOCK, TOPK = 16, 3  # 8 key blocks; each query keeps 3 (its own block and the 2 best past)
TOL = 1e-4  # fp32, max abs error against the fp64 oracle


def gate_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """MoBA's gate: s[b, h, i, j] = q_i . mean-pooled key block j ([B, Hq, Lq, n_blocks]),
    -inf for blocks after the query's own, +inf for its own (always selected)."""
    pooled = k.view(B, HKV, L // BLOCK, BLOCK, D).mean(3)  # [B, Hkv, n_blocks, D]
    pooled = pooled.repeat_interleave(HQ // HKV, dim=1)  # query head h reads kv head h // G
    s = q @ pooled.transpose(-1, -2)
    n_rows = q.shape[2]
    own = (torch.arange(n_rows) * (L // n_rows) // BLOCK)[:, None]  # query row -> its block
    blocks = torch.arange(L // BLOCK)[None, :]
    s = s.masked_fill(blocks > own, float("-inf"))
    return s.masked_fill(blocks == own, float("inf"))


def topk_indices(scores: torch.Tensor) -> torch.Tensor:
    """The gate's choice as M16 indices: the TOPK best blocks, -1 for an unused slot."""
    top = scores.topk(TOPK, dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, -1).to(torch.int32)


def dense_moba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor
               ) -> torch.Tensor:
    """fp64 MoBA from the paper: softmax over the keys of the gated blocks (causal), with the
    gate as a boolean threshold on the scores, expanded to one row per query token."""
    kth = scores.topk(TOPK, dim=-1).values[..., -1:]
    chosen = (scores >= kth) & (scores > float("-inf"))  # [B, H, rows, n_blocks]
    chosen = chosen.repeat_interleave(L // scores.shape[2], dim=2)  # block rows -> tokens
    allowed = chosen.repeat_interleave(BLOCK, dim=3)  # [B, H, L, L]
    allowed &= torch.ones(L, L, dtype=torch.bool).tril()
    kk = k.double().repeat_interleave(HQ // HKV, dim=1)
    vv = v.double().repeat_interleave(HQ // HKV, dim=1)
    s = (q.double() @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


def main() -> int:
    perturb = perturbed(__doc__)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, L, D, generator=gen)
    k, v = (torch.randn(B, HKV, L, D, generator=gen) for _ in range(2))
    n = L // BLOCK
    causal_tiles = n * (n + 1) // 2
    schedule = attncc.Schedule(block_m=BLOCK, block_n=BLOCK)
    ok = True
    variants = {"MoBA, per-token gate": q,
                "block-level gate (pooled queries)": q.view(B, HQ, n, BLOCK, D).mean(3)}
    for name, gate_q in variants.items():
        scores = gate_scores(gate_q, k)
        idx = topk_indices(scores)
        per_token = idx.shape[2] == L
        mask = attncc.block_topk(idx.to(DEVICE), BLOCK, per_token=per_token)
        attn = attncc.compile(attncc.Attention(mask=mask, schedule=schedule))
        visits = torch.zeros(B * HQ, n, n, dtype=torch.int8, device=DEVICE)
        out = attn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton", _visits=visits)
        if perturb:  # a wrong gate in the oracle (one more block for the last rows)
            scores = scores.clone()
            scores[..., -1, 0] = float("inf")
        ref = dense_moba(q, k, v, scores)
        err = (out.double().cpu() - ref).abs().max().item()
        read = int((visits > 0).sum())
        print(f"{name}: L={L}, {HQ} query heads on {HKV} kv heads, blocks of {BLOCK}, top-{TOPK}"
              f"; tiles from {attn.plan.block_map.source!r}, kernel {attn.name}")
        print(f"  attncc saved: {read} kv tiles of {BLOCK}x{BLOCK} read over {HQ} heads vs "
              f"{HQ * causal_tiles} causal ({read / (HQ * causal_tiles):.0%}); keys per query: "
              f"<= {TOPK * BLOCK} of up to {L}")
        if per_token:
            print(f"  (per-token routing: a query tile of {BLOCK} rows reads the union of its "
                  f"rows' blocks; the mask is evaluated inside them)")
        ok &= check_abs("o - dense PyTorch", err, TOL, indent="  ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
