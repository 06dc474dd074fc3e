"""K5 compact caches for streaming heads (DuoAttention): build and append.

A streaming kv head keeps `sink + R` entries per sequence instead of all of them:
k_stream [B, Hkv_stream, sink + R, D]. Logical position p of a sequence lives in slot p when
p < sink, else in slot `sink + (p - sink) % R` (a ring over the last R tokens), so a sequence
of length n holds positions [0, min(sink, n)) and [max(sink, n - R), n). R = window serves
decode (Lq = 1) exactly; a step of Lq query tokens needs R >= window + Lq - 1.

These helpers are device-side index arithmetic (no host sync), for examples and tests; a
serving engine writes the same slots from its own KV-append kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ring_slots(positions: Tensor, sink: int, ring: int) -> Tensor:
    """Slot of each logical position (any shape, int) in a compact cache of sink + ring."""
    if ring < 1:
        raise ValueError(f"ring: expected an int >= 1, got {ring!r}")
    return torch.where(positions < sink, positions, sink + (positions - sink) % ring)


def append_stream(k_stream: Tensor, v_stream: Tensor, k_new: Tensor, v_new: Tensor,
                  kv_len: Tensor, sink: int) -> None:
    """Write T new tokens per sequence into the compact cache, in place.

    k_stream/v_stream [B, Hs, sink + R, D]; k_new/v_new [B, Hs, T, D] the streaming heads' new
    keys/values; kv_len int[B]: each sequence's length BEFORE the append (the new tokens take
    positions kv_len[b] .. kv_len[b] + T - 1). T <= R, so the new tokens never overwrite each
    other."""
    B, Hs, S, D = k_stream.shape
    ring = S - sink
    T = k_new.shape[2]
    if k_new.shape != (B, Hs, T, D) or v_new.shape[:3] != (B, Hs, T) or T > ring:
        raise ValueError(f"k_new/v_new: expected [B, Hs, T <= ring, D] = [{B}, {Hs}, <= {ring}, "
                         f"{D}], got {list(k_new.shape)} / {list(v_new.shape)}")
    if kv_len.shape != (B,):
        raise ValueError(f"kv_len: expected an int tensor [B] = [{B}], got {list(kv_len.shape)}")
    pos = kv_len.to(k_stream.device, torch.int64)[:, None] + torch.arange(T, device=k_stream.device)
    slot = ring_slots(pos, sink, ring)  # [B, T]
    b = torch.arange(B, device=k_stream.device)[:, None].expand(B, T)
    # advanced indices at dims 0 and 2 -> the indexed view is [B, T, Hs, D]
    k_stream[b, :, slot] = k_new.transpose(1, 2).to(k_stream.dtype)
    v_stream[b, :, slot] = v_new.transpose(1, 2).to(v_stream.dtype)


def compact_from_dense(k: Tensor, v: Tensor, kv_len: Tensor, sink: int, ring: int
                       ) -> tuple[Tensor, Tensor]:
    """A compact cache [B, Hs, sink + ring, D] holding what a streaming head keeps of dense
    k/v [B, Hs, L, D] with per-sequence lengths kv_len int[B] (e.g. after prefill). Slots a
    short sequence has not reached are zero."""
    B, Hs, L, _ = k.shape
    ks = k.new_zeros(B, Hs, sink + ring, k.shape[-1])
    vs = v.new_zeros(B, Hs, sink + ring, v.shape[-1])
    pos = torch.arange(L, device=k.device)
    for b, n in enumerate(kv_len.tolist()):  # host loop: a setup helper, not the fast path
        keep = pos[(pos < min(sink, n)) | ((pos >= max(sink, n - ring)) & (pos < n))]
        slot = ring_slots(keep, sink, ring)
        ks[b][:, slot] = k[b][:, keep]
        vs[b][:, slot] = v[b][:, keep]
    return ks, vs
