"""Softmax context parallelism by a ring of key/value chunks (strategy="ring";
docs/context_parallel.md).

Rank r holds its chunks of q, k, v (a `Sharding`). In W steps the ranks pass their K/V chunks
to the next rank (`attncc.dist.collectives.ring_shift`, point-to-point), so that at step s rank
r holds the keys and values of rank r - s. The next transfer is posted BEFORE the step's
compute, so that it travels while the rank computes where the backend overlaps them. At each
step, each of the rank's query chunks attends to each key chunk it holds, both at their global
positions: the spec is rewritten once by `attncc.ir.shard.at_pair_offset` (q_idx, kv_idx at
runtime offsets, Lq and Lk the whole length), so one kernel serves every pair. Each pair gives
(o_j, lse_j); the rank's rows are their LSE merge (`attncc.ops.merge`, catalog Section 0). A
sink normaliser is applied once, after the merge, as the reference does.

Skipped pairs: a (query chunk, key chunk) pair whose tiles are all empty (`chunk_tiles` of the
whole-sequence spec with this call's runtime values, at tiles of up to 64 that divide a chunk;
every head for a mask that reads the head) is not computed. With contiguous causal shards rank
r computes r + 1 of its W pairs; with head-tail shards every rank computes 2W + 1 of its 4W
chunk pairs (balanced). A skipped pair still forwards its chunk: every rank runs the same
point-to-point operations in the same order. A mask that reads the batch index computes every
pair (the tile counts are per batch 0).

Backward (exact): `_Ring.backward` rotates (k, v) again, and with them the accumulators of dk
and dv of the chunk each rank holds; after W hops they are home. Each computed pair's partial
attention is recomputed under autograd on the compiled attention's own differentiable call, and
the upstream gradients are mapped through the merge: with o = sum_j w_j o_j and
w_j = exp(lse_j - lse), d o_j = w_j do and d lse_j = w_j (dlse + sum_d do (o_j - o)). So the
backward holds one K/V chunk at a time, never the whole sequence; it costs one more forward of
every computed pair. Captured tensors that require grad get each rank's gradient from its own
query rows (as under the all-gather).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from attncc.dist.collectives import ring_shift
from attncc.ir.nodes import Normaliser
from attncc.ir.shard import at_pair_offset, pair_names
from attncc.ir.symbols import B_IDX, H_IDX, HKV, HQ
from attncc.ir.tiles import FULL, PARTIAL
from attncc.ops.merge import merge_pair
from attncc.ops.softmax.compiled import CompiledAttention
from attncc.passes.shard_pairs import Sharding, chunk_tiles

__all__ = ["RingPlan", "computed_pairs", "pair_attention", "plan_ring", "ring_attention"]

# the compiled attention of a (query chunk, key chunk) pair, one per CompiledAttention
_PAIRS: "weakref.WeakKeyDictionary[CompiledAttention, CompiledAttention]" = (
    weakref.WeakKeyDictionary())
_KV_TAG, _GRAD_TAG = 0, 2  # tags of the two shifts that may be in flight in the backward


def pair_attention(attn: CompiledAttention) -> CompiledAttention:
    """The compiled attention at pair offsets, without the sink (applied after the merge)."""
    hit = _PAIRS.get(attn)
    if hit is None:
        spec = attn.spec.replace(normaliser=Normaliser())
        hit = CompiledAttention(at_pair_offset(spec), attn.backend)
        _PAIRS[attn] = hit
    return hit


@dataclass(frozen=True)
class RingPlan:
    """`steps[s]`: the (local query chunk, local key chunk of rank r - s) pairs rank r computes
    at step s; `size`: tokens per chunk; `L`: the whole sequence's length."""

    sharding: Sharding
    rank: int
    size: int
    L: int
    steps: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def computed(self) -> int:
        return sum(len(step) for step in self.steps)


