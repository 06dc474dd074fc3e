"""Differentiable collectives over the sequence dimension (docs/context_parallel.md).

`gather_sequence` all-gathers every rank's slice of a sequence and puts the chunks in global
order; its backward hands each rank the sum over ranks of the gradient of its own slice (a
reduce-scatter). `sequence_to_heads` / `heads_to_sequence` are the all-to-all (Ulysses) pair: a
rank's slice of the sequence for all heads <-> the whole sequence (global order) for its W-th
of the heads; each one's backward is the other (an all-to-all is a permutation of the data
across ranks).

They are PyTorch's functional collectives (`torch.distributed._functional_collectives`, the
autograd-enabled `all_gather_tensor_autograd` / `all_to_all_single_autograd`), not a
`torch.autograd.Function` over `dist.all_gather`: dynamo traces them, so the strategies run
inside `torch.compile` with the collectives in the graph (forward and backward), and eagerly
they are the same `torch.distributed` calls. NCCL and gloo both implement them (gloo's
reduce-scatter is an all-reduce and a slice inside torch; checked under gloo with torch 2.13).

`ring_shift` is the ring strategy's step: point-to-point sends to the next rank and receives from
the previous one (`dist.batch_isend_irecv`), posted at once and waited for later, so that the
caller computes while the chunks travel (eager only: the ring does not run inside
`torch.compile`). `gather_stacked` stacks every rank's tensor (the exchange of the linear
recurrences' state maps); `sum_over_ranks` all-reduces one (the varlen final states; an
autograd.Function over `dist.all_reduce`, eager only).
Everything goes through `torch.distributed`: attncc has no transport of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from attncc.passes.shard_pairs import Sharding

__all__ = ["chunk_runs", "gather_sequence", "gather_stacked", "heads_to_sequence", "ring_shift",
           "sequence_to_heads", "shard_sequence", "sum_over_ranks"]

# torch 2.13 renamed the autograd all-gather `all_gather_single_autograd` and deprecated the
# old name (a FutureWarning on every eager call); torch 2.11 has only the old one
_ALL_GATHER = getattr(funcol, "all_gather_single_autograd", None) or \
    funcol.all_gather_tensor_autograd


def _group(group: Any) -> Any:
    """None: the default group (the functional collectives take no None)."""
    return dist.group.WORLD if group is None else group


# torch 2.13 differentiates `wait_tensor` (`wait_tensor_backward`); where it does not, waiting
# explicitly would cut the gradient, and the subclass below is left to wait on first use
_WAIT_IS_DIFFERENTIABLE = hasattr(funcol, "wait_tensor_backward")


def _waited(x: torch.Tensor) -> torch.Tensor:
    """Eagerly a functional collective returns an `AsyncCollectiveTensor` (a subclass that
    waits on first use): a plain tensor lets the kernels take their direct eager path rather
    than the custom op's dispatch (both give the same result). Traced, it is already a plain
    tensor (the graph holds the wait)."""
    if _WAIT_IS_DIFFERENTIABLE and isinstance(x, funcol.AsyncCollectiveTensor):
        return x.wait()
    return x


def _all_gather(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """[.., l, ..] on each rank -> [.., W*l, ..] in rank order along `dim` (differentiable: the
    backward reduce-scatters the gradient)."""
    front = _ALL_GATHER(x.movedim(dim, 0).contiguous(), 0, _group(group))  # along dim 0
    return _waited(front).movedim(0, dim)


class _SumOverRanks(torch.autograd.Function):
    """The sum of every rank's `x` on every rank (all-reduce); the backward is the same
    all-reduce of the gradients (each rank's x reaches every rank's result)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _all_to_all(x: torch.Tensor, group: Any, split_dim: int, cat_dim: int) -> torch.Tensor:
    """Split `x` into W equal parts along `split_dim`, part j to rank j; concatenate the parts
    received, in rank order, along `cat_dim` (differentiable: the backward is the same
    exchange with the dimensions swapped). Every rank passes the same shape."""
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, split_dim)).contiguous()  # all_to_all_single splits dim 0
    splits = [send.shape[0] // world] * world
    recv = funcol.all_to_all_single_autograd(send, splits, splits, _group(group))
    return torch.cat(_waited(recv).unbind(0), cat_dim)


def _global_order(x: torch.Tensor, sharding: Sharding, dim: int) -> torch.Tensor:
    """Every rank's chunks in rank order (each rank's in its storage order) along `dim` ->
    the sequence in global order."""
    per_rank = len(sharding.chunks[0])
    size = x.shape[dim] // sharding.n_chunks
    pieces = {}  # global chunk -> (start in the gathered tensor, chunks)
    for r, chunks in enumerate(sharding.chunks):
        for local, first, count in chunk_runs(chunks):
            pieces[first] = ((r * per_rank + local) * size, count)
    if len(pieces) == 1:  # contiguous: rank order is global order
        return x
    return torch.cat([x.narrow(dim, start, count * size)
                      for _, (start, count) in sorted(pieces.items())], dim)


def _rank_order(x: torch.Tensor, sharding: Sharding, dim: int) -> torch.Tensor:
    """The inverse of `_global_order`: rank 0's chunks, then rank 1's, ... along `dim`."""
    size = x.shape[dim] // sharding.n_chunks
    runs = [run for chunks in sharding.chunks for run in chunk_runs(chunks)]
    if len(runs) == 1:
        return x
    return torch.cat([x.narrow(dim, first * size, count * size) for _, first, count in runs],
                     dim)


def sequence_to_heads(x: torch.Tensor, sharding: Sharding, group: Any = None, seq_dim: int = 2,
                      head_dim: int = 1) -> torch.Tensor:
    """This rank's chunks of the sequence for all H heads -> the whole sequence, in global
    order, for heads [r H/W, (r + 1) H/W) (one all-to-all; differentiable). W must divide H.
    A collective: every rank of `group` calls it with the same sharding and equal shapes."""
    return _global_order(_all_to_all(x, group, head_dim, seq_dim), sharding, seq_dim)


def heads_to_sequence(y: torch.Tensor, sharding: Sharding, group: Any = None, seq_dim: int = 2,
                      head_dim: int = 1) -> torch.Tensor:
    """The inverse of `sequence_to_heads`: the whole sequence (global order) for this rank's
    heads -> this rank's chunks (storage order) for all heads (one all-to-all)."""
    return _all_to_all(_rank_order(y, sharding, seq_dim), group, seq_dim, head_dim)


def chunk_runs(chunks: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(local chunk, global chunk, count) for each run of consecutive global chunks."""
    runs: list[tuple[int, int, int]] = []
    for i, c in enumerate(chunks):
        if runs and runs[-1][1] + runs[-1][2] == c:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, c, 1))
    return runs


def gather_sequence(x: torch.Tensor, sharding: Sharding, group: Any = None,
                    dim: int = 2) -> torch.Tensor:
    """The whole sequence in global order from each rank's slice `x` (its chunks of
    `sharding`, in storage order, along `dim`); differentiable. A collective: every rank of
    `group` calls it with the same sharding and equal shapes."""
    return _global_order(_all_gather(x, group, dim), sharding, dim)


def shard_sequence(x: torch.Tensor, sharding: Sharding, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s slice of the whole sequence `x`: its chunks along `dim`, in storage order
    (what `gather_sequence` and `context_parallel_attention` expect). No communication."""
    if not 0 <= rank < sharding.world:
        raise ValueError(f"shard_sequence: rank {rank} is not in a sharding of "
                         f"{sharding.world} ranks")
    L = x.shape[dim]
    if L % sharding.n_chunks:
        raise ValueError(f"shard_sequence: length {L} does not split into {sharding.n_chunks} "
                         f"equal chunks ({sharding.name or 'sharding'} over {sharding.world} "
                         "ranks)")
    size = L // sharding.n_chunks
    return torch.cat([x.narrow(dim, first * size, count * size)
                      for _, first, count in chunk_runs(sharding.chunks[rank])], dim)


def gather_stacked(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """[W, *x.shape]: every rank's `x` in rank order, differentiable (the backward hands each
    rank the sum over ranks of the gradient of its own entry). A collective: every rank of
    `group` calls it with equal shapes, and its backward is one collective too, so every rank
    must run the backward of whatever it computed from the result."""
    return _all_gather(x.unsqueeze(0), group, 0)


def ring_shift(tensors: list[torch.Tensor], group: Any, tag: int = 0
               ) -> Callable[[], list[torch.Tensor]]:
    """Post the sends of `tensors` to the next rank of `group` and the receives of the previous
    rank's (same shapes and dtypes) into new buffers; return `wait`, which blocks until both are
    done and gives the received tensors. Not differentiable (the ring's backward runs its own
    shifts). Every rank of `group` must post the same shifts in the same order (the i-th tensor
    travels with tag `tag + i`, so several shifts may be in flight). One rank: `wait` gives
    `tensors` back, nothing is sent."""
    world = dist.get_world_size(group)
    if world == 1:
        return lambda: tensors
    rank = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prev = dist.get_global_rank(group, (rank - 1) % world)
    sends = [t.contiguous() for t in tensors]  # alive until `wait`: the sends read them
    recvs = [torch.empty_like(t) for t in sends]
    ops = ([dist.P2POp(dist.isend, t, nxt, group, tag + i) for i, t in enumerate(sends)]
           + [dist.P2POp(dist.irecv, t, prev, group, tag + i) for i, t in enumerate(recvs)])
    requests = dist.batch_isend_irecv(ops)

    def wait() -> list[torch.Tensor]:
        for r in requests:
            r.wait()
        del sends[:]
        return recvs
    return wait


def sum_over_ranks(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum over ranks of `x`, on every rank; differentiable (one all-reduce forward, one
    backward). A collective: every rank of `group` calls it with equal shapes, and every rank
    must run the backward of whatever it computed from the result."""
    return _SumOverRanks.apply(x, group)
