"""Useful work of a case: exact allowed (q, kv) pairs and tile efficiency, from attncc's mask.

FLOPs (benchmarks/README.md): forward `4 * B * Hq * allowed_pairs * D`, allowed_pairs counted per
(batch, head): `attncc.passes.classify_blocks` classifies every 64 x 64 tile exactly by interval
reasoning (O(tiles)) and `allowed_pairs` counts FULL tiles by area, evaluating the mask pointwise
only inside PARTIAL tiles. Tile efficiency = allowed pairs / (visited tiles x tile area), in the
case's token order, at TILE (the size the cost model of `choose_reorder` uses).
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.ir.tiles import EMPTY
from attncc.passes.classify_blocks import allowed_pairs, classify_blocks
from benchmarks.workloads import Case

TILE = (64, 64)


def mask_stats(case: Case) -> dict[str, Any]:
    """allowed_pairs (all B x H), flops, tiles_visited (all B x H), tile_efficiency, density."""
    shape, spec = case.shape, case.variant.spec
    B, H, L, D = shape.B, shape.H, shape.L, shape.D
    bm, bn = TILE
    rows = torch.tensor([min(bm, L - m) for m in range(0, L, bm)])
    cols = torch.tensor([min(bn, L - n) for n in range(0, L, bn)])
    area = rows[:, None] * cols[None, :]
    if spec.mask is None:
        allowed, visited, visited_area = B * H * L * L, B * H * area.numel(), B * H * L * L
    else:
        pos = case.variant.perm.cpu() if case.variant.perm is not None else None
        kw: dict[str, Any] = {
            "Lq": L, "Lk": L, "Hq": H, "Hkv": H, "B": B, "block_m": bm, "block_n": bn,
            "params": {p.name: p.value for p in spec.params},
            "tensors": {c.name: c.tensor.cpu() for c in spec.captures},
            "q_pos": pos, "kv_pos": pos}
        result = classify_blocks(spec.mask.expr, **kw)
        groups_b, groups_h = result.classes.shape[:2]
        per_group = (B // groups_b) * (H // groups_h)  # a mask not reading b (h) repeats
        allowed = int(allowed_pairs(spec.mask.expr, result, **kw).sum()) * per_group
        seen = result.classes != EMPTY
        visited = int(seen.sum()) * per_group
        visited_area = int((seen * area).sum()) * per_group
    return {"allowed_pairs": allowed, "flops": 4 * allowed * D, "tile": list(TILE),
            "tiles_visited": visited,
            "tile_efficiency": allowed / visited_area if visited_area else 1.0,
            "density": allowed / (B * H * L * L)}
