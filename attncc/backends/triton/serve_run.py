"""What the Triton serving family does for `ServingAttention.run` after `plan`: check metadata,
assemble kernel arguments, launch the forward kernel (and the merge kernel when the plan
splits), and cascade attention.

Nothing here reads device data or allocates (cascade excepted, which says so): argument values
are tensors, their strides and the plan's integers. After the launches, one
`torch._assert_async` on the plan's error record raises what the kernel found wrong in the
index values (`attncc.backends.serve_checks`), without a sync.

The first run of a plan with inputs of one geometry (`_run_key`: each input's type, shape,
strides, dtype, device and 16-byte alignment, the layout, the current device) checks and
assembles everything and launches through Triton's JIT; the plan keeps the `CompiledKernel`s
the JIT returned and the arguments in each kernel's order (`_Remembered`). A later run of the
same geometry passed every check that run did (they read nothing else), gets the same integer
arguments, constexprs and JIT specialisation, so it only puts its own tensors into their
positions and calls the binaries: no dict, no check, no specialisation per argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from triton.compiler import CompiledKernel
from triton.runtime import driver

from attncc import config
from attncc.backends.base import Backend, ServePlan
from attncc.backends.serve_checks import check_absent, check_tensor, raise_index_errors
from attncc.backends.triton.forward import argument_values, target_of
from attncc.backends.triton import serve as serve_kernels
from attncc.backends.triton.serve import (FIXED_ARGS, MERGE_FIXED_ARGS, TritonServe,
                                          extra_arguments, launch)
from attncc.ir.memory import PagedMemory, PerHeadLengths, PersistentMemory, RaggedMemory
from attncc.ir.plan import KernelPlan
from attncc.passes.select_tiles import choose_serving, padded

KV_DENSE, KV_PAGED, KV_RAGGED = 0, 1, 2
_checks = True  # False only inside `_unchecked` (benchmarks time what the checks cost)


@contextlib.contextmanager
def _unchecked() -> Iterator[None]:
    """Runs without the index checks (kernel CHECK off, no assert): for benchmarks only, to
    measure the checks' cost; an out-of-range index then reads out of bounds."""
    global _checks
    _checks = False
    try:
        yield
    finally:
        _checks = True


def _q_strides(x: Tensor, ragged: bool, prefix: str) -> dict[str, int]:
    """[B, H, L, D] or packed [T, H, D] -> strides along (b, m, h, d)."""
    s = (0, x.stride(0), x.stride(1), x.stride(2)) if ragged else (
        x.stride(0), x.stride(2), x.stride(1), x.stride(3))
    return dict(zip((prefix + c for c in "bmhd"), s))


def _kv_strides(x: Tensor, mode: str, prefix: str) -> dict[str, int]:
    """Strides along (page or batch, token, head, d) for each KV layout."""
    if mode == "packed":  # [T, Hkv, D]
        s = (0, x.stride(0), x.stride(1), x.stride(2))
    elif mode == "nhd":  # [num_pages, P, Hkv, D]
        s = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
    else:  # "hnd" pages [num_pages, Hkv, P, D] or dense [B, Hkv, L, D]
        s = (x.stride(0), x.stride(2), x.stride(1), x.stride(3))
    return dict(zip((prefix + c for c in "bnhd"), s))


def _lse_strides(plan: ServePlan) -> dict[str, int]:
    """lse [B, Hq, L] or packed [T, Hq] -> strides along (b, m, h); zeros when not written."""
    if plan.lse is None:
        return {"stride_lb": 0, "stride_lm": 0, "stride_lh": 0}
    s = plan.lse.stride()
    s = (0, s[0], s[1]) if plan.ragged_q else (s[0], s[2], s[1])
    return dict(zip(("stride_lb", "stride_lm", "stride_lh"), s))


