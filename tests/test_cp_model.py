"""The context-parallel scaling model (benchmarks/cp_model.py): FLOPs conserved and exact for
causal, monotone in length, world size, bandwidth and efficiency, all-to-all refused with a clear
error when heads do not split, and the CLI."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from benchmarks import cp_model
from benchmarks.cp_model import Hardware, Shape, strategies

K = 1024


def by_name(found):
    return {s.name: s for s in found}


def test_causal_flops_are_the_computed_tiles():
    """W = 1: every query tile m of 128 rows visits 2(m + 1) kv tiles of 64 (sm_90 bf16 d128)."""
    shape = Shape(L=16 * K, world=1, heads=4, kv_heads=2, head_dim=128)
    n_m = shape.L // 128
    expected = 4 * 128 * 64 * 128 * 4 * n_m * (n_m + 1)
    for s in strategies("causal", shape):
        assert s.flops_per_rank == expected, s


@pytest.mark.parametrize("spec", ["causal", "sliding-window", "full", "document"])
def test_flops_are_conserved_and_balanced(spec):
    """The busiest rank holds at least 1 / W of the single-GPU work, within 5% for these
    masks once balanced (head-tail, greedy)."""
    base = Shape(L=256 * K, world=1, heads=8, kv_heads=8, head_dim=64)
    total = by_name(strategies(spec, base))["ring"].flops_per_rank
    for w in (2, 4, 8):
        found = by_name(strategies(spec, replace(base, world=w)))
        for name in ("ring", "all-gather", "p2p non-empty", "all-to-all"):
            busiest = found[name].flops_per_rank
            assert total / w <= busiest <= 1.05 * total / w, (name, w, busiest * w / total)


def test_monotone():
    hw = Hardware()
    base = Shape(L=64 * K, world=8, heads=32, kv_heads=8, head_dim=128)
    for spec in ("causal", "gated-delta", "linear-attention"):
        times = [by_name(strategies(spec, replace(base, L=L))) for L in (64 * K, 128 * K, 256 * K)]
        for name in times[0]:
            assert times[0][name].seconds < times[1][name].seconds < times[2][name].seconds, name
        flops = [min(s.flops_per_rank for s in strategies(spec, replace(base, world=w)))
                 for w in (2, 4, 8, 16)]
        assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
        slow = by_name(strategies(spec, replace(base, world=32), replace(hw, ib=hw.ib / 4)))
        fast = by_name(strategies(spec, replace(base, world=32), hw))
        lazy = by_name(strategies(spec, replace(base, world=32), replace(hw, efficiency=0.3)))
        for name, s in fast.items():  # hidden communication may leave a time unchanged
            assert s.seconds <= slow[name].seconds and s.seconds < lazy[name].seconds, name
        assert any(s.seconds < slow[name].seconds for name, s in fast.items())


def test_ring_overlaps_and_pays_for_bytes():
    """Compute-bound ring: step time is the compute (bandwidth does not matter); tiny shards on
    many GPUs: the ring is bound by its W - 1 sends."""
    hw = Hardware()
    big = Shape(L=256 * K, world=8, heads=32, kv_heads=8, head_dim=128)
    ring = by_name(strategies("causal", big))["ring"]
    assert ring.seconds == pytest.approx(ring.flops_per_rank / hw.flops_per_s("bfloat16"),
                                         rel=0.02)
    small = Shape(L=16 * K, world=64, heads=32, kv_heads=8, head_dim=128)
    ring = by_name(strategies("causal", small))["ring"]
    kv_shard = 2 * small.tokens * 8 * 128 * 2
    assert ring.bytes_per_rank == 63 * kv_shard
    assert ring.seconds >= 63 * (hw.latency_ib + kv_shard / hw.ib)


def test_p2p_skips_empty_shard_pairs():
    """Documents of 64K tokens on shards of 16K: a rank needs the kv of at most its document's
    other shards, not the W - 1 shards a ring or an all-gather moves."""
    hw = Hardware()
    shape = Shape(L=512 * K, world=32, heads=32, kv_heads=8, head_dim=128)
    found = by_name(strategies("document", shape, hw))
    kv_shard = 2 * shape.tokens * 8 * 128 * 2
    p2p = found["p2p non-empty"]
    assert p2p.bytes_per_rank < found["ring"].bytes_per_rank
    spec = cp_model.SPECS["document"](shape.L)
    sharding, tiles = cp_model.shardings(spec, shape)[0]
    assert sharding.name == "contiguous"
    assert cp_model.selective(sharding, tiles, shape, hw).bytes_per_rank == 3 * kv_shard
    assert p2p.seconds < found["ring"].seconds and p2p.seconds < found["all-gather"].seconds
    assert p2p.seconds >= p2p.flops_per_rank / hw.flops_per_s("bfloat16")
    full = by_name(strategies("full", shape, hw))["p2p non-empty"]  # every pair has work
    assert full.bytes_per_rank == 31 * kv_shard


def test_ulysses_refused_when_heads_do_not_split():
    with pytest.raises(ValueError, match="world size 64 must divide the 32 query heads"):
        cp_model.ulysses_kv_heads(Shape(L=64 * K, world=64, heads=32, kv_heads=8))
    with pytest.raises(ValueError, match="6 kv heads can neither be split"):
        cp_model.ulysses_kv_heads(Shape(L=64 * K, world=4, heads=24, kv_heads=6))
    assert cp_model.ulysses_kv_heads(Shape(L=64 * K, world=16, heads=32, kv_heads=8)) == 16
    a2a = by_name(strategies("causal", Shape(L=64 * K, world=64, heads=32, kv_heads=8)))
    assert math.isinf(a2a["all-to-all"].seconds) and "32 query heads" in a2a["all-to-all"].note
    assert cp_model.fastest(list(a2a.values())).name != "all-to-all"


def test_linear_state_passing_bytes():
    shape = Shape(L=256 * K, world=16, heads=8, kv_heads=8, head_dim=64)
    found = by_name(strategies("gated-delta", shape))
    map_bytes = 8 * 4 * (64 * 64 + 64 * 64)  # (M, U) per head, fp32
    assert found["LASP-2 all-gather"].bytes_per_rank == 15 * map_bytes
    assert found["prefix scan"].bytes_per_rank == 4 * map_bytes  # log2(16) rounds
    assert found["ring (LASP-1)"].bytes_per_rank == 8 * 4 * 64 * 64


def test_linear_exchange_overlaps_the_outputs():
    """The exchange hides behind the intra-chunk outputs when it is shorter, else adds to them;
    LASP-2's one all-gather beats LASP-1's W - 1 dependent hops for L3 (its paper's setting)."""
    hw = Hardware()
    shape = Shape(L=2048 * K, world=64, heads=32, kv_heads=32, head_dim=128)
    found = by_name(strategies("linear-attention", shape))
    assert found["LASP-2 all-gather"].seconds < found["ring (LASP-1)"].seconds
    rule = cp_model.linear_rule("linear-attention", shape)

    def floor(shape):  # the rank's own FLOPs, nothing else
        work = rule.map_part + rule.transition + rule.output_part + rule.correction
        return shape.tokens * shape.heads * work / hw.flops_per_s("bfloat16")

    for s in found.values():
        assert math.isinf(s.seconds) or s.seconds >= floor(shape)
    one_node = replace(shape, L=512 * K, world=8)
    scan = by_name(strategies("linear-attention", one_node))["prefix scan"].seconds
    assert scan == pytest.approx(floor(one_node) + hw.step_overhead, rel=1e-3)  # fully hidden


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="spec: expected one of"):
        strategies("hilbert", Shape(L=64 * K, world=8))
    with pytest.raises(ValueError, match="kv heads"):
        Shape(L=64 * K, world=8, heads=32, kv_heads=5)
    with pytest.raises(ValueError, match="multiple of chunks"):
        strategies("causal", Shape(L=1000, world=8))


def test_cli(capsys):
    assert cp_model.main(["--spec", "causal", "--L", str(32 * K), "--world", "64"]) == 0
    out = capsys.readouterr().out
    assert "refused: all-to-all (Ulysses)" in out and "fastest: " in out
    assert cp_model.main(["--spec", "gated-delta", "--L", str(32 * K), "--world", "4"]) == 0
    assert "LASP-2 all-gather" in capsys.readouterr().out
