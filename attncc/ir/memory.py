"""KV memory layouts K2-K6 (docs/catalog.md): where K/V live. K1 is `nodes.DenseMemory`.

A layout node says only where keys and values are stored; what attention computes is always
the dense softmax attention of docs/semantics.md over the keys the layout holds. The reference
semantics of each layout live in the reference backend (one function per node).
Shapes below use `Hq, Hkv` heads, head dims `Dqk, Dv`, int32 index tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def _check_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner} {name}: expected an int >= {minimum}, got {value!r}")


class _Layout:
    """Shared by the layout nodes: `key` is sha256 over `text()` (never Python `hash()`)."""

    __slots__ = ()

    def text(self) -> str:  # pragma: no cover - every node overrides it
        raise NotImplementedError

    @property
    def key(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PagedMemory(_Layout):
    """K2 (vLLM, FlashInfer): K/V in fixed-size pages shared by all sequences.

    k_cache [num_pages, page_size, Hkv, Dqk], v_cache [num_pages, page_size, Hkv, Dv];
    page_table int32[B, max_pages]: sequence b's token t lives in page `page_table[b, t // P]`
    at offset `t % P`; kv_len int32[B]: its length (entries past `ceil(kv_len[b] / P)` in its
    page_table row are never read). Any `page_size >= 1`. Each sequence has its own Lk, so the
    named masks align its last query with its last key.
    """

    page_size: int

    def __post_init__(self) -> None:
        _check_int("PagedMemory", "page_size", self.page_size)

    catalog_id = "K2"

    def text(self) -> str:
        return f"paged(page_size={self.page_size})"


@dataclass(frozen=True, slots=True)
class RaggedMemory(_Layout):
    """K3 (FlashAttention varlen): sequences packed along one token axis, no padding.

    q [total_q, Hq, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv]; cu_seqlens_q and
    cu_seqlens_k int32[N + 1], starting at 0, non-decreasing, ending at total_q / total_k.
    Sequence i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]]; masks see positions inside
    the sequence (0..Lq_i-1, 0..Lk_i-1) and `b = i`. o [total_q, Hq, Dv], lse [total_q, Hq].
    """

    catalog_id = "K3"

    def text(self) -> str:
        return "ragged"


@dataclass(frozen=True, slots=True)
class PersistentMemory(_Layout):
    """K4 (persistent-memory transformers, Titans): `slots` learned K/V vectors per kv head.

    mem_k [Hkv, slots, Dqk], mem_v [Hkv, slots, Dv], shared by every sequence and prepended to
    its keys. Slots are ALWAYS attended: neither the mask nor the score mod applies to them
    (they have no position); their score is the plain `scale * <q, mem_k>`. The sequence's own
    keys keep their indices 0..Lk-1 (and Lk) for the mask and score mod, as if no slot existed.
    The result is the LSE merge (docs/semantics.md) of the slot and sequence parts; a sink is
    counted once.
    """

    slots: int

    def __post_init__(self) -> None:
        _check_int("PersistentMemory", "slots", self.slots)

    catalog_id = "K4"

    def text(self) -> str:
        return f"persistent(slots={self.slots})"


@dataclass(frozen=True, slots=True)
class PerHeadLengths(_Layout):
    """K5 (DuoAttention): each kv head keeps its own number of most recent entries.

    head_kv_len int32[Hkv] (or [Hq], one per query head), 0 <= n <= Lk. Query head h attends to
    key j iff `j >= Lk - n[h]` AND the mask allows (b, h, q, j); keys keep their ORIGINAL indices
    j and the mask sees the full Lk, so a "full" head (n = Lk) is exactly dense attention and a
    "streaming" head (n = w) reads only its last w keys. Entries before `Lk - n[h]` are never
    read (they may hold garbage). With [Hkv], query head h uses `n[h // (Hq // Hkv)]`.

    Compact caches (`sink` and `window` given; DuoAttention): the kv heads are split into
    full heads and streaming heads by `stream_heads` int32[Hkv] (-1: full, j >= 0: slot j of the
    compact cache). Full heads read the full cache (dense [B, Hkv_full, L, D] or paged, full
    heads in the order they appear) under the spec's mask. Streaming head j reads only
    k_stream/v_stream [B, Hkv_stream, sink + R, D] (R = ring size >= window + Lq - 1) and
    attends `mask AND sinks_window(sink, window)` (M6; with mask = causal() this is M18).
    Ring convention: logical position p of a sequence lives in slot p when p < sink, else in
    slot `sink + (p - sink) % R`; a sequence of length n holds positions [0, min(sink, n)) and
    [max(sink, n - R), n). Masks and score mods see logical positions and the full Lk = n.
    """

    sink: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if (self.sink is None) != (self.window is None):
            raise ValueError(f"PerHeadLengths sink, window: expected both or neither, got "
                             f"sink={self.sink!r}, window={self.window!r}")
        if self.sink is not None:
            _check_int("PerHeadLengths", "sink", self.sink, minimum=0)
            _check_int("PerHeadLengths", "window", self.window)

    catalog_id = "K5"

    @property
    def compact(self) -> bool:
        """True for the compact-cache (streaming heads) form."""
        return self.window is not None

    def text(self) -> str:
        if self.compact:
            return f"per_head_lengths(sink={self.sink}, window={self.window})"
        return "per_head_lengths"


@dataclass(frozen=True, slots=True)
class OffloadedMemory(_Layout):
    """K6 (Landmark Attention, RetrievalAttention): KV blocks of `block` tokens in host memory.

    k_blocks_host [num_blocks, block, Hkv, Dqk], v_blocks_host [num_blocks, block, Hkv, Dv] on
    the CPU; block_ids int32[B, n]: sequence b is the concatenation of blocks block_ids[b, 0..n-1]
    (Lk = n * block, positions 0..Lk-1 in that order). Semantics are those of dense attention on
    that concatenation; only storage differs (the blocks are fetched to the device when read).
    """

    block: int

    def __post_init__(self) -> None:
        _check_int("OffloadedMemory", "block", self.block)

    catalog_id = "K6"

    def text(self) -> str:
        return f"offloaded(block={self.block})"


MEMORY_LAYOUTS = (PagedMemory, RaggedMemory, PersistentMemory, PerHeadLengths, OffloadedMemory)
