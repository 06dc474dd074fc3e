"""Linear-recurrence context parallelism by state passing (docs/context_parallel.md).

Rank r of a process group holds the r-th W-th of one sequence (contiguous: the recurrence runs
in sequence order). For every rule L1-L6 (docs/catalog.md) a shard maps the state it receives
to the state it hands on by an affine map, S_out = M S_in + U:

- U is the shard's final state from a zero state (rank 0: from the user's initial state);
- M is the product of the shard's transitions: I (L1), lam_h^l I (L2), e^{sum g} I (L3),
  diag(e^{sum g}) (L4), all read from the inputs without a run and exchanged as a diagonal
  [B, H, F]; the delta rules (L5, L6) have a dense M [B, H, Dk, Dk], which the same run
  computes: v gets Dk zero columns and the initial state the identity in those columns, so
  the state's extra columns end as M I + 0 = M (the columns of S evolve independently).

One all-gather (LASP-2 style; `gather_stacked`, differentiable, ONE collective forward and
backward so that every rank's backward runs the same collectives in the same order) hands every
rank all (M, U); rank r folds S_in(r) = fold over j < r of S = M_j S + U_j in the state's
dtype (fp32, fp64 for fp64 inputs), and reruns its shard from S_in(r) for its outputs. Rank 0's
first run already started from the true state, so its output is final; it is tied to the
exchange (`_Tie`) so that its backward joins the gather's collective too.

Checks, before the exchange: this process in `group`, a rule this strategy covers, no varlen,
an initial state on rank 0 only, each rank's own inputs valid, and (one small all-gather of
integers, `check=True`) every rank holding the same shapes and dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attncc.dist.agree import agree_on_inputs
from attncc.dist.collectives import gather_stacked
from attncc.ops.linear.compiled import CompiledLinearAttention
from attncc.validate.linear import check_inputs

__all__ = ["context_parallel_linear"]

_DENSE = ("delta", "gated_delta")  # rules whose shard transition is a dense Dk x Dk matrix
_COVERED = ("linear", "decay", "scalar_gate", "vector_gate") + _DENSE


class _Tie(torch.autograd.Function):
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


def _local_error(attn: CompiledLinearAttention, q: Any, k: Any, v: Any, g: Any, beta: Any,
                 initial_state: Any, rank: int) -> str | None:
    """What is wrong with this rank's own arguments (None: nothing)."""
    if initial_state is not None and rank != 0:
        return ("initial_state is the state before the sequence's first token, which rank 0 "
                "holds: pass it on rank 0 only (None on the other ranks)")
    try:
        check_inputs(q, k, v, attn.node, g, beta, initial_state)
    except (TypeError, ValueError) as e:
        return str(e)
    if q.shape[2] == 0:
        return "a rank holds no tokens (every rank must hold L / W > 0 of them)"
    return None


@torch.compiler.disable
def _agree(attn: CompiledLinearAttention, q: Any, k: Any, v: Any, g: Any, beta: Any,
           initial_state: Any, rank: int, group: Any) -> None:
    """This rank's checks and the agreement on them, eagerly also under torch.compile (one
    graph break): the gate check reads values, which a traced graph does not know."""
    error = _local_error(attn, q, k, v, g, beta, initial_state, rank)
    agree_on_inputs({"q": q, "v": v}, error, group, "the recurrence")


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


def _transition(attn: CompiledLinearAttention, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
                initial_state: torch.Tensor | None, run: dict[str, Any]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o from `initial_state` (None: zero), U [B, H, F, Dv'], M: diagonal [B, H, F] or dense
    [B, H, F, F]) of this shard, in one run."""
    if attn.node.rule not in _DENSE:
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


def context_parallel_linear(attn: CompiledLinearAttention, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, *, g: torch.Tensor | None = None,
                            beta: torch.Tensor | None = None, group: Any = None,
                            scale: float | None = None,
                            initial_state: torch.Tensor | None = None,
                            return_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                            backend: str | None = None, check: bool = True
                            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A linear recurrence (L1-L6) over one sequence sharded contiguously over `group`.

    q, k [B, H, l, Dk], v [B, H, l, Dv], g, beta as `attn` takes them, are this rank's
    l = L / W tokens: rank r holds tokens [r l, (r + 1) l) (`attncc.dist.shard_sequence` with
    the "contiguous" sharding cuts them). `initial_state` [B, H, F, Dv'] (the state before
    token 0) is given on rank 0 only. Returns o for these tokens, equal to the rows of `attn`
    on the whole sequence, and with `return_state` the final state of the whole sequence
    (the same on every rank; if several ranks use it, its gradients add up over them, as
    with any value the group shares). Differentiable in q, k, v, g, beta and initial_state.

    Cost per rank: one extra forward run of its shard (and its backward) for U, except on
    rank 0; the delta rules (L5, L6) run it with Dk extra value columns for their transition
    M; one all-gather of W (M, U) pairs. `check`: one all-gather of a few integers so that
    bad or mismatched shapes raise on every rank instead of hanging in the exchange.
    Not in this slice: varlen (`cu_seqlens`), L7, non-contiguous shardings.
    """
    if not isinstance(attn, CompiledLinearAttention):
        raise TypeError(f"context parallel: expected the CompiledLinearAttention of a linear "
                        f"recurrence (attncc.compile(spec) with memory=attncc.recurrent_state"
                        f"(...)), got {type(attn).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallel: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets it up)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("context parallel: this process is not a member of `group`; only its "
                         "members may call (each holds a slice of the sequence)")
    if attn.node.rule not in _COVERED:
        raise ValueError(f"context parallel: rule {attn.node.rule!r} ({attn.node.text()}) is "
                         "not supported yet: state passing covers L1-L6 (docs/catalog.md)")
    if cu_seqlens is not None:
        raise NotImplementedError(
            "context parallel: varlen (cu_seqlens, documents crossing shard boundaries) is not "
            "supported yet: each sequence would need its own state chain across ranks "
            "(docs/context_parallel.md)")
    if check:
        _agree(attn, q, k, v, g, beta, initial_state, rank, group)
    else:
        error = _local_error(attn, q, k, v, g, beta, initial_state, rank)
        if error is not None:
            raise ValueError(f"context parallel (rank {rank}): {error}")
    run = {"scale": scale, "backend": backend}
    o, U, M = _transition(attn, q, k, v, g, beta, initial_state, run)
    # one collective for both halves: every rank's backward then runs one all-reduce
    packed = torch.cat([M.flatten(2), U.flatten(2)], -1)
    every = gather_stacked(packed, group)  # [W, B, H, |M| + |U|]
    m_size = M[0, 0].numel()
    Ms = every[..., :m_size].unflatten(-1, M.shape[2:])
    Us = every[..., m_size:].unflatten(-1, U.shape[2:])
    states = [torch.zeros_like(U)]  # states[j]: the state entering rank j
    for j in range(dist.get_world_size(group)):
        states.append(_step(Ms[j], states[-1]) + Us[j])
    if rank == 0:  # its first run started from the true state (the user's or zero)
        o = _Tie.apply(o, every)
    else:
        o = attn(q, k, v, g=g, beta=beta, initial_state=states[rank], **run)
    return (o, states[-1]) if return_state else o
