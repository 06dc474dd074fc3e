"""Serving: paged / ragged / dense KV with per-request lengths, split-KV decode, plan / run.

    attn = attncc.compile(attncc.Attention(mask=attncc.causal(), memory=attncc.paged(16)))
    plan = attn.plan(batch=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, max_q_len=1,
                     max_pages=M, dtype=torch.float16, device="cuda")   # host, once per shape
    o = attn.run(plan, q, k_cache, v_cache, page_table=pt, kv_len=lens)  # graph-capturable

`plan` does every host-side thing once: the work list (request, packed row tile) on the device,
the split count, the tile sizes, preallocated outputs and partials, the bound parameters and
captured tensors. `run` reads only tensor metadata and launches (forward, then merge when the
plan splits); it allocates nothing, makes no decision from device data and never synchronises,
so a decode step can be captured in a CUDA graph and replayed with new page tables and lengths
up to the planned capacity (the kernel reads kv_len at run time). Its outputs are the plan's
buffers, overwritten by the next run. Index values are always checked, without a sync: the
kernel never reads out of range whatever the page ids, lengths and offsets, and reports a
bad one through `torch._assert_async` (see `attncc.backends.serve_checks`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import torch
from torch import Tensor

from attncc.backends import registry
from attncc.backends.base import ServePlan, Unsupported
from attncc.backends.serve_checks import (
    check_absent,
    check_cu_seqlens,
    check_plan_arguments,
    check_tensor,
    described,
    error_record,
)
from attncc.ir.memory import PagedMemory, PerHeadLengths, PersistentMemory, RaggedMemory
from attncc.ir.nodes import DenseMemory
from attncc.ir.spec import AttentionSpec
from attncc.ops.serving import custom_op as torch_ops_serving
from attncc.passes.pipeline import run_spec_passes
from attncc.passes.select_tiles import serving_block_m, serving_splits
from attncc.validate import split_runtime

_MEMORIES = (DenseMemory, PagedMemory, RaggedMemory, PersistentMemory, PerHeadLengths)
RUN_INPUTS = frozenset({"page_table", "kv_len", "cu_seqlens_k", "cu_seqlens_q", "mem_k", "mem_v",
                        "head_kv_len", "kv_layout", "k_stream", "v_stream", "_visits"})


class ServingAttention:
    """`attncc.compile(spec)` for a spec whose memory is paged (K2), ragged (K3), persistent
    slots (K4) or per-head lengths (K5); also usable on dense memory (kv_len per request)."""

    def __init__(self, spec: AttentionSpec) -> None:
        if not isinstance(spec.memory, _MEMORIES):
            raise TypeError(f"spec.memory: expected dense, paged, ragged, persistent or "
                            f"per-head lengths, got {spec.memory.text()}")
        if spec.reorder is not None:
            raise ValueError(f"spec.reorder: serving kernels read tokens in order; expected None,"
                             f" got {spec.reorder.text()}")
        self.spec = spec
        self.memory = spec.memory
        plan = run_spec_passes(spec)
        found = registry.families(lambda b: b.serving(plan))
        self.kernels = registry.compiled_family(found)  # the serving family of a backend
        if self.kernels is None:
            raise Unsupported(registry.why_none(found))
        self.name = self.kernels.name
        self.key = torch_ops_serving.register(self)  # the name attncc::serve_run finds it by
        if self.kernels.reads_every_tile:
            warnings.warn(f"{self.name}: the mask's kv ranges depend on the head, and a tile "
                          "packs several heads, so the serving kernel evaluates the mask on every "
                          "kv tile up to kv_len (slow path for long caches)", stacklevel=3)

    # plan ------------------------------------------------------------------------------------
    def plan(self, *, batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
             head_dim_v: int | None = None, max_q_len: int = 1, cu_seqlens_q: Tensor | None = None,
             max_pages: int | None = None, kv_capacity: int | None = None,
             dtype: torch.dtype = torch.float16, device: Any = "cpu",
             num_splits: int | None = None, return_lse: bool = False, scale: float | None = None,
             stream_heads: Tensor | None = None, block_n: int | None = None,
             **runtime: Any) -> ServePlan:
        """Host-side work for one batch shape. Paged: `max_pages` (the page table's width) sets
        the capacity; otherwise `kv_capacity` (the most keys of one request). Ragged (K3):
        `cu_seqlens_q` int32[B + 1] (read here, once). `runtime`: parameter values and
        captured tensors, bound for every run of this plan. K5 compact caches
        (`per_head_lengths(sink, window)`): `stream_heads` int [Hkv], -1 for a full head, else
        the head's index in k_stream / v_stream (read here, once). `block_n`: keys per kv tile
        (a power of two >= 16), else chosen by head dim."""
        device = torch.device(device)
        check_plan_arguments(batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, head_dim_v=head_dim_v, max_q_len=max_q_len,
                             max_pages=max_pages, kv_capacity=kv_capacity, dtype=dtype,
                             device=device, num_splits=num_splits, scale=scale)
        self.kernels.check_device(device)
        dv = head_dim if head_dim_v is None else head_dim_v
        group = num_heads // num_kv_heads
        if isinstance(self.memory, PagedMemory):
            if max_pages is None:
                raise ValueError("max_pages: expected the page table's width for paged memory, "
                                 "got None")
            kv_capacity = max_pages * self.memory.page_size
        if kv_capacity is None or kv_capacity < 0:
            raise ValueError(f"kv_capacity: expected the most keys of one request (an int >= 0),"
                             f" got {kv_capacity!r}")
        ragged = isinstance(self.memory, RaggedMemory) or cu_seqlens_q is not None
        if ragged:
            if cu_seqlens_q is None:
                raise ValueError("cu_seqlens_q: expected int32[B + 1] for ragged memory, got None")
            check_tensor("cu_seqlens_q", cu_seqlens_q, [batch + 1], torch.int32,
                         cu_seqlens_q.device, "[B + 1]")
            cu = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, int(cu_seqlens_q[-1]))
            lens, q_rows = [b - a for a, b in itertools.pairwise(cu)], cu[-1]
        else:
            lens, q_rows = [max_q_len] * batch, max_q_len
        block_m = serving_block_m(max(lens, default=0) * group)
        chosen_n, num_warps = self.kernels.tiles(max(head_dim, dv), device)
        if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int)
                                    or block_n < 16 or block_n & (block_n - 1)):
            raise ValueError(f"block_n: expected a power of two >= 16, got {block_n!r}")
        block_n = chosen_n if block_n is None else block_n
        items = [(b, t) for b, n in enumerate(lens) for t in range(-(-n * group // block_m))]
        programs = max(len(items) * num_kv_heads, 1)
        tiles = max(-(-kv_capacity // block_n), 1)
        if num_splits is None:
            num_splits = serving_splits(programs, tiles)
        work = torch.tensor(items or [(0, 0)], dtype=torch.int32, device=device)[:len(items)]
        oshape = (q_rows, num_heads) if ragged else (batch, num_heads, q_rows)
        rows = q_rows if ragged else batch * q_rows
        params, tensors = split_runtime(self.spec, runtime)
        params = {p.name: params.get(p.name, p.value) for p in self.spec.params}
        extra = self.kernels.bound_arguments(params, tensors, device)
        scale = self.spec.scale if scale is None else scale
        split = num_splits > 1
        head_map, n_stream = self._head_map(stream_heads, num_kv_heads, device)
        plan = ServePlan(
            batch=batch, hq=num_heads, hkv=num_kv_heads, dqk=head_dim, dv=dv, dtype=dtype,
            device=device, q_rows=q_rows, ragged_q=ragged, kv_capacity=kv_capacity,
            num_splits=num_splits, block_m=block_m, block_n=block_n, num_warps=num_warps,
            work=work,
            o=torch.empty(*oshape, dv, dtype=dtype, device=device),
            lse=torch.empty(*oshape, dtype=torch.float32, device=device) if return_lse else None,
            o_part=(torch.empty(num_splits, rows, num_heads, dv, dtype=torch.float32,
                                device=device) if split else None),
            lse_part=(torch.empty(num_splits, rows, num_heads, dtype=torch.float32,
                                  device=device) if split else None),
            sm_scale=1.0 / math.sqrt(head_dim) if scale is None else scale, extra=extra,
            slots=getattr(self.memory, "slots", 0), max_q=max(lens, default=1),
            n_stream=n_stream, head_map=head_map,
            cu_q=cu_seqlens_q.clone() if ragged else None, err=error_record(device))
        plan.err_ok = plan.err[:1]  # made once: run asserts on it without making a view
        plan.key = torch_ops_serving.register_plan(plan)
        return plan

    def _head_map(self, stream_heads: Tensor | None, hkv: int, device: torch.device
                  ) -> tuple[Tensor | None, int]:
        """K5 compact: int32[Hkv] (a full head's index in the full cache, or -1 - j for slot j
        of the compact cache) and the number of streaming heads; (None, 0) otherwise."""
        if not (isinstance(self.memory, PerHeadLengths) and self.memory.compact):
            check_absent("stream_heads", stream_heads, "memory is not per_head_lengths(sink, "
                         "window)")
            return None, 0
        if not isinstance(stream_heads, Tensor) or stream_heads.shape != (hkv,) \
                or stream_heads.dtype.is_floating_point:
            raise ValueError(f"stream_heads: expected an int tensor [Hkv] = [{hkv}] (-1: full "
                             f"head, j >= 0: slot j of k_stream), got {described(stream_heads)}")
        idx = [int(x) for x in stream_heads.tolist()]
        stream = sorted(j for j in idx if j >= 0)
        if stream != list(range(len(stream))) or any(j < -1 for j in idx):
            raise ValueError(f"stream_heads: expected -1 (full) or distinct compact slots "
                             f"0..Hkv_stream-1, got {idx}")
        full = iter(range(hkv))
        table = [next(full) if j < 0 else -1 - j for j in idx]
        return torch.tensor(table, dtype=torch.int32, device=device), len(stream)

    # run -------------------------------------------------------------------------------------
    def run(self, plan: ServePlan, q: Tensor, k: Tensor, v: Tensor, *,
            page_table: Tensor | None = None, kv_len: Tensor | None = None,
            cu_seqlens_k: Tensor | None = None, cu_seqlens_q: Tensor | None = None,
            mem_k: Tensor | None = None, mem_v: Tensor | None = None,
            head_kv_len: Tensor | None = None, kv_layout: str = "nhd",
            k_stream: Tensor | None = None, v_stream: Tensor | None = None,
            _visits: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Launch `plan` on new data. Shapes (q: [B, Hq, Lq, D], or [total_q, Hq, D] ragged):
        paged: k/v caches [num_pages, P, Hkv, D] (kv_layout "nhd") or [num_pages, Hkv, P, D]
        ("hnd"), page_table int32[B, max_pages], kv_len int32[B]; dense: k/v [B, Hkv, Lk, D],
        kv_len optional; ragged: k/v [total_k, Hkv, D], cu_seqlens_q/k int32[B + 1];
        persistent (K4): mem_k/mem_v [Hkv, slots, D]; per-head lengths (K5): head_kv_len
        int32[Hkv] or [Hq]; K5 compact (`per_head_lengths(sink, window)`): k/v hold the full heads
        only ([B, Hkv_full, Lk, D] or paged), k_stream/v_stream [B, Hkv_stream, sink + R, D]
        (see `attncc.ops.serving.stream`). Returns plan.o (and plan.lse when planned with
        return_lse). A page id outside [0, num_pages), a length outside [0, capacity], or
        offsets that are not the planned ones (cu_seqlens_q) or not nondecreasing from 0 to
        total_k (cu_seqlens_k) are never read out of range and raise: a ValueError on the CPU,
        a device-side assert at the next sync on CUDA (`attncc.ops.serving.checks`).
        Under torch.compile / torch.export this is the op `attncc::serve_run`
        (`attncc.ops.serving.custom_op`); eagerly the same implementation runs without the
        dispatcher."""
        inputs = {"page_table": page_table, "kv_len": kv_len, "cu_seqlens_q": cu_seqlens_q,
                  "cu_seqlens_k": cu_seqlens_k, "mem_k": mem_k, "mem_v": mem_v,
                  "head_kv_len": head_kv_len, "k_stream": k_stream, "v_stream": v_stream,
                  "_visits": _visits}  # _visits (tests): int32[B] += kv tiles read
        torch_ops_serving.run(self, plan, q, k, v, kv_layout, inputs)  # attncc::serve_run
        return (plan.o, plan.lse) if plan.lse is not None else plan.o

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False,
                 num_splits: int | None = None, scale: float | None = None,
                 **inputs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """Plan and run in one call (host work every call: not for CUDA graphs). `inputs`:
        the keyword arguments of `run`, plus parameter values and captured tensors."""
        stream_heads = inputs.pop("stream_heads", None)
        runtime = {n: x for n, x in inputs.items() if n not in RUN_INPUTS}
        inputs = {n: x for n, x in inputs.items() if n in RUN_INPUTS}
        kw: dict[str, Any] = {}
        if stream_heads is not None:
            kw["stream_heads"] = stream_heads
        if isinstance(self.memory, PagedMemory):
            table = inputs.get("page_table")
            kw["max_pages"] = table.shape[1] if isinstance(table, Tensor) else None
        elif isinstance(self.memory, RaggedMemory):
            cu = inputs.get("cu_seqlens_k")  # reads lengths back: this call is not the fast path
            kw["kv_capacity"] = int((cu[1:] - cu[:-1]).max()) if isinstance(cu, Tensor) else None
        elif isinstance(inputs.get("page_table"), Tensor):  # K5 compact over a paged full cache
            kw["kv_capacity"] = inputs["page_table"].shape[1] * k.shape[
                1 if inputs.get("kv_layout", "nhd") == "nhd" else 2]
        else:
            kw["kv_capacity"] = k.shape[2]
        packed = q.dim() == 3  # [total_q, Hq, D] with cu_seqlens_q
        heads_at = 1 if packed or not isinstance(self.memory, PagedMemory) or inputs.get(
            "kv_layout", "nhd") == "hnd" else 2
        cu_q = inputs.get("cu_seqlens_q")
        hkv = stream_heads.shape[0] if isinstance(stream_heads, Tensor) else k.shape[heads_at]
        plan = self.plan(
            batch=cu_q.shape[0] - 1 if packed and isinstance(cu_q, Tensor) else q.shape[0],
            num_heads=q.shape[-2] if packed else q.shape[1], num_kv_heads=hkv,
            head_dim=q.shape[-1], head_dim_v=v.shape[-1], max_q_len=1 if packed else q.shape[2],
            cu_seqlens_q=cu_q if packed else None, dtype=q.dtype, device=q.device,
            num_splits=num_splits, return_lse=return_lse, scale=scale, **kw, **runtime)
        return self.run(plan, q, k, v, **inputs)

    def cascade(self, plan: ServePlan, q: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                k: Tensor, v: Tensor, **inputs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """Shared-prefix (cascade) attention: every request's keys are a shared prefix
        (prefix_k [P, Hkv, Dqk], prefix_v [P, Hkv, Dv], stored once) followed by its own suffix
        (k, v and `inputs` as for `run`, with kv_len the suffix lengths); equals attention over
        the concatenation. Allocates its partials (not for CUDA graphs)."""
        return self.kernels.cascade(plan, q, prefix_k, prefix_v, k, v, **inputs)

    def __repr__(self) -> str:
        return f"ServingAttention({self.name}, memory={self.memory.text()})"
