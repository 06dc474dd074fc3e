"""The "attncc" attention function for transformers: what a model's attention layer calls with
`attn_implementation="attncc"` (signature of transformers' `AttentionInterface` functions).

The mask arrives as a `MaskGeometry` (`attncc.integrations.hf_masks`), never as an Lq x Lk
tensor, and becomes an attncc spec: causal / bidirectional, a sliding window, the padding as a
per-key validity table `key_valid[b, kv]` (bool [B, Lk]), packed sequences as
`attncc.document(cu_seqlens=...)`, the soft-cap as `attncc.softcap`, sinks as `attncc.sink`.
GQA is native (k/v keep their Hkv heads). Compiled objects are cached per configuration (which
of those pieces are present, `spec_key`), so a model compiles a handful of specs, not one per
layer; the window, soft-cap, scale, sink logits, padding and sequence offsets are runtime values
and never recompile.

A query with no valid key (a left-padding row) gets o = 0, attncc's rule for empty rows, where
eager attention averages every key: such rows are meaningless in both.

What attncc cannot do exactly raises before anything runs, naming it: dropout, returning
attention weights, a position bias, a 4-D mask tensor, packed sequences with a KV cache.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

import attncc
from attncc.integrations.hf_masks import MaskGeometry, MaskKind

Tensor = torch.Tensor
NAME = "attn_implementation='attncc'"


class SpecKey(NamedTuple):
    """Which pieces a call's spec holds; everything else about a call is runtime data."""

    causal: bool
    window: bool
    softcap: bool
    sink: bool
    padded: bool
    packed: bool


_COMPILED: dict[SpecKey, attncc.CompiledAttention] = {}


def compiled_specs() -> dict[SpecKey, attncc.CompiledAttention]:
    """The compiled attentions this process holds, by configuration (a copy)."""
    return dict(_COMPILED)


def _key_valid_mask() -> attncc.Mask:
    key_valid = torch.ones(1, 1, dtype=torch.bool)  # a placeholder: each call passes its own

    def key_valid_mask(b, h, q_idx, kv_idx):
        return key_valid[b, kv_idx]

    return attncc.Attention(mask=key_valid_mask).mask


def _build(key: SpecKey) -> attncc.CompiledAttention:
    if key.window:  # the window's value is a runtime parameter (`window=`)
        mask = attncc.sliding_window(1) if key.causal else attncc.bidirectional_window(0)
    else:
        mask = attncc.causal() if key.causal else attncc.full()
    if key.padded:
        mask = mask & _key_valid_mask()
    if key.packed:
        mask = mask & attncc.document(cu_seqlens=torch.tensor([0, 1]), causal=key.causal)
    score = attncc.softcap(1.0) if key.softcap else None
    normaliser = attncc.sink(torch.zeros(1)) if key.sink else None
    return attncc.compile(attncc.Attention(mask=mask, score=score, normaliser=normaliser))


def compiled_for(key: SpecKey) -> attncc.CompiledAttention:
    attn = _COMPILED.get(key)
    if attn is None:
        attn = _COMPILED[key] = _build(key)
    return attn


def _check_supported(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any]) -> None:
    if dropout:
        raise NotImplementedError(
            f"{NAME}: attention dropout ({dropout}) is not implemented by attncc; call "
            "model.eval(), or set the config's attention dropout to 0.0 for training")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            f"{NAME}: output_attentions=True needs the attention weights, which attncc's fused "
            "kernels never form; use attn_implementation='eager' to get them")
    for name in ("position_bias", "head_mask"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{NAME}: {name} is not supported by the attncc "
                                      f"integration ({type(module).__name__})")


def _geometry(module: torch.nn.Module, mask: Any, query: Tensor, key: Tensor,
              sliding_window: int | None) -> MaskGeometry:
    """The call's `MaskGeometry`: the one the registered mask function made, or (no mask: a
    layer called without one) the module's causality on aligned positions."""
    if isinstance(mask, MaskGeometry):
        return mask
    if mask is not None:
        raise NotImplementedError(
            f"{NAME}: got a {type(mask).__name__} attention mask of shape "
            f"{list(getattr(mask, 'shape', []))}; attncc takes the masks its registered mask "
            "function describes (a 2-D padding mask [B, L], never a materialised 4-D mask)")
    Lq, Lk = query.shape[2], key.shape[2]
    if sliding_window is not None:
        raise NotImplementedError(f"{NAME}: sliding_window={sliding_window} with no attention "
                                  "mask: the window's positions are not known")
    causal = bool(getattr(module, "is_causal", True))
    if causal and Lq not in (1, Lk):
        raise NotImplementedError(f"{NAME}: a causal layer called with no mask and Lq = {Lq}, "
                                  f"Lk = {Lk}: the query positions are not known")
    return MaskGeometry(MaskKind(causal), Lq, Lk, Lk - Lq, 0, None)


