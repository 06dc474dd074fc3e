"""Argument checks of `attncc.serving`.

`check_tensor` / `check_absent` read only shapes, dtypes and devices (no device data, no sync)
and always run. `check_cu_seqlens` reads offsets (a sync): `plan` always calls it (it reads
them anyway to build the work list), `run` only in debug mode. `debug_*` functions read index
tensors (page ids, lengths, offsets) and so synchronise with
the device: they run only when `attncc.config.debug_checks()` (ATTNCC_DEBUG=1). In the fast path
those values are UNCHECKED: a page id out of range or a kv_len above the page table's capacity
reads out of bounds, as in vLLM and FlashInfer.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def _got(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}"
    return type(x).__name__


described = _got  # "[shape] dtype on device" or the type name, for error messages


def check_tensor(name: str, x: object, shape: list[int | None], dtype: torch.dtype,
                 device: torch.device, what: str) -> Tensor:
    """`x` is a tensor of `dtype` on `device` whose shape matches `shape` (None: any size)."""
    ok = (isinstance(x, Tensor) and x.dtype == dtype and x.device == device
          and x.dim() == len(shape) and all(w is None or w == s for w, s in zip(shape, x.shape)))
    if not ok:
        want = "[" + ", ".join("?" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name}: expected a {str(dtype).removeprefix('torch.')} tensor {what} "
                         f"= {want} on {device}, got {_got(x)}")
    return x


def check_absent(name: str, x: object, why: str) -> None:
    if x is not None:
        raise ValueError(f"{name}: expected None ({why}), got {_got(x)}")


def debug_lengths(name: str, lengths: Tensor, capacity: int, what: str) -> None:
    vals = lengths.tolist()
    bad = [(i, n) for i, n in enumerate(vals) if not 0 <= n <= capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(f"{name}[{i}]: expected 0 <= {name} <= {what} = {capacity}, got {n}")


def debug_page_table(page_table: Tensor, kv_len: Tensor, page_size: int, num_pages: int) -> None:
    capacity = page_table.shape[1] * page_size
    debug_lengths("kv_len", kv_len, capacity, "max_pages * page_size")
    table = page_table.cpu()
    for b, n in enumerate(kv_len.tolist()):
        used = table[b, :-(-n // page_size)]
        if used.numel() and not (0 <= int(used.min()) and int(used.max()) < num_pages):
            raise ValueError(f"page_table[{b}]: expected page ids in [0, {num_pages}) for its "
                             f"first {used.numel()} pages, got {used.tolist()}")


def check_cu_seqlens(name: str, cu: Tensor, total: int) -> list[int]:
    c = cu.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != total or any(b < a for a, b in itertools.pairwise(c)):
        raise ValueError(f"{name}: expected N + 1 >= 2 non-decreasing offsets from 0 to {total}, "
                         f"got {c}")
    return c
