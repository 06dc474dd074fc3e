"""Caches of results computed from tensors, keyed by the tensors' VALUES.

A data pointer and an in-place version are no identity: the allocator gives a fresh tensor the
address of a freed one (and the version restarts at 0), and writes through `t.data`, a numpy
view or DLPack never move the version counter. So a cached result is reused only when the
tensors it was built from are certain to hold the same values: a kept copy compares equal
(`torch.equal`). That comparison is cheap where it needs no device sync, i.e. where the tensors
already live on the host (or the builder copies them there anyway); elsewhere callers rebuild.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def on_host(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether comparing `tensors` by value needs no device sync."""
    return all(t.is_cpu for t in tensors)


def keep(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Host copies that later writes to `tensors` cannot reach (`.cpu()` alone may alias)."""
    return tuple(t.detach().to("cpu", copy=True) for t in tensors)


def same_values(kept: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> bool:
    """Exact equality of shapes, dtypes and values (a NaN never equals: such a result is
    rebuilt, which is safe). A host tensor is compared where it is (`torch.equal` reads its
    values, whatever its autograd state); a device one through a host copy."""
    if len(kept) != len(tensors):
        return False
    for a, b in zip(kept, tensors):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not torch.equal(a, b if b.is_cpu else b.detach().cpu()):
            return False
    return True


class ValueCache(Generic[T]):
    """The last `size` results, each stored with its hashable `key` (shapes, parameters) and
    copies of the tensors it was computed from; a lookup hits only on an equal key AND equal
    tensor values. O(entries) key compares plus one value compare per candidate."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: list[tuple[Hashable, tuple[torch.Tensor, ...], T]] = []

    def get(self, key: Hashable, tensors: Sequence[torch.Tensor]) -> T | None:
        for i in range(len(self._entries) - 1, -1, -1):
            k, kept, value = self._entries[i]
            if k == key and same_values(kept, tensors):
                self._entries.append(self._entries.pop(i))  # most recently used last
                return value
        return None

    def put(self, key: Hashable, kept: tuple[torch.Tensor, ...], value: T) -> None:
        """Store `value` with `kept` (from `keep`, taken BEFORE the value was computed from the
        tensors, so a concurrent write cannot make the copy newer than the value)."""
        self._entries.append((key, kept, value))
        while len(self._entries) > self.size:
            self._entries.pop(0)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        return [value for _, _, value in self._entries]
