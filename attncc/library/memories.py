"""Constructors of the KV memory layouts K2-K5 (docs/catalog.md) for `Attention(memory=...)`.

A spec with one of these memories compiles (`attncc.compile`) to `attncc.ops.serving.compiled
.ServingAttention`: plan / run over paged, ragged or per-head-length KV. The nodes and their
semantics are in `attncc.ir.memory`; the reference backend holds one oracle per layout.
"""

from __future__ import annotations

from attncc.ir.memory import PagedMemory, PerHeadLengths, PersistentMemory, RaggedMemory


def paged(page_size: int) -> PagedMemory:
    """K2: k/v caches [num_pages, page_size, Hkv, D] read through page_table int32[B, max_pages]
    and kv_len int32[B]; any page_size >= 1."""
    return PagedMemory(page_size)


def ragged() -> RaggedMemory:
    """K3: packed q [total_q, Hq, D], k/v [total_k, Hkv, D] with cu_seqlens_q / cu_seqlens_k."""
    return RaggedMemory()


def persistent(slots: int) -> PersistentMemory:
    """K4: `slots` learned key/value vectors per kv head (mem_k/mem_v [Hkv, slots, D]), always
    attended, without mask or score mod."""
    return PersistentMemory(slots)


def per_head_lengths(sink: int | None = None, window: int | None = None) -> PerHeadLengths:
    """K5 (DuoAttention). Without arguments: head h reads only its last head_kv_len[h] keys of
    the shared cache. With `sink` and `window`: streaming kv heads (call argument
    `stream_heads` int32[Hkv], -1 for full heads) read a compact cache k_stream/v_stream
    [B, Hkv_stream, sink + R, D] (first `sink` tokens, then a ring of the last R >= window
    tokens; see `PerHeadLengths`) and attend `mask AND sinks_window(sink, window)`; full heads
    read the full cache under the mask. `attncc.ops.serving.stream.append_stream` appends decoded
    tokens to the compact cache."""
    return PerHeadLengths(sink, window)


def streaming_heads(sink: int, window: int) -> PerHeadLengths:
    """K5 with compact caches for streaming heads: `per_head_lengths(sink, window)`."""
    return PerHeadLengths(sink, window)
