"""attncc.dist (docs/context_parallel.md): softmax context parallelism by all-gather of K and V
(strategy="all_gather") and by the ring of K/V chunks (the "ring-" cases; the all-to-all
strategy and world size 4: tests/test_dist4.py) over
torch.distributed, in 2 gloo processes on the CPU (Triton interpreter), against the
single-process fp64 reference of the whole sequence: o, lse and dq, dk, dv of each rank's slice.

One spawn runs every case (starting a process costs seconds of imports); each test reads its
case's result. Tolerances (max abs error / max(1, max |reference|)): fp32 1e-4, fp16 1e-2 (as
tests/test_backward.py: fp16 inputs, p and dS rounded to fp16 before their dots).
Bad inputs raise on EVERY rank before the gather of K and V or the first hop of the ring (no
rank hangs: the spawn has a deadline)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.passes import shard_balance

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build",
                allow_module_level=True)

from tests import dist_integration_cases as integration  # noqa: E402
from tests.dist_support import run_rank, spawn_ranks, try_calls  # noqa: E402

WORLD = 2
TOL = {"fp32": 1e-4, "fp16": 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEADLINE_S = 240  # a hang fails the test instead of blocking the run


def _doc_ids(L):  # documents of 21, 26 and 17 tokens: two of them cross the shard boundaries
    return torch.tensor([0] * 21 + [1] * 26 + [2] * (L - 47))


# name: (mask, score, sharding, dtype, Hq, Hkv, L, runtime[, strategy: "all_gather"])
CASES = {
    "causal-contiguous": ("causal", None, "contiguous", "fp32", 2, 2, 64, {}),
    "causal-head-tail-fp16": ("causal", None, "head-tail", "fp16", 2, 2, 64, {}),
    "sliding-window-head-tail": ("sliding", None, "head-tail", "fp32", 2, 2, 64, {"window": 11}),
    "document-contiguous": ("document", None, "contiguous", "fp32", 2, 2, 64, {}),
    "gqa-causal-alibi-head-tail": ("causal", "alibi", "head-tail", "fp32", 4, 2, 64, {}),
    "bidirectional-window-contiguous": ("bidirectional", None, "contiguous", "fp32", 2, 1, 64,
                                        {}),
    "prefix-lm-softcap-head-tail": ("prefix", "softcap", "head-tail", "fp32", 2, 2, 64, {}),
    "traced-capture-contiguous": ("traced", None, "contiguous", "fp32", 2, 2, 64, {}),
    "sink-causal-head-tail": ("causal", "sink", "head-tail", "fp32", 2, 2, 64, {}),
    # the ring (K/V chunks passed rank to rank, LSE merge; 4 ranks: tests/test_dist4.py)
    "ring-causal-contiguous": ("causal", None, "contiguous", "fp32", 2, 2, 64, {}, "ring"),
    "ring-sliding-window-head-tail-fp16": ("sliding", None, "head-tail", "fp16", 2, 2, 64,
                                           {"window": 11}, "ring"),
    "ring-traced-capture-contiguous": ("traced", None, "contiguous", "fp32", 2, 2, 64, {},
                                       "ring"),
    "ring-gqa-learned-alibi-sink-head-tail": ("causal", "learned-alibi", "head-tail", "fp32", 4,
                                              2, 64, {}, "ring"),
}


def _traced_documents(L):
    doc = _doc_ids(L)

    def mask_mod(b, h, q_idx, kv_idx):  # FlexAttention style: raw rows, a captured tensor
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    return mask_mod


def _spec(mask, score, L):
    masks = {"causal": attncc.causal(), "sliding": attncc.sliding_window(4),
             "document": attncc.document(_doc_ids(L)),
             "bidirectional": attncc.bidirectional_window(6),
             "prefix": attncc.prefix_lm(21),  # the prefix ends inside rank 0's second chunk
             "traced": _traced_documents(L)}
    scores = {"alibi": attncc.alibi(), "softcap": attncc.softcap(5.0)}
    scores["learned-alibi"] = attncc.alibi(LEARNED["alibi_slopes"])
    sinks = {"sink": torch.tensor([0.5, -1.0]), "learned-alibi": LEARNED["sink"]}
    normaliser = attncc.sink(sinks[score]) if score in sinks else None
    return attncc.Attention(mask=masks[mask], score=scores.get(score), normaliser=normaliser)


# learned captured tensors (score "learned-alibi", 4 query heads): their gradients are checked,
# summed over the ranks (each rank's backward gives the part from its own query rows)
LEARNED = {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625]),
           "sink": torch.tensor([0.5, -1.0, 2.0, 0.0])}


def _inputs(Hq, Hkv, L, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    do = torch.randn(1, Hq, L, D, generator=g)
    dlse = torch.randn(1, Hq, L, generator=g)
    return q, k, v, do, dlse


def _run_case(name, rank, group):
    if name in integration.CASES:
        return integration.CASES[name](rank, group)
    mask, score, sharding_name, dt, Hq, Hkv, L, runtime, *strategy = CASES[name]
    spec = _spec(mask, score, L)
    sharding = attncc.dist.sharding_for(sharding_name, WORLD)
    q, k, v, do, dlse = _inputs(Hq, Hkv, L)
    dtype = DTYPES[dt]
    q, k, v = (t.to(dtype) for t in (q, k, v))  # the reference sees the same rounded inputs
    # the reference: fp64 autograd on the whole sequence
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    learned = LEARNED if score == "learned-alibi" else {}
    ref_learned = {n: t.double().requires_grad_() for n, t in learned.items()}
    o_ref, lse_ref = attention_reference(spec, *ref, params=runtime, captures=ref_learned)
    ((o_ref * do.double()).sum() + (lse_ref * dlse.double()).sum()).backward()
    # this rank's slice, run sharded
    mine = [attncc.dist.shard_sequence(t, sharding, rank).requires_grad_() for t in (q, k, v)]
    attn = attncc.compile(spec)
    mine_learned = {n: t.clone().requires_grad_() for n, t in learned.items()}
    o, lse = attncc.dist.context_parallel_attention(attn, *mine, group=group, sharding=sharding,
                                                   strategy=(strategy or ["all_gather"])[0],
                                                   return_lse=True,
                                                   **runtime, **mine_learned)
    ((o.double() * attncc.dist.shard_sequence(do, sharding, rank).double()).sum()
     + (lse.double() * attncc.dist.shard_sequence(dlse, sharding, rank).double()).sum()
     ).backward()
    errors = {}
    pairs = [("o", o, o_ref), ("lse", lse, lse_ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", mine, ref)]
    for what, got, full in pairs:
        want = attncc.dist.shard_sequence(full.detach(), sharding, rank)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert got.dtype == (torch.float32 if what == "lse" else dtype), (what, got.dtype)
        errors[what] = ((got.double() - want).abs().max().item()
                        / max(1.0, want.abs().max().item()))
    for n, t in mine_learned.items():  # the whole gradient: every rank's rows summed
        total = t.grad.clone()
        dist.all_reduce(total, group=group)
        want = ref_learned[n].grad
        errors[f"d{n}"] = ((total.double() - want).abs().max().item()
                           / max(1.0, want.abs().max().item()))
    return errors


def _bad_inputs(rank, group):
    """Each bad input must raise ValueError on every rank, before the gather of K and V."""
    spec = attncc.Attention(mask=attncc.causal())
    attn = attncc.compile(spec)
    q = torch.randn(1, 2, 32, 16)
    cp = attncc.dist.context_parallel_attention
    cases = {
        # a sharding for 3 ranks in a group of 2
        "world": lambda: cp(attn, q, q, q, group=group, sharding=shard_balance.contiguous(3)),
        # 33 local tokens cannot split into head-tail's two chunks per rank
        "length": lambda: cp(attn, *(torch.randn(1, 2, 33, 16),) * 3, group=group,
                             sharding="head-tail"),
        # rank 1 holds more tokens than rank 0
        "mismatch": lambda: cp(attn, *(torch.randn(1, 2, 32 + 8 * rank, 16),) * 3, group=group),
        # rank 1 has wrong head counts (its own check fails; rank 0 learns it by the exchange)
        "one-rank-bad": lambda: cp(attn, q, torch.randn(1, 3 if rank else 2, 32, 16),
                                   torch.randn(1, 3 if rank else 2, 32, 16), group=group),
        "reorder": lambda: cp(attncc.compile(attncc.Attention(
            mask=attncc.causal(), reorder=attncc.permutation())), q, q, q, group=group,
            strategy="all_gather", perm=torch.arange(64)),
        # the ring's pairs need the sink's one value per query head (2 here), before any hop
        "ring-sink": lambda: cp(attncc.compile(attncc.Attention(
            mask=attncc.causal(), normaliser=attncc.sink(torch.zeros(3)))), q, q, q,
            group=group, strategy="ring"),
    }
    cases.update(integration.bad_module_calls(rank, group))
    return try_calls(cases, group)


def _worker(rank, init_file, out_dir):
    run_rank(rank, WORLD, init_file, out_dir, [*CASES, *integration.CASES], _run_case,
             _bad_inputs)


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_worker, WORLD, DEADLINE_S)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_whole_sequence(results, name):
    tol = TOL[CASES[name][3]]
    for rank, res in enumerate(results):
        case = res[name]
        assert "exception" not in case, f"rank {rank}:\n{case['exception']}"
        for what, err in case["errors"].items():
            assert err < tol, f"rank {rank} {name}: {what} error {err:.2e} > {tol}"


@pytest.mark.parametrize("name", list(integration.CASES))
def test_modules_and_compile_match(results, name):
    """tests/dist_integration_cases.py: the nn modules with a group against the whole-sequence
    module, torch.compile against eager (fp32, 1e-4)."""
    for rank, res in enumerate(results):
        case = res[name]
        assert "exception" not in case, f"rank {rank}:\n{case['exception']}"
        for what, err in case["errors"].items():
            assert err < TOL["fp32"], f"rank {rank} {name}: {what} error {err:.2e}"


@pytest.mark.parametrize("name", list(integration.BAD_MODULES))
def test_bad_module_arguments_raise_at_construction(results, name):
    for rank, res in enumerate(results):
        got = res["bad-inputs"][name]
        assert got.startswith(integration.BAD_MODULES[name]), f"rank {rank}: {got}"


BAD = {
    "world": "assigns chunks to 3 ranks, the process group has 2",
    "length": "do not split into the 2 equal chunks per rank",
    "mismatch": "ranks hold different q, k, v shapes",
    "one-rank-bad": None,  # rank 1: its own error; rank 0: "rank(s) [1] rejected their inputs"
    "reorder": "is not supported yet",
    "ring-sink": "one value per query head, shape [2], got shape [3]",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_on_every_rank(results, name):
    for rank, res in enumerate(results):
        got = res["bad-inputs"][name]
        assert got.startswith("ValueError"), f"rank {rank}: {got}"
        want = BAD[name] or ("expected" if rank else "rank(s) [1] rejected their inputs")
        assert want in got, f"rank {rank}: {got}"
        assert res["bad-inputs"]["after"] == f"all_reduce {float(WORLD)}", rank


def test_shard_and_gather_are_inverse():
    """shard_sequence cuts the chunks a rank holds, in its storage order (no process group)."""
    x = torch.arange(16).view(1, 1, 16, 1)
    ht = shard_balance.head_tail(2)  # 4 chunks of 4: rank 0 holds 0 and 3, rank 1 holds 1, 2
    assert attncc.dist.shard_sequence(x, ht, 0).flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert attncc.dist.shard_sequence(x, ht, 1).flatten().tolist() == list(range(4, 12))
    with pytest.raises(ValueError, match="does not split into 4 equal chunks"):
        attncc.dist.shard_sequence(x[:, :, :14], ht, 0)


def test_requires_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="not initialised"):
        attncc.dist.context_parallel_attention(attn, q, q, q)
