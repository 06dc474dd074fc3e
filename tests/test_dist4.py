"""attncc.dist at world size 4 (docs/context_parallel.md): the three softmax strategies,
all-gather of K and V, all-to-all between sequence and heads (Ulysses) and the ring of K/V
chunks (causal contiguous and head-tail, documents crossing shards, GQA with a sink), and linear
recurrences by state passing, in 4 gloo processes on the CPU (Triton interpreter), against the
single-process fp64 reference of the whole sequence: o, lse and dq, dk, dv of each rank's slice
(linear: o, the final state, the gradients of q, k, v, g, beta and the initial state,
tests/dist_linear_cases.py: L2, L3, L5, L6 with and without an initial state; varlen L6 with a
sequence over 3 ranks and L3 with one over all 4, so that ranks lying inside one sequence hand
on its transition). Tiny shapes (L = 64, d = 16, fp32): 4 processes share the CPU with
everything else.

One spawn runs every case; each test reads its case's result. Tolerance: fp32 1e-4 of
max(1, max |reference|), as tests/test_dist.py. Bad inputs raise on EVERY rank before any
collective of the attention (the spawn has a deadline, so a hang fails instead of blocking).
The all-to-all cases put one or two heads on each rank, so a head-dependent spec that read
local head indices (ALiBi slopes, per-head mask classes, sinks) would be wrong on ranks 1-3.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.ir.shard import at_head_offset, head_names
from attncc.ops.softmax.compiled import CompiledAttention

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build",
                allow_module_level=True)

from tests.dist_linear_cases import expected, run_linear_case  # noqa: E402
from tests.dist_support import run_rank, spawn_ranks, try_calls  # noqa: E402

WORLD = 4
L, D = 64, 16
TOL = 1e-4
DEADLINE_S = 300  # a hang fails the test instead of blocking the run
HEAD_CLASS = [0, 1, 1, 0]  # M18: heads 0 and 3 causal, 1 and 2 streaming


def _spec(name):
    if name == "causal":
        return attncc.Attention(mask=attncc.causal())
    if name == "document":  # documents of 21, 26 and 17 tokens cross the 16-token shards
        return attncc.Attention(mask=attncc.document(
            torch.tensor([0] * 21 + [1] * 26 + [2] * 17)))
    if name == "per-head-alibi":
        return attncc.Attention(mask=attncc.per_head_classes(
            torch.tensor(HEAD_CLASS, dtype=torch.int32), sinks=2, window=8), score=attncc.alibi())
    if name == "hilberta":  # M15 on an 8 x 8 grid in Hilbert order (R1)
        return attncc.Attention(mask=attncc.hilberta(8, 8, 16, 8, 2),
                                reorder=attncc.hilbert((8, 8)))
    if name in ("gqa-sink", "gqa-sink-4"):  # a sink value per query head: 8 or 4 of them
        return attncc.Attention(mask=attncc.causal(), normaliser=attncc.sink(
            torch.linspace(-1.0, 1.0, 8 if name == "gqa-sink" else 4)))
    raise KeyError(name)


# name: (spec, strategy, sharding, Hq, Hkv, layout)
CASES = {
    "causal-all_gather-head-tail": ("causal", "all_gather", "head-tail", 1, 1, "bhsd"),
    "document-all_gather-contiguous": ("document", "all_gather", "contiguous", 1, 1, "bhsd"),
    "causal-all_to_all-contiguous": ("causal", "all_to_all", "contiguous", 4, 4, "bhsd"),
    "per-head-alibi-all_to_all-head-tail": ("per-head-alibi", "all_to_all", "head-tail", 4, 4,
                                            "bhsd"),
    "hilberta-all_to_all-contiguous": ("hilberta", "all_to_all", "contiguous", 4, 4, "bhsd"),
    "gqa-sink-all_to_all-bshd": ("gqa-sink", "all_to_all", "contiguous", 8, 4, "bshd"),
    # the ring: 4 hops, causal pairs skipped (contiguous: rank r computes r + 1 of 4)
    "causal-ring-contiguous": ("causal", "ring", "contiguous", 1, 1, "bhsd"),
    "causal-ring-head-tail": ("causal", "ring", "head-tail", 1, 1, "bhsd"),
    "document-ring-contiguous": ("document", "ring", "contiguous", 1, 1, "bhsd"),
    "gqa-sink-ring-head-tail-bshd": ("gqa-sink-4", "ring", "head-tail", 4, 2, "bshd"),
}
# linear recurrences, name: (rule, with an initial state, cu_seqlens or None, return_state)
LINEAR = {f"linear-{r}{'-s0' if s0 else ''}": (r, s0, None, True)
          for r in ("L2", "L3", "L5", "L6") for s0 in (False, True)}
# 16 tokens per rank: [16, 53) starts at rank 1's edge, lies over rank 2 and ends in rank 3;
# rank 0 holds three sequences, an empty one at its end
LINEAR["linear-L6-varlen-s0"] = ("L6", True, [0, 5, 16, 16, 53, 64], True)
LINEAR["linear-L3-varlen"] = ("L3", False, [0, 3, 61, 64], True)  # ranks 1, 2 inside one


def _run_case(name, rank, group):
    if name in LINEAR:
        return run_linear_case(LINEAR[name], rank, WORLD, group, L, 1, D)
    spec_name, strategy, sharding_name, Hq, Hkv, layout = CASES[name]
    spec = _spec(spec_name)
    sharding = attncc.dist.sharding_for(sharding_name, WORLD)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    do = torch.randn(1, Hq, L, D, generator=g)
    dlse = torch.randn(1, Hq, L, generator=g)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = attention_reference(spec, *ref)
    ((o_ref * do.double()).sum() + (lse_ref * dlse.double()).sum()).backward()

    def mine_of(t):  # this rank's slice, in the call's layout
        part = attncc.dist.shard_sequence(t, sharding, rank)
        return part.transpose(1, 2) if layout == "bshd" and part.dim() == 4 else part

    mine = [mine_of(t).detach().requires_grad_() for t in (q, k, v)]
    o, lse = attncc.dist.context_parallel_attention(
        attncc.compile(spec), *mine, group=group, sharding=sharding, strategy=strategy,
        layout=layout, return_lse=True)
    ((o.double() * mine_of(do).double()).sum()
     + (lse.double() * attncc.dist.shard_sequence(dlse, sharding, rank).double()).sum()
     ).backward()
    errors = {}
    pairs = [("o", o, o_ref), ("lse", lse, lse_ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", mine, ref)]
    for what, got, full in pairs:
        want = (attncc.dist.shard_sequence(full.detach(), sharding, rank) if what == "lse"
                else mine_of(full.detach()))
        assert got.shape == want.shape, (what, got.shape, want.shape)
        errors[what] = ((got.double() - want).abs().max().item()
                        / max(1.0, want.abs().max().item()))
    return errors


def _bad_inputs(rank, group):
    """Each bad input must raise ValueError on every rank, before any collective but the
    agreement's."""
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    cp = attncc.dist.context_parallel_attention
    x = torch.randn(1, 2, 16, D)
    hilbert = attncc.compile(_spec("hilberta"))
    y = torch.randn(1, 4, 16, D)
    lin = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(decay=0.9)))
    z = torch.randn(16, 1, D)  # packed: this rank's 16 tokens
    cases = {
        # 2 heads do not split over 4 ranks
        "heads": lambda: cp(attn, x, x, x, group=group, strategy="all_to_all"),
        # GQA: 8 query heads split, 2 kv heads do not
        "kv-heads": lambda: cp(attn, torch.randn(1, 8, 16, D), x, x, group=group,
                               strategy="all_to_all"),
        # the all-gather needs positions of sharded queries, which a reorder takes away
        "reorder-all_gather": lambda: cp(hilbert, y, y, y, group=group, strategy="all_gather"),
        # "auto" with heads that do not divide falls back to the ring, which refuses
        "reorder-auto-heads": lambda: cp(hilbert, x, x, x, group=group),
        "strategy": lambda: cp(attn, y, y, y, group=group, strategy="rings"),
        # the ring needs the positions of sharded queries and keys, which a reorder takes away
        "reorder-ring": lambda: cp(hilbert, y, y, y, group=group, strategy="ring"),
        # varlen linear: rank 2 packs the batch differently
        "linear-cu-differs": lambda: attncc.dist.context_parallel_linear(
            lin, z, z, z, group=group, cu_seqlens=torch.tensor([0, 9 + (rank == 2), 64])),
    }
    return try_calls(cases, group)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # 4 processes on a small shared machine
    run_rank(rank, WORLD, init_file, out_dir, [*CASES, *LINEAR], _run_case, _bad_inputs)


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_worker, WORLD, DEADLINE_S)


