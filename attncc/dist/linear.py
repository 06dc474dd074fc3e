"""Linear-recurrence context parallelism by state passing (docs/context_parallel.md).

Rank r of a process group holds the r-th W-th of one sequence (contiguous: the recurrence runs
in sequence order). Each rank runs its shard once for its affine state map S_out = M S_in + U
(`attncc.dist.state_maps`: U from a zero state, rank 0 from the user's initial state), one
all-gather hands every rank every map, rank r folds the state entering it and reruns its shard
from that state for its outputs. Rank 0's first run already started from the true state, so
its output is final; it is tied to the exchange (`Tie`) so that its backward joins the
gather's collective too.

Varlen (packed [T, H, D] with the whole batch's `cu_seqlens`, T = W l): each rank runs the
sequences it holds as varlen, clipped to its shard (`attncc.dist.varlen.plan_shard`). Only the
sequence running out of the shard's last token hands a state on. Its map is the whole shard's
transition if the shard lies inside that one sequence; otherwise that sequence starts in the
shard, from its own initial state, and M = 0, so the same fold resets at every sequence start.
Only the sequence running into the shard's first token starts from the folded state (the
rerun, only on such ranks); the others from their rows of the initial state, which every rank
passes alike. With `return_state`, each rank's final states of the sequences ending in its
shard reach every rank by one all-reduce (`sum_over_ranks`). Its input is tied to the gather
and o to its output: every rank's backward runs the all-reduce's collective, then the
gather's, whichever outputs its loss reads.

Checks, before the exchange: this process in `group`, a rule this strategy covers, an initial
state on rank 0 only (varlen: on every rank or none), each rank's own inputs valid, and (one
small all-gather of integers, `check=True`) every rank holding the same shapes and dtype
(varlen: and the same cu_seqlens, by a checksum, and the same return_state).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attncc.dist.agree import agree_on_inputs
from attncc.dist.collectives import sum_over_ranks
from attncc.dist.state_maps import DENSE, Tie, exchange, transition
from attncc.dist.varlen import ShardPlan, digest, plan_shard
from attncc.ops.linear.compiled import CompiledLinearAttention
from attncc.validate.linear import check_cu_seqlens, check_inputs, check_tensor, varlen_views

__all__ = ["context_parallel_linear"]

_COVERED = ("linear", "decay", "scalar_gate", "vector_gate") + DENSE


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


def _varlen_error(attn: CompiledLinearAttention, q: Any, k: Any, v: Any, g: Any, beta: Any,
                  initial_state: Any, cu_seqlens: Any, world: int
                  ) -> tuple[str | None, list[int] | None]:
    """(what is wrong with this rank's packed arguments or None, the global cu_seqlens)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        return (f"q: expected this rank's packed tokens [T / W, H, Dk] with cu_seqlens, got "
                f"{got}"), None
    if q.shape[0] == 0:
        return "a rank holds no tokens (every rank must hold T / W > 0 of them)", None
    total = world * q.shape[0]
    try:
        n = check_cu_seqlens(cu_seqlens, total, q.device)
    except ValueError as e:
        return (f"cu_seqlens is the whole packed batch's, the same on every rank, ending at "
                f"T = W x (tokens per rank) = {world} x {q.shape[0]} = {total}: {e}"), None
    try:
        varlen_views(q, k, v, attn.node, g, beta, None, cu_seqlens.new_tensor([0, q.shape[0]]))
        if initial_state is not None:
            _, H, Dk = q.shape
            node = attn.node
            shape = [n, H, node.feature_dim(Dk), node.state_dv(v.shape[-1])]
            check_tensor("initial_state", initial_state, shape, "[N, H, F, Dv'] (every rank)")
            if initial_state.device != q.device:
                raise ValueError(f"initial_state: expected q's device {q.device}, got "
                                 f"{initial_state.device}")
    except (TypeError, ValueError) as e:
        return str(e), None
    return None, cu_seqlens.tolist()


