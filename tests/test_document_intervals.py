"""M11 from cu_seqlens: one kv interval per query row, `doc_start[q] <= kv <= q` (causal) or
`<= doc_end[q]`, with `doc_start`/`doc_end` built on the device in O(L) by
`attncc.document_inputs`. Checked here: the tensors against an explicit loop; the mask against
the doc-id form (padding tokens past cu_seqlens[-1] included); tile classes exact against brute
force; the kernel against the fp64 reference of the doc-id form (odd totals, Lq != Lk, GQA, fp16
and fp32, causal and not); new sequences at call time without recompiling; no Lq x Lk
allocation and no host sync; the debug-mode check of the order.

Tolerances (max abs error against fp64, inputs rounded to the tested dtype first), as in
test_triton_forward: fp32 2e-5 on o and lse; fp16 2e-3 on o, 1e-4 on lse.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import sympy
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc
from attncc import config
from attncc.backends.triton import render as triton_render
from attncc.backends.reference.forward import attention_reference
from attncc.ir.eval import evaluate
from attncc.ir.nodes import Capture, Schedule
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import KV_IDX, LK, LQ, Q_IDX, Load, buffer_symbol
from attncc.ir.tiles import FULL, PARTIAL, tile_map
from attncc.passes.classify_tiles import is_nondecreasing
from tests.test_tiles import tiles_of_dense
from attncc.passes.pipeline import run_spec_passes
from attncc.validate import check_captures, index_extents

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-4)}


def cu_of(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def random_lens(total: int, n: int, seed: int) -> list[int]:
    """`n` sequence lengths summing to `total`, some of them empty."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, total + 1, (n - 1,), generator=g).tolist())
    return [b - a for a, b in pairwise([0, *cuts, total])]


def doc_ids(lens: list[int], total: int) -> torch.Tensor:
    """Document id (from 1) of each of `total` tokens by an explicit loop; tokens past the last
    sequence share one more id (the padding sequence)."""
    ids = [n + 1 for n, length in enumerate(lens) for _ in range(length)]
    return torch.tensor(ids + [len(lens) + 1] * (total - len(ids)), dtype=torch.int64)


def allowed(lens, total, Lq, Lk, causal) -> torch.Tensor:
    """bool[Lq, Lk] from document ids; keys past `total` belong to no document."""
    ids = torch.cat([doc_ids(lens, total), torch.full((max(Lk - total, 0),), -1)])
    q, kv = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    out = ids[q] == ids[kv]
    return out & (kv <= q) if causal else out


CU_CASES = {  # id -> (lengths, total)
    "one-token": ([1], 1),
    "one-seq-77": ([77], 77),
    "len1x37": ([1] * 37, 37),
    "empty-seqs-77": ([0, 5, 0, 0, 25, 1, 32, 0, 14, 0], 77),
    "random-200": (random_lens(200, 9, seed=1), 200),
    "random-257": (random_lens(257, 4, seed=2), 257),
    "padded-63": ([5, 25, 20], 63),
}


# ---- the tensors and the mask's meaning -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["cu32", "cu64"])
@pytest.mark.parametrize("case", list(CU_CASES))
def test_document_inputs_match_an_explicit_loop(case, dtype):
    lens, total = CU_CASES[case]
    cu = cu_of(lens).to(dtype)
    got = attncc.document_inputs(cu, total=total, causal=False)
    bounds = [*pairwise(cu.tolist()), (int(cu[-1]), total)]
    starts = [a for a, b in bounds for _ in range(b - a)]
    ends = [b - 1 for a, b in bounds for _ in range(b - a)]
    assert got["doc_start"].dtype == got["doc_end"].dtype == torch.int32
    assert got["doc_start"].tolist() == starts and got["doc_end"].tolist() == ends
    assert list(attncc.document_inputs(cu, total=total)) == ["doc_start"]  # causal: no doc_end
    if total == int(cu[-1]):  # total defaults to cu_seqlens[-1]
        assert torch.equal(attncc.document_inputs(cu)["doc_start"], got["doc_start"])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CU_CASES))
