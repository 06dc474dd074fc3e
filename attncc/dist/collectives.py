"""Differentiable collectives over the sequence dimension (docs/context_parallel.md).

`gather_sequence` all-gathers every rank's slice of a sequence and puts the chunks in global
order; its backward hands each rank the sum over ranks of the gradient of its own slice
(reduce-scatter under NCCL; all-reduce then slice under gloo, which has no reduce-scatter).
Everything goes through `torch.distributed`: attncc has no transport of its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attncc.passes.shard_pairs import Sharding

__all__ = ["chunk_runs", "gather_sequence", "gather_stacked", "shard_sequence"]


class _AllGather(torch.autograd.Function):
    """[.., l, ..] on each rank -> [.., W*l, ..] in rank order (dimension `dim`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        group, dim = ctx.group, ctx.dim
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = grad.shape[dim] // world
        if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter
            total = grad.contiguous()
            dist.all_reduce(total, group=group)
            return total.narrow(dim, rank * local, local).contiguous(), None, None
        front = grad.movedim(dim, 0).contiguous()  # reduce_scatter_tensor splits dimension 0
        out = torch.empty((local, *front.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, front, group=group)
        return out.movedim(0, dim), None, None


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
    full = _AllGather.apply(x, group, dim)
    per_rank = len(sharding.chunks[0])
    size = x.shape[dim] // per_rank
    pieces = {}  # global chunk -> (start in the gathered tensor, chunks)
    for r, chunks in enumerate(sharding.chunks):
        for local, first, count in chunk_runs(chunks):
            pieces[first] = ((r * per_rank + local) * size, count)
    if len(pieces) == 1:  # contiguous: rank order is global order
        return full
    return torch.cat([full.narrow(dim, start, count * size)
                      for _, (start, count) in sorted(pieces.items())], dim)


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
    return _AllGather.apply(x.unsqueeze(0), group, 0)
