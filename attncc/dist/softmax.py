"""Softmax context parallelism by all-gather of keys and values, by all-to-all between
sequence and heads (Ulysses), or by a ring of K/V chunks (docs/context_parallel.md).

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

All-to-all (`strategy="all_to_all"`): q, k, v go from this rank's chunks of the sequence for all
heads to the whole sequence (global order) for heads [r H/W, (r + 1) H/W) (one all-to-all each,
`attncc.dist.collectives.sequence_to_heads`); the compiled attention runs unchanged on those
heads, the spec rewritten once by `attncc.ir.shard.at_head_offset` (h -> h + offset, Hq, Hkv ->
the global counts) so that per-head masks, scores and captured tensors read global heads, and
the sink tensor sliced to the rank's heads; o (and lse) go back by the inverse all-to-all.
Needs W | Hq and W | Hkv. Reordered specs work: every rank holds whole sequences.

Ring (`strategy="ring"`, `attncc.dist.ring`): K/V chunks pass from rank to rank by
point-to-point in W steps, the next hop posted before each step's compute; each (query chunk,
key chunk) pair with work runs at both global positions (`attncc.ir.shard.at_pair_offset`) and
the partial results are LSE-merged. Its backward rotates K/V with their gradient accumulators.
No rank holds more than its own and one travelling K/V chunk. No reordered specs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist

from attncc.dist.agree import agree_on_inputs
from attncc.dist.collectives import (chunk_runs, gather_sequence, heads_to_sequence,
                                    sequence_to_heads)
from attncc.dist.ring import pair_attention, plan_ring, ring_attention
from attncc.ir.shard import at_head_offset, at_query_offset, head_names, offset_names, pair_names
from attncc.ir.symbols import H_IDX
from attncc.ops.softmax.compiled import CompiledAttention
from attncc.passes import shard_balance
from attncc.passes.shard_pairs import Sharding
from attncc.validate import LAYOUTS, check_captures, check_qkv, to_bhsd

__all__ = ["STRATEGIES", "choose_strategy", "context_parallel_attention", "sharding_for"]

STRATEGIES = ("all_gather", "all_to_all", "ring", "auto")
_SEQ_DIM = {"bhsd": 2, "bshd": 1}
_HEAD_DIM = {"bhsd": 1, "bshd": 2}
# the compiled attention at global query positions / global heads, one per CompiledAttention
_SHARDED: "weakref.WeakKeyDictionary[CompiledAttention, CompiledAttention]" = (
    weakref.WeakKeyDictionary())
_SHARDED_HEADS: "weakref.WeakKeyDictionary[CompiledAttention, CompiledAttention]" = (
    weakref.WeakKeyDictionary())


def choose_strategy(heads_q: int, heads_kv: int, world: int) -> str:
    """What `strategy="auto"` runs: "all_to_all" when the world size divides both head counts,
    else "ring" (docs/context_parallel.md, "Choosing a strategy").

    Why: all-to-all sends each rank (W - 1) / W of four tensors of its own size (q, k, v, o),
    holds no whole K and V, and its per-rank work is exactly balanced (whole sequences, a W-th
    of the heads) for any mask; the scaling model (benchmarks/cp_model.py) predicts it far
    ahead of the ring on document masks and at most 7% behind it on causal ones. It is also
    the only strategy here for a reordered spec. Where heads do not divide, the model predicts
    the ring (its hops overlapped with compute) ahead of the all-gather in 15 of the 16 cells
    of its table, and the ring holds one K/V chunk at a time where the all-gather holds all of
    them (both refuse a reordered spec). The rule reads shapes only, which the agreement step
    checks are the same on every rank, so every rank picks the same."""
    return "all_to_all" if heads_q % world == 0 and heads_kv % world == 0 else "ring"


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


def _sharded_heads(attn: CompiledAttention) -> CompiledAttention:
    hit = _SHARDED_HEADS.get(attn)
    if hit is None:
        spec = at_head_offset(attn.spec)  # the same spec when nothing reads a head index
        hit = attn if spec is attn.spec else CompiledAttention(spec, attn.backend)
        _SHARDED_HEADS[attn] = hit
    return hit


def _head_error(attn: CompiledAttention, qb: torch.Tensor, kb: torch.Tensor, world: int,
                runtime: dict[str, Any]) -> str | None:
    """What stops the all-to-all on these shapes and runtime tensors (None: nothing)."""
    Hq, Hkv = qb.shape[1], kb.shape[1]
    if Hq % world or Hkv % world:
        return (f"the all_to_all strategy splits heads over the {world} ranks: it needs the "
                f"world size to divide Hq = {Hq} and Hkv = {Hkv}; use strategy='all_gather' "
                "(or a group whose size divides both)")
    tensors = {c.name: runtime.get(c.name, c.tensor) for c in attn.spec.captures}
    try:  # captured tensors indexed by h must hold every GLOBAL head
        check_captures(attn.spec, tensors, qb.device, {H_IDX: Hq})
    except (TypeError, ValueError, AttributeError) as e:
        return str(e)
    sink = attn.spec.normaliser.sink
    if sink is not None and tensors[sink.name].shape[0] < Hq:
        return (f"{sink.name}: the sink holds {tensors[sink.name].shape[0]} values, one per "
                f"query head is {Hq}")
    return None


def _local_error(attn: CompiledAttention, q: Any, k: Any, v: Any, layout: str,
                 sharding: Sharding, strategy: str, runtime: dict[str, Any]) -> str | None:
    """What is wrong with this rank's own arguments (None: nothing)."""
    try:
        qb, kb, vb = to_bhsd("q", q, layout), to_bhsd("k", k, layout), to_bhsd("v", v, layout)
        check_qkv(qb, kb, vb)
    except (TypeError, ValueError) as e:
        return str(e)
    if strategy == "all_to_all":
        error = _head_error(attn, qb, kb, sharding.world, runtime)
        if error is not None:
            return error
    per_rank = len(sharding.chunks[0])
    if qb.shape[2] != kb.shape[2]:
        return (f"q holds {qb.shape[2]} tokens and k {kb.shape[2]}: context parallelism "
                "shards one sequence, each rank holds the same tokens of q, k and v")
    if qb.shape[2] == 0 or qb.shape[2] % per_rank:
        return (f"a rank holds {qb.shape[2]} tokens, which do not split into the {per_rank} "
                f"equal chunks per rank of the {sharding.name or ''} sharding (the sequence "
                f"length must be a positive multiple of {sharding.n_chunks})")
    return None


