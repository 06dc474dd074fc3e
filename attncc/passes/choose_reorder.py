"""Choose a token order: the cost model behind `reorder="auto"`.

Requires: a spec whose mask reads a token grid (parameters grid_h, grid_w and, in 3-D, grid_t)
or an `AutoReorder(grid=...)`. Ensures: `spec.reorder` is a concrete order: the candidate
(row-major, Morton, Hilbert, tile-major; 3-D: row-major, Hilbert 3-D, tile-major) whose tiles,
classified exactly by interval reasoning at the given tile size, visit the fewest kv tiles. Ties
go to more full tiles (no mask evaluated there), then to the simpler order. The number of allowed
pairs does not depend on the order, so fewer visited tiles means a denser, cheaper kernel.

Costs are for batch 0, head 0 with the spec's parameter values, at the tile size the schedule
fixes or 64 x 64 (the size every target's kernels use for kv tiles of 128-dim heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.ir.reorder import AutoReorder, Hilbert2D, Hilbert3D, Morton2D, Reorder, TileMajor
from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import EMPTY, FULL, PARTIAL
from attncc.passes.classify_blocks import allowed_pairs, classify_blocks

DEFAULT_TILES = (64, 64)


@dataclass(frozen=True)
class OrderCost:
    name: str
    reorder: Reorder | None
    visited: int  # kv tiles visited over all query tiles
    full: int
    partial: int
    total: int  # all tile pairs
    allowed: int  # allowed (q, kv) pairs: the same in every order
    visited_area: int  # pairs inside visited tiles
    pairs: int  # Lq x Lk

    @property
    def efficiency(self) -> float:
        """Allowed pairs per pair computed: 1.0 means no wasted work in visited tiles."""
        return self.allowed / self.visited_area if self.visited_area else 1.0

    @property
    def density(self) -> float:
        return self.allowed / self.pairs


def grid_of(spec: AttentionSpec) -> tuple[int, ...] | None:
    """The token grid a spec's mask reads, from its grid parameters (or AutoReorder(grid=))."""
    if isinstance(spec.reorder, AutoReorder) and spec.reorder.grid is not None:
        return tuple(spec.reorder.grid)
    values = {p.name: p.value for p in spec.params}
    names = ("grid_t", "grid_h", "grid_w") if "grid_t" in values else ("grid_h", "grid_w")
    if not all(n in values for n in names):
        return None
    return tuple(int(values[n]) for n in names)


def candidates(grid: tuple[int, ...], block: int) -> dict[str, Reorder | None]:
    """The orders worth trying for `grid`; tile-major tiles hold about one kv tile of tokens."""
    if len(grid) == 2:
        h, w = grid
        th = min(h, 1 << (max(block.bit_length() - 1, 0) // 2))
        tw = min(w, max(block // th, 1))
        return {"row-major": None, "hilbert": Hilbert2D(h, w), "morton": Morton2D(h, w),
                f"tiles-{th}x{tw}": TileMajor((h, w), (th, tw))}
    t, h, w = grid
    side = 1 << (max(block.bit_length() - 1, 0) // 3)
    tile = (min(t, side), min(h, side), min(w, max(block // (side * side), 1)))
    return {"row-major": None, "hilbert3d": Hilbert3D(t, h, w),
            f"tiles-{'x'.join(map(str, tile))}": TileMajor((t, h, w), tile)}


def order_costs(spec: AttentionSpec, grid: tuple[int, ...],
                tiles: tuple[int, int] = DEFAULT_TILES) -> list[OrderCost]:
    """Exact tile counts of every candidate order of `grid` for `spec.mask`."""
    length = 1
    for d in grid:
        length *= d
    block_m, block_n = tiles
    shape = dict(Lq=length, Lk=length, Hq=1, Hkv=1, B=1, block_m=block_m, block_n=block_n,
                 params={p.name: p.value for p in spec.params},
                 tensors={c.name: c.tensor for c in spec.captures})
    rows = torch.tensor([min(block_m, length - m) for m in range(0, length, block_m)])
    cols = torch.tensor([min(block_n, length - n) for n in range(0, length, block_n)])
    area = rows[:, None] * cols[None, :]
    out, allowed = [], None
    for name, order in candidates(grid, block_n).items():
        pos = order.permutation(length) if order is not None else None
        result = classify_blocks(spec.mask.expr, q_pos=pos, kv_pos=pos, **shape)
        classes = result.classes[0, 0]
        if allowed is None:
            allowed = int(allowed_pairs(spec.mask.expr, result, q_pos=pos, kv_pos=pos,
                                        **shape)[0, 0])
        visited = classes != EMPTY
        out.append(OrderCost(name, order, int(visited.sum()), int((classes == FULL).sum()),
                             int((classes == PARTIAL).sum()), classes.numel(), allowed,
                             int(area[visited].sum()), length * length))
    return out


def best(costs: list[OrderCost]) -> OrderCost:
    return min(costs, key=lambda c: (c.visited, -c.full, costs.index(c)))


def cost_table(costs: list[OrderCost]) -> str:
    chosen = best(costs)
    lines = [f"{'order':<14}{'visited':>9}{'full':>7}{'partial':>9}{'of':>8}"
             f"{'efficiency':>12}{'density':>9}"]
    for c in costs:
        mark = "  <- chosen" if c is chosen else ""
        lines.append(f"{c.name:<14}{c.visited:>9}{c.full:>7}{c.partial:>9}{c.total:>8}"
                     f"{c.efficiency:>12.3f}{c.density:>9.4f}{mark}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ChooseReorder:
    name: str = "choose-reorder"

    def __call__(self, spec: AttentionSpec) -> AttentionSpec:
        if not isinstance(spec.reorder, AutoReorder):
            return spec
        grid = grid_of(spec)
        if grid is None or spec.mask is None:
            raise ValueError("reorder='auto': the mask reads no token grid (parameters grid_h, "
                             "grid_w[, grid_t]); pass reorder=attncc.AutoReorder(grid=(H, W)) "
                             "or a concrete order")
        tiles = (spec.schedule.block_m or DEFAULT_TILES[0],
                 spec.schedule.block_n or DEFAULT_TILES[1])
        return spec.replace(reorder=best(order_costs(spec, grid, tiles)).reorder)
