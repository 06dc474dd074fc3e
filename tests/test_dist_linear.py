"""attncc.dist.context_parallel_linear (docs/context_parallel.md): linear recurrences by state
passing over torch.distributed, in 2 gloo processes on the CPU (Triton interpreter), against the
single-process fp64 spec loop of the whole sequence (tests/dist_linear_cases.py: o of each
rank's slice, the final state on every rank, the gradients of q, k, v, g, beta and of the
initial state). One sequence: L1 (elu1, normalised), L2, L3, L5, L6 (with and without an
initial state), L4 (with one). Varlen (packed, the whole batch's cu_seqlens on every rank):
L2, L3, L5, L6 with a sequence crossing the shard edge (with and without initial states), and
with a boundary exactly at the edge plus empty sequences there and at both ends (with them);
L1 and L4 crossing; L6 without return_state (no all-reduce of the final states).

One spawn runs every case, as tests/test_dist.py. Tolerance (max abs error / max(1, max
|reference|)): fp32 1e-4, as tests/test_linear_backward.py. Bad inputs raise on EVERY rank
before the exchange of states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.ir.linear import LinearState

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build",
                allow_module_level=True)

from tests.dist_linear_cases import expected, run_linear_case  # noqa: E402
from tests.dist_support import run_rank, spawn_ranks, try_calls  # noqa: E402

WORLD = 2
TOL = 1e-4
DEADLINE_S = 240  # a hang fails the test instead of blocking the run
L, H, D = 40, 1, 16  # 20 tokens per rank: a partial chunk of the kernels
# sequence 1 crosses the shard edge at 20
CROSS = [0, 7, 31, 40]
# a boundary exactly at the edge, an empty sequence there, empty sequences at 0 and at the end
EDGE = [0, 0, 13, 20, 20, 33, 40, 40]

# name: (rule, with an initial state, cu_seqlens or None, return_state)
CASES = {f"{r}{'-s0' if s0 else ''}": (r, s0, None, True) for r in ("L2", "L3", "L5", "L6")
         for s0 in (False, True)}
CASES["L4-s0"] = ("L4", True, None, True)
CASES["L1"] = ("L1", False, None, True)  # elu1 and the normaliser: o is not linear in the state
for _r in ("L2", "L3", "L5", "L6"):
    CASES[f"{_r}-varlen-cross"] = (_r, False, CROSS, True)
    CASES[f"{_r}-varlen-cross-s0"] = (_r, True, CROSS, True)
    CASES[f"{_r}-varlen-edge-s0"] = (_r, True, EDGE, True)
CASES["L1-varlen-cross"] = ("L1", False, CROSS, True)
CASES["L4-varlen-cross-s0"] = ("L4", True, CROSS, True)
CASES["L6-varlen-cross-s0-no-state"] = ("L6", True, CROSS, False)


def _run_case(name, rank, group):
    return run_linear_case(CASES[name], rank, WORLD, group, L, H, D)


def _bad_inputs(rank, group):
    """Each bad input must raise on every rank, before the exchange of states."""
    attn = attncc.compile(attncc.Attention(memory=LinearState("gated_delta")))
    q = F.normalize(torch.randn(1, 2, 32, D), dim=-1)
    g, beta = -torch.rand(1, 2, 32), torch.rand(1, 2, 32)
    cp = attncc.dist.context_parallel_linear
    s0 = torch.zeros(1, 2, D, D)
    qp, gp, bp = q[0].transpose(0, 1), g[0].T, beta[0].T  # packed [32, 2, ...] per rank
    cu, sp = torch.tensor([0, 10, 40, 64]), torch.zeros(3, 2, D, D)
    cases = {
        # an initial state on rank 1 (rank 0 learns it by the exchange of shapes)
        "state-off-rank-0": lambda: cp(attn, q, q, q, g=g, beta=beta, group=group,
                                       initial_state=s0 if rank else None),
        # rank 1 holds more tokens than rank 0
        "mismatch": lambda: cp(attn, *(F.normalize(torch.randn(1, 2, 32 + 8 * rank, D),
                                                   dim=-1),) * 3,
                               g=-torch.rand(1, 2, 32 + 8 * rank),
                               beta=torch.rand(1, 2, 32 + 8 * rank), group=group),
        # no beta for a delta rule
        "missing-beta": lambda: cp(attn, q, q, q, g=g, group=group),
        # varlen: rank 1 packs its sequences differently
        "varlen-cu-differs": lambda: cp(attn, qp, qp, qp, g=gp, beta=bp, group=group,
                                        cu_seqlens=torch.tensor([0, 10 + rank, 64])),
        # varlen: the cu_seqlens of one rank's tokens, not of the whole batch (2 x 32)
        "varlen-cu-local": lambda: cp(attn, qp, qp, qp, g=gp, beta=bp, group=group,
                                      cu_seqlens=torch.tensor([0, 10, 32])),
        # varlen: initial states on rank 0 only (varlen takes them on every rank)
        "varlen-state-rank-0": lambda: cp(attn, qp, qp, qp, g=gp, beta=bp, group=group,
                                          cu_seqlens=cu, initial_state=None if rank else sp),
        # varlen: one initial state for three sequences
        "varlen-state-shape": lambda: cp(attn, qp, qp, qp, g=gp, beta=bp, group=group,
                                         cu_seqlens=cu, initial_state=sp[:1]),
        # varlen: return_state on rank 0 only (it adds a collective)
        "varlen-return-state": lambda: cp(attn, qp, qp, qp, g=gp, beta=bp, group=group,
                                          cu_seqlens=cu, return_state=rank == 0),
        # varlen on rank 0 only
        "varlen-one-rank": lambda: cp(attn, *((q,) * 3 if rank else (qp,) * 3),
                                      g=g if rank else gp, beta=beta if rank else bp,
                                      group=group, cu_seqlens=None if rank else cu),
        # varlen: [B, H, L, D] tokens with cu_seqlens
        "varlen-not-packed": lambda: cp(attn, q, q, q, g=g, beta=beta, group=group,
                                        cu_seqlens=cu),
        "L7": lambda: cp(attncc.compile(attncc.Attention(memory=LinearState(
            "block_causal", block=4))), q, q, q, group=group),
    }
    return try_calls(cases, group)


def _worker(rank, init_file, out_dir):
    run_rank(rank, WORLD, init_file, out_dir, CASES, _run_case, _bad_inputs)


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_worker, WORLD, DEADLINE_S)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_whole_sequence(results, name):
    rule, with_s0, cu, return_state = CASES[name]
    for rank, res in enumerate(results):
        case = res[name]
        assert "exception" not in case, f"rank {rank}:\n{case['exception']}"
        want = expected(rule, with_s0, cu is not None, return_state, rank)
        assert set(case["errors"]) == want, (rank, sorted(case["errors"]))
        for what, err in case["errors"].items():
            assert err < TOL, f"rank {rank} {name}: {what} error {err:.2e} > {TOL}"


BAD = {
    "state-off-rank-0": ("ValueError", "pass it on rank 0 only"),
    "mismatch": ("ValueError", "ranks hold different q, v shapes"),
    "missing-beta": ("ValueError", "beta"),
    "varlen-cu-differs": ("ValueError", "ranks pass different cu_seqlens (checksum"),
    "varlen-cu-local": ("ValueError", "ending at T = W x (tokens per rank) = 2 x 32 = 64"),
    "varlen-state-rank-0": ("ValueError", "ranks pass different initial_state (varlen: given on "
                                          "every rank or none)"),
    "varlen-state-shape": ("ValueError", "initial_state: expected shape [N, H, F, Dv']"),
    "varlen-return-state": ("ValueError", "ranks pass different return_state (varlen)"),
    "varlen-one-rank": ("ValueError", "ranks hold different q, v shapes"),
    "varlen-not-packed": ("ValueError", "expected this rank's packed tokens [T / W, H, Dk]"),
    "L7": ("ValueError", "not supported yet"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_on_every_rank(results, name):
    kind, text = BAD[name]
    for rank, res in enumerate(results):
        got = res["bad-inputs"][name]
        assert got.startswith(kind), f"rank {rank}: {got}"
        want = "rank(s) [1] rejected their inputs" if name == "state-off-rank-0" and rank == 0 \
            else text
        assert want in got, f"rank {rank}: {got}"
        assert res["bad-inputs"]["after"] == f"all_reduce {float(WORLD)}", rank


def test_requires_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    attn = attncc.compile(attncc.Attention(memory=LinearState("decay", decay=0.9)))
    q = torch.randn(1, 1, 8, D)
    with pytest.raises(RuntimeError, match="not initialised"):
        attncc.dist.context_parallel_linear(attn, q, q, q)
