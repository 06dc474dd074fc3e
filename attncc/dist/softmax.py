"""Softmax context parallelism by all-gather of keys and values (docs/context_parallel.md).

Each rank of a process group holds the queries, keys and values of its chunks of one sequence
(a `Sharding`: contiguous, head-tail, or any other from `attncc.passes.shard_balance`). A call
all-gathers K and V (differentiable: `attncc.dist.collectives`), puts them in global order and
runs the compiled attention on the rank's own queries at their GLOBAL positions: the spec is
rewritten once by `attncc.ir.shard.at_query_offset` (q_idx -> q_idx + offset, Lq -> Lk) and
each run of consecutive chunks is one call with its offset as a runtime parameter, so every
mask, score and captured tensor means what it means on the whole sequence and no shard
recompiles. Gradients flow back through the gather (dK, dV reduce-scattered to their owners).

Checks, before any collective of the attention itself: the group holds this process, the
sharding's world is the group's size, and (one small all-gather of shapes, on by default) every
rank's q, k, v have the same shapes, dtype and a length the sharding divides. A rank whose own
check fails tells the others through that exchange, so every rank raises and none hangs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist

from attncc.dist.agree import agree_on_inputs
from attncc.dist.collectives import chunk_runs, gather_sequence
from attncc.ir.shard import at_query_offset, offset_names
from attncc.ops.softmax.compiled import CompiledAttention
from attncc.passes import shard_balance
from attncc.passes.shard_pairs import Sharding
from attncc.validate import LAYOUTS, check_qkv, to_bhsd

__all__ = ["context_parallel_attention", "sharding_for"]

_SEQ_DIM = {"bhsd": 2, "bshd": 1}
# the compiled attention at global query positions, one per CompiledAttention
_SHARDED: "weakref.WeakKeyDictionary[CompiledAttention, CompiledAttention]" = (
    weakref.WeakKeyDictionary())


def sharding_for(sharding: str | Sharding, world: int) -> Sharding:
    """"contiguous" | "head-tail" | a `Sharding` (checked against the world size)."""
    if isinstance(sharding, Sharding):
        if sharding.world != world:
            raise ValueError(f"context parallel: the sharding {sharding.name or ''} assigns "
                             f"chunks to {sharding.world} ranks, the process group has {world}")
        return sharding
    makers = {"contiguous": shard_balance.contiguous, "head-tail": shard_balance.head_tail}
    if sharding not in makers:
        raise ValueError(f"sharding: expected 'contiguous', 'head-tail' or a Sharding, "
                         f"got {sharding!r}")
    return makers[sharding](world)


def _sharded(attn: CompiledAttention) -> CompiledAttention:
    hit = _SHARDED.get(attn)
    if hit is None:
        hit = CompiledAttention(at_query_offset(attn.spec), attn.backend)
        _SHARDED[attn] = hit
    return hit


def _local_error(q: Any, k: Any, v: Any, layout: str, sharding: Sharding) -> str | None:
    """What is wrong with this rank's own arguments (None: nothing)."""
    try:
        qb, kb, vb = to_bhsd("q", q, layout), to_bhsd("k", k, layout), to_bhsd("v", v, layout)
        check_qkv(qb, kb, vb)
    except (TypeError, ValueError) as e:
        return str(e)
    per_rank = len(sharding.chunks[0])
    if qb.shape[2] != kb.shape[2]:
        return (f"q holds {qb.shape[2]} tokens and k {kb.shape[2]}: context parallelism "
                "shards one sequence, each rank holds the same tokens of q, k and v")
    if qb.shape[2] == 0 or qb.shape[2] % per_rank:
        return (f"a rank holds {qb.shape[2]} tokens, which do not split into the {per_rank} "
                f"equal chunks per rank of the {sharding.name or ''} sharding (the sequence "
                f"length must be a positive multiple of {sharding.n_chunks})")
    return None


def context_parallel_attention(attn: CompiledAttention, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, *, group: Any = None,
                               sharding: str | Sharding = "contiguous",
                               return_lse: bool = False, scale: float | None = None,
                               layout: str = "bhsd", backend: str | None = None,
                               check: bool = True, **runtime: Any
                               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence sharded over the ranks of `group` (None: the default group).

    q [B, Hq, l, Dqk], k [B, Hkv, l, Dqk], v [B, Hkv, l, Dv] (layout="bshd": [B, l, H, D]) are
    this rank's l = L / W tokens: its chunks of `sharding` ("contiguous": rank r holds the r-th
    W-th of the sequence; "head-tail": chunks r and 2W-1-r of 2W, balanced for causal masks;
    or a `Sharding`), in storage order (`attncc.dist.shard_sequence` cuts them). Returns o for
    these queries in q's layout (and lse [B, Hq, l] with `return_lse`), equal to the rows of
    `attn` on the whole sequence; differentiable in q, k, v.

    Runtime values (`window=`, `doc=`) are those of the WHOLE sequence: a captured tensor
    indexed by position (document ids, a bias) has all L entries on every rank. `check`: one
    all-gather of a few integers per call so that bad or mismatched shapes raise on every rank
    instead of hanging in the gather (turn it off when the shapes are known to agree).
    Not in this slice: reordered specs, ring / all-to-all strategies (docs/context_parallel.md).
    """
    if not isinstance(attn, CompiledAttention):
        raise TypeError(f"context parallel: expected the CompiledAttention of a dense softmax "
                        f"spec (attncc.compile(spec)), got {type(attn).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallel: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets it up)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("context parallel: this process is not a member of `group`; only its "
                         "members may call (each holds a slice of the sequence)")
    plan = sharding_for(sharding, dist.get_world_size(group))
    sharded = _sharded(attn)  # an unsupported spec raises here, on every rank alike
    names = offset_names(sharded.spec)
    clash = sorted(set(names) & set(runtime))
    if clash:
        raise ValueError(f"context parallel: {clash[0]!r} is the shard offset that this call "
                         "sets itself; do not pass it")
    error = _local_error(q, k, v, layout, plan)
    if check:
        agree_on_inputs({"q": q, "k": k, "v": v}, error, group, "the attention")
    elif error is not None:
        raise ValueError(f"context parallel (rank {rank}): {error}")
    dim = _SEQ_DIM[layout]
    k_all = gather_sequence(k, plan, group, dim)
    v_all = gather_sequence(v, plan, group, dim)
    size = q.shape[dim] // len(plan.chunks[rank])
    outs, lses = [], []
    for local, first, count in chunk_runs(plan.chunks[rank]):
        offset = {name: first * size for name in names}
        o, lse = sharded(q.narrow(dim, local * size, count * size), k_all, v_all,
                         return_lse=True, scale=scale, layout=layout, backend=backend,
                         **offset, **runtime)
        outs.append(o)
        lses.append(lse)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim)
    if not return_lse:
        return o
    return o, (lses[0] if len(lses) == 1 else torch.cat(lses, 2))