def _nonempty(spec: Any, L: int, sharding: Sharding, Hq: int, Hkv: int,
              runtime: dict[str, Any]) -> torch.Tensor:
    """bool[C, C]: whether (query chunk, key chunk) holds an allowed position."""
    C = sharding.n_chunks
    read = spec.mask.expr.free_symbols if spec.mask is not None else set()
    if spec.mask is None or B_IDX in read:
        return torch.ones(C, C, dtype=torch.bool)
    block = math.gcd(L // C, 64)
    params = {p.name: runtime.get(p.name, p.value) for p in spec.params}
    tensors = {c.name: runtime.get(c.name, c.tensor) for c in spec.captures}
    heads = range(Hq) if read & {H_IDX, HQ, HKV} else range(1)
    out = torch.zeros(C, C, dtype=torch.bool)
    for h in heads:
        counts = chunk_tiles(spec, L, C, block_m=block, block_n=block, Hq=Hq, Hkv=Hkv, h=h,
                             params=params, tensors=tensors).counts
        out |= (counts[..., PARTIAL] + counts[..., FULL]) > 0
    return out


def plan_ring(spec: Any, L: int, sharding: Sharding, rank: int, Hq: int = 1, Hkv: int = 1,
              runtime: dict[str, Any] | None = None) -> RingPlan:
    """Which pairs rank `rank` computes at each step of the ring over `sharding` for `spec` at
    length L (runtime values: the call's)."""
    nonempty = _nonempty(spec, L, sharding, Hq, Hkv, dict(runtime or {}))
    world, mine = sharding.world, sharding.chunks[rank]
    steps = []
    for s in range(world):
        theirs = sharding.chunks[(rank - s) % world]
        steps.append(tuple((i, j) for i, qc in enumerate(mine) for j, kc in enumerate(theirs)
                           if nonempty[qc, kc]))
    return RingPlan(sharding, rank, L // sharding.n_chunks, L, tuple(steps))


def computed_pairs(spec: Any, L: int, sharding: Sharding, **kwargs: Any) -> list[int]:
    """Chunk pairs each rank computes over the whole ring (no process group needed)."""
    return [plan_ring(spec, L, sharding, r, **kwargs).computed for r in range(sharding.world)]


class _Call:
    """One pair's call: the pair attention, its offset names and the call's fixed arguments."""

    def __init__(self, pair: CompiledAttention, plan: RingPlan, run: dict[str, Any],
                 runtime: dict[str, Any], grad_names: tuple[str, ...]) -> None:
        self.pair, self.plan, self.run, self.runtime = pair, plan, run, runtime
        self.names = pair_names(pair.spec)
        self.grad_names = grad_names

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int, j: int,
                 src: int, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        plan, n = self.plan, self.plan.size
        where = (plan.sharding.chunks[plan.rank][i] * n, plan.sharding.chunks[src][j] * n,
                 plan.L)
        offsets = {name: where[which] for name, which in self.names.items()}
        return self.pair(q.narrow(2, i * n, n), k.narrow(2, j * n, n), v.narrow(2, j * n, n),
                         return_lse=True, **self.run, **offsets, **self.runtime,
                         **dict(zip(self.grad_names, grads)))


def _weights(lse_j: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(lse_j - lse), 0 on rows empty everywhere (lse = -inf)."""
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    return torch.where(finite, torch.exp(lse_j - safe), torch.zeros_like(lse))


class _Ring(torch.autograd.Function):
    """(q, k, v, *captured tensors that require grad) -> (o, lse) of the rank's rows, merged in
    the accumulation dtype (fp32, fp64 for fp64 inputs), without the sink."""

    @staticmethod
    def forward(ctx: Any, call: _Call, group: Any, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, *grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan, n = call.plan, call.plan.size
        rank, world = plan.rank, plan.sharding.world
        acc = torch.promote_types(q.dtype, torch.float32)
        B, Hq, Dv = q.shape[0], q.shape[1], v.shape[3]
        o = [torch.zeros(B, Hq, n, Dv, dtype=acc, device=q.device)
             for _ in plan.sharding.chunks[rank]]
        lse = [torch.full((B, Hq, n), -math.inf, dtype=acc, device=q.device) for _ in o]
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for s in range(world):
            # post the next hop before computing: the chunk travels during the compute
            arriving = ring_shift([k_cur, v_cur], group, _KV_TAG) if s < world - 1 else None
            for i, j in plan.steps[s]:
                o_j, lse_j = call(q, k_cur, v_cur, i, j, (rank - s) % world, grads)
                o[i], lse[i] = merge_pair(o[i], lse[i], o_j.to(acc), lse_j.to(acc))
            if arriving is not None:
                k_cur, v_cur = arriving()
        o_all, lse_all = torch.cat(o, 2), torch.cat(lse, 2)
        ctx.call, ctx.group = call, group
        ctx.save_for_backward(q, k, v, o_all, lse_all, *grads)
        return o_all, lse_all

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor, dlse: torch.Tensor) -> tuple[Any, ...]:
        call, group = ctx.call, ctx.group
        q, k, v, o, lse, *grads = ctx.saved_tensors
        plan, n = call.plan, call.plan.size
        rank, world = plan.rank, plan.sharding.world
        acc = o.dtype
        do, dlse = do.to(acc), dlse.to(acc)
        dq = torch.zeros_like(q, dtype=acc)
        d_grads = [torch.zeros_like(t) for t in grads]
        k_cur, v_cur = k.contiguous(), v.contiguous()
        home = None  # the shift carrying the accumulators of the chunk held next
        for s in range(world):
            arriving = ring_shift([k_cur, v_cur], group, _KV_TAG) if s < world - 1 else None
            dk = torch.zeros_like(k_cur, dtype=acc)
            dv = torch.zeros_like(v_cur, dtype=acc)
            for i, j in plan.steps[s]:
                rows = slice(i * n, (i + 1) * n)
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in (q, k_cur, v_cur, *grads)]
                    o_j, lse_j = call(*leaves[:3], i, j, (rank - s) % world, tuple(leaves[3:]))
                    w = _weights(lse_j.to(acc), lse[:, :, rows])
                    do_i = do[:, :, rows]
                    g_o = w[..., None] * do_i
                    spread = (do_i * (o_j.to(acc) - o[:, :, rows])).sum(-1)
                    g_lse = w * (dlse[:, :, rows] + spread)
                    got = torch.autograd.grad((o_j, lse_j), leaves,
                                              (g_o.to(o_j.dtype), g_lse.to(lse_j.dtype)),
                                              allow_unused=True)
                for total, g in zip((dq, dk, dv, *d_grads), got):
                    if g is not None:
                        total += g
            if home is not None:  # the accumulators of this chunk, from the ranks before
                dk_in, dv_in = home()
                dk, dv = dk + dk_in, dv + dv_in
            home = ring_shift([dk, dv], group, _GRAD_TAG)
            if arriving is not None:
                k_cur, v_cur = arriving()
        dk, dv = home()  # the chunk this rank holds the keys of, back from its W hops
        return (None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                *(g.to(t.dtype) for g, t in zip(d_grads, grads)))


def ring_attention(attn: CompiledAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   plan: RingPlan, group: Any, run: dict[str, Any], runtime: dict[str, Any]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o in q's dtype, lse fp32) of this rank's rows; q, k, v in "bhsd", this rank's chunks in
    storage order. `run`: scale and backend; `runtime`: the call's runtime values."""
    pair = pair_attention(attn)
    sink = attn.spec.normaliser.sink
    values = dict(runtime)
    sink_tensor = values.pop(sink.name, sink.tensor) if sink is not None else None
    tensors = {c.name: values.get(c.name, c.tensor) for c in pair.spec.captures}
    grad_names = tuple(name for name, t in tensors.items()
                       if isinstance(t, torch.Tensor) and t.requires_grad)
    fixed = {name: value for name, value in values.items() if name not in grad_names}
    call = _Call(pair, plan, {**run, "layout": "bhsd"}, fixed, grad_names)
    o, lse = _Ring.apply(call, group, q, k, v, *(tensors[name] for name in grad_names))
    if sink_tensor is not None:  # the sink counts once, not once per pair
        total = torch.logaddexp(lse, sink_tensor.to(lse.dtype).view(1, -1, 1).expand_as(lse))
        o = o * torch.exp(lse - total)[..., None]
        lse = total
    return o.to(q.dtype), lse.float()
