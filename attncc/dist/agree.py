"""Every rank agrees on its inputs before any collective that could hang (docs/context_parallel.md).

One small all-gather of a few integers per call: each rank's "my own checks failed" flag, and
the shape and dtype of the tensors that must match across ranks, and any integers the caller
needs alike on every rank (flags, a checksum of varlen cu_seqlens). A rank whose checks failed
raises its own error; every other rank raises one naming it; mismatched shapes or integers
raise on every rank. So bad input never leaves some ranks waiting in a gather the others never
join.

Under `torch.compile` the exchange runs eagerly (`torch.compiler.disable`: one graph break, the
rows are read as Python integers), between the graph of the checks before it and the graph of
the collectives and kernels after it, so it still happens before any data collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["agree_on_inputs"]

# dtypes that travel as an index in the agreement row (anything else: -1)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _row(tensors: dict[str, Any], failed: bool, same: dict[str, int]) -> list[int]:
    """[failed, then per tensor: its number of dimensions and 4 sizes (-1 for a missing one,
    all -1 if not a tensor of at most 4 dimensions) and a dtype index, then `same`'s values]."""
    row = [int(failed)]
    for t in tensors.values():
        ok = isinstance(t, torch.Tensor) and t.dim() <= 4
        row += [t.dim(), *t.shape, *[-1] * (4 - t.dim())] if ok else [-1] * 5
        row.append(_DTYPES.index(t.dtype) if ok and t.dtype in _DTYPES else -1)
    return row + list(same.values())


@torch.compiler.disable
def _shape(sizes: list[int]) -> tuple[int, ...] | None:
    """A tensor's shape back from its [dimensions, 4 sizes] in the row (None: no tensor)."""
    return None if sizes[0] < 0 else tuple(sizes[1:1 + sizes[0]])


def agree_on_inputs(tensors: dict[str, Any], error: str | None, group: Any, what: str,
                    same: dict[str, int] | None = None) -> None:
    """All-gather every rank's row of `tensors` (name -> this rank's tensor), its check
    result `error` (None: passed) and the integers `same` (what they say -> value: flags, a
    checksum) that every rank must pass alike, then raise the same way on every rank if any
    rank failed, the shapes differ or the integers do. `what` names the computation in the
    messages ("the attention")."""
    same = same or {}
    first = next(iter(tensors.values()))
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor(_row(tensors, error is not None, same), dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = [r.tolist() for r in rows]
    if error is not None:
        raise ValueError(f"context parallel (rank {dist.get_rank(group)}): {error}")
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"context parallel: rank(s) {failed} rejected their inputs (their "
                         f"error says why); no rank ran {what}")
    width = 6 * len(tensors)
    if any(row[:1 + width] != table[0][:1 + width] for row in table):
        names = ", ".join(tensors)
        shapes = {r: tuple(_shape(row[1 + 6 * i:6 + 6 * i]) for i in range(len(tensors)))
                  for r, row in enumerate(table)}
        raise ValueError(f"context parallel: ranks hold different {names} shapes or dtypes "
                         f"(rank: ({names}) shapes): {shapes}; every rank must hold the same "
                         "number of tokens of the same heads")
    for i, name in enumerate(same):
        values = [row[1 + width + i] for row in table]
        if any(value != values[0] for value in values):
            raise ValueError(f"context parallel: ranks pass different {name} (by rank: "
                             f"{values}); every rank must pass the same")
