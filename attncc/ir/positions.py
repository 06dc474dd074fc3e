"""Row positions of a reordered launch: for each row of the kernel's token order, the token's
ORIGINAL position (`perm[new] = original`, docs/semantics.md). Kernels read them as int32 to
evaluate masks and scores on original positions and, in the original layout, to gather rows.

Grid orders (R1-R4) are fixed by the spec: their positions are built once per length and device.
R5 (`key_score=`) and R6 (`perm=` or the node's name) take a tensor per call: its positions are
reused only for an EQUAL tensor on the host (compared by value, `attncc.value_cache`);
for a device tensor they are recomputed on every call (a sort on the device, no host sync).
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.value_cache import ValueCache, keep, on_host
from attncc.ir.reorder import SegmentSort, UserPermutation

CACHED = 8
DATA_ORDERS = (SegmentSort, UserPermutation)  # orders whose positions come from call tensors


def split_reorder_inputs(reorder: Any, runtime: dict[str, Any], permuted: bool
                         ) -> dict[str, torch.Tensor]:
    """Pop the reorder's call arguments from `runtime` (in place), as `permutation` keywords."""
    if reorder is None:
        if permuted:
            raise ValueError("permuted=True: this spec has no reorder, so there is no "
                             "permuted layout; leave permuted=False")
        return {}
    if isinstance(reorder, SegmentSort):
        names = {"key_score": "key_score"}
    elif isinstance(reorder, UserPermutation):
        names = {reorder.name: "perm"}
    else:
        return {}
    missing = [n for n in names if n not in runtime]
    if missing:
        raise ValueError(f"{missing[0]}: the reorder {reorder.text()} needs it as a call "
                         f"argument ({missing[0]}=tensor of length L)")
    return {keyword: runtime.pop(name) for name, keyword in names.items()}


class Positions:
    """int32 (q_pos, kv_pos) for a reorder, cached per (lengths, device) and input values."""

    def __init__(self, reorder: Any) -> None:
        self.reorder = reorder
        self._cache: ValueCache[tuple[torch.Tensor, torch.Tensor]] = ValueCache(CACHED)

    def get(self, Lq: int, Lk: int, device: torch.device, inputs: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (Lq, Lk, device, tuple(sorted(inputs)))
        data = [t for _, t in sorted(inputs.items())]
        cacheable = on_host(data)
        if cacheable:
            hit = self._cache.get(key, data)
            if hit is not None:
                return hit
            kept = keep(data)
        q_pos = self.reorder.permutation(Lq, device=device, **inputs).to(torch.int32)
        kv_pos = (q_pos if Lk == Lq else
                  self.reorder.permutation(Lk, device=device, **inputs).to(torch.int32))
        if cacheable:
            self._cache.put(key, kept, (q_pos, kv_pos))
        return q_pos, kv_pos
