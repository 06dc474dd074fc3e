"""Constructors of the KV memory layouts K2-K5 (CATALOG Section 6) for `Attention(memory=...)`.

A spec with one of these memories compiles (`attncc.compile`) to `attncc.serving
.ServingAttention`: plan / run over paged, ragged or per-head-length KV. The nodes and their
semantics are in `attncc.ir.memory`; the oracles in `attncc.backends.reference_memory`.
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


def per_head_lengths() -> PerHeadLengths:
    """K5 (DuoAttention): head h reads only its last head_kv_len[h] keys."""
    return PerHeadLengths()
