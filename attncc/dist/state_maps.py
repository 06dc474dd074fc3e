"""A contiguous shard's affine state map S_out = M S_in + U and its exchange between ranks
(linear-recurrence context parallelism, `attncc.dist.linear`, docs/context_parallel.md).

- U is the shard's final state from its initial state (zero where a state is handed in);
- M is the product of the shard's transitions: I (L1), lam_h^l I (L2), e^{sum g} I (L3),
  diag(e^{sum g}) (L4), all read from the inputs without a run and exchanged as a diagonal
  [B, H, F]; the delta rules (L5, L6) have a dense M [B, H, Dk, Dk], which the same run
  computes: v gets Dk zero columns and the initial state the identity in those columns, so
  the state's extra columns end as M I + 0 = M (the columns of S evolve independently).

One all-gather (LASP-2 style; `gather_stacked`, differentiable, ONE collective forward and
backward so that every rank's backward runs the same collectives in the same order) hands every
rank all (M, U); `exchange` folds the state entering each rank, S = M_j S + U_j over the ranks
j before it, in the state's dtype (fp32, fp64 for fp64 inputs). `Tie` makes an output that
does not read a collective's result still run that collective's backward.
"""

from __future__ import annotations

from typing import Any

import torch

from attncc.dist.collectives import gather_stacked
from attncc.ops.linear.compiled import CompiledLinearAttention

__all__ = ["DENSE", "Tie", "exchange", "transition"]

DENSE = ("delta", "gated_delta")  # rules whose shard transition is a dense Dk x Dk matrix


class Tie(torch.autograd.Function):
    """`x` unchanged; the backward hands `anchor` a zero gradient, so that the backward of
    whatever made `anchor` (a collective) runs on this rank as on the others."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.anchor
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _diagonal(attn: CompiledLinearAttention, q: torch.Tensor, g: torch.Tensor | None,
              F: int, dtype: torch.dtype) -> torch.Tensor:
    """M of an additive rule as its diagonal [B, H, F] (no run: read from the inputs)."""
    B, H, l, _ = q.shape
    rule = attn.node.rule
    if rule == "linear":
        return torch.ones(B, H, F, dtype=dtype, device=q.device)
    if rule == "decay":
        lam = attn.node.decay if isinstance(attn.node.decay, tuple) else (attn.node.decay,) * H
        per_head = torch.tensor(lam, dtype=dtype, device=q.device) ** l
        return per_head.view(1, H, 1).expand(B, H, F)
    total = g.to(dtype).sum(2)  # L3: [B, H]; L4: [B, H, Dk]
    return torch.exp(total).unsqueeze(-1).expand(B, H, F) if rule == "scalar_gate" \
        else torch.exp(total)


def transition(attn: CompiledLinearAttention, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
               initial_state: torch.Tensor | None, run: dict[str, Any]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o from `initial_state` (None: zero), U [B, H, F, Dv'], M: diagonal [B, H, F] or dense
    [B, H, F, F]) of this shard, in one run."""
    if attn.node.rule not in DENSE:
        o, U = attn(q, k, v, g=g, beta=beta, initial_state=initial_state, return_state=True,
                    **run)
        return o, U, _diagonal(attn, q, g, U.shape[2], U.dtype)
    B, H, l, F = q.shape
    Dv = v.shape[-1]
    v_ext = torch.cat([v, v.new_zeros(B, H, l, F)], -1)
    eye = torch.eye(F, device=q.device).expand(B, H, F, F)
    first = (initial_state if initial_state is not None
             else torch.zeros(B, H, F, Dv, device=q.device))
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probe = torch.cat([first.to(state_dtype), eye.to(state_dtype)], -1)
    o, S = attn(q, k, v_ext, g=g, beta=beta, initial_state=probe, return_state=True, **run)
    return o[..., :Dv], S[..., :Dv], S[..., Dv:]


def _step(M: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """M S for a diagonal [B, H, F] or dense [B, H, F, F] M."""
    return M.unsqueeze(-1) * S if M.dim() == 3 else M @ S


def exchange(M: torch.Tensor, U: torch.Tensor, group: Any, upto: int
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every rank's (M, U) by one all-gather; (the gathered tensor, states[j] for j <= upto:
    the state entering rank j, folded from a zero state)."""
    # one collective for both halves: every rank's backward then runs one all-reduce
    every = gather_stacked(torch.cat([M.flatten(2), U.flatten(2)], -1), group)
    m_size = M[0, 0].numel()
    Ms = every[..., :m_size].unflatten(-1, M.shape[2:])
    Us = every[..., m_size:].unflatten(-1, U.shape[2:])
    states = [torch.zeros_like(U)]
    for j in range(upto):
        states.append(_step(Ms[j], states[-1]) + Us[j])
    return every, states