def _varlen(attn: CompiledLinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            g: torch.Tensor | None, beta: torch.Tensor | None,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, plan: ShardPlan,
            n: int, group: Any, rank: int, run: dict[str, Any], return_state: bool
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a packed batch (module docstring: varlen)."""
    node = attn.node
    _, H, Dk = q.shape
    F, Dv = node.feature_dim(Dk), node.state_dv(v.shape[-1])
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    local_cu = torch.tensor(plan.local_cu, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    own = None if initial_state is None else \
        initial_state[plan.starts.start:plan.starts.stop].to(dtype)

    def initial(entering: torch.Tensor) -> torch.Tensor | None:
        """The run's initial states: `entering` for a sequence crossing in, then own rows."""
        if not plan.crossing_in:
            return own
        rest = own if own is not None else entering.new_zeros(plan.count - 1, H, F, Dv)
        return torch.cat([entering, rest])

    def packed(x: torch.Tensor | None) -> torch.Tensor | None:  # [T, H, ..] -> [1, H, T, ..]
        return None if x is None else x.transpose(0, 1).unsqueeze(0)

    if plan.inside:  # one sequence through the shard: the dense path's map
        o, U, M = transition(attn, *map(packed, (q, k, v, g, beta)), None, run)
        o, S = o[0].transpose(0, 1), U
    else:  # the sequence crossing out (if any) starts here: its map does not read S_in
        o, S = attn(q, k, v, g=g, beta=beta, initial_state=initial(q.new_zeros(1, H, F, Dv,
                    dtype=dtype)), return_state=True, cu_seqlens=local_cu, **run)
        # none crossing out: hand on zeros, tied to the run so that the gather's backward
        # (one collective) runs on this rank as on the others
        U = S[-1:] if plan.crossing_out else Tie.apply(torch.zeros_like(S[-1:]), S)
        M = U.new_zeros((1, H, F, F) if node.rule in DENSE else (1, H, F))
    every, states = exchange(M, U, group, rank)
    if plan.crossing_in:  # rerun from the state entering this shard
        o, S = attn(q, k, v, g=g, beta=beta, initial_state=initial(states[rank]),
                    return_state=True, cu_seqlens=local_cu, **run)
    else:  # every sequence started here from its own state: o is final
        o = Tie.apply(o, every)
    if not return_state:
        return o
    # the final states of the sequences ending in this shard, in their global rows
    mine = torch.cat([S.new_zeros(plan.first, H, F, Dv), S[:plan.owned],
                      S.new_zeros(n - plan.first - plan.owned, H, F, Dv)])
    finals = sum_over_ranks(Tie.apply(mine, every), group)
    return Tie.apply(o, finals), finals


@torch.compiler.disable
def _checked(attn: CompiledLinearAttention, q: Any, k: Any, v: Any, g: Any, beta: Any,
             initial_state: Any, cu_seqlens: Any, return_state: bool, check: bool, rank: int,
             world: int, group: Any) -> list[int] | None:
    """This rank's checks and (`check`) the agreement on them; eager also under
    torch.compile (one graph break): the gate check and cu_seqlens read values, which a traced
    graph does not know. Returns the global cu_seqlens as a list (None: not varlen)."""
    varlen = cu_seqlens is not None
    if varlen:
        error, cu = _varlen_error(attn, q, k, v, g, beta, initial_state, cu_seqlens, world)
    else:
        error, cu = _local_error(attn, q, k, v, g, beta, initial_state, rank), None
    # the same keys on every rank (the rows must have one length); -2: not varlen
    checksum = digest(cu) if cu is not None else -1 if varlen else -2
    same = {"cu_seqlens (checksum; -2: none)": checksum,
            "return_state (varlen)": int(return_state) if varlen else -2,
            "initial_state (varlen: given on every rank or none)":
                int(initial_state is not None) if varlen else -2}
    if check:
        agree_on_inputs({"q": q, "v": v}, error, group, "the recurrence", same)
    elif error is not None:
        raise ValueError(f"context parallel (rank {rank}): {error}")
    return cu


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

    Varlen: with `cu_seqlens` (int [N + 1], the whole packed batch's, the same tensor on every
    rank), q, k [l, H, Dk], v [l, H, Dv] (g, beta likewise packed) are this rank's l = T / W
    of the packed tokens (`shard_sequence(x, contiguous(W), rank, dim=0)`); sequences may cross
    any number of shard edges. `initial_state` [N, H, F, Dv'] is given on EVERY rank alike
    (or on none; the values are not compared): rank r reads the rows of the sequences
    starting in its shard, so its gradient holds those rows and the sum over ranks is the
    whole gradient (as for the final states, a value the group shares). `return_state`: the
    final states [N, H, F, Dv'] of all sequences, the same on every rank.

    Cost per rank: one extra forward run of its shard (and its backward) for U, except on
    rank 0; the delta rules (L5, L6) run it with Dk extra value columns for their transition
    M; one all-gather of W (M, U) pairs. Varlen: the rerun only on ranks with a sequence
    crossing in, the extra columns only where the shard lies inside one sequence, and with
    `return_state` one all-reduce of the N final states. `check`: one all-gather of a few
    integers so that bad or mismatched shapes (varlen: cu_seqlens, return_state, initial
    state given or not) raise on every rank instead of hanging in the exchange.
    Not in this slice: L7, non-contiguous shardings.
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
    world = dist.get_world_size(group)
    if check or cu_seqlens is not None:
        cu = _checked(attn, q, k, v, g, beta, initial_state, cu_seqlens, return_state, check,
                      rank, world, group)
    else:  # traceable: under torch.compile(fullgraph=True) no graph break
        error, cu = _local_error(attn, q, k, v, g, beta, initial_state, rank), None
        if error is not None:
            raise ValueError(f"context parallel (rank {rank}): {error}")
    run = {"scale": scale, "backend": backend}
    if cu is not None:
        return _varlen(attn, q, k, v, g, beta, initial_state, cu_seqlens,
                       plan_shard(cu, rank, world), len(cu) - 1, group, rank, run, return_state)
    o, U, M = transition(attn, q, k, v, g, beta, initial_state, run)
    every, states = exchange(M, U, group, world)
    if rank == 0:  # its first run started from the true state (the user's or zero)
        o = Tie.apply(o, every)
    else:
        o = attn(q, k, v, g=g, beta=beta, initial_state=states[rank], **run)
    return (o, states[-1]) if return_state else o