@pytest.mark.parametrize("name", [*CASES, *LINEAR])
def test_matches_whole_sequence(results, name):
    for rank, res in enumerate(results):
        case = res[name]
        assert "exception" not in case, f"rank {rank}:\n{case['exception']}"
        if name in LINEAR:
            rule, with_s0, cu, return_state = LINEAR[name]
            want = expected(rule, with_s0, cu is not None, return_state, rank)
            assert set(case["errors"]) == want, (rank, sorted(case["errors"]))
        for what, err in case["errors"].items():
            assert err < TOL, f"rank {rank} {name}: {what} error {err:.2e} > {TOL}"


BAD = {
    "heads": "needs the world size to divide Hq = 2 and Hkv = 2",
    "kv-heads": "needs the world size to divide Hq = 8 and Hkv = 2",
    "reorder-all_gather": "is not supported yet",
    "reorder-auto-heads": "is not supported yet",
    "strategy": "strategy: expected one of",
    "reorder-ring": "is not supported yet",
    "linear-cu-differs": "ranks pass different cu_seqlens (checksum; -2: none) (by rank: [",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_on_every_rank(results, name):
    for rank, res in enumerate(results):
        got = res["bad-inputs"][name]
        assert got.startswith("ValueError"), f"rank {rank}: {got}"
        assert BAD[name] in got, f"rank {rank}: {got}"
        assert res["bad-inputs"]["after"] == f"all_reduce {float(WORLD)}", rank


def test_auto_chooses_all_to_all_where_heads_divide_else_the_ring():
    assert attncc.dist.choose_strategy(8, 4, 4) == "all_to_all"
    assert attncc.dist.choose_strategy(8, 2, 4) == "ring"  # kv heads do not split
    assert attncc.dist.choose_strategy(6, 6, 4) == "ring"


def test_head_offset_reads_global_heads():
    """A rank's head slice run by the rewritten spec equals those heads of the whole run; the
    spec as it is (local head indices) does not (one process, no group)."""
    attn = attncc.compile(_spec("per-head-alibi"))  # CPU tensors: interpreted (conftest)
    sharded = CompiledAttention(at_head_offset(attn.spec), attn.backend)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 32, D, generator=g) for _ in range(3))
    whole = attn(q, k, v)
    first = 2
    values = {n: (first, 4, 4)[i] for n, i in head_names(sharded.spec).items()}
    part = sharded(q[:, 2:], k[:, 2:], v[:, 2:], **values)
    assert sorted(values) == ["shard_head_offset", "shard_head_offset_s", "shard_hq_s"]
    torch.testing.assert_close(part, whole[:, 2:], rtol=0, atol=1e-5)
    assert (attn(q[:, 2:], k[:, 2:], v[:, 2:]) - whole[:, 2:]).abs().max() > 0.1
