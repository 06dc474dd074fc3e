"""attncc.dist.varlen (docs/context_parallel.md): the plan of a packed batch's contiguous shard
for varlen linear context parallelism, without processes. Hypothesis draws cu_seqlens (empty
sequences, boundaries at shard edges, sequences over many shards) and world sizes; the plans
of all ranks must cover every sequence exactly, own each one once (on the rank of its last
token), agree on who hands a state to whom, and read each initial state on one rank. Then a
scalar affine recurrence s = a s + b run by the plans (each rank's map, the fold over ranks,
the rerun from the state handed in, the final states of the owners) equals the one run
sequence by sequence.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from attncc.dist.varlen import ShardPlan, digest, owner, plan_shard


@st.composite
def batches(draw):
    """(cu_seqlens, world): T = world * length tokens cut at sorted points (repeats allowed)."""
    world = draw(st.integers(1, 5))
    length = draw(st.integers(1, 6))
    total = world * length
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=8)))
    return [0, *cuts, total], world


def _plans(cu, world):
    return [plan_shard(cu, r, world) for r in range(world)]


@settings(max_examples=300, deadline=None)
@given(batches())
def test_plans_cover_the_batch(batch):
    cu, world = batch
    length, n = cu[-1] // world, len(cu) - 1
    plans = _plans(cu, world)
    held = [0] * n  # tokens of each sequence over all ranks
    owned = []
    for r, p in enumerate(plans):
        assert p.local_cu[0] == 0 and p.local_cu[-1] == length and p.count >= 1
        assert all(x <= y for x, y in zip(p.local_cu, p.local_cu[1:]))
        for i in range(p.count):
            held[p.first + i] += p.local_cu[i + 1] - p.local_cu[i]
            # local boundaries are the global ones clipped to the shard
            lo, hi = cu[p.first + i], cu[p.first + i + 1]
            assert p.local_cu[i] == min(max(lo, r * length), (r + 1) * length) - r * length
            assert p.local_cu[i + 1] == min(max(hi, r * length), (r + 1) * length) - r * length
        owned += range(p.first, p.first + p.owned)
        assert all(owner(cu[m + 1], length) == r for m in range(p.first, p.first + p.owned))
        assert p.count == p.owned + p.crossing_out
        assert p.crossing_in == (r * length not in cu)
        assert p.crossing_out == ((r + 1) * length not in cu)
        if p.inside:
            assert p.owned == 0 and cu[p.first] < r * length and cu[p.first + 1] > (r + 1) * length
    assert held == [b - a for a, b in zip(cu, cu[1:])]
    assert owned == list(range(n))  # each sequence owned once, in order
    assert not plans[0].crossing_in and not plans[-1].crossing_out
    for left, right in zip(plans, plans[1:]):
        assert left.crossing_out == right.crossing_in
        if left.crossing_out:  # the same sequence goes on
            assert left.first + left.count - 1 == right.first
    starts = [m for p in plans for m in p.starts]
    assert starts == list(range(n))  # each initial state read on one rank


def _run(a, b, start):
    """The scalar recurrence s = a_t s + b_t from `start` over lists a, b: the final s."""
    s = start
    for at, bt in zip(a, b):
        s = at * s + bt
    return s


def _by_plans(cu, world, a, b, s0):
    """The final states of every sequence as context parallelism computes them."""
    length, n = cu[-1] // world, len(cu) - 1
    plans = _plans(cu, world)
    maps = []  # (M, U) each rank hands on
    for r, p in enumerate(plans):
        base = r * length
        if not p.crossing_out:
            maps.append((0.0, 0.0))
            continue
        lo, hi = p.local_cu[-2] + base, p.local_cu[-1] + base
        seg_a, seg_b = a[lo:hi], b[lo:hi]
        if p.inside:  # transition of the whole shard
            maps.append((_run(seg_a, [0.0] * len(seg_a), 1.0), _run(seg_a, seg_b, 0.0)))
        else:  # starts here from its own state
            maps.append((0.0, _run(seg_a, seg_b, s0[p.first + p.count - 1])))
    finals = [0.0] * n
    entering = 0.0
    for r, p in enumerate(plans):
        base = r * length
        for i in range(p.owned):
            m = p.first + i
            lo, hi = p.local_cu[i] + base, p.local_cu[i + 1] + base
            start = entering if (i == 0 and p.crossing_in) else s0[m]
            finals[m] = _run(a[lo:hi], b[lo:hi], start)
        M, U = maps[r]
        entering = M * entering + U
    return finals


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(0, 2**32 - 1))
def test_plans_run_the_recurrence(batch, seed):
    cu, world = batch
    rng = random.Random(seed)
    a = [rng.uniform(0.5, 1.0) for _ in range(cu[-1])]
    b = [rng.uniform(-1.0, 1.0) for _ in range(cu[-1])]
    s0 = [rng.uniform(-1.0, 1.0) for _ in range(len(cu) - 1)]
    want = [_run(a[x:y], b[x:y], s) for x, y, s in zip(cu, cu[1:], s0)]
    got = _by_plans(cu, world, a, b, s0)
    assert max(abs(x - y) for x, y in zip(got, want)) < 1e-9


def test_plan_of_a_sequence_over_three_ranks():
    # ranks hold 16 tokens: [16, 53) runs over ranks 1, 2 (inside it) and 3
    cu = [0, 5, 16, 16, 53, 64]
    assert _plans(cu, 4) == [
        ShardPlan(first=0, owned=3, local_cu=(0, 5, 16, 16), crossing_in=False,
                  crossing_out=False),
        ShardPlan(first=3, owned=0, local_cu=(0, 16), crossing_in=False, crossing_out=True),
        ShardPlan(first=3, owned=0, local_cu=(0, 16), crossing_in=True, crossing_out=True),
        ShardPlan(first=3, owned=2, local_cu=(0, 5, 16), crossing_in=True, crossing_out=False)]
    assert [p.inside for p in _plans(cu, 4)] == [False, False, True, False]
    assert [list(p.starts) for p in _plans(cu, 4)] == [[0, 1, 2], [3], [], [4]]


def test_digest_tells_packings_apart():
    assert digest([0, 10, 40]) == digest((0, 10, 40))
    assert len({digest(c) for c in ([0, 10, 40], [0, 11, 40], [0, 40], [0, 0, 40],
                                    [0, 40, 40])}) == 5
