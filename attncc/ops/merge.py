"""The LSE merge: combine partial attention results over disjoint key sets into one.

    from attncc.ops.merge import merge
    o, lse = merge([o_a, o_b], [lse_a, lse_b])   # == attention over the keys of a and b

Each part `i` is what a softmax attention over its own keys returns: `o_i` [..., Dv] and its
natural-log `lse_i` [...] (e.g. [B, Hq, Lq, Dv] and [B, Hq, Lq], from `return_lse=True`). The
result is `lse = logaddexp_i(lse_i)`, `o = sum_i e^(lse_i - lse) o_i` (docs/semantics.md). A part
in which a row has no allowed key (`o = 0`, `lse = -inf`) adds nothing to that row; a row empty in
every part gives `o = 0`, `lse = -inf`, as attention over the union would.

This is the one merge in PyTorch for everything above the backends. Split-KV decode and cascade
attention apply the same rule inside the serving merge kernel; a split of the keys made in
Python (hybrid heads, keys spread over devices for context parallelism) merges here. The
arithmetic is `attncc.backends.merge`: the reference backend merges its key chunks and
persistent-memory slots with the same code (a backend may not import `attncc.ops`); this module
is its front and checks the parts first. A learned sink (N2) belongs to one part only, so that
it is counted once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attncc.backends import merge as _impl


def merge(o_parts: Sequence[torch.Tensor] | torch.Tensor,
          lse_parts: Sequence[torch.Tensor] | torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of attention over the union of the parts' key sets. `o_parts`: n >= 1 tensors
    [..., Dv] (or one tensor [n, ..., Dv]); `lse_parts`: n tensors [...] (or [n, ...]), the same
    leading shape, floating point, on one device. The result has the parts' promoted dtype."""
    _check(o_parts, lse_parts)
    return _impl.merge(o_parts, lse_parts)


def merge_pair(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge([o1, o2], [lse1, lse2])` without building the lists."""
    _check([o1, o2], [lse1, lse2])
    return _impl.merge_pair(o1, lse1, o2, lse2)


def _check(o_parts: Sequence[torch.Tensor] | torch.Tensor,
           lse_parts: Sequence[torch.Tensor] | torch.Tensor) -> None:
    """ValueError naming the first part whose shape, dtype or device does not fit."""
    if len(o_parts) == 0 or len(o_parts) != len(lse_parts):
        raise ValueError(f"merge: expected as many o parts as lse parts, at least one, got "
                         f"{len(o_parts)} and {len(lse_parts)}")
    rows, device = tuple(lse_parts[0].shape), o_parts[0].device
    for i, (o, lse) in enumerate(zip(o_parts, lse_parts)):
        if not (o.is_floating_point() and lse.is_floating_point()):
            raise ValueError(f"merge: part {i}: expected floating-point o and lse, got "
                             f"{o.dtype} and {lse.dtype}")
        if tuple(lse.shape) != rows or o.dim() != lse.dim() + 1 or tuple(o.shape[:-1]) != rows:
            raise ValueError(f"merge: part {i}: expected o [*rows, Dv] and lse [*rows] with the "
                             f"rows of part 0 {list(rows)}, got o {list(o.shape)}, lse "
                             f"{list(lse.shape)}")
        if o.shape[-1] != o_parts[0].shape[-1]:
            raise ValueError(f"merge: part {i}: o has Dv = {o.shape[-1]}, part 0 has "
                             f"{o_parts[0].shape[-1]}")
        if o.device != device or lse.device != device:
            raise ValueError(f"merge: part {i}: expected tensors on {device}, got o on "
                             f"{o.device}, lse on {lse.device}")