def arguments(kernels: TritonServe, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor,
              page_table: Tensor | None, kv_len: Tensor | None, cu_seqlens_q: Tensor | None,
              cu_seqlens_k: Tensor | None, mem_k: Tensor | None, mem_v: Tensor | None,
              head_kv_len: Tensor | None, kv_layout: str, k_stream: Tensor | None = None,
              v_stream: Tensor | None = None) -> tuple[dict, dict]:
    """Kernel argument values by name, and constexprs, for one run of `plan`."""
    mem, dev, dt, i32 = kernels.memory, plan.device, plan.dtype, torch.int32
    B, Hq, Hkv, D, Dv = plan.batch, plan.hq, plan.hkv, plan.dqk, plan.dv
    Hc = Hkv - plan.n_stream  # heads in the full cache (all of them unless K5 compact)
    if plan.ragged_q:
        check_tensor("q", q, [plan.q_rows, Hq, D], dt, dev, "[total_q, Hq, Dqk]")
        check_tensor("cu_seqlens_q", cu_seqlens_q, [B + 1], i32, dev, "[B + 1]")
    else:
        check_tensor("q", q, [B, Hq, plan.q_rows, D], dt, dev, "[B, Hq, Lq, Dqk]")
        check_absent("cu_seqlens_q", cu_seqlens_q, "this plan was made for batched q")
    dummy = plan.work
    a: dict[str, Any] = {"Q": q, "K": k, "V": v, "O": plan.o, "WORK": plan.work, "VISITS": dummy,
                         "LSE": plan.lse if plan.lse is not None else dummy,
                         "O_PART": plan.o_part if plan.o_part is not None else dummy,
                         "LSE_PART": plan.lse_part if plan.lse_part is not None else dummy,
                         "PAGE_TABLE": dummy, "KV_LEN": dummy,
                         "CU_Q": dummy if cu_seqlens_q is None else cu_seqlens_q,
                         "CU_K": dummy, "LK_MASK": dummy, "HEAD_LEN": dummy, "MEM_K": q,
                         "MEM_V": q, "stride_pt": 0, "page_size": 1, "q_rows": plan.q_rows,
                         "Hq": Hq, "Hkv": Hkv, "sm_scale": float(plan.sm_scale), "n_slots": 0,
                         "head_len_div": 1, "kv_pos0": 0, "split_base": 0,
                         "n_rows_total": plan.rows, "K_S": q, "V_S": q, "HEAD_MAP": dummy,
                         "n_sink": 0, "window": 0, "ring": 1, "CU_Q_IN": dummy,
                         "ERR": plan.err, "n_req": B, "num_pages": 0, "kv_cap": 0,
                         "cap_what": ""}  # cap_what: for error messages, not an argument
    if plan.ragged_q:  # the kernel reads the planned offsets and compares the run's with them
        a.update(CU_Q=plan.cu_q, CU_Q_IN=cu_seqlens_q)
    a.update({f"stride_{x}{d}": 0 for x in ("ks", "vs") for d in "bnhd"})
    a.update(_q_strides(q, plan.ragged_q, "stride_q"))
    a.update(_q_strides(plan.o, plan.ragged_q, "stride_o"))
    a.update(_lse_strides(plan))
    cx = {"KV_MODE": KV_DENSE, "RAGGED_Q": plan.ragged_q, "HAS_KV_LEN": False,
          "HAS_LK_MASK": False, "HEAD_LENGTHS": False, "HAS_SLOTS": False, "STREAM": False,
          "COUNT_VISITS": False, "CHECK": _checks}
    # K5 compact caches take the full heads' cache dense or paged (page size from its shape)
    paged_full = (isinstance(mem, PerHeadLengths) and mem.compact and page_table is not None
                  and isinstance(k, Tensor) and k.dim() == 4)
    if isinstance(mem, PagedMemory) or paged_full:
        if kv_layout not in ("nhd", "hnd"):
            raise ValueError(f"kv_layout: expected 'nhd' or 'hnd', got {kv_layout!r}")
        P = mem.page_size if isinstance(mem, PagedMemory) else k.shape[1 if kv_layout == "nhd"
                                                                          else 2]
        if P < 1:  # K5 compact: the page size comes from the cache's shape
            raise ValueError(f"k_cache: expected pages of page_size >= 1 tokens, got {P} "
                             f"({list(k.shape)}, kv_layout {kv_layout!r})")
        shape = [None, P, Hc] if kv_layout == "nhd" else [None, Hc, P]
        what = "[num_pages, page_size, Hkv, D]" if kv_layout == "nhd" else \
            "[num_pages, Hkv, page_size, D]"
        check_tensor("k_cache", k, shape + [D], dt, dev, what)
        check_tensor("v_cache", v, [k.shape[0]] + shape[1:] + [Dv], dt, dev, what)
        if k.shape[0] < 1:  # the kernel clamps page ids into [0, num_pages)
            raise ValueError(f"k_cache: expected at least one page {what}, got {list(k.shape)}")
        check_tensor("page_table", page_table, [B, plan.kv_capacity // P if not paged_full
                                                else None], i32, dev, "[B, max_pages] (planned)")
        check_tensor("kv_len", kv_len, [B], i32, dev, "[B]")
        a.update(_kv_strides(k, kv_layout, "stride_k"), **_kv_strides(v, kv_layout, "stride_v"),
                 PAGE_TABLE=page_table, KV_LEN=kv_len, stride_pt=page_table.stride(0),
                 page_size=P, kv_rows=0, num_pages=k.shape[0], kv_cap=page_table.shape[1] * P,
                 cap_what="max_pages * page_size")
        cx.update(KV_MODE=KV_PAGED, HAS_KV_LEN=True)
    elif isinstance(mem, RaggedMemory):
        check_tensor("k", k, [None, Hkv, D], dt, dev, "[total_k, Hkv, Dqk]")
        check_tensor("v", v, [k.shape[0], Hkv, Dv], dt, dev, "[total_k, Hkv, Dv]")
        check_tensor("cu_seqlens_k", cu_seqlens_k, [B + 1], i32, dev, "[B + 1]")
        a.update(_kv_strides(k, "packed", "stride_k"), **_kv_strides(v, "packed", "stride_v"),
                 CU_K=cu_seqlens_k, kv_rows=0, kv_cap=k.shape[0], cap_what="total_k")
        cx.update(KV_MODE=KV_RAGGED)
    else:
        what = "Hkv_full" if plan.n_stream else "Hkv"
        check_tensor("k", k, [B, Hc, None, D], dt, dev, f"[B, {what}, Lk, Dqk]")
        check_tensor("v", v, [B, Hc, k.shape[2], Dv], dt, dev, f"[B, {what}, Lk, Dv]")
        a.update(_kv_strides(k, "hnd", "stride_k"), **_kv_strides(v, "hnd", "stride_v"),
                 kv_rows=k.shape[2], kv_cap=k.shape[2], cap_what="Lk of k")
        if kv_len is not None:
            check_tensor("kv_len", kv_len, [B], i32, dev, "[B]")
            a["KV_LEN"] = kv_len
            cx["HAS_KV_LEN"] = True
    if isinstance(mem, PersistentMemory):
        check_tensor("mem_k", mem_k, [Hkv, mem.slots, D], dt, dev, "[Hkv, slots, Dqk]")
        check_tensor("mem_v", mem_v, [Hkv, mem.slots, Dv], dt, dev, "[Hkv, slots, Dv]")
        a.update(MEM_K=mem_k, MEM_V=mem_v, n_slots=mem.slots,
                 **dict(zip(("stride_mkh", "stride_mks", "stride_mkd"), mem_k.stride())),
                 **dict(zip(("stride_mvh", "stride_mvs", "stride_mvd"), mem_v.stride())))
        cx["HAS_SLOTS"] = True
    else:
        check_absent("mem_k", mem_k, "memory is not persistent(...)")
        a.update({f"stride_{x}": 0 for x in ("mkh", "mks", "mkd", "mvh", "mvs", "mvd")})
    if isinstance(mem, PerHeadLengths) and mem.compact:
        check_absent("head_kv_len", head_kv_len, "per_head_lengths(sink, window) takes "
                     "k_stream / v_stream / stream_heads")
        _stream_arguments(plan, mem, k_stream, v_stream, a)
        cx["STREAM"] = True
    elif isinstance(mem, PerHeadLengths):
        if head_kv_len is None or head_kv_len.dim() != 1 or head_kv_len.shape[0] not in (Hkv, Hq):
            got = None if head_kv_len is None else list(head_kv_len.shape)
            raise ValueError(f"head_kv_len: expected an int32 tensor [Hkv] = [{Hkv}] or [Hq] = "
                             f"[{Hq}], got {got}")
        check_tensor("head_kv_len", head_kv_len, [head_kv_len.shape[0]], i32, dev, "[Hkv]/[Hq]")
        a.update(HEAD_LEN=head_kv_len, head_len_div=Hq // head_kv_len.shape[0])
        cx["HEAD_LENGTHS"] = True
    else:
        check_absent("head_kv_len", head_kv_len, "memory is not per_head_lengths()")
    if not (isinstance(mem, PerHeadLengths) and mem.compact):
        check_absent("k_stream", k_stream, "memory is not per_head_lengths(sink, window)")
        check_absent("v_stream", v_stream, "memory is not per_head_lengths(sink, window)")
    return a, cx


def _stream_arguments(plan: ServePlan, mem: PerHeadLengths, k_stream: Tensor | None,
                      v_stream: Tensor | None, a: dict[str, Any]) -> None:
    """K5 compact caches: k_stream [B, Hkv_stream, sink + R, Dqk], v_stream likewise with Dv;
    R (the ring) must hold the window of every query row: R >= window + Lq - 1."""
    B, Hs, dt, dev = plan.batch, plan.n_stream, plan.dtype, plan.device
    check_tensor("k_stream", k_stream, [B, Hs, None, plan.dqk], dt, dev,
                 "[B, Hkv_stream, sink + ring, Dqk]")
    check_tensor("v_stream", v_stream, [B, Hs, k_stream.shape[2], plan.dv], dt, dev,
                 "[B, Hkv_stream, sink + ring, Dv]")
    ring = k_stream.shape[2] - mem.sink
    if ring < mem.window + plan.max_q - 1:
        raise ValueError(f"k_stream: expected sink + ring entries with ring >= window + Lq - 1 = "
                         f"{mem.window + plan.max_q - 1} (sink {mem.sink}, window {mem.window}, "
                         f"Lq {plan.max_q}), got {k_stream.shape[2]} entries (ring {ring})")
    a.update(K_S=k_stream, V_S=v_stream, HEAD_MAP=plan.head_map, n_sink=mem.sink,
             window=mem.window, ring=ring,
             **dict(zip((f"stride_ks{d}" for d in "bhnd"), k_stream.stride())),
             **dict(zip((f"stride_vs{d}" for d in "bhnd"), v_stream.stride())))


def launch_plan(kernels: TritonServe, plan: ServePlan, a: dict[str, Any], cx: dict[str, Any],
                *, split_base: int, parts: int, num_splits: int | None = None,
                merge_parts: bool = True) -> list[_Launched]:
    """Forward over the plan's work list; then, unless it wrote final outputs, the merge of
    `parts` partials (split_base: first partial slice this launch writes). Returns the
    launches made, in order."""
    splits = plan.num_splits if num_splits is None else num_splits
    partial = parts > 1
    a = dict(a, split_base=split_base)
    names = [n for n, _ in FIXED_ARGS]
    target = target_of(plan.device)
    cx = dict(cx, D_QK=plan.dqk, D_V=plan.dv, D_QK_PAD=padded(plan.dqk), D_V_PAD=padded(plan.dv),
              BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, SLOTS_PAD=padded(max(plan.slots, 1)),
              DOT_PRECISION="ieee",
              UPCAST_DOT=target == "interpreter" and plan.dtype == torch.bfloat16,
              NUM_SPLITS=splits, WRITE_PARTIAL=partial, WRITE_LSE=plan.lse is not None)
    launched: list[_Launched] = []
    if plan.work.shape[0]:
        fn, grid = kernels.forward(), (plan.work.shape[0], plan.hkv, splits)
        args = [a[n] for n in names] + list(plan.extra)
        launched.append(_Launched(launch(kernels.name, fn, grid, args, cx,
                                         num_warps=plan.num_warps, num_stages=2),
                                  grid, _positional(fn, args, cx)))
    if partial and merge_parts:
        launched += merge(kernels, plan, plan.o_part, plan.lse_part, parts)
    return launched


def raise_errors(plan: ServePlan, a: dict[str, Any]) -> None:
    """After the launches of one run: raise what the kernel wrote to the plan's error record
    (no sync; see `attncc.backends.serve_checks.raise_index_errors`)."""
    if _checks and plan.work.shape[0]:
        raise_index_errors(plan.err, plan.err_ok, _error_inputs(plan, a))


ERROR_ARGUMENTS = ("num_pages", "kv_cap", "cap_what", "PAGE_TABLE", "KV_LEN", "CU_K", "CU_Q_IN",
                   "HEAD_LEN")


def _error_inputs(plan: ServePlan, a: dict[str, Any]) -> dict[str, Any]:
    """What an index error's message reads: the run's index tensors and capacities."""
    return {"num_pages": a["num_pages"], "kv_cap": a["kv_cap"], "cap_what": a["cap_what"],
            "q_offsets": plan.cu_q, "page_table": a["PAGE_TABLE"], "kv_len": a["KV_LEN"],
            "cu_seqlens_k": a["CU_K"], "cu_seqlens_q": a["CU_Q_IN"],
            "head_kv_len": a["HEAD_LEN"]}


def merge(kernels: TritonServe, plan: ServePlan, o_part: Tensor, lse_part: Tensor,
          parts: int) -> list[_Launched]:
    o, lse = plan.o, plan.lse if plan.lse is not None else plan.work
    a = {"O_PART": o_part, "LSE_PART": lse_part, "O": o, "LSE": lse,
         **_q_strides(o, plan.ragged_q, "stride_o"), **_lse_strides(plan),
         "n_rows_total": plan.rows,
         "rows_per_b": plan.rows if plan.ragged_q else plan.q_rows, "Hq": plan.hq,
         "n_parts": parts}
    cx = {"D_V": plan.dv, "D_V_PAD": padded(plan.dv), "WRITE_LSE": plan.lse is not None}
    if not plan.rows:
        return []
    fn, grid = kernels.merge(), (plan.rows, plan.hq)
    args = [a[n] for n, _ in MERGE_FIXED_ARGS] + list(plan.extra)
    return [_Launched(launch(kernels.name + "_merge", fn, grid, args, cx, num_warps=1), grid,
                      _positional(fn, args, cx))]


def cascade(kernels: TritonServe, plan: ServePlan, q: Tensor, prefix_k: Tensor,
            prefix_v: Tensor, k: Tensor, v: Tensor, **inputs: Any
            ) -> Tensor | tuple[Tensor, Tensor]:
    """Cascade attention: every request's keys are a shared prefix (prefix_k [P, Hkv, Dqk],
    prefix_v [P, Hkv, Dv], stored once) followed by its own suffix (k, v and `inputs` as for
    `run`, with kv_len the suffix lengths). Equals attention over the concatenation: masks see
    prefix keys at 0..P-1, suffix keys at P.., and Lk = P + kv_len[b]. The prefix part is one
    launch reading the prefix once per kv-head tile for all requests, the suffix part another,
    and the merge kernel combines them (sink counted once). Allocates its two partial slices
    and the per-request lengths (not for CUDA graphs)."""
    P = prefix_k.shape[0]
    check_tensor("prefix_k", prefix_k, [P, plan.hkv, plan.dqk], plan.dtype, plan.device,
                 "[P, Hkv, Dqk]")
    check_tensor("prefix_v", prefix_v, [P, plan.hkv, plan.dv], plan.dtype, plan.device,
                 "[P, Hkv, Dv]")
    kv_len = inputs.get("kv_len")
    if kv_len is None:
        raise ValueError("kv_len: expected the suffix lengths int32[B] for cascade, got None")
    a, cx = arguments(kernels, plan, q, k, v, inputs.get("page_table"), kv_len,
                      inputs.get("cu_seqlens_q"), None, None, None, None,
                      inputs.get("kv_layout", "nhd"))
    rows = plan.rows
    o_part = torch.empty(2, rows, plan.hq, plan.dv, dtype=torch.float32, device=plan.device)
    lse_part = torch.empty(2, rows, plan.hq, dtype=torch.float32, device=plan.device)
    lk_mask = kv_len + P
    cx = dict(cx, HAS_LK_MASK=True)
    suffix = dict(a, O_PART=o_part, LSE_PART=lse_part, LK_MASK=lk_mask, kv_pos0=P)
    prefix = dict(suffix, K=prefix_k, V=prefix_v, kv_pos0=0, kv_rows=P, page_size=1)
    prefix.update(_kv_strides(prefix_k, "packed", "stride_k"),
                  **_kv_strides(prefix_v, "packed", "stride_v"))
    pcx = dict(cx, KV_MODE=KV_DENSE, HAS_KV_LEN=False)
    launch_plan(kernels, plan, prefix, pcx, split_base=0, parts=2, num_splits=1,
                merge_parts=False)
    launch_plan(kernels, plan, suffix, cx, split_base=1, parts=2, num_splits=1, merge_parts=False)
    merge(kernels, plan, o_part, lse_part, 2)
    raise_errors(plan, suffix)
    return (plan.o, plan.lse) if plan.lse is not None else plan.o


# -- later runs of one geometry: the arguments of the first, the binaries its JIT returned --

RUN_TENSORS = ("page_table", "kv_len", "cu_seqlens_q", "cu_seqlens_k", "mem_k", "mem_v",
               "head_kv_len", "k_stream", "v_stream")  # after q, k, v: a run's own tensors
_REMEMBERED_PER_PLAN = 16  # geometries one plan keeps (a decode loop has one)


class _Launched(NamedTuple):
    """One launch of a run: what Triton returned (its `CompiledKernel` from the JIT; nothing
    under the interpreter), the grid, and every argument in the kernel's order, constexprs
    included (what the JIT hands the binary; None if the launch's names do not cover them)."""

    compiled: Any
    grid: tuple[int, ...]
    positional: list[Any] | None


def _positional(fn: Any, args: list[Any], constexprs: dict[str, Any]) -> list[Any] | None:
    """`args` then the constexprs in the order of `fn`'s parameters (what `JITFunction.run`
    binds and passes to `CompiledKernel.run`); None unless they are exactly the rest."""
    rest = list(getattr(fn, "arg_names", ()))[len(args):]
    if sorted(rest) != sorted(constexprs):
        return None
    return list(args) + [constexprs[n] for n in rest]


def _geometry(t: Any) -> Any:
    """What a run's checks and Triton's specialisation read of one input: its type, shape,
    strides, dtype, device, and whether its address is 16-byte aligned."""
    if t is None:
        return None
    return type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16


def _run_key(plan: ServePlan, tensors: tuple, kv_layout: str) -> tuple:
    """Everything the checks, the arguments other than the run's tensors, the constexprs and
    the binary a run launches depend on: each input's `_geometry`, the layout, whether the
    index checks are on, the current device (Triton loads a binary per device) and the
    alignment of the plan's captured tensors."""
    return (kv_layout, _checks, driver.active.get_current_device(),
            *[_geometry(t) for t in tensors],
            *[x.data_ptr() % 16 for x in plan.extra if isinstance(x, Tensor)])


class _Remembered(NamedTuple):
    """The launches of one run geometry: per launch the binary's runner (`compiled[grid]`),
    its arguments and, for the forward, (position, index into the run's tensors) of every
    argument that is one of them; `error_at`: the same for what an index error reports."""

    runners: tuple[Callable[..., None], ...]
    arguments: tuple[list[Any], ...]
    slots: tuple[tuple[tuple[int, int], ...], ...]
    error_at: dict[str, Any]

    def run(self, plan: ServePlan, tensors: tuple) -> None:
        for runner, arguments, slots in zip(self.runners, self.arguments, self.slots):
            if slots:
                arguments = arguments.copy()
                for position, index in slots:
                    arguments[position] = tensors[index]
            runner(*arguments)
        if _checks and plan.work.shape[0]:
            raise_index_errors(plan.err, plan.err_ok, lambda: self.error_inputs(plan, tensors))

    def error_inputs(self, plan: ServePlan, tensors: tuple) -> dict[str, Any]:
        return _error_inputs(plan, {name: tensors[at.index] if isinstance(at, _Slot) else at
                                    for name, at in self.error_at.items()})


class _Slot(NamedTuple):
    """Stands for the run's tensor `index` (in `RUN_TENSORS` order after q, k, v)."""

    index: int


def _remember(plan: ServePlan, tensors: tuple, kv_layout: str, launched: list[_Launched],
              a: dict[str, Any]) -> None:
    """Keep what this run (just launched through the JIT, all checks passed) launched, for the
    later runs of its geometry. Kept only when every launch ran a `CompiledKernel` and each
    argument that is one of the run's tensors names it unambiguously: no run tensor is
    another, or one the plan owns (then its position could stand for either)."""
    if not launched or not all(isinstance(x.compiled, CompiledKernel)
                               and x.positional is not None for x in launched):
        return
    given = [t for t in tensors if t is not None]
    owned = [plan.o, plan.lse, plan.o_part, plan.lse_part, plan.work, plan.err, plan.cu_q,
             plan.head_map, *plan.extra]
    if any(t is u for i, t in enumerate(given) for u in given[i + 1:] + owned):
        return

    def index_of(value: Any) -> int | None:
        return next((i for i, t in enumerate(tensors) if t is not None and t is value), None)

    slots = tuple(tuple((p, i) for p, i in ((p, index_of(x)) for p, x in enumerate(
        run.positional)) if i is not None) for run in launched)
    error_at = {name: a[name] if index_of(a[name]) is None else _Slot(index_of(a[name]))
                for name in ERROR_ARGUMENTS}
    if len(plan.launches) >= _REMEMBERED_PER_PLAN:
        plan.launches.clear()
    plan.launches[_run_key(plan, tensors, kv_layout)] = _Remembered(
        tuple(x.compiled[tuple(x.grid) + (1,) * (3 - len(x.grid))] for x in launched),
        tuple(x.positional for x in launched), slots, error_at)


class TritonServing(TritonServe):
    """The serving family of the Triton backend (`attncc.backends.base`): the kernels of
    `TritonServe`, the plan-time choices only they need (kv tile, warps, bound arguments), and
    the run-time launches above."""

    def __init__(self, backend: Backend, plan: KernelPlan) -> None:
        self.backend = backend
        self.memory = plan.spec.memory  # TritonServe's plan sets it to dense: layouts are flags
        super().__init__(plan)

    def check_device(self, device: torch.device) -> None:
        """ValueError unless the kernels run on `device`."""
        if device.type != "cuda" and not config.triton_interpret():
            raise ValueError(f"device: serving kernels run on CUDA, or on the CPU under "
                             f"TRITON_INTERPRET=1; got {device} without it (the CPU oracle is "
                             f"attncc.backends.reference.memory)")

    def tiles(self, head_dim_max: int, device: torch.device) -> tuple[int, int]:
        """(keys per kv tile, warps) for the largest head dim on `device`."""
        return choose_serving(head_dim_max, target_of(device) == "interpreter")

    def bound_arguments(self, params: dict[str, Any], tensors: dict[str, Tensor],
                        device: torch.device) -> list[Any]:
        """The values of the spec's parameters and captured tensors (on `device`), in the
        kernels' argument order after the fixed arguments."""
        captures = {c.name: tensors.get(c.name, c.tensor).to(device)
                    for c in self.plan.spec.captures}
        return argument_values(self.plan, params, captures,
                               arguments=extra_arguments(self.plan))

    def run(self, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor, kv_layout: str,
            inputs: dict[str, Any]) -> None:
        """One run of `plan`: check, assemble, launch (and merge), raise index errors.

        The first run of each geometry of the inputs (`_run_key`) does all of it through
        Triton's JIT; later runs of that geometry launch the binaries it returned with the
        arguments it assembled, only the run's tensors put in (`_Remembered`)."""
        tensors = (q, k, v, *map(inputs.__getitem__, RUN_TENSORS))
        visits = inputs.get("_visits")
        if plan.launches and visits is None and not serve_kernels.LAUNCH_HOOKS:
            key = _run_key(plan, tensors, kv_layout)
            known = plan.launches.get(key)
            if known is not None:
                known.run(plan, tensors)
                return
        args, cx = arguments(self, plan, q, k, v, *tensors[3:10], kv_layout, *tensors[10:])
        if visits is not None:  # tests: int32[B] += kv tiles read (all heads and splits)
            args["VISITS"], cx["COUNT_VISITS"] = visits, True
        launched = launch_plan(self, plan, args, cx, split_base=0, parts=plan.num_splits)
        raise_errors(plan, args)
        if visits is None and not serve_kernels.LAUNCH_HOOKS:
            _remember(plan, tensors, kv_layout, launched, args)

    def cascade(self, plan: ServePlan, q: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                k: Tensor, v: Tensor, **inputs: Any) -> Tensor | tuple[Tensor, Tensor]:
        return cascade(self, plan, q, prefix_k, prefix_v, k, v, **inputs)
