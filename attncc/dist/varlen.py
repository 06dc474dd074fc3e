"""Which packed sequences a contiguous shard holds (varlen context parallelism of the linear
recurrences, docs/context_parallel.md). Pure functions of the global `cu_seqlens`: no torch, no
process group, so every rank plans every rank alike and the plan is unit-tested on its own.

The packed sequence of T = W l tokens is cut into W shards of l tokens; rank r holds
[a, b) = [r l, (r + 1) l). Sequence n = [cu[n], cu[n + 1]) is

- *owned* by the rank holding its last token (an empty one at position p: by the rank holding
  token p - 1, rank 0 for p = 0): that rank's run ends it, so its final state is that rank's;
- *crossing in* on rank r if it began before a and runs on at a (a is not a boundary): its
  initial state on rank r is the state handed on by rank r - 1;
- *crossing out* on rank r if it began before b and runs on at b: rank r hands its state on.

A rank runs its owned sequences and the one crossing out (at most one), in order: they are
consecutive in the global order and cover its l tokens. Every other sequence it holds starts
in the shard (at or after a), from its own initial state.
"""

from __future__ import annotations

import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ShardPlan", "digest", "owner", "plan_shard"]


@dataclass(frozen=True)
class ShardPlan:
    """Rank r's part of a packed batch: global sequences [first, first + len(local_cu) - 1)."""

    first: int  # global index of the first sequence this rank runs
    owned: int  # how many of them (from `first`) end here: their final states are this rank's
    local_cu: tuple[int, ...]  # their boundaries in the shard: 0 = local_cu[0] <= ... = l
    crossing_in: bool  # the first began on an earlier rank: it starts from the state handed on
    crossing_out: bool  # the last runs on to the next rank: this rank hands its state on

    @property
    def count(self) -> int:
        """How many sequences this rank runs (at least 1: the shard has tokens)."""
        return len(self.local_cu) - 1

    @property
    def inside(self) -> bool:
        """The whole shard lies inside one sequence: its outgoing state depends on the
        incoming one (through the transition of all l tokens). Otherwise the sequence crossing
        out (if any) starts in the shard and its outgoing state does not."""
        return self.crossing_in and self.crossing_out and self.count == 1

    @property
    def starts(self) -> range:
        """Global indices of the sequences that start in this shard: they read their row of
        the initial state here (and on no other rank)."""
        return range(self.first + int(self.crossing_in), self.first + self.count)


def owner(end: int, length: int) -> int:
    """The rank that owns a sequence ending at `end` (exclusive) when every rank holds
    `length` tokens: the one holding token end - 1 (token 0 for an empty sequence at 0)."""
    return max(end - 1, 0) // length


def plan_shard(cu: Sequence[int], rank: int, world: int) -> ShardPlan:
    """Rank `rank`'s plan for valid cumulative sequence lengths `cu` (0 = cu[0] <= ... <=
    cu[N] = T, T a positive multiple of `world`)."""
    length = cu[-1] // world
    a, b = rank * length, (rank + 1) * length
    ends = cu[1:]
    # `owner` in closed form: rank r owns the sequences ending in (a, b] (rank 0: [0, b])
    first = bisect_right(ends, a) if rank else 0
    stop = bisect_right(ends, b)
    crossing_out = stop < len(ends) and cu[stop] < b  # the next one holds token b - 1 too
    last = stop + int(crossing_out)
    local = tuple(min(max(c, a), b) - a for c in cu[first:last + 1])
    return ShardPlan(first=first, owned=stop - first, local_cu=local,
                     crossing_in=cu[first] < a, crossing_out=crossing_out)


def digest(cu: Sequence[int]) -> int:
    """A checksum of `cu` (CRC-32 of its values as 8-byte integers), the same in every
    process: ranks compare it to agree on one packing before any exchange."""
    return zlib.crc32(b"".join(int(c).to_bytes(8, "little", signed=True) for c in cu))
