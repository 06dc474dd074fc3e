"""Shard pairs: how much attention work each (query shard, key shard) pair of a sharded sequence
holds, in tiles of each class (empty / partial / full).

Context parallelism (docs/context_parallel.md) cuts a sequence of L tokens into C equal chunks
and gives each rank some of them (`Sharding`: contiguous, head-tail, cost-based; built in
`attncc.passes.shard_balance`). A rank's queries meet every rank's keys, so the work of the pair
(rank i's queries, rank j's keys) is the sum of the chunk pairs it holds. A pair with no
partial and no full tile is never computed: with contiguous causal shards, rank 0 computes only
its own pair.

Requires: a spec with positions in original order (a reordered spec: pass `positions`, the
original position of each row of the sequence that is sharded), L divisible by
C x max(block_m, block_n) (every chunk holds whole tiles).
Ensures: `ChunkTiles.counts[cq, ck, c]` = number of tiles of class c (EMPTY, PARTIAL, FULL of
`attncc.ir.tiles`) in query chunk cq x key chunk ck, as the kernel would visit them:
- closed form (the spec's tile source is closed-form ranges, `choose_tile_source`): the
  arithmetic of `attncc.ir.tiles.tile_loops` on the pieces of `classify_tiles`, vectorised over
  query tiles; per query tile the class is piecewise constant in the kv tile index with at most
  4 x pieces + 1 segments, so counts per key chunk are differences of a cumulative count
  evaluated at the chunk boundaries: O(query tiles x (chunks + pieces)), no tile grid, so
  L = 2M at 128 x 64 tiles costs a fraction of a second;
- block map (any other mask): `attncc.passes.classify_blocks` (exact classes, O(tiles)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import sympy
import torch
from torch import Tensor

from attncc.ir.eval import evaluate
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import Q_FIRST, Q_LAST
from attncc.ir.tiles import EMPTY, FULL, PARTIAL, TileClasses
from attncc.passes.classify_blocks import classify_blocks
from attncc.passes.pipeline import run_spec_passes

__all__ = ["ChunkTiles", "Sharding", "chunk_tiles", "shard_pairs"]

_BATCH = 1 << 21  # (query tile, chunk boundary) evaluations per step: bounds the temporaries


@dataclass(frozen=True)
class Sharding:
    """`chunks[r]`: the chunks (of `n_chunks` equal ones, in sequence order) rank r holds, in
    the order it stores them. Every chunk belongs to exactly one rank and every rank holds the
    same number (equal tokens per rank)."""

    n_chunks: int
    chunks: tuple[tuple[int, ...], ...]
    name: str = ""

    def __post_init__(self) -> None:
        flat = sorted(c for rank in self.chunks for c in rank)
        if not self.chunks or flat != list(range(self.n_chunks)):
            raise ValueError(f"Sharding: every chunk 0..{self.n_chunks - 1} must belong to "
                             f"exactly one rank, got {self.chunks}")
        if len({len(rank) for rank in self.chunks}) != 1:
            raise ValueError(f"Sharding: every rank must hold the same number of chunks (equal "
                             f"tokens per rank), got {[len(r) for r in self.chunks]}")

    @property
    def world(self) -> int:
        return len(self.chunks)

    def ranges(self, L: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per rank, the global token ranges [start, stop) it holds, in storage order: the
        offsets a shard carries so its positions mean what they mean in the whole sequence."""
        size = chunk_length(L, self.n_chunks)
        return tuple(tuple((c * size, (c + 1) * size) for c in rank) for rank in self.chunks)


def chunk_length(L: int, n_chunks: int, tile: int = 1) -> int:
    """Tokens per chunk; an error unless chunks are equal and hold whole tiles of `tile`."""
    if L <= 0 or n_chunks <= 0 or L % (n_chunks * tile):
        raise ValueError(f"sharding: sequence length {L} must be a positive multiple of "
                         f"chunks ({n_chunks}) x tile ({tile}) = {n_chunks * tile}")
    return L // n_chunks


