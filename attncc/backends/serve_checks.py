"""Argument checks of `attncc.ops.serving.compiled`. All of them always run.

`check_tensor` / `check_absent` read only shapes, dtypes and devices (no device data, no sync).
`check_plan_arguments` and `check_cu_seqlens` run in `plan`, on the host (`plan` reads the
query offsets anyway to build its work list). Index VALUES given to `run` (page ids, kv_len,
head_kv_len, cu_seqlens_k, and cu_seqlens_q against the planned offsets) are checked by the
serving kernel itself, with no sync: it clamps them so that it never reads out of range (a
bad page id is clamped into [0, num_pages), a length into [0, capacity]), and writes where a
bad value is to the plan's error record `ServePlan.err`; `raise_index_errors`
then asserts on the record with `torch._assert_async` (on a CPU tensor it raises at once and
becomes the detailed ValueError below; on CUDA it fails at the next sync). With
ATTNCC_DEBUG=1 `run` reads the record instead (a sync) and raises the detailed ValueError on
CUDA too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attncc import config


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


def check_cu_seqlens(name: str, cu: Tensor, total: int) -> list[int]:
    c = cu.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != total or any(b < a for a, b in itertools.pairwise(c)):
        raise ValueError(f"{name}: expected N + 1 >= 2 non-decreasing offsets from 0 to {total}, "
                         f"got {c}")
    return c


def check_count(name: str, x: object, least: int, what: str) -> int:
    """`x` is an int (not a bool) >= `least`."""
    if isinstance(x, bool) or not isinstance(x, int) or x < least:
        raise ValueError(f"{name}: expected {what} (an int >= {least}), got {x!r}")
    return x


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_plan_arguments(*, batch: Any, num_heads: Any, num_kv_heads: Any, head_dim: Any,
                         head_dim_v: Any, max_q_len: Any, max_pages: Any, kv_capacity: Any,
                         dtype: Any, device: torch.device, num_splits: Any, scale: Any) -> None:
    """Sizes, dtype and device given to `plan`, before anything is computed from them."""
    check_count("batch", batch, 0, "the number of requests")
    check_count("num_heads", num_heads, 1, "the query heads Hq")
    check_count("num_kv_heads", num_kv_heads, 1, "the kv heads Hkv")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads = {num_heads}, "
                         f"got {num_kv_heads}")
    check_count("head_dim", head_dim, 1, "the query / key head dim Dqk")
    if head_dim_v is not None:
        check_count("head_dim_v", head_dim_v, 1, "the value head dim Dv")
    check_count("max_q_len", max_q_len, 0, "the query rows of every request")
    if max_pages is not None:
        check_count("max_pages", max_pages, 0, "the page table's width")
    if kv_capacity is not None:
        check_count("kv_capacity", kv_capacity, 0, "the most keys of one request")
    if num_splits is not None:
        check_count("num_splits", num_splits, 1, "the kv splits")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {[str(d) for d in DTYPES]}, got {dtype!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale: expected a float or None, got {scale!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected a device this torch can use, got {device} but "
                         f"torch.cuda.is_available() is False (torch {torch.__version__} built "
                         f"without CUDA, or no visible GPU); on the CPU use device='cpu' with "
                         f"TRITON_INTERPRET=1")


# The serving kernel's error record int64[6]: [0] ok (1: no error), [code] where a bad value is
# (-1: none); the host reads the value itself from the input, only to report an error.
ERR_PAGE, ERR_KV_LEN, ERR_CU_K, ERR_CU_Q, ERR_HEAD_LEN = 1, 2, 3, 4, 5
CLEAN = (1, -1, -1, -1, -1, -1)
# torch copies the message into the CUDA assert kernel's arguments: at most 254 characters
# (longer ones raise at once on CUDA: ATen/native/cuda/TensorCompare.cu, MAX_MSG_LENGTH 256)
ASYNC_MESSAGE = (
    "attncc serving run: an index input is out of range (a page_table id, kv_len, head_kv_len, "
    "cu_seqlens_k, or cu_seqlens_q not the planned offsets); nothing was read out of range. "
    "Rerun with ATTNCC_DEBUG=1 for the argument and value")


def error_record(device: torch.device) -> Tensor:
    return torch.tensor(CLEAN, dtype=torch.int64, device=device)


def raise_index_errors(err: Tensor, ok: Tensor,
                       inputs: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
    """After a launch: raise when the kernel flagged an index value in `err` (`ok` = err[:1],
    a view made once). No sync unless ATTNCC_DEBUG=1 or on the CPU. `inputs` (or a function
    that returns it, called only on an error): the index tensors by argument name, num_pages,
    kv_cap, cap_what (what kv_cap is) and q_offsets (the planned cu_seqlens_q), read only to
    report an error."""
    if config.debug_checks():
        if int(err[0]) == 0:
            _raise(err, inputs() if callable(inputs) else inputs)
        return
    try:
        torch._assert_async(ok, ASYNC_MESSAGE)
    except RuntimeError:  # a CPU tensor fails here; a CUDA one at the next sync
        _raise(err, inputs() if callable(inputs) else inputs)


def _raise(err: Tensor, inputs: dict[str, Any]) -> None:
    record = err.tolist()
    err.copy_(torch.tensor(CLEAN, dtype=torch.int64))  # the plan stays usable after the error
    code = next(c for c in range(1, len(CLEAN)) if record[c] >= 0)
    where = record[code]
    cap, what = inputs["kv_cap"], inputs["cap_what"]
    if code == ERR_PAGE:
        b, j = divmod(where, 2**31)
        msg = (f"page_table[{b}, {j}]: expected a page id in [0, num_pages) = "
               f"[0, {inputs['num_pages']}) (num_pages: the k/v caches' first dim) for the "
               f"pages below kv_len, got {int(inputs['page_table'][b, j])}")
    elif code == ERR_KV_LEN:
        msg = (f"kv_len[{where}]: expected 0 <= kv_len <= {what} = {cap}, got "
               f"{int(inputs['kv_len'][where])}")
    elif code == ERR_CU_K:
        cu = inputs["cu_seqlens_k"].tolist()
        msg = (f"cu_seqlens_k[{where}]: expected nondecreasing offsets from 0 to total_k = "
               f"{cap} (k.shape[0]), got {cu[where]} (cu_seqlens_k = {cu})")
    elif code == ERR_CU_Q:
        cu = inputs["cu_seqlens_q"].tolist()
        msg = (f"cu_seqlens_q[{where}]: expected the offsets the plan was made for, "
               f"{inputs['q_offsets'].tolist()}, got {cu[where]} (cu_seqlens_q = {cu}; plan "
               f"again for new query lengths)")
    else:
        msg = (f"head_kv_len[{where}]: expected 0 <= head_kv_len <= {what} = {cap}, got "
               f"{int(inputs['head_kv_len'][where])}")
    raise ValueError(msg) from None
