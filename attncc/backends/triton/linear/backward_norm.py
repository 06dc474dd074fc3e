"""The normaliser's backward (L1 with normalize=True) as the unnormalised one on augmented values.

With z as the state's last value column (v' = [v, 1], `attncc.ir.linear`), the forward is
    o'_t = scale * S'_t^T phi(q_t)   [Dv + 1],   num = o'[:Dv],  den = o'[Dv],
    o_t  = num / den   (0 where den == 0).
So dL/do' = [do / den, -(do . o) / den] (both 0 where den == 0), and the generated kernel for the
additive rule, run on v' with that do', gives dq, dk, dv' (dv = dv'[:Dv]; the ones column's
gradient is dropped) and the full-width initial-state gradient. den is rebuilt on the host from
z_t = z_0 + cumsum(phi(k)) (per sequence when packed): O(L F) tensor ops, no loop over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.ir.eval import feature_map
from attncc.ir.linear import LinearState


def _z(node: LinearState, kv: Tensor, s0: Tensor | None, cu: Tensor | None) -> Tensor:
    """z_t (inclusive of token t) [Bv, H, Lv, F] in fp32 from views kv [Bv, H, Lv, Dk]."""
    phik = feature_map(kv.float(), node.feature_map)
    z = phik.cumsum(2)
    if cu is None:
        return z if s0 is None else z + s0[..., -1][:, :, None, :]
    lengths = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=kv.device), lengths)
    starts = cu[:-1].long()
    before = torch.cat([torch.zeros_like(z[:, :, :1]), z], dim=2)[:, :, starts]  # [1, H, N, F]
    z = z - before[:, :, seq]
    if s0 is not None:  # s0 [N, H, F, Dv + 1] -> [1, H, N, F]
        z = z + s0[..., -1].transpose(0, 1)[None][:, :, seq]
    return z


def augment(node: LinearState, qv: Tensor, kv: Tensor, vv: Tensor, dov: Tensor, ov: Tensor,
            s0: Tensor | None, scale: float, cu: Tensor | None) -> tuple[Tensor, Tensor]:
    """(v' = [v, 1] in v's dtype, dL/do' fp32), both [Bv, H, Lv, Dv + 1], from views of q, k, v,
    do and the forward's o (all [Bv, H, Lv, .]) and the fp32 initial state (or None)."""
    den = scale * (_z(node, kv, s0, cu) * feature_map(qv.float(), node.feature_map)).sum(-1)
    zero = den == 0
    inv = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, den))[..., None]
    do32 = dov.float()
    d_den = -(do32 * ov.float()).sum(-1, keepdim=True) * inv
    v_aug = torch.cat([vv, torch.ones_like(vv[..., :1])], dim=-1)
    return v_aug, torch.cat([do32 * inv, d_den], dim=-1)