def test_mask_means_the_doc_id_form(case, causal):
    """Interval form == doc-id form on every (q, kv), Lk past the tokens included."""
    lens, total = CU_CASES[case]
    mask = attncc.document(cu_seqlens=cu_of(lens), causal=causal, total=total)
    ids_form = attncc.document(doc_ids(lens, total), causal=causal)
    Lk = total + 5
    env = {Q_IDX: torch.arange(total).view(-1, 1), KV_IDX: torch.arange(Lk).view(1, -1),
           LQ: total, LK: Lk}
    ours = torch.as_tensor(evaluate(mask.expr, env, {c.name: c.tensor for c in mask.captures}))
    theirs = torch.as_tensor(evaluate(ids_form.expr, env, {c.name: c.tensor
                                                           for c in ids_form.captures}))
    want = allowed(lens, total, total, Lk, causal)
    assert torch.equal(ours.expand(total, Lk), want)
    assert torch.equal(theirs.expand(total, Lk), want)


@pytest.mark.parametrize("call,words", [
    (lambda: attncc.document_inputs(torch.zeros(0, dtype=torch.int32)), "at least one entry"),
    (lambda: attncc.document_inputs(torch.tensor([0.0, 3.0])), "cu_seqlens: expected a 1-d"),
    (lambda: attncc.document_inputs(cu_of([3]), total=-1), "total: expected an int >= 0"),
    (lambda: attncc.document(torch.zeros(3, dtype=torch.int32), total=3), "total= goes with"),
])
def test_bad_arguments_name_the_argument(call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call()


def test_more_queries_than_tokens_is_an_error(device):
    attn = attncc.compile(attncc.Attention(mask=attncc.document(cu_seqlens=cu_of([3, 4]))))
    q = torch.randn(1, 1, 8, 16, device=device)
    with pytest.raises(ValueError, match=r"doc_start: dimension 0 is indexed by q_idx up to 7"):
        attn(q, q, q, backend="triton")


def test_captures_are_nondecreasing_and_keyed():
    mask = attncc.document(cu_seqlens=cu_of([3, 4]), causal=False)
    assert [(c.name, c.dtype, c.nondecreasing) for c in mask.captures] == [
        ("doc_start", "int32", True), ("doc_end", "int32", True)]
    assert "doc_start:int32[1d, nondecreasing]" in AttentionSpec(mask=mask).kernel_text()
    t = torch.arange(5, dtype=torch.int32)
    plain, ordered = Capture.of("x", t), Capture.of("x", t, nondecreasing=True)
    assert plain.text() == "x:int32[1d]" and ordered.text() == "x:int32[1d, nondecreasing]"
    specs = [AttentionSpec(mask=attncc.Mask(sympy.Ge(KV_IDX, Load(buffer_symbol("x"), Q_IDX)),
                                            (), (c,))) for c in (plain, ordered)]
    assert specs[0].key != specs[1].key  # the order changes the kernel's loops
    with pytest.raises(ValueError, match="nondecreasing applies to 1-d tensors, got 2-d"):
        Capture.of("y", torch.zeros(2, 2, dtype=torch.int32), nondecreasing=True)


def test_is_nondecreasing_reads_ordered_captures_at_q_only():
    x = buffer_symbol("x")
    ordered = frozenset({"x"})
    assert is_nondecreasing(Load(x, Q_IDX), Q_IDX, ordered)
    assert is_nondecreasing(sympy.Max(0, Load(x, Q_IDX) + 3), Q_IDX, ordered)
    assert not is_nondecreasing(Load(x, Q_IDX))  # not promised
    assert not is_nondecreasing(Load(x, Q_IDX + 1), Q_IDX, ordered)  # could read past the end
    assert not is_nondecreasing(-Load(x, Q_IDX), Q_IDX, ordered)


# ---- tile classes: exact -------------------------------------------------------------------

BLOCKS = [(16, 16), (32, 64), (64, 16)]
CLASS_CASES = [(c, causal, bm, bn) for c in CU_CASES for causal in (True, False)
               for bm, bn in BLOCKS]


@pytest.mark.parametrize("case,causal,bm,bn", CLASS_CASES,
                         ids=[f"{c}-{'causal' if k else 'full'}-{m}x{n}"
                              for c, k, m, n in CLASS_CASES])
def test_tile_classes_are_exact(case, causal, bm, bn):
    lens, total = CU_CASES[case]
    spec = attncc.Attention(mask=attncc.document(cu_seqlens=cu_of(lens), causal=causal,
                                                 total=total))
    plan = run_spec_passes(spec)
    assert len(plan.tiles.pieces) == 1 and plan.tiles.pieces[0].exact
    tensors = {c.name: c.tensor for c in plan.spec.captures}
    for Lq, Lk in {(total, total), (max(total // 3, 1), total), (total, max(total // 3, 1)),
                   (total, total + 40)}:
        ours = tile_map(plan.tiles, Lq=Lq, Lk=Lk, Hq=1, Hkv=1, block_m=bm, block_n=bn,
                        tensors=tensors)
        truth = tiles_of_dense(allowed(lens, total, Lq, Lk, causal), bm, bn)
        assert torch.equal(ours, truth), f"Lq={Lq} Lk={Lk}\n{truth}\n{ours}"


def test_explain_shows_tiles_skipped_across_documents():
    spec = attncc.Attention(mask=attncc.document(cu_seqlens=cu_of([70, 50, 80])))
    text = attncc.explain(spec, shape=(200, 200), block=(32, 32))
    assert "visit kv [Max(0, Load(doc_start, q_first)), Min(q_last, Lk - 1)]" in text
    assert "full kv [Max(0, Load(doc_start, q_last)), Min(q_first, Lk - 1)]" in text
    truth = tiles_of_dense(allowed([70, 50, 80], 200, 200, 200, True), 32, 32)
    n_full, n_partial = int((truth == FULL).sum()), int((truth == PARTIAL).sum())
    assert (f"tiles 32x32: {n_full + n_partial}/49 visited, {n_full} full, {n_partial} partial"
            in text)


# ---- the kernel against the fp64 reference -------------------------------------------------

def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def _reference(lens, total, causal, q, k, v):
    """fp64 reference of the doc-id form: an independent statement of the same mask."""
    spec = attncc.Attention(mask=attncc.document(doc_ids(lens, total), causal=causal))
    return attention_reference(spec, *(t.double().cpu() for t in (q, k, v)), q_chunk=64,
                               kv_chunk=64)


def _close(o, lse, ref, dtype):
    o_tol, lse_tol = TOL[dtype]
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.double().cpu(), ref[0], atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(lse.double().cpu(), ref[1], atol=lse_tol, rtol=lse_tol)


KERNEL_CASES = {  # id -> (case, Lq, Lk, Hq, Hkv, D, dtype)
    "one-token-fp32": ("one-token", 1, 1, 1, 1, 16, torch.float32),
    "empty-seqs-77-gqa-fp16": ("empty-seqs-77", 77, 77, 4, 2, 32, torch.float16),
    "len1x37-fp32": ("len1x37", 37, 37, 2, 1, 16, torch.float32),
    "random-200-Lq77-Lk200-gqa-fp32": ("random-200", 77, 200, 4, 2, 32, torch.float32),
    "random-200-Lq200-Lk77-fp16": ("random-200", 200, 77, 2, 2, 32, torch.float16),
    "padded-63-fp32": ("padded-63", 63, 63, 2, 1, 16, torch.float32),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kcase", list(KERNEL_CASES))
def test_kernel_matches_reference(kcase, causal, device):
    case, Lq, Lk, Hq, Hkv, D, dtype = KERNEL_CASES[kcase]
    lens, total = CU_CASES[case]
    attn = attncc.compile(attncc.Attention(mask=attncc.document(
        cu_seqlens=cu_of(lens).to(device), causal=causal, total=total)))
    q, k, v = _qkv(1, Hq, Hkv, Lq, Lk, D, dtype, device)
    o, lse = attn(q, k, v, return_lse=True, backend="triton")
    _close(o, lse, _reference(lens, total, causal, q, k, v), dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernel_visits_exactly_the_classified_tiles(causal, device):
    lens, total = CU_CASES["empty-seqs-77"]
    bm = bn = 16
    spec = attncc.Attention(mask=attncc.document(cu_seqlens=cu_of(lens).to(device),
                                                 causal=causal),
                            schedule=Schedule(block_m=bm, block_n=bn))
    attn = attncc.compile(spec)
    q, k, v = _qkv(1, 2, 1, total, total, 16, torch.float32, device)
    n = -(-total // bm)
    visits = torch.zeros(2, n, n, dtype=torch.int8, device=device)
    attn(q, k, v, backend="triton", _visits=visits)
    truth = tiles_of_dense(allowed(lens, total, total, total, causal), bm, bn)
    assert torch.equal(visits[0].cpu(), truth) and torch.equal(visits[1].cpu(), truth)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_new_sequences_at_call_time_do_not_recompile(causal, device):
    first, other = CU_CASES["random-200"][0], CU_CASES["empty-seqs-77"][0] + [123]
    attn = attncc.compile(attncc.Attention(mask=attncc.document(
        cu_seqlens=cu_of(first).to(device), causal=causal)))
    q, k, v = _qkv(1, 2, 2, 200, 200, 16, torch.float32, device, seed=3)
    o1, _ = attn(q, k, v, return_lse=True, backend="triton")
    fn, renders = attn.kernels.kernel.jit_function(), triton_render.RENDERS[0]
    inputs = attncc.document_inputs(cu_of(other).to(device), causal=causal)
    o2, lse2 = attn(q, k, v, return_lse=True, backend="triton", **inputs)
    assert attn.kernels.kernel.jit_function() is fn and triton_render.RENDERS[0] == renders
    _close(o2, lse2, _reference(other, 200, causal, q, k, v), torch.float32)
    assert not torch.allclose(o1, o2)
    again = attncc.compile(attncc.Attention(mask=attncc.document(
        cu_seqlens=cu_of(other).to(device), causal=causal)))
    # same cache entry, new data
    assert again.kernels.kernel.entry.path == attn.kernels.kernel.entry.path


# ---- memory and host syncs -----------------------------------------------------------------

class _Record(TorchDispatchMode):
    """Every tensor an aten op produces, and every op that reads a value back to the host."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "item"):
            self.syncs.append(func.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


def test_no_lq_by_lk_allocation_and_intervals_in_linear_memory(device):
    L, D = 4096, 16
    cu = cu_of(random_lens(L, 17, seed=4)).to(device)
    with _Record() as built:
        inputs = attncc.document_inputs(cu, total=L, causal=False)
    assert built.syncs == [], f"document_inputs read back from the device: {built.syncs}"
    assert max(built.sizes) < L * L // 8 and sum(built.sizes) < 16 * L, built.sizes
    attn = attncc.compile(attncc.Attention(mask=attncc.document(cu_seqlens=cu, causal=False)))
    q, k, v = (torch.randn(1, 1, L, D, device=device) for _ in range(3))
    attn(q, k, v, backend="triton", **inputs)  # warm: lazy imports and (on GPU) the compile
    with _Record() as call:
        attn(q, k, v, backend="triton", **inputs)
    assert max(call.sizes) < L * L // 8, f"a tensor of {max(call.sizes)} elements"
    with _Record() as checked:
        check_captures(attn.plan.spec, inputs, q.device, index_extents(1, 1, L, L))
    assert checked.syncs == []  # the fast path trusts the order: no device sync


# ---- the debug-mode order check ------------------------------------------------------------

def test_debug_mode_rejects_a_decreasing_doc_start_before_launch(device):
    attn = attncc.compile(attncc.Attention(mask=attncc.document(
        cu_seqlens=cu_of([4, 6]).to(device)), schedule=Schedule(block_m=16, block_n=16)))
    q, k, v = _qkv(1, 1, 1, 10, 10, 16, torch.float32, device)
    bad = torch.tensor([0, 0, 0, 0, 4, 4, 3, 4, 4, 4], dtype=torch.int32, device=device)
    visits = torch.zeros(1, 1, 1, dtype=torch.int8, device=device)
    with config.override(ATTNCC_DEBUG="1"):
        assert config.debug_checks()
        with pytest.raises(ValueError, match=r"doc_start: expected values that never decrease "
                                             r".*got doc_start\[6\] = 3 < doc_start\[5\] = 4"):
            attn(q, k, v, backend="triton", doc_start=bad, _visits=visits)
        assert not visits.any()  # nothing launched
        attn(q, k, v, backend="triton", **attncc.document_inputs(cu_of([4, 6]).to(device)))
    with config.override(ATTNCC_DEBUG=None):
        assert not config.debug_checks()
        attn(q, k, v, backend="triton", doc_start=bad)  # trusted: no check, no device sync
