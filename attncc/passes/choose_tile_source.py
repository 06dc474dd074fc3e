"""Choose how the kernel finds its tiles: closed-form ranges, or a block map built at run time.

Requires: the canonical spec and its `TileClasses`. Ensures: None (the kernel loops over the
closed-form pieces) only when they are exact and tokens keep their order; otherwise a
`BlockMapTiles` saying which builder
makes the per-query-tile lists of partial and full kv tiles:
- "topk": a bare block top-k mask (M16): its index tensor already lists the kv blocks;
- "device": any other mask that reads per-batch captured data: a generated kernel classifies
  tiles on the device, so the captured values never travel to the host. How it classifies is
  decided here too (`attncc.passes.row_intervals`): from per-row key intervals when the mask is
  a union of a few of them, else by evaluating the mask at every pair (`BlockMapTiles.rows`
  says which and why; "topk" carries it as well, for the device kernel it falls back to);
- "analytic": index arithmetic and static tables (a curve's ranks) only: interval reasoning on
  the host, O(number of tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import Load
from attncc.ir.tiles import BlockMapTiles, TileClasses
from attncc.passes.row_intervals import row_intervals


def choose(spec: AttentionSpec, tiles: TileClasses) -> BlockMapTiles | None:
    if spec.mask is None or (tiles.exact and spec.reorder is None):
        return None
    why = ("tokens are reordered: closed-form ranges hold in the original order only"
           if spec.reorder is not None else "the closed-form ranges of this mask are not exact")
    if spec.mask.tag == "topk" and spec.reorder is None:
        return BlockMapTiles("topk", why, row_intervals(spec))
    static = {c.name for c in spec.mask.captures if c.static}
    if any(load.args[0].name not in static for load in spec.mask.expr.atoms(Load)):
        return BlockMapTiles("device", why, row_intervals(spec))
    return BlockMapTiles("analytic", why)  # index arithmetic and static tables only


@dataclass(frozen=True)
class ChooseTileSource:
    name: str = "choose-tile-source"

    def __call__(self, spec: AttentionSpec, tiles: TileClasses) -> BlockMapTiles | None:
        return choose(spec, tiles)
