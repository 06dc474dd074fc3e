"""attncc as a diffusers attention processor: a DiT's self-attention through an attncc spec.

    import attncc, attncc.integrations.diffusers as ad
    ad.apply(transformer, lambda grid: attncc.Attention(
        mask=attncc.neighbourhood_2d(*grid, 3, 3), reorder="auto"))   # grid from the patching

`AttnccProcessor` does what diffusers' default `AttnProcessor2_0` does (projections, q/k norms,
output projection, residual, rescale) with the attention itself an attncc call; cross-attention
and attention masks stay with diffusers' processors (an error here, never a silent dense
fallback). `apply` compiles the spec once for every self-attention layer of the model, the grid
taken from the model's patching (`latent_grid`); with `permuted=True` (a spec with a token
order) the tokens are put in that order once, after the patch embedding, every layer runs on the
permuted layout, and they are put back before the output norm.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention

import attncc
from attncc.ir.reorder import inverse

Tensor = torch.Tensor
SpecFor = Callable[[tuple[int, ...]], attncc.AttentionSpec]


def latent_grid(model: torch.nn.Module) -> tuple[int, ...]:
    """The token grid of a patch-embedding transformer from its config: (H / p, W / p), or
    (T / p_t, H / p, W / p) for a video model with `num_frames`; ValueError when the config does
    not say."""
    config = getattr(model, "config", None)
    size, patch = getattr(config, "sample_size", None), getattr(config, "patch_size", None)
    if size is None or patch is None:
        raise ValueError(f"latent_grid: {type(model).__name__}'s config has no sample_size and "
                         "patch_size; pass the grid to the spec yourself")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    grid: tuple[int, ...] = (h // patch, w // patch)
    frames = getattr(config, "num_frames", None)
    if frames:
        grid = (frames // (getattr(config, "patch_size_t", None) or 1), *grid)
    return grid


class AttnccProcessor:
    """A diffusers processor for self-attention layers: `attention` runs q [B, H, L, D] against
    k/v of the same tokens (any attncc spec; None: dense). `tokens`: the L the spec was made for
    (checked per call). `permuted`: the tokens arrive in the spec's order (`apply`)."""

    def __init__(self, attention: attncc.CompiledAttention | attncc.AttentionSpec | None = None,
                 *, tokens: int | None = None, permuted: bool = False,
                 backend: str | None = None) -> None:
        if attention is None:
            attention = attncc.Attention()
        if not isinstance(attention, attncc.CompiledAttention):
            attention = attncc.compile(attention)
        self.attention, self.tokens, self.permuted = attention, tokens, permuted
        self.backend = backend

    def __call__(self, attn: DiffusersAttention, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            what = "cross-attention" if encoder_hidden_states is not None else "an attention mask"
            raise NotImplementedError(f"AttnccProcessor runs self-attention under its attncc "
                                      f"spec; this layer got {what}: keep diffusers' processor "
                                      "on it (attncc.integrations.diffusers.apply does)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        B, L, _ = hidden_states.shape
        if self.tokens is not None and L != self.tokens:
            raise ValueError(f"AttnccProcessor: the spec was made for a grid of {self.tokens} "
                             f"tokens, this call has {L}: apply it again for this resolution")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        D = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, L, attn.heads, D).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        # the default processor's SDPA uses 1/sqrt(D) whatever attn.scale says: so does this
        out = self.attention(q, k, v, scale=1.0 / math.sqrt(D), permuted=self.permuted,
                             backend=self.backend)
        hidden_states = out.transpose(1, 2).reshape(B, L, attn.heads * D).to(q.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _self_attention_layers(model: torch.nn.Module) -> list[DiffusersAttention]:
    return [m for m in model.modules()
            if isinstance(m, DiffusersAttention) and not m.is_cross_attention]


def _permute_tokens(model: torch.nn.Module, perm: Tensor) -> list[Any]:
    """Hooks that put tokens in `perm` order after the patch embedding and back before the
    output norm (token-wise layers in between commute with the permutation)."""
    entry, exit_ = getattr(model, "pos_embed", None), getattr(model, "norm_out", None)
    if entry is None or exit_ is None:
        raise NotImplementedError(f"apply(permuted=True): {type(model).__name__} has no "
                                  "pos_embed / norm_out to permute its tokens around")
    back = inverse(perm)
    return [entry.register_forward_hook(lambda mod, args, out: out[:, perm.to(out.device)]),
            exit_.register_forward_pre_hook(
                lambda mod, args: (args[0][:, back.to(args[0].device)], *args[1:]))]


def apply(model: torch.nn.Module, spec: attncc.AttentionSpec | SpecFor | None = None, *,
          permuted: bool = False, backend: str | None = None) -> attncc.CompiledAttention:
    """Set an `AttnccProcessor` on every self-attention layer of `model`, all sharing one compiled
    spec: `spec` itself, or `spec(latent_grid(model))` for a function of the grid (None: dense).
    `permuted=True` keeps the tokens in the spec's order between layers (the spec needs a grid
    order, e.g. `reorder="auto"` or `attncc.hilbert(grid)`); the hooks stay on the model until
    the next `apply`.
    Returns the compiled attention (its `.spec.reorder` is the order "auto" chose)."""
    grid = latent_grid(model)
    tokens = math.prod(grid)
    attention = attncc.compile(spec(grid) if callable(spec) else spec or attncc.Attention())
    layers = _self_attention_layers(model)
    if not layers:
        raise ValueError(f"apply: {type(model).__name__} has no diffusers self-attention layer")
    for hook in getattr(model, "_attncc_token_hooks", []):  # an earlier apply's order
        hook.remove()
    model._attncc_token_hooks = []
    if permuted:
        reorder = attention.spec.reorder
        if reorder is None:
            raise ValueError("apply(permuted=True): the spec has no token order (reorder=None, "
                             "or 'auto' chose row-major); use permuted=False")
        model._attncc_token_hooks = _permute_tokens(model, reorder.permutation(tokens))
    for layer in layers:
        layer.set_processor(AttnccProcessor(attention, tokens=tokens, permuted=permuted,
                                            backend=backend))
    return attention