@dataclass(frozen=True)
class ChunkTiles:
    """counts: int64[C, C, 3], tiles of each class per (query chunk, key chunk)."""

    counts: Tensor
    L: int
    block_m: int
    block_n: int
    source: str  # "closed-form" | "block-map"

    @property
    def n_chunks(self) -> int:
        return self.counts.shape[0]

    def pairs(self, sharding: Sharding) -> Tensor:
        """int64[W, W, 3]: tiles of each class per (query rank, key rank)."""
        if sharding.n_chunks != self.n_chunks:
            raise ValueError(f"shard_pairs: the sharding cuts {sharding.n_chunks} chunks, the "
                             f"tile counts are for {self.n_chunks}")
        index = torch.tensor(sharding.chunks)  # [W, k]
        rows = self.counts[index].sum(1)  # [W, C, 3]: a rank's query chunks summed
        return rows[:, index].sum(2)  # [W, W, 3]

    def computed(self, partial_cost: float = 1.0) -> Tensor:
        """float64[C, C]: work per chunk pair in full-tile units (a partial tile costs
        `partial_cost`: it also evaluates the mask)."""
        return (self.counts[..., FULL] + partial_cost * self.counts[..., PARTIAL]).double()


def chunk_tiles(spec: AttentionSpec, L: int, n_chunks: int, *, block_m: int, block_n: int,
                Hq: int = 1, Hkv: int = 1, h: int = 0,
                params: Mapping[str, int | float] | None = None,
                tensors: Mapping[str, Tensor] | None = None,
                positions: Tensor | None = None) -> ChunkTiles:
    """Tile counts per (query chunk, key chunk) of `spec` at sequence length `L` (batch 0,
    head `h`); `params` / `tensors` default to the values the spec was built with."""
    chunk_length(L, n_chunks, max(block_m, block_n))
    if spec.reorder is not None and positions is None:
        raise ValueError("shard_pairs: a reordered spec needs `positions` (the original "
                         "position of each row of the sharded sequence)")
    plan = run_spec_passes(spec)
    params = {p.name: p.value for p in plan.spec.params} if params is None else dict(params)
    tensors = ({c.name: c.tensor for c in plan.spec.captures} if tensors is None
               else dict(tensors))
    if plan.block_map is None and positions is None:
        counts = _closed_form(plan.tiles, L, n_chunks, block_m, block_n,
                              {"Lq": L, "Lk": L, "Hq": Hq, "Hkv": Hkv, "b": 0, "h": h, **params},
                              tensors)
        return ChunkTiles(counts, L, block_m, block_n, "closed-form")
    classes = classify_blocks(plan.spec.mask.expr, Lq=L, Lk=L, Hq=Hq, Hkv=Hkv, block_m=block_m,
                              block_n=block_n, params=params, tensors=tensors, q_pos=positions,
                              kv_pos=positions).classes
    tiles = classes[0, min(h, classes.shape[1] - 1)].long()  # [nM, nN]
    n_m, n_n = tiles.shape
    grid = tiles.view(n_chunks, n_m // n_chunks, n_chunks, n_n // n_chunks)
    counts = torch.stack([(grid == c).sum((1, 3)) for c in (EMPTY, PARTIAL, FULL)], -1)
    return ChunkTiles(counts, L, block_m, block_n, "block-map")


def shard_pairs(spec: AttentionSpec, L: int, sharding: Sharding, *, block_m: int, block_n: int,
                **kwargs) -> Tensor:
    """int64[W, W, 3]: tiles of each class per (query rank, key rank); see `chunk_tiles`."""
    return chunk_tiles(spec, L, sharding.n_chunks, block_m=block_m, block_n=block_n,
                       **kwargs).pairs(sharding)


def _value(expr: sympy.Basic, env: Mapping[str, object], tensors: Mapping[str, Tensor],
           like: Tensor) -> Tensor:
    """`expr` at every query tile, bound by name (assumptions must not hide a value)."""
    bound = {s: env[s.name] for s in expr.free_symbols if s.name in env}
    value = evaluate(expr, bound, tensors)
    return torch.broadcast_to(torch.as_tensor(value).long(), like.shape)


def _closed_form(tiles: TileClasses, L: int, n_chunks: int, bm: int, bn: int,
                 scalars: Mapping[str, object], tensors: Mapping[str, Tensor]) -> Tensor:
    n_m, n_n = L // bm, L // bn
    first = torch.arange(n_m) * bm
    env = {**scalars, Q_FIRST.name: first, Q_LAST.name: first + bm - 1}
    loops = [_piece_loops(p, env, tensors, first, bn, n_n) for p in tiles.pieces]
    # Every boundary of every piece, and the ends: the class is constant between two of them.
    bounds = torch.sort(torch.cat([torch.zeros(n_m, 1, dtype=torch.long),
                                   torch.full((n_m, 1), n_n)]
                                  + [torch.stack(lp, 1) for lp in loops], 1)).values
    start = bounds[:, :-1]
    length = bounds[:, 1:] - start
    cls = torch.full_like(start, EMPTY)
    for n_begin, f_begin, f_end, n_end in reversed(loops):  # the first piece visiting wins
        inside = (n_begin[:, None] <= start) & (start < n_end[:, None])
        full = (f_begin[:, None] <= start) & (start < f_end[:, None])
        cls = torch.where(inside, torch.where(full, FULL, PARTIAL), cls)
    per_chunk = n_n // n_chunks
    edges = torch.arange(n_chunks + 1) * per_chunk
    counts = torch.zeros(n_chunks, n_chunks, 3, dtype=torch.long)
    rows = n_m // n_chunks  # query tiles per chunk
    step = max(1, _BATCH // (rows * (n_chunks + 1)))  # query chunks per batch
    for c0 in range(0, n_chunks, step):
        sl = slice(c0 * rows, min(n_chunks, c0 + step) * rows)
        s, ln, k = start[sl], length[sl], cls[sl]
        e = edges.expand(s.shape[0], -1).contiguous()
        seg = (torch.searchsorted(bounds[sl].contiguous(), e, right=True) - 1).clamp(
            0, s.shape[1] - 1)
        for c in (PARTIAL, FULL):
            mine = (k == c).long()
            before = torch.cumsum(ln * mine, 1) - ln * mine  # tiles of class c before segment
            at = (before.gather(1, seg)
                  + (e - s.gather(1, seg)).clamp(0, None).minimum(ln.gather(1, seg))
                  * mine.gather(1, seg))  # tiles of class c in kv tiles [0, e)
            per_tile = at[:, 1:] - at[:, :-1]  # [query tiles, key chunks]
            counts[c0:c0 + step, :, c] = per_tile.view(-1, rows, n_chunks).sum(1)
    counts[..., EMPTY] = rows * per_chunk - counts[..., PARTIAL] - counts[..., FULL]
    return counts


def _piece_loops(piece, env, tensors, like: Tensor, bn: int, n_n: int) -> tuple[Tensor, ...]:
    """`tile_loops` of one piece for every query tile: (n_begin, f_begin, f_end, n_end)."""
    some_lo, some_hi, all_lo, all_hi = (_value(e, env, tensors, like) for e in
                                        (piece.some_lo, piece.some_hi, piece.all_lo, piece.all_hi))
    enabled = _value(piece.guard, env, tensors, like).bool()
    n_begin = torch.div(some_lo, bn, rounding_mode="floor")
    n_end = torch.where((some_hi >= some_lo) & enabled,
                        torch.div(some_hi, bn, rounding_mode="floor") + 1, n_begin)
    f_begin = torch.div(all_lo + bn - 1, bn, rounding_mode="floor")
    f_end = torch.div((all_hi + 1).clamp(0, None), bn, rounding_mode="floor")
    f_begin = torch.minimum(torch.maximum(f_begin, n_begin), n_end)
    f_end = torch.maximum(torch.minimum(f_end, n_end), f_begin)
    if not piece.exact:
        f_begin = f_end = n_end
    return tuple(t.clamp(0, n_n) for t in (n_begin, f_begin, f_end, n_end))