def _visible_keys(g: MaskGeometry, Lk: int) -> int:
    """How many leading keys the call reads. attncc's named masks put query i at position
    i + Lk - Lq (the last query with the last key); transformers puts it at q_offset + i and key
    j at kv_offset + j. A causal mask never allows a key after the last query, so the keys are
    cut to end there (a static cache's unwritten slots), which makes the two agree."""
    if g.kv_length != Lk:
        raise ValueError(f"{NAME}: the mask describes {g.kv_length} keys, the layer gives {Lk}")
    if not g.kind.causal:
        if g.kind.window is not None and g.q_offset - g.kv_offset != Lk - g.q_length:
            raise NotImplementedError(f"{NAME}: a bidirectional window with query offset "
                                      f"{g.q_offset} and key offset {g.kv_offset}")
        return Lk
    visible = g.q_offset + g.q_length - g.kv_offset
    if not g.q_length <= visible <= Lk:
        raise ValueError(f"{NAME}: queries at positions {g.q_offset}..{g.q_offset + g.q_length - 1}"
                         f" do not end inside the keys at {g.kv_offset}..{g.kv_offset + Lk - 1}")
    return visible


def _document_inputs(g: MaskGeometry, length: int) -> dict[str, Tensor]:
    """Packed sequences (`position_ids` restarting, no padding mask) as `cu_seqlens` documents
    over the batch's rows laid end to end (`_rows_end_to_end`)."""
    if g.q_length != length or g.q_offset or g.kv_offset:
        raise NotImplementedError(f"{NAME}: packed sequences with a KV cache")
    ids = g.kind.sequence_ids.to(torch.int64)  # [B, L]: 0, 0, 1, 1, 1, 2, ... per row
    first = torch.cumsum(ids[:, -1] + 1, 0) - (ids[:, -1] + 1)  # sequences in earlier rows
    counts = torch.bincount((ids + first[:, None]).flatten())
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return attncc.document_inputs(cu, total=ids.numel(), causal=g.kind.causal)


def _rows_end_to_end(t: Tensor) -> Tensor:
    """[B, H, L, D] -> [1, H, B * L, D] (a copy when B > 1)."""
    B, H, L, D = t.shape
    return t if B == 1 else t.transpose(0, 1).reshape(1, H, B * L, D)


def attncc_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Any, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, s_aux: Tensor | None = None,
                             **kwargs: Any) -> tuple[Tensor, None]:
    """query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> ([B, Lq, Hq, Dv], None), as every
    transformers attention function. `scaling`: the score scale (Gemma's
    query_pre_attn_scalar ** -0.5); `softcap`: Gemma 2's attn_logit_softcapping; `s_aux`: GPT-OSS
    sink logits [Hq]. The sliding window comes from the mask (what eager attention applies)."""
    _check_supported(module, dropout, kwargs)
    g = _geometry(module, attention_mask, query, key, sliding_window)
    visible = _visible_keys(g, key.shape[2])
    if visible < key.shape[2]:
        key, value = key[:, :, :visible], value[:, :, :visible]
    runtime: dict[str, Any] = {}
    if g.kind.window is not None:
        runtime["window"] = int(g.kind.window)
    if softcap is not None:
        runtime["softcap"] = float(softcap)
    if s_aux is not None:
        runtime["sink"] = s_aux.to(torch.float32)
    if g.key_valid is not None:
        runtime["key_valid"] = g.key_valid[:, :visible]
    batch, length = query.shape[0], query.shape[2]
    packed = g.kind.sequence_ids is not None
    if packed:  # documents need no mask per row: the rows run as one packed sequence
        runtime.update(_document_inputs(g, key.shape[2]))
        query, key, value = (_rows_end_to_end(t) for t in (query, key, value))
    spec_key = SpecKey(g.kind.causal, g.kind.window is not None, softcap is not None,
                       s_aux is not None, g.key_valid is not None,
                       packed)
    out = compiled_for(spec_key)(query, key, value, scale=scaling, **runtime)
    if packed and batch > 1:
        out = out.reshape(out.shape[1], batch, length, out.shape[3]).transpose(0, 1)
    return out.transpose(1, 2).contiguous(), None
