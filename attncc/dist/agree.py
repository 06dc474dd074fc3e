"""Every rank agrees on its inputs before any collective that could hang (docs/context_parallel.md).

One small all-gather of a few integers per call: each rank's "my own checks failed" flag, and
the shape and dtype of the tensors that must match across ranks. A rank whose checks failed
raises its own error; every other rank raises one naming it; mismatched shapes raise on every
rank. So bad input never leaves some ranks waiting in a gather the others never join.

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


def _row(tensors: dict[str, Any], failed: bool) -> list[int]:
    """[failed, then per tensor: 4 sizes (-1 if not a 4-d tensor) and a dtype index]."""
    row = [int(failed)]
    for t in tensors.values():
        ok = isinstance(t, torch.Tensor) and t.dim() == 4
        row += list(t.shape) if ok else [-1] * 4
        row.append(_DTYPES.index(t.dtype) if ok and t.dtype in _DTYPES else -1)
    return row


@torch.compiler.disable
def agree_on_inputs(tensors: dict[str, Any], error: str | None, group: Any, what: str) -> None:
    """All-gather every rank's row of `tensors` (name -> this rank's tensor) and its check
    result `error` (None: passed), then raise the same way on every rank if any rank failed or
    the shapes differ. `what` names the computation in the messages ("the attention")."""
    first = next(iter(tensors.values()))
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor(_row(tensors, error is not None), dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = [r.tolist() for r in rows]
    if error is not None:
        raise ValueError(f"context parallel (rank {dist.get_rank(group)}): {error}")
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"context parallel: rank(s) {failed} rejected their inputs (their "
                         f"error says why); no rank ran {what}")
    if any(row != table[0] for row in table):
        names = ", ".join(tensors)
        shapes = {r: tuple(row[1 + 5 * i:5 + 5 * i] for i in range(len(tensors)))
                  for r, row in enumerate(table)}
        raise ValueError(f"context parallel: ranks hold different {names} shapes or dtypes "
                         f"(rank: ({names}) shapes): {shapes}; every rank must hold the same "
                         "number of tokens of the same heads")