def _strategy(strategy: str, q: Any, k: Any, layout: str, world: int) -> str:
    """The strategy this call runs ("auto" resolved by `choose_strategy` on this rank's shapes,
    which the agreement step then checks are every rank's)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    heads = _HEAD_DIM.get(layout)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4
            and k.dim() == 4):
        return "ring"  # the checks reject these inputs anyway
    return choose_strategy(q.shape[heads], k.shape[heads], world)


def _prepare(attn: CompiledAttention, strategy: str, runtime: dict[str, Any]
             ) -> tuple[CompiledAttention | None, str | None]:
    """(the rewritten compiled attention, None) or (None, why this spec cannot run)."""
    rewrite, names_of = {"all_gather": (_sharded, offset_names),
                         "all_to_all": (_sharded_heads, head_names),
                         "ring": (pair_attention, pair_names)}[strategy]
    try:
        sharded = rewrite(attn)
    except ValueError as e:
        return None, str(e)
    names = names_of(sharded.spec)
    clash = sorted(set(names) & set(runtime))
    if clash:
        return None, (f"{clash[0]!r} is a shard offset that this call sets itself; do not "
                      "pass it")
    return sharded, None


def context_parallel_attention(attn: CompiledAttention, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, *, group: Any = None,
                               sharding: str | Sharding = "contiguous",
                               strategy: str = "auto",
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

    `strategy`: "all_gather" (K and V gathered, the rank's queries at their global positions),
    "all_to_all" (Ulysses: sequence <-> heads; needs W | Hq and W | Hkv; the only one for
    reordered specs), "ring" (K/V chunks passed rank to rank, partial results LSE-merged,
    fully masked chunk pairs skipped; a sink needs one value per query head) or "auto"
    (`choose_strategy`: all-to-all where the heads divide, else the ring).
    Runtime values (`window=`, `doc=`, `perm=`) are those of the WHOLE model: a captured tensor
    indexed by position (document ids, a bias) has all L entries, one indexed by head all Hq,
    on every rank. `check`: one all-gather of a few integers per call so that bad or
    mismatched shapes raise on every rank instead of hanging in a collective (turn it off when
    the shapes are known to agree).
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
    world = dist.get_world_size(group)
    plan = sharding_for(sharding, world)
    chosen = _strategy(strategy, q, k, layout, world)
    # a spec the strategy cannot run is this rank's error like a bad shape: with "auto" ranks
    # holding different shapes could choose differently, and must still meet in the agreement
    sharded, error = _prepare(attn, chosen, runtime)
    if error is None:
        error = _local_error(attn, q, k, v, layout, plan, chosen, runtime)
    ring = None
    if error is None and chosen == "ring":
        ring, error = _ring_plan(attn, q, k, layout, plan, rank, runtime)
    if check:
        agree_on_inputs({"q": q, "k": k, "v": v}, error, group, "the attention")
    elif error is not None:
        raise ValueError(f"context parallel (rank {rank}): {error}")
    run = {"scale": scale, "layout": layout, "backend": backend}
    if chosen == "all_to_all":
        return _all_to_all(attn, sharded, q, k, v, plan, group, rank, return_lse, run, runtime)
    if chosen == "ring":
        bhsd = [t.transpose(1, 2) if layout == "bshd" else t for t in (q, k, v)]
        o, lse = ring_attention(attn, *bhsd, ring, group, {"scale": scale, "backend": backend},
                                runtime)
        o = o.transpose(1, 2) if layout == "bshd" else o
        return (o, lse) if return_lse else o
    dim = _SEQ_DIM[layout]
    names = offset_names(sharded.spec)
    k_all = gather_sequence(k, plan, group, dim)
    v_all = gather_sequence(v, plan, group, dim)
    size = q.shape[dim] // len(plan.chunks[rank])
    outs, lses = [], []
    for local, first, count in chunk_runs(plan.chunks[rank]):
        offset = {name: first * size for name in names}
        o, lse = sharded(q.narrow(dim, local * size, count * size), k_all, v_all,
                         return_lse=True, **run, **offset, **runtime)
        outs.append(o)
        lses.append(lse)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim)
    if not return_lse:
        return o
    return o, (lses[0] if len(lses) == 1 else torch.cat(lses, 2))


def _ring_plan(attn: CompiledAttention, q: torch.Tensor, k: torch.Tensor, layout: str,
               plan: Sharding, rank: int, runtime: dict[str, Any]) -> tuple[Any, str | None]:
    """(the ring's schedule of computed pairs, None) or (None, why it cannot be made): the
    tile counts read the runtime values, so a bad one is this rank's error, reported through
    the agreement like a bad shape."""
    seq, head = _SEQ_DIM[layout], _HEAD_DIM[layout]
    sink = attn.spec.normaliser.sink
    if sink is not None:  # added after the merge, one value per query head
        values = runtime.get(sink.name, sink.tensor)
        if not isinstance(values, torch.Tensor) or values.shape != (q.shape[head],):
            got = (f"shape {list(values.shape)}" if isinstance(values, torch.Tensor)
                   else type(values).__name__)
            return None, (f"{sink.name}: the ring adds the sink after its merge and needs one "
                          f"value per query head, shape [{q.shape[head]}], got {got}")
    try:
        return plan_ring(attn.spec, q.shape[seq] * plan.world, plan, rank, q.shape[head],
                         k.shape[head], runtime), None
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        return None, f"the ring's tile counts: {type(e).__name__}: {e}"


def _all_to_all(attn: CompiledAttention, sharded: CompiledAttention, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, plan: Sharding, group: Any, rank: int,
                return_lse: bool, run: dict[str, Any], runtime: dict[str, Any]
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ulysses: sequence -> heads, the whole sequence for this rank's heads, heads -> sequence."""
    layout = run["layout"]
    seq, head = _SEQ_DIM[layout], _HEAD_DIM[layout]
    world = plan.world
    Hq, Hkv = q.shape[head], k.shape[head]
    first = rank * (Hq // world)  # this rank's first global query head
    values = dict(runtime)
    for name, which in head_names(sharded.spec).items():
        values[name] = (first, Hq, Hkv)[which]
    sink = attn.spec.normaliser.sink
    if sink is not None:  # the kernel reads sink[h] with the local h: hand it the rank's slice
        values[sink.name] = values.get(sink.name, sink.tensor).narrow(0, first, Hq // world)
    q_h, k_h, v_h = (sequence_to_heads(t, plan, group, seq, head) for t in (q, k, v))
    o_h, lse_h = sharded(q_h, k_h, v_h, return_lse=True, **run, **values)
    o = heads_to_sequence(o_h, plan, group, seq, head)
    if not return_lse:
        return o
    return o, heads_to_sequence(lse_h, plan, group, 2, 1)
