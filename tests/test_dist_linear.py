"""attncc.dist.context_parallel_linear (docs/context_parallel.md): linear recurrences by state
passing over torch.distributed, in 2 gloo processes on the CPU (Triton interpreter), against the
single-process fp64 spec loop (`recurrent_reference`) of the whole sequence: o of each rank's
slice, the final state (on every rank) and the gradients of q, k, v, g, beta of the slice and of
the initial state (rank 0): L1 (elu1, normalised), L2, L3, L5, L6 (with and without an
initial state), L4 (with one).

One spawn runs every case, as tests/test_dist.py. The loss is sum(o * do) on every rank plus
sum(S_final * dS) on the last rank only (the final state is shared: its gradients add up over the
ranks that use it). Tolerance (max abs error / max(1, max |reference|)): fp32 1e-4, as
tests/test_linear_backward.py. Bad inputs raise on EVERY rank before the exchange of states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.ir.linear import LinearState

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build",
                allow_module_level=True)

from tests.dist_support import run_rank, spawn_ranks, try_calls  # noqa: E402

WORLD = 2
TOL = 1e-4
DEADLINE_S = 240  # a hang fails the test instead of blocking the run
L, H, D = 40, 1, 16  # 20 tokens per rank: a partial chunk of the kernels
CONTIGUOUS = attncc.dist.contiguous(WORLD)

RULES = {"L1": LinearState("linear", feature_map="elu1", normalize=True),
         "L2": LinearState("decay", decay=0.9), "L3": LinearState("scalar_gate"),
         "L4": LinearState("vector_gate"), "L5": LinearState("delta"),
         "L6": LinearState("gated_delta")}
# name: (rule, with an initial state)
CASES = {f"{r}{'-s0' if s0 else ''}": (r, s0) for r in ("L2", "L3", "L5", "L6")
         for s0 in (False, True)}
CASES["L4-s0"] = ("L4", True)
CASES["L1"] = ("L1", False)  # elu1 and the normaliser: o is not linear in the state


def _inputs(node, seed=0):
    """{name: tensor} of the whole sequence (B 1, H, L, D), do and dS; unit-norm keys for
    the delta rules, as their users have."""
    gen = torch.Generator().manual_seed(seed)
    x = {n: torch.randn(1, H, L, D, generator=gen) for n in "qkv"}
    if node.rule in ("delta", "gated_delta"):
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.rand(1, H, L, generator=gen)
    if node.rule in ("scalar_gate", "gated_delta"):
        x["g"] = -0.3 * torch.rand(1, H, L, generator=gen)
    if node.rule == "vector_gate":
        x["g"] = -0.3 * torch.rand(1, H, L, D, generator=gen)
    do = torch.randn(1, H, L, D, generator=gen)
    state = (1, H, node.feature_dim(D), node.state_dv(D))
    s0 = torch.randn(*state, generator=gen)
    ds = torch.randn(*state, generator=gen)
    return x, s0, do, ds


def _run_case(name, rank, group):
    rule, with_s0 = CASES[name]
    node = RULES[rule]
    x, s0, do, ds = _inputs(node)
    # the reference: fp64 autograd through the spec loop on the whole sequence
    ref = {n: t.double().requires_grad_() for n, t in x.items()}
    ref_s0 = s0.double().requires_grad_() if with_s0 else None
    o_ref, s_ref = recurrent_reference(ref["q"], ref["k"], ref["v"], node, g=ref.get("g"),
                                       beta=ref.get("beta"), initial_state=ref_s0,
                                       output_final_state=True)
    ((o_ref * do.double()).sum() + (s_ref * ds.double()).sum()).backward()
    # this rank's slice, run sharded
    mine = {n: attncc.dist.shard_sequence(t, CONTIGUOUS, rank).requires_grad_()
            for n, t in x.items()}
    s0_mine = s0.clone().requires_grad_() if with_s0 and rank == 0 else None
    attn = attncc.compile(attncc.Attention(memory=node))
    o, s = attncc.dist.context_parallel_linear(
        attn, mine["q"], mine["k"], mine["v"], g=mine.get("g"), beta=mine.get("beta"),
        group=group, initial_state=s0_mine, return_state=True)
    loss = (o.double() * attncc.dist.shard_sequence(do, CONTIGUOUS, rank).double()).sum()
    if rank == WORLD - 1:
        loss = loss + (s.double() * ds.double()).sum()
    loss.backward()
    pairs = [("o", o, attncc.dist.shard_sequence(o_ref.detach(), CONTIGUOUS, rank)),
             ("state", s, s_ref.detach())]
    pairs += [(f"d{n}", t.grad, attncc.dist.shard_sequence(ref[n].grad, CONTIGUOUS, rank))
              for n, t in mine.items()]
    if s0_mine is not None:
        pairs.append(("ds0", s0_mine.grad, ref_s0.grad))
    errors = {}
    for what, got, want in pairs:
        assert got is not None, f"{what}: no gradient"
        assert got.shape == want.shape, (what, got.shape, want.shape)
        errors[what] = ((got.double() - want).abs().max().item()
                        / max(1.0, want.abs().max().item()))
    return errors


def _bad_inputs(rank, group):
    """Each bad input must raise on every rank, before the exchange of states."""
    attn = attncc.compile(attncc.Attention(memory=LinearState("gated_delta")))
    q = F.normalize(torch.randn(1, 2, 32, D), dim=-1)
    g, beta = -torch.rand(1, 2, 32), torch.rand(1, 2, 32)
    cp = attncc.dist.context_parallel_linear
    s0 = torch.zeros(1, 2, D, D)
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
        "varlen": lambda: cp(attn, q[0].transpose(0, 1), q[0].transpose(0, 1),
                             q[0].transpose(0, 1), g=g[0].T, beta=beta[0].T, group=group,
                             cu_seqlens=torch.tensor([0, 10, 32])),
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
    for rank, res in enumerate(results):
        case = res[name]
        assert "exception" not in case, f"rank {rank}:\n{case['exception']}"
        want = {"o", "state", "dq", "dk", "dv"} | ({"dg"} if name[:2] in ("L3", "L4", "L6")
                                                    else set()) \
            | ({"dbeta"} if name[:2] in ("L5", "L6") else set()) \
            | ({"ds0"} if name.endswith("s0") and rank == 0 else set())
        assert set(case["errors"]) == want, (rank, sorted(case["errors"]))
        for what, err in case["errors"].items():
            assert err < TOL, f"rank {rank} {name}: {what} error {err:.2e} > {TOL}"


BAD = {
    "state-off-rank-0": ("ValueError", "pass it on rank 0 only"),
    "mismatch": ("ValueError", "ranks hold different q, v shapes"),
    "missing-beta": ("ValueError", "beta"),
    "varlen": ("NotImplementedError", "varlen"),
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
