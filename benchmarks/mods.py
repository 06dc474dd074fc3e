"""FlexAttention-style `mask_mod(b, h, q_idx, kv_idx)` / `score_mod(score, b, h, q_idx, kv_idx)`
equivalents of the attncc specs in workloads.py.

Each function here is written once in plain torch ops and serves two peers: FlexAttention calls
it on 0-d index tensors (vmapped), and dense_mask.py calls it on broadcast index tensors
(`q_idx [R, 1]`, `kv_idx [1, L]`) to build SDPA's dense mask or bias. They are independent of
attncc's IR on purpose: a mod that disagrees with the attncc spec shows up as a peer whose output
the harness finds "wrong" against attncc's reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MaskMod = Callable[..., torch.Tensor]
ScoreMod = Callable[..., torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """attncc.sliding_window(w): causal, and the window counts the query itself."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


def prefix_lm(prefix: int) -> MaskMod:
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)
    return mask_mod


def document(doc: torch.Tensor) -> MaskMod:
    """doc: int[L] document id of each token (nondecreasing); causal within a document."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])
    return mask_mod


def neighbourhood_2d(height: int, width: int, kernel_h: int, kernel_w: int) -> MaskMod:
    """NATTEN M12: the query's centre is clamped into the grid, then both offsets within k // 2."""
    rh, rw = kernel_h // 2, kernel_w // 2

    def mask_mod(b, h, q_idx, kv_idx):
        cy = torch.clamp(q_idx // width, rh, height - 1 - rh)
        cx = torch.clamp(q_idx % width, rw, width - 1 - rw)
        return ((cy - kv_idx // width).abs() <= rh) & ((cx - kv_idx % width).abs() <= rw)
    return mask_mod


def hilberta(rank: torch.Tensor, height: int, width: int, tile: int, shift: int,
             centre: int) -> MaskMod:
    """HilbertA (M15): same tile of `tile` consecutive Hilbert ranks (boundaries shifted), or a
    key in the central `centre x centre` block. rank: int[L], Hilbert rank of each position."""
    y0, x0 = (height - centre) // 2, (width - centre) // 2

    def mask_mod(b, h, q_idx, kv_idx):
        same = (rank[q_idx] + shift) // tile == (rank[kv_idx] + shift) // tile
        ky, kx = kv_idx // width, kv_idx % width
        central = (ky >= y0) & (ky < y0 + centre) & (kx >= x0) & (kx < x0 + centre)
        return same | central
    return mask_mod


def permuted(mask_mod: MaskMod, perm: torch.Tensor) -> MaskMod:
    """The mask on inputs stored in `perm` order (`perm[new] = original`)."""
    def reordered(b, h, q_idx, kv_idx):
        return mask_mod(b, h, perm[q_idx], perm[kv_idx])
    return reordered


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def head_bias(bias: torch.Tensor) -> ScoreMod:
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h]
    return score_mod


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """attncc.alibi(): `score + slope[h] * (kv - q)`, slope[h] = 2^(-8 (h + 1) / H)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return score_mod


def alibi_slopes(heads: int, device: str) -> torch.Tensor:
    return torch.exp2(-8.0 * (torch.arange(heads, device=device, dtype=torch.float32) + 1)
                      / heads)


def softcap(cap: float) -> ScoreMod:
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod
