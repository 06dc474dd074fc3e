"""Catalogue masks and score mods instantiated for a given shape, shared by kernel tests.

Each builder returns attncc values whose captured tensors fit (B, Hq, Lq, Lk)."""

from __future__ import annotations

import torch

import attncc


def grid_for(length: int) -> tuple[int, int]:
    """A near-square H x W grid with exactly `length` cells (W the largest divisor <= sqrt)."""
    w = max(d for d in range(1, int(length ** 0.5) + 1) if length % d == 0)
    return length // w, w


def masks(B: int, Hq: int, Lq: int, Lk: int, seed: int = 0) -> dict[str, attncc.Mask]:
    g = torch.Generator().manual_seed(seed)
    L = max(Lq, Lk)
    block = 16
    n_blocks = -(-L // block)
    out = {
        "M1-causal": attncc.causal(),
        "M2-sliding-window": attncc.sliding_window(37),
        "M3-bidirectional": attncc.bidirectional_window(21),
        "M4-dilated": attncc.dilated_window(40, 3, causal=True),
        "M5-prefix-lm": attncc.prefix_lm(19),
        "M6-sinks-window": attncc.sinks_window(4, 45),
        "M7-chunked": attncc.chunked(48),
        "M8-block-causal": attncc.block_causal(24),
        "M9-strided-heads": attncc.strided_heads(16, 2, 3, 1),
        "M10-global": attncc.global_tokens(9, torch.rand(L, generator=g) < 0.1),
        "M11-document": attncc.document(torch.sort(torch.randint(0, 4, (L,), generator=g))[0]),
        "M16-block-topk": attncc.block_topk(
            torch.randint(-1, n_blocks, (B, Hq, n_blocks, 3), generator=g), block),
        "M17-bigbird": attncc.bigbird(block, 1, torch.rand(n_blocks, generator=g) < 0.2,
                                      attncc.bigbird_random_blocks(n_blocks, 2, seed)),
        "M18-per-head": attncc.per_head_classes(torch.arange(Hq) % 2, 4, 30),
        "M19-tree": attncc.tree(max(Lk - Lq, 0), torch.rand(Lq, max(Lk - max(Lk - Lq, 0), 1),
                                                            generator=g) < 0.5),
        "and-or-not": (attncc.causal() & ~attncc.chunked(32)) | attncc.prefix_lm(5),
    }
    # drawn after the others, so their data does not depend on this case; empty sequences too
    cuts = torch.sort(torch.randint(0, L + 1, (5,), generator=g))[0]
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([L])])
    out["M11-cu-seqlens"] = attncc.document(cu_seqlens=cu_seqlens.to(torch.int32))
    if Lq == Lk:
        h, w = grid_for(Lq)
        out["M12-neighbourhood-2d"] = attncc.neighbourhood_2d(h, w, min(h, 3) | 1, min(w, 5) | 1)
    return out


def scores(B: int, Hq: int, Lq: int, Lk: int, seed: int = 0) -> dict[str, attncc.ScoreMod]:
    g = torch.Generator().manual_seed(seed)
    return {
        "S1-scale": attncc.scale(0.7),
        "S2-softcap": attncc.softcap(2.5),
        "S3-alibi": attncc.alibi(),
        "S3-alibi-slopes": attncc.alibi(torch.rand(Hq, generator=g)),
        "S4-relative-bias": attncc.relative_bias(torch.randn(Hq, 17, generator=g)),
        "S5-bias": attncc.bias(torch.randn(1, Hq, Lq, Lk, generator=g)),
        "S6-head-bias": attncc.head_bias(torch.randn(Hq, generator=g)),
        "S7-log-count": attncc.log_count(torch.rand(Lk, generator=g).log()),
        "S8-calibration": attncc.calibration(torch.rand(Lk, generator=g) + 0.5),
        "softcap-then-alibi": attncc.softcap(3.0).then(attncc.alibi()),
    }
