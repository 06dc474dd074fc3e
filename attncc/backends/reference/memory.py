"""Reference execution on the KV memory layouts K2-K6 and the L8 hybrid (docs/catalog.md).

Every layout reduces to `attention_reference` on a dense view of the keys it holds (gathered
pages, one packed sequence, the fetched blocks), so semantics live in one place. Per-sequence
calls keep the mask's batch index: `b` is replaced by the sequence's index before the call.
Inputs are validated first (ValueError naming the argument, what was expected and what was
given); index tensors (`page_table`, `kv_len`, `cu_seqlens_*`, `head_kv_len`, `block_ids`) are
int32. `**kw` goes to `attention_reference` (scale, params, captures, reorder_inputs, chunks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
from torch import Tensor

from attncc.backends.merge import merge_pair
from attncc.backends.reference.forward import attention_reference
from attncc.backends.reference.linear import mix_hybrid, recurrent_reference
from attncc.validate.linear import check_inputs
from attncc.ir.linear import Hybrid
from attncc.ir.memory import (OffloadedMemory, PagedMemory, PerHeadLengths, PersistentMemory,
                              RaggedMemory)
from attncc.ir.nodes import Capture, DenseMemory, Mask, Normaliser
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, LK, Load, buffer_symbol

Pair = tuple[Tensor, Tensor]


def _shape(x: object) -> object:
    return list(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _want(want: list[int | None]) -> str:
    return "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"


def _float(name: str, x: object, want: list[int | None], what: str) -> None:
    """`x` is a floating tensor whose shape matches `want` (None: any size)."""
    ok = (isinstance(x, Tensor) and x.is_floating_point() and x.dim() == len(want)
          and all(w is None or w == s for w, s in zip(want, x.shape)))
    if not ok:
        got = f"{_shape(x)} {x.dtype}" if isinstance(x, Tensor) else _shape(x)
        raise ValueError(f"{name}: expected a floating-point tensor {what} = {_want(want)}, "
                         f"got {got}")


def _index(name: str, x: object, want: list[int | None], what: str) -> None:
    ok = (isinstance(x, Tensor) and x.dtype == torch.int32 and x.dim() == len(want)
          and all(w is None or w == s for w, s in zip(want, x.shape)))
    if not ok:
        got = f"{_shape(x)} {x.dtype}" if isinstance(x, Tensor) else _shape(x)
        raise ValueError(f"{name}: expected an int32 tensor {what} = {_want(want)}, got {got}")


def _same(q: Tensor, **others: Tensor) -> None:
    for name, x in others.items():
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name}: expected q's dtype {q.dtype} on {q.device}, "
                             f"got {x.dtype} on {x.device}")


def _heads(hq: int, hkv: int, name: str) -> None:
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{name}: expected Hkv dividing Hq = {hq}, got Hkv = {hkv}")


def _memory(spec: AttentionSpec, kind: type, field: str | None, given: int | None, fn: str
            ) -> AttentionSpec:
    """spec.memory must be `kind` (matching `given`) or the default DenseMemory."""
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"spec: expected an AttentionSpec, got {type(spec).__name__}")
    mem = spec.memory
    if not isinstance(mem, (kind, DenseMemory)):
        raise ValueError(f"spec.memory: expected {kind.__name__} (or the default DenseMemory) "
                         f"for {fn}, got {mem.text()}")
    if isinstance(mem, kind) and field is not None and getattr(mem, field) != given:
        raise ValueError(f"spec.memory.{field}: expected {given} (read from the tensors), "
                         f"got {getattr(mem, field)}")
    return spec.replace(memory=DenseMemory())


def _for_batch(spec: AttentionSpec, b: int) -> AttentionSpec:
    """The spec seen by sequence b alone: its mask and score read `b` as the constant b."""
    sub = {B_IDX: sympy.Integer(b)}
    changes = {name: dataclasses.replace(node, expr=node.expr.xreplace(sub))
               for name, node in (("mask", spec.mask), ("score", spec.score))
               if node is not None and B_IDX in node.expr.free_symbols}
    return spec.replace(**changes) if changes else spec


def _bhsd(x: Tensor) -> Tensor:
    """[L, H, D] -> [1, H, L, D]."""
    return x.permute(1, 0, 2)[None]


def paged_reference(spec: AttentionSpec, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                    page_table: Tensor, kv_len: Tensor, **kw: Any) -> Pair:
    """K2: q [B, Hq, Lq, Dqk]; k_cache [N, P, Hkv, Dqk]; v_cache [N, P, Hkv, Dv];
    page_table int32[B, max_pages]; kv_len int32[B] with 0 <= kv_len[b] <= max_pages * P.
    Only the first ceil(kv_len[b] / P) entries of a page_table row are read (and checked).
    Returns o [B, Hq, Lq, Dv], lse [B, Hq, Lq]; sequence b attends to its first kv_len[b] tokens.
    """
    _float("q", q, [None] * 4, "[B, Hq, Lq, Dqk]")
    _float("k_cache", k_cache, [None] * 4, "[num_pages, page_size, Hkv, Dqk]")
    B, Hq, Lq, D = q.shape
    N, P, Hkv = k_cache.shape[:3]
    _float("k_cache", k_cache, [N, P, Hkv, D], "[num_pages, page_size, Hkv, Dqk]")
    _float("v_cache", v_cache, [N, P, Hkv, None], "[num_pages, page_size, Hkv, Dv]")
    _same(q, k_cache=k_cache, v_cache=v_cache)
    _heads(Hq, Hkv, "k_cache")
    spec = _memory(spec, PagedMemory, "page_size", P, "paged_reference")
    _index("page_table", page_table, [B, None], "[B, max_pages]")
    _index("kv_len", kv_len, [B], "[B]")
    lens, table = kv_len.tolist(), page_table.cpu()
    capacity = page_table.shape[1] * P
    for b, n in enumerate(lens):
        if not 0 <= n <= capacity:
            raise ValueError(f"kv_len[{b}]: expected 0 <= kv_len <= max_pages * page_size = "
                             f"{capacity}, got {n}")
        used = table[b, :-(-n // P)]
        if used.numel() and not (0 <= int(used.min()) and int(used.max()) < N):
            raise ValueError(f"page_table[{b}]: expected page ids in [0, {N}) for its first "
                             f"{used.numel()} pages, got {used.tolist()}")
    outs = []
    for b, n in enumerate(lens):
        pages = table[b, :-(-n // P)].long().to(k_cache.device)
        k = _bhsd(k_cache[pages].flatten(0, 1)[:n])
        v = _bhsd(v_cache[pages].flatten(0, 1)[:n])
        outs.append(attention_reference(_for_batch(spec, b), q[b:b + 1], k, v, **kw))
    return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])


def _cu(name: str, cu: object, total: int) -> list[int]:
    _index(name, cu, [None], "[N + 1]")
    c = cu.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"{name}: expected N + 1 >= 2 non-decreasing offsets from 0 to {total}, "
                         f"got {c}")
    return c


def ragged_reference(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, **kw: Any) -> Pair:
    """K3: packed q [total_q, Hq, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv];
    cu_seqlens_q, cu_seqlens_k int32[N + 1]. Sequence i is a batch of one with its own Lq, Lk
    (named masks align per sequence) and b = i. Returns o [total_q, Hq, Dv], lse [total_q, Hq].
    """
    _float("q", q, [None] * 3, "[total_q, Hq, Dqk]")
    _float("k", k, [None] * 3, "[total_k, Hkv, Dqk]")
    tq, Hq, D = q.shape
    tk, Hkv = k.shape[:2]
    _float("k", k, [tk, Hkv, D], "[total_k, Hkv, Dqk]")
    _float("v", v, [tk, Hkv, None], "[total_k, Hkv, Dv]")
    _same(q, k=k, v=v)
    _heads(Hq, Hkv, "k")
    spec = _memory(spec, RaggedMemory, None, None, "ragged_reference")
    cq, ck = _cu("cu_seqlens_q", cu_seqlens_q, tq), _cu("cu_seqlens_k", cu_seqlens_k, tk)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_k: expected N + 1 = {len(cq)} entries (as cu_seqlens_q), "
                         f"got {len(ck)}")
    o = q.new_zeros(tq, Hq, v.shape[-1])
    lse = q.new_full((tq, Hq), float("-inf"))
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if cq[i + 1] == cq[i]:
            continue
        oi, li = attention_reference(_for_batch(spec, i), _bhsd(q[qs]), _bhsd(k[ks]),
                                     _bhsd(v[ks]), **kw)
        o[qs], lse[qs] = oi[0].permute(1, 0, 2), li[0].T
    return o, lse


def _dense_kv(q: Tensor, k: Tensor, v: Tensor) -> None:
    _float("q", q, [None] * 4, "[B, Hq, Lq, Dqk]")
    B, Hq, _, D = q.shape
    _float("k", k, [B, None, None, D], "[B, Hkv, Lk, Dqk]")
    _float("v", v, [B, k.shape[1], k.shape[2], None], "[B, Hkv, Lk, Dv]")
    _same(q, k=k, v=v)
    _heads(Hq, k.shape[1], "k")


def persistent_reference(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor,
                         mem_v: Tensor, **kw: Any) -> Pair:
    """K4: q [B, Hq, Lq, Dqk], k [B, Hkv, Lk, Dqk], v [B, Hkv, Lk, Dv], mem_k [Hkv, m, Dqk],
    mem_v [Hkv, m, Dv]. The slots are attended without mask or score mod; the sequence part is
    `attention_reference(spec)` on its own keys (indices 0..Lk-1, sink included); the two are
    merged by the LSE rule (docs/semantics.md). Returns o [B, Hq, Lq, Dv], lse [B, Hq, Lq].
    """
    _dense_kv(q, k, v)
    B, _, _, D = q.shape
    Hkv = k.shape[1]
    _float("mem_k", mem_k, [Hkv, None, D], "[Hkv, m, Dqk]")
    _float("mem_v", mem_v, [Hkv, mem_k.shape[1], v.shape[-1]], "[Hkv, m, Dv]")
    _same(q, mem_k=mem_k, mem_v=mem_v)
    spec = _memory(spec, PersistentMemory, "slots", mem_k.shape[1], "persistent_reference")
    slot_spec = spec.replace(mask=None, score=None, normaliser=Normaliser(), reorder=None)
    o1, lse1 = attention_reference(slot_spec, q, mem_k[None].expand(B, -1, -1, -1),
                                   mem_v[None].expand(B, -1, -1, -1), **kw)
    o2, lse2 = attention_reference(spec, q, k, v, **kw)
    # a sink adds e^sink to the sequence part's denominator and nothing to its numerator, so the
    # merge keeps it exactly once
    return merge_pair(o1, lse1, o2, lse2)


_HEAD_LEN = "head_kv_len"


def per_head_length_reference(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor,
                              head_kv_len: Tensor, **kw: Any) -> Pair:
    """K5: q [B, Hq, Lq, Dqk], k [B, Hkv, Lk, Dqk], v [B, Hkv, Lk, Dv]; head_kv_len int32[Hkv]
    or [Hq], 0 <= n <= Lk. Query head h attends to key j iff j >= Lk - n[h] and the mask allows
    it, with original indices and the full Lk. Entries a head does not keep are never read.
    """
    _dense_kv(q, k, v)
    Hq, Hkv, Lk = q.shape[1], k.shape[1], k.shape[2]
    spec = _memory(spec, PerHeadLengths, None, None, "per_head_length_reference")
    _index(_HEAD_LEN, head_kv_len, [None], "[Hkv] or [Hq]")
    n = head_kv_len.tolist()
    if len(n) not in (Hkv, Hq) or not all(0 <= x <= Lk for x in n):
        raise ValueError(f"{_HEAD_LEN}: expected {Hkv} (Hkv) or {Hq} (Hq) lengths in "
                         f"[0, Lk = {Lk}], got {n}")
    per_q = torch.tensor(n, device=q.device).repeat_interleave(Hq // len(n))
    keep = per_q.view(Hkv, Hq // Hkv).amax(dim=1)  # what each kv head stores
    dropped = (torch.arange(Lk, device=q.device) < Lk - keep[:, None])[None, :, :, None]
    k, v = k.masked_fill(dropped, 0), v.masked_fill(dropped, 0)  # garbage there is never read
    cap = Capture.of(_HEAD_LEN, per_q)
    recent = Mask(sympy.Ge(KV_IDX, LK - Load(buffer_symbol(cap.name), H_IDX)), (), (cap,),
                  tag="headlen")
    return attention_reference(spec.replace(mask=recent if spec.mask is None
                                            else spec.mask & recent), q, k, v, **kw)


def offloaded_reference(spec: AttentionSpec, q: Tensor, k_blocks_host: Tensor,
                        v_blocks_host: Tensor, block_ids: Tensor, **kw: Any) -> Pair:
    """K6: q [B, Hq, Lq, Dqk] on the device; k_blocks_host [num_blocks, block, Hkv, Dqk] and
    v_blocks_host [num_blocks, block, Hkv, Dv] on the CPU; block_ids int32[B, n]. Sequence b is
    the concatenation of its blocks (Lk = n * block); the result is dense attention on it.
    """
    _float("q", q, [None] * 4, "[B, Hq, Lq, Dqk]")
    _float("k_blocks_host", k_blocks_host, [None] * 4, "[num_blocks, block, Hkv, Dqk]")
    B, Hq, _, D = q.shape
    N, blk, Hkv = k_blocks_host.shape[:3]
    _float("k_blocks_host", k_blocks_host, [N, blk, Hkv, D], "[num_blocks, block, Hkv, Dqk]")
    _float("v_blocks_host", v_blocks_host, [N, blk, Hkv, None], "[num_blocks, block, Hkv, Dv]")
    for name, x in (("k_blocks_host", k_blocks_host), ("v_blocks_host", v_blocks_host)):
        if x.device.type != "cpu" or x.dtype != q.dtype:
            raise ValueError(f"{name}: expected host (cpu) memory of q's dtype {q.dtype}, "
                             f"got {x.dtype} on {x.device}")
    _heads(Hq, Hkv, "k_blocks_host")
    spec = _memory(spec, OffloadedMemory, "block", blk, "offloaded_reference")
    _index("block_ids", block_ids, [B, None], "[B, n]")
    ids = block_ids.cpu().long()
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < N):
        raise ValueError(f"block_ids: expected ids in [0, {N}), got min {int(ids.min())}, "
                         f"max {int(ids.max())}")

    def fetch(blocks: Tensor) -> Tensor:  # [B, n, blk, Hkv, D] -> [B, Hkv, n * blk, D]
        return blocks[ids].flatten(1, 2).permute(0, 2, 1, 3).to(q.device)

    return attention_reference(spec, q, fetch(k_blocks_host), fetch(v_blocks_host), **kw)


def hybrid_reference(hybrid_node: Hybrid, softmax_spec: AttentionSpec | None, q: Tensor,
                     k: Tensor, v: Tensor, *, g: Tensor | None = None, beta: Tensor | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     scale: float | None = None, **kw: Any) -> tuple[Tensor, Tensor | None]:
    """L8: `mix_hybrid(node, attention_reference(softmax_spec), recurrent_reference(node.linear))`
    on the same q, k, v [B, H, L, D] (Hq == Hkv, Lq == Lk: the linear part needs both).

    softmax_spec None: use `hybrid_node.softmax` (it must then be an AttentionSpec). `scale`, if
    given, goes to both parts; otherwise each uses its own default. g, beta, initial_state go to
    the linear part. Returns (o [B, H, L, Dv], the linear final state or None).
    """
    if not isinstance(hybrid_node, Hybrid):
        raise ValueError(f"hybrid_node: expected a Hybrid, got {type(hybrid_node).__name__}")
    own = hybrid_node.softmax
    if softmax_spec is None:
        softmax_spec = own
    if not isinstance(softmax_spec, AttentionSpec) or softmax_spec.normaliser.kind == "none":
        raise ValueError("softmax_spec: expected a softmax AttentionSpec, got "
                         f"{getattr(softmax_spec, 'text', lambda: type(softmax_spec).__name__)()}")
    if isinstance(own, AttentionSpec) and own.text() != softmax_spec.text():
        raise ValueError(f"softmax_spec: expected hybrid_node.softmax\n{own.text()}\n"
                         f"got\n{softmax_spec.text()}")
    check_inputs(q, k, v, hybrid_node.linear, g, beta, initial_state)
    o_soft, _ = attention_reference(softmax_spec, q, k, v, scale=scale, **kw)
    o_lin, state = recurrent_reference(q, k, v, hybrid_node.linear, g=g, beta=beta, scale=scale,
                                       initial_state=initial_state,
                                       output_final_state=output_final_state)
    return mix_hybrid(hybrid_node, o_soft, o_lin), state
