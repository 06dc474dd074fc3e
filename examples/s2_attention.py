"""S2-Attention (Lin et al., 2024): heterogeneous context sharding among heads (M9 & M1).

Every head sees a dense local window of `N_LOCAL` blocks, plus its own strided shard of the
remote blocks: head h keeps remote block J when `(J + h * DELTA + 1) % STRIDE == 0`, so the
heads together cover the whole context while each reads only about 1 / STRIDE of it. attncc
builds the layer as `causal() & strided_heads(BLOCK, N_LOCAL, STRIDE, DELTA)`: one kernel, its
tiles from a run-time block map (the pattern depends on the head), no dense mask.

Checked against an independent dense PyTorch version (a boolean [H, L, L] mask written from the
paper's rule, masked softmax in fp64): fp32 output within 1e-4 (max abs error; exit 1 beyond).
Also checked: the union over heads of the tiles the kernel read covers every causal block of
the last query block (the paper's "heads together cover the context"), and every head reads
exactly the blocks the rule allows (its window plus its shard). Prints the per-head tile counts the kernel itself recorded.

    TRITON_INTERPRET=1 python examples/s2_attention.py      # about 5 s on a CPU
"""

from __future__ import annotations

import math
import sys

import torch

# paper_check first: without a GPU it selects the Triton interpreter before attncc loads
from paper_check import DEVICE, check_abs, perturbed

import attncc

B, H, L, D = 1, 4, 128, 32
BLOCK, N_LOCAL, STRIDE, DELTA = 16, 2, 4, 1  # the kernel's tiles are BLOCK x BLOCK
TOL = 1e-4  # fp32, max abs error against the fp64 oracle


def s2_mask_dense(heads: int, length: int) -> torch.Tensor:
    """bool [H, L, L]: the paper's rule, written out (token-level causal inside blocks)."""
    pos = torch.arange(length)
    q, kv = pos[:, None], pos[None, :]
    qb, kb = q // BLOCK, kv // BLOCK
    masks = []
    for h in range(heads):
        local = (qb - kb) < N_LOCAL
        shard = (kb + h * DELTA + 1) % STRIDE == 0
        masks.append((kv <= q) & (kb <= qb) & (local | shard))
    return torch.stack(masks)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor) -> torch.Tensor:
    """Plain masked softmax attention, fp64: softmax(q k^T / sqrt(d) + log mask) v."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.double()


def main() -> int:
    perturb = perturbed(__doc__)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))

    spec = attncc.Attention(mask=attncc.causal() & attncc.strided_heads(BLOCK, N_LOCAL, STRIDE,
                                                                        DELTA),
                            schedule=attncc.Schedule(block_m=BLOCK, block_n=BLOCK))
    attn = attncc.compile(spec)
    n = L // BLOCK
    visits = torch.zeros(B * H, n, n, dtype=torch.int8, device=DEVICE)  # the kernel's record
    out = attn(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="triton", _visits=visits)

    allowed = s2_mask_dense(H, L)
    if perturb:  # a wrong oracle (head 1 given head 0's shard) must be caught
        allowed[1] = allowed[0]
    ref = dense_attention(q, k, v, allowed)
    err = (out.double().cpu() - ref).abs().max().item()

    visited = (visits.cpu() > 0).view(H, n, n)
    causal_tiles = n * (n + 1) // 2
    print(f"S2-Attention: L={L}, {H} heads, blocks of {BLOCK}, {N_LOCAL} local blocks, "
          f"stride {STRIDE}, head offset {DELTA}; kernel {attn.name}")
    for h in range(H):
        shard = [j for j in range(n) if (j + h * DELTA + 1) % STRIDE == 0]
        print(f"  head {h}: {int(visited[h].sum()):2d} of {causal_tiles} causal tiles read; "
              f"remote shard: blocks {shard}")
    union = visited[:, -1].any(0)  # the last query block: which kv blocks some head reads
    covers = bool(union.all())
    print(f"  union of heads, last query block: kv blocks {union.nonzero().flatten().tolist()} "
          f"-> {'covers' if covers else 'does NOT cover'} all {n} blocks")
    blocks = allowed.view(H, n, BLOCK, n, BLOCK).any(4).any(2)  # blocks holding a pair
    exact = torch.equal(visited, blocks)
    print(f"  tiles read == blocks the rule allows, every head: {exact}")

    total = int(visited.sum())
    print(f"attncc saved: {total} tiles of {BLOCK}x{BLOCK} read over {H} heads vs "
          f"{H * causal_tiles} causal ({H * n * n} dense): {total / (H * causal_tiles):.0%} "
          f"of causal")
    ok = check_abs("o - dense PyTorch S2", err, TOL, also=covers and exact)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
