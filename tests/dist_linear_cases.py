"""One linear-recurrence context-parallel case (attncc.dist.context_parallel_linear), run on
every rank of a spawned group (tests/test_dist_linear.py: 2 ranks; tests/test_dist4.py: 4).

A case is (rule, with an initial state, cu_seqlens or None, return_state). The reference is
fp64 autograd through the spec loop on the whole sequence (`recurrent_reference`; varlen:
`varlen_reference`, one sequence at a time). This rank's slice is run sharded (contiguous), and
the loss is sum(o * do) on every rank plus, with return_state, sum(S_final * dS) on the last
rank only (the final state is shared: its gradients add up over the ranks that use it).
Compared: o of the slice, the final state (every rank), the gradients of q, k, v, g, beta of
the slice, and of the initial state: dense, given on rank 0 and compared there; varlen, given
on every rank, each rank's gradient holding the rows of the sequences starting on it, so their
sum over ranks (an all-reduce after the case) is compared on every rank.
Errors are max abs error / max(1, max |reference|).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.ir.linear import LinearState

RULES = {"L1": LinearState("linear", feature_map="elu1", normalize=True),
         "L2": LinearState("decay", decay=0.9), "L3": LinearState("scalar_gate"),
         "L4": LinearState("vector_gate"), "L5": LinearState("delta"),
         "L6": LinearState("gated_delta")}


def _inputs(node, L, H, D, n_states, seed=0):
    """{name: tensor} of the whole sequence ([1, H, L, ...]), the initial state, do, dS;
    unit-norm keys for the delta rules, as their users have."""
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
    state = (n_states, H, node.feature_dim(D), node.state_dv(D))
    return x, torch.randn(*state, generator=gen), do, torch.randn(*state, generator=gen)


def _packed(t):
    """[1, H, L, ...] -> [L, H, ...] (the varlen layout)."""
    return t[0].transpose(0, 1).contiguous()


def expected(rule, with_s0, varlen, return_state, rank):
    """The names `run_linear_case` reports on `rank`."""
    names = {"o", "dq", "dk", "dv"} | ({"state"} if return_state else set())
    names |= {"dg"} if rule in ("L3", "L4", "L6") else set()
    names |= {"dbeta"} if rule in ("L5", "L6") else set()
    return names | ({"ds0"} if with_s0 and (varlen or rank == 0) else set())


def run_linear_case(case, rank, world, group, L, H, D):
    """{what: relative error} of one case (module docstring) on this rank."""
    rule, with_s0, cu_list, return_state = case
    node = RULES[rule]
    cu = None if cu_list is None else torch.tensor(cu_list, dtype=torch.int32)
    x, s0, do, ds = _inputs(node, L, H, D, 1 if cu is None else len(cu_list) - 1)
    dim = 2 if cu is None else 0
    if cu is not None:
        x, do = {n: _packed(t) for n, t in x.items()}, _packed(do)
    ref = {n: t.double().requires_grad_() for n, t in x.items()}
    ref_s0 = s0.double().requires_grad_() if with_s0 else None
    args = dict(g=ref.get("g"), beta=ref.get("beta"), initial_state=ref_s0,
                output_final_state=True)
    o_ref, s_ref = (recurrent_reference(ref["q"], ref["k"], ref["v"], node, **args) if cu is None
                    else varlen_reference(ref["q"], ref["k"], ref["v"], node, cu_seqlens=cu,
                                          **args))
    ((o_ref * do.double()).sum() + return_state * (s_ref * ds.double()).sum()).backward()
    sharding = attncc.dist.contiguous(world)

    def mine_of(t):
        return attncc.dist.shard_sequence(t, sharding, rank, dim)

    mine = {n: mine_of(t).requires_grad_() for n, t in x.items()}
    s0_mine = s0.clone().requires_grad_() if with_s0 and (cu is not None or rank == 0) else None
    out = attncc.dist.context_parallel_linear(
        attncc.compile(attncc.Attention(memory=node)), mine["q"], mine["k"], mine["v"],
        g=mine.get("g"), beta=mine.get("beta"), group=group, initial_state=s0_mine,
        return_state=return_state, cu_seqlens=cu)
    o, s = out if return_state else (out, None)
    loss = (o.double() * mine_of(do).double()).sum()
    if return_state and rank == world - 1:
        loss = loss + (s.double() * ds.double()).sum()
    loss.backward()
    pairs = [("o", o, mine_of(o_ref.detach()))]
    pairs += [("state", s, s_ref.detach())] if return_state else []
    pairs += [(f"d{n}", t.grad, mine_of(ref[n].grad)) for n, t in mine.items()]
    if s0_mine is not None:
        ds0 = s0_mine.grad
        if cu is not None:  # each rank holds the rows of its sequences (maybe none)
            ds0 = torch.zeros_like(s0) if ds0 is None else ds0.clone()
            dist.all_reduce(ds0, group=group)
        pairs.append(("ds0", ds0, ref_s0.grad))
    errors = {}
    for what, got, want in pairs:
        assert got is not None, f"{what}: no gradient"
        assert got.shape == want.shape, (what, got.shape, want.shape)
        errors[what] = ((got.double() - want).abs().max().item()
                        / max(1.0, want.abs().max().item()))
    return errors
