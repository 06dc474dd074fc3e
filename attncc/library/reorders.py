"""Token orders by catalogue name (docs/catalog.md, R1-R6): `attncc.hilbert((H, W))`, ...

Pass one as `Attention(..., reorder=...)`, or `reorder="auto"` to let the cost model choose.
Grid tokens are numbered row-major (`y * W + x`, `(t * H + y) * W + x`); masks and scores keep
seeing these original positions whatever the order.
"""

from __future__ import annotations

from attncc.ir.reorder import (AutoReorder, Hilbert2D, Hilbert3D, Morton2D, SegmentSort,
                               TileMajor, UserPermutation)


def _grid(owner: str, grid: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
    grid = tuple(grid)
    if len(grid) not in dims:
        raise ValueError(f"{owner}: expected a grid of {' or '.join(map(str, dims))} dims, "
                         f"got {grid!r}")
    return grid


def hilbert(grid: tuple[int, ...]) -> Hilbert2D | Hilbert3D:
    """R1 (H, W) or R4 (T, H, W): Hilbert order; any sizes (generalised curve, no padding in
    2-D; in 3-D the curve of the enclosing 2^k cube restricted to the grid)."""
    grid = _grid("hilbert", grid, (2, 3))
    return Hilbert2D(*grid) if len(grid) == 2 else Hilbert3D(*grid)


def morton(grid: tuple[int, int]) -> Morton2D:
    """R2: Z-order of an (H, W) grid; non-power-of-two grids sort their real cells."""
    return Morton2D(*_grid("morton", grid, (2,)))


def tiles(grid: tuple[int, ...], tile: tuple[int, ...]) -> TileMajor:
    """R3: tile-major order, row-major inside each (th, tw) or (tt, th, tw) tile."""
    return TileMajor(tuple(grid), tuple(tile))


def segment_sort(segment: int) -> SegmentSort:
    """R5: tokens move only inside segments of `segment`, sorted by the call's `key_score=`."""
    return SegmentSort(segment)


def permutation(name: str = "perm") -> UserPermutation:
    """R6: the call passes `name=perm` with `perm[new] = original`."""
    return UserPermutation(name)


def auto(grid: tuple[int, ...] | None = None) -> AutoReorder:
    """The cost model's choice among the orders above (same as `reorder="auto"`)."""
    return AutoReorder(None if grid is None else _grid("auto", grid, (2, 3)))
