"""Curve math for the reorder axis (R1-R4, docs/catalog.md): cell orders of 2-D and 3-D grids.

Cells are numbered row-major: `y * W + x` in 2-D, `(t * H + y) * W + x` in 3-D. Every `*_order`
function returns `order: int64[n_cells]` (CPU) with `order[new_position] = flat cell index`.
These functions are pure and uncached; `attncc.ir.reorder` caches them per node and device.
"""

from __future__ import annotations

import torch


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def gilbert2d_order(height: int, width: int) -> torch.Tensor:
    """Generalised Hilbert ("gilbert") order of an `height x width` grid.

    The region is a rectangle spanned from a corner `(x, y)` by a major vector `a` and a minor
    vector `b` (axis-aligned, one of them along x, the other along y). A 1-thick region is
    filled as a straight line. A long region (`2|a| > 3|b|`) is cut across `a` into two halves
    walked one after the other. Otherwise it is cut into three parts, as the Hilbert curve is:
    a lower-left block walked "up" (major and minor swapped), the full-width upper part walked
    along `a`, and a lower-right block walked back "down". Cut points are moved by one cell to
    keep the sub-rectangles' lengths even where possible, which keeps every step a unit step.

    Guarantees (tests/test_reorder.py checks them on every size up to 24 x 24):
    - `2^k x 2^k`: the classical Hilbert curve (equal to `hilbert_index` over `(x, y)`); starts
      at `(0, 0)` and ends at the corner `(W-1, 0)`.
    - any size: starts at `(0, 0)`; ends at `(W-1, 0)` if `W >= H`, else at `(0, H-1)`, except
      `2 x odd` grids, which end next to that corner instead.
    - every step is a unit step (Manhattan distance 1), except when the longer side is odd and
      the shorter side even and >= 4 (e.g. 4 x 5, 6 x 7, 7 x 4): then exactly one step is
      diagonal (distance 2). That is forced: such a grid has an even number of cells, so a
      unit-step walk through all of them ends on the other chessboard colour than it starts,
      but the two end corners have the same colour.
    """
    if height < 1 or width < 1:
        raise ValueError(f"gilbert2d_order: height and width must be >= 1, got {height}x{width}")
    out: list[int] = []
    # Explicit stack instead of recursion: parts are pushed in reverse walking order.
    if width >= height:
        stack = [(0, 0, width, 0, 0, height)]
    else:
        stack = [(0, 0, 0, height, width, 0)]
    while stack:
        x, y, ax, ay, bx, by = stack.pop()
        w, h = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = _sign(ax), _sign(ay), _sign(bx), _sign(by)
        if h == 1:
            out.extend((y + i * day) * width + x + i * dax for i in range(w))
            continue
        if w == 1:
            out.extend((y + i * dby) * width + x + i * dbx for i in range(h))
            continue
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        if 2 * w > 3 * h:
            if abs(ax2 + ay2) % 2 and w > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            stack.append((x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by))
            stack.append((x, y, ax2, ay2, bx, by))
        else:
            if abs(bx2 + by2) % 2 and h > 2:
                bx2, by2 = bx2 + dbx, by2 + dby
            stack.append((x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
                          -bx2, -by2, -(ax - ax2), -(ay - ay2)))
            stack.append((x + bx2, y + by2, ax, ay, bx - bx2, by - by2))
            stack.append((x, y, bx2, by2, ax2, ay2))
    return torch.tensor(out, dtype=torch.int64)


def hilbert_index(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Hilbert index of points in the `2^bits` hypercube (Skilling's transpose algorithm).

    coords: int64[n, d], entries in `[0, 2^bits)`; returns int64[n] in `[0, 2^(d*bits))`.
    Vectorised over points; loops only over `bits * d`. Axis 0 is the most significant axis.
    """
    n, d = coords.shape
    if d * bits > 62:
        raise ValueError(f"hilbert_index: d*bits must be <= 62 to fit int64, got {d}*{bits}")
    xs = [coords[:, i].to(torch.int64).clone() for i in range(d)]
    q = 1 << (bits - 1)
    while q > 1:  # undo excess work: invert or exchange low bits, from the top bit down
        p = q - 1
        for i in range(d):
            hit = (xs[i] & q) != 0
            t = (xs[0] ^ xs[i]) & p
            new0 = torch.where(hit, xs[0] ^ p, xs[0] ^ t)
            xs[i] = torch.where(hit, xs[i], xs[i] ^ t)
            xs[0] = new0
        q >>= 1
    for i in range(1, d):  # Gray encode
        xs[i] = xs[i] ^ xs[i - 1]
    t = torch.zeros(n, dtype=torch.int64)
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((xs[d - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    index = torch.zeros(n, dtype=torch.int64)
    for b in range(bits - 1, -1, -1):  # interleave the transposed bits, axis 0 first
        for i in range(d):
            index = (index << 1) | (((xs[i] ^ t) >> b) & 1)
    return index


def _grid_coords(dims: tuple[int, ...]) -> torch.Tensor:
    """int64[prod(dims), len(dims)]: coordinates of every cell in row-major order."""
    axes = [torch.arange(n, dtype=torch.int64) for n in dims]
    return torch.stack([g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij")], dim=1)


def hilbert3d_order(frames: int, height: int, width: int) -> torch.Tensor:
    """3-D Hilbert order of a `T x H x W` grid: the Hilbert curve of the smallest `2^k` cube
    that holds the grid, restricted to the real cells (padding cells are skipped).

    For a `2^k` cube every step is a unit step; so it is for `2^(k-1) x 2^k x 2^k` (e.g. the
    video shape 32 x 64 x 64), which is the first half of the cube's curve. For other sizes the
    order is a bijection whose consecutive cells stay close but may jump (e.g. 2 x 6 x 5 has two
    steps of Manhattan distance > 1) where the padded curve leaves and re-enters the grid.
    """
    bits = max(1, (max(frames, height, width) - 1).bit_length())
    return torch.argsort(hilbert_index(_grid_coords((frames, height, width)), bits))


def morton2d_order(height: int, width: int) -> torch.Tensor:
    """Z-order: sort cells by the code `... y1 x1 y0 x0` (bits of y and x interleaved, x
    lowest). Codes are unique, so for any grid size sorting them gives a bijection."""
    coords = _grid_coords((height, width))
    y, x = coords[:, 0], coords[:, 1]
    code = torch.zeros_like(x)
    for b in range(max(1, (max(height, width) - 1).bit_length())):
        code |= ((x >> b) & 1) << (2 * b) | ((y >> b) & 1) << (2 * b + 1)
    return torch.argsort(code)


def tile_major_order(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Tiles in row-major order, cells row-major inside a tile; edge tiles may be smaller.

    Row-major order inside a tile is the original order, so a stable sort by tile id is enough.
    """
    coords = _grid_coords(grid)
    tile_id = torch.zeros(coords.shape[0], dtype=torch.int64)
    for axis, (n, t) in enumerate(zip(grid, tile)):
        tile_id = tile_id * (-(-n // t)) + coords[:, axis] // t
    return torch.argsort(tile_id, stable=True)
