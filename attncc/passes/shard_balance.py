"""Shard balance: which chunks of a sequence each rank holds, so every rank does about the same
attention work (docs/context_parallel.md).

A rank's queries meet every key (ring or all-gather of keys and values), so its work is the sum
over its query chunks of each chunk's row of `ChunkTiles.computed()`: it depends only on which
query chunks the rank holds. Three assignments:
- `contiguous(W)`: W chunks, rank r holds chunk r. Balanced for masks whose work per query row is
  flat (full, sliding window); for causal, rank W-1 does 2W-1 times the work of rank 0.
- `head_tail(W)`: 2W chunks, rank r holds chunks r and 2W-1-r (the zigzag of PyTorch's
  `context_parallel` and Megatron-LM for causal masks): a short causal row is paired with a long
  one, so every rank holds the same number of causal tiles up to the diagonal's rounding.
- `greedy(tiles, W)`: from the tile counts of any mask (document masks with uneven documents,
  prefix-LM, ...), longest work first to the least loaded rank that still has room (each rank
  holds C / W chunks, so tokens per rank stay equal); on causal with 2W chunks it finds head-tail.

`rank_work` and `imbalance` measure an assignment.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from attncc.passes.shard_pairs import ChunkTiles, Sharding

__all__ = ["contiguous", "greedy", "head_tail", "imbalance", "rank_work"]


def _world(world: int) -> int:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"sharding: world size must be a positive int, got {world!r}")
    return world


def contiguous(world: int) -> Sharding:
    """Rank r holds chunk r of W."""
    w = _world(world)
    return Sharding(w, tuple((r,) for r in range(w)), "contiguous")


def head_tail(world: int) -> Sharding:
    """Rank r holds chunks r and 2W-1-r of 2W."""
    w = _world(world)
    return Sharding(2 * w, tuple((r, 2 * w - 1 - r) for r in range(w)), "head-tail")


def rank_work(tiles: ChunkTiles, sharding: Sharding, partial_cost: float = 1.0) -> Tensor:
    """float64[W]: each rank's work in full-tile units (its query chunks against every key)."""
    row = tiles.computed(partial_cost).sum(1)  # [C]
    if sharding.n_chunks != row.numel():
        raise ValueError(f"rank_work: the sharding cuts {sharding.n_chunks} chunks, the tile "
                         f"counts are for {row.numel()}")
    return torch.stack([row[list(rank)].sum() for rank in sharding.chunks])


def imbalance(work: Tensor) -> float:
    """max / mean - 1: 0 when perfectly balanced (the slowest rank sets the step time)."""
    mean = float(work.double().mean())
    return float(work.max()) / mean - 1.0 if mean > 0 else 0.0


def greedy(tiles: ChunkTiles, world: int, partial_cost: float = 1.0) -> Sharding:
    """Longest-processing-time-first with equal chunks per rank: chunks by decreasing work, each
    to the least loaded rank with room left (ties: the lower rank). A rank stores its chunks in
    sequence order."""
    w = _world(world)
    n = tiles.n_chunks
    if n % w:
        raise ValueError(f"greedy sharding: {n} chunks do not split evenly over {w} ranks")
    row = tiles.computed(partial_cost).sum(1).tolist()
    order = sorted(range(n), key=lambda c: (-row[c], c))
    heap = [(0.0, r) for r in range(w)]
    held: list[list[int]] = [[] for _ in range(w)]
    for c in order:
        load, r = heapq.heappop(heap)
        held[r].append(c)
        if len(held[r]) < n // w:  # a full rank leaves the heap
            heapq.heappush(heap, (load + row[c], r))
    return Sharding(n, tuple(tuple(sorted(h)) for h in held), "greedy")
