"""What a transformers mask asks for, read without building it: the mask function that
transformers' `masking_utils` hands to a registered `AttentionMaskInterface` function is a
closure tree of a few known factories (causal, bidirectional, sliding-window overlays, packed
sequences, `and_masks`). `describe_mask_function` reads that tree into a `MaskKind`;
`MaskGeometry` is what the mask function returns to the model instead of an Lq x Lk tensor, and
what `attncc.integrations.hf_attention` turns into an attncc spec and its runtime values.

A piece of the tree that is not one of those factories (an `or_masks` overlay for image tokens,
chunked attention, a user mask function) raises NotImplementedError naming it: attncc never
guesses a mask it cannot state exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import masking_utils as mu

Tensor = torch.Tensor


@dataclass(frozen=True)
class MaskKind:
    """causal: `kv <= q` (else every pair, bidirectional); window: with causal, `q - kv < window`
    (transformers' `sliding_window_overlay`), without, `|q - kv| <= window`
    (`sliding_window_bidirectional_overlay`); None: no window. sequence_ids: int[B, L] packed
    sequence ids (`packed_sequence_mask_function`: tokens attend only within their sequence)."""

    causal: bool
    window: int | None = None
    sequence_ids: Tensor | None = None


def _cells(fn: Callable) -> dict[str, Any]:
    closure = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in closure)))


def _code(factory: Callable, *args: Any) -> Any:
    return factory(*args).__code__


# the code objects of the closures transformers' factories return: a closure is recognised by its
# code, its parameters are read from its cells
_AND = _code(mu.and_masks, mu.causal_mask_function)
_OR = _code(mu.or_masks, mu.causal_mask_function)
_WINDOW = _code(mu.sliding_window_overlay, 1)
_BIWINDOW = _code(mu.sliding_window_bidirectional_overlay, 1)
_PACKED = _code(mu.packed_sequence_mask_function, torch.zeros(1, 1))
_REMAP = _code(mu.remap_positions_for_packed_sequence, mu.causal_mask_function, torch.zeros(1, 1))
_CHUNKED = _code(mu.chunked_overlay, 1, torch.zeros(1))


def _atoms(fn: Callable) -> list[tuple[str, Any]]:
    """The conjunction `fn` states, as (kind, value) atoms."""
    if fn is mu.causal_mask_function:
        return [("causal", None)]
    if fn is mu.bidirectional_mask_function:
        return [("full", None)]
    code = getattr(fn, "__code__", None)
    cells = _cells(fn) if code is not None else {}
    if code is _AND:
        return [a for f in cells["mask_functions"] for a in _atoms(f)]
    if code is _WINDOW:
        return [("window", cells["sliding_window"])]
    if code is _BIWINDOW:
        return [("biwindow", cells["sliding_window"])]
    if code is _PACKED:
        return [("packed", cells["packed_sequence_mask"])]
    if code is _REMAP:
        # positions restart per packed sequence; every atom here is translation invariant
        # (it reads q - kv only), so within one sequence it means the same on raw indices
        return _atoms(cells["mask_function"])
    what = ("chunked attention (chunked_overlay)" if code is _CHUNKED
            else "an or_masks overlay (e.g. bidirectional image tokens)" if code is _OR
            else f"the mask function {getattr(fn, '__qualname__', fn)!r}")
    raise NotImplementedError(
        f"attn_implementation='attncc': the model asks for {what}, which the attncc integration "
        "does not map to an attncc mask yet; use attn_implementation='eager' or 'sdpa' for this "
        "model, or describe the mask with attncc directly (attncc.compile)")


def describe_mask_function(fn: Callable) -> MaskKind:
    """The `MaskKind` of a transformers mask function; NotImplementedError for anything else."""
    atoms = _atoms(fn)
    kinds = {k for k, _ in atoms}
    windows = [v for k, v in atoms if k in ("window", "biwindow")]
    packed = [v for k, v in atoms if k == "packed"]
    causal = "causal" in kinds
    if (causal and "biwindow" in kinds) or (not causal and "window" in kinds) \
            or len(windows) > 1 or len(packed) > 1 or not kinds & {"causal", "full"}:
        raise NotImplementedError(
            f"attn_implementation='attncc': the model's mask combines {sorted(kinds)}, which the "
            "attncc integration does not map to an attncc mask")
    return MaskKind(causal, windows[0] if windows else None, packed[0] if packed else None)


@dataclass(frozen=True)
class MaskGeometry:
    """What the attention function needs, O(B x Lk) at most: the mask's kind, the query and key
    positions (query i sits at q_offset + i, key j at kv_offset + j, as in transformers'
    masking_utils) and the padding: key_valid bool[B, kv_length] for keys kv_offset ..
    kv_offset + kv_length - 1, or None when every key is valid."""

    kind: MaskKind
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    key_valid: Tensor | None

    ndim = 4  # transformers' mask preparation reads it (a prepared mask, not a 2-D padding mask)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the 4-D mask this stands for (code that only reads the size works)."""
        batch = self.key_valid.shape[0] if self.key_valid is not None else 1
        return (batch, 1, self.q_length, self.kv_length)


def _as_int(value: int | Tensor) -> int:
    # a StaticCache gives its query offset as a 0-d tensor (to avoid graph breaks): one read
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def attncc_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0,
                kv_offset: int = 0, mask_function: Callable = mu.causal_mask_function,
                attention_mask: Tensor | None = None, **kwargs: Any) -> MaskGeometry:
    """The `AttentionMaskInterface` function registered as "attncc": a `MaskGeometry`, never an
    Lq x Lk tensor. `attention_mask`: bool[B, >= kv_offset + kv_length] padding (True: a token),
    or a `MaskGeometry` made in advance (`generate` with a static cache prepares its masks before
    the forward): returned as it is, as transformers returns a prepared 4-D mask."""
    if isinstance(attention_mask, MaskGeometry):
        return attention_mask
    kind = describe_mask_function(mask_function)
    key_valid = None
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        if not bool(padding.all()):  # one read, as transformers' own sdpa mask does
            key_valid = padding.expand(batch_size, -1).contiguous()
    return MaskGeometry(kind, int(q_length), int(kv_length), _as_int(q_offset), int(kv_offset),
                        key_valid)
