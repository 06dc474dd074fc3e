"""KV memory layouts K2-K6 and the L8 hybrid (CATALOG 6, 5): each layout against a dense
equivalent built independently (scattered pages, packed sequences, concatenated slots, an
explicit fp64 oracle), with GQA, causal / sliding-window masks, decode and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attncc.library import masks
from attncc.backends.reference.forward import attention_reference
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.memory import (hybrid_reference, offloaded_reference,
                                              paged_reference, per_head_length_reference,
                                              persistent_reference, ragged_reference)
from attncc.ir.linear import Hybrid, LinearState
from attncc.ir.memory import (OffloadedMemory, PagedMemory, PerHeadLengths, PersistentMemory,
                              RaggedMemory)
from attncc.ir.nodes import Capture, Normaliser, ScoreMod
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import B_IDX, KV_IDX, SCORE, Load, buffer_symbol

F64, I32 = torch.float64, torch.int32
TOL = dict(atol=1e-12, rtol=1e-10)
HQ, HKV, D, DV = 4, 2, 8, 5  # GQA: two query heads per kv head

MASKS = {"full": None, "causal": masks.causal, "sw5": lambda: masks.sliding_window(5)}


def rn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def allowed(name: str, lq: int, lk: int) -> torch.Tensor:
    """The named mask as an explicit bool [Lq, Lk] matrix (CATALOG 1, `qp = q + Lk - Lq`)."""
    qp = torch.arange(lq)[:, None] + lk - lq
    kv = torch.arange(lk)[None, :]
    if name == "full":
        return torch.ones(lq, lk, dtype=torch.bool)
    if name == "causal":
        return kv <= qp
    return (kv <= qp) & (qp - kv < 5)


def naive(q, k, v, ok, scale=None, sink=None):
    """fp64 oracle: q [B,Hq,Lq,D], k/v [B,Hkv,Lk,*], ok bool broadcast to [B,Hq,Lq,Lk]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    if sink is not None:
        lse = torch.logaddexp(lse, sink.view(1, -1, 1).expand_as(lse))
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), 0.0)
    return p @ v, lse


def spec_of(mask: str, memory=None) -> AttentionSpec:
    m = MASKS[mask]
    kw = {} if memory is None else {"memory": memory}
    return AttentionSpec(mask=None if m is None else m(), **kw)


# -- memory nodes ------------------------------------------------------------------------------

def test_nodes_text_key_and_validation():
    nodes = [PagedMemory(16), RaggedMemory(), PersistentMemory(4), PerHeadLengths(),
             OffloadedMemory(64)]
    assert [n.text() for n in nodes] == ["paged(page_size=16)", "ragged", "persistent(slots=4)",
                                         "per_head_lengths", "offloaded(block=64)"]
    assert [n.catalog_id for n in nodes] == ["K2", "K3", "K4", "K5", "K6"]
    assert PagedMemory(16) == PagedMemory(16) and PagedMemory(16).key == PagedMemory(16).key
    assert PagedMemory(16).key != PagedMemory(1).key
    spec = AttentionSpec(mask=masks.causal(), memory=PagedMemory(3))
    assert "memory:     paged(page_size=3)" in spec.text()
    assert spec.key != spec.replace(memory=PagedMemory(4)).key
    with pytest.raises(AttributeError):
        PagedMemory(3).page_size = 4
    for bad, match in [(lambda: PagedMemory(0), "page_size.*>= 1.*got 0"),
                       (lambda: PersistentMemory(True), "slots.*got True"),
                       (lambda: OffloadedMemory(2.0), "block.*got 2.0")]:
        with pytest.raises(ValueError, match=match):
            bad()


# -- K2 paged ---------------------------------------------------------------------------------

def make_paged(P: int, lens: list[int], lq: int, seed: int = 0):
    """Dense K/V prefixes scattered into randomly permuted pages; unused slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    B, lmax = len(lens), max(lens)
    q, k, v = rn(gen, B, HQ, lq, D), rn(gen, B, HKV, lmax, D), rn(gen, B, HKV, lmax, DV)
    need = [-(-n // P) for n in lens]
    n_pages = sum(need) + 3  # a few pages nobody owns
    perm = torch.randperm(n_pages, generator=gen)
    k_cache = torch.full((n_pages, P, HKV, D), math.nan, dtype=F64)
    v_cache = torch.full((n_pages, P, HKV, DV), math.nan, dtype=F64)
    table = torch.full((B, max(need) + 1), -1, dtype=I32)  # -1: unused entries are never read
    nxt = 0
    for b, n in enumerate(lens):
        for i in range(need[b]):
            page = int(perm[nxt])
            nxt += 1
            table[b, i] = page
            t = slice(i * P, min((i + 1) * P, n))
            k_cache[page, : t.stop - t.start] = k[b, :, t].transpose(0, 1)
            v_cache[page, : t.stop - t.start] = v[b, :, t].transpose(0, 1)
    return q, k, v, k_cache, v_cache, table, torch.tensor(lens, dtype=I32)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lq", [1, 4], ids=["decode", "lq4"])
@pytest.mark.parametrize("P", [1, 3, 16])
def test_paged_equals_dense_prefix(P, lq, mask):
    lens = [1, 37, 20]
    q, k, v, kc, vc, table, kv_len = make_paged(P, lens, lq, seed=P + lq)
    spec = spec_of(mask, PagedMemory(P))
    o, lse = paged_reference(spec, q, kc, vc, table, kv_len)
    assert o.shape == (3, HQ, lq, DV) and lse.shape == (3, HQ, lq)
    for b, n in enumerate(lens):
        want_o, want_lse = attention_reference(spec_of(mask), q[b:b + 1], k[b:b + 1, :, :n],
                                               v[b:b + 1, :, :n])
        torch.testing.assert_close(o[b:b + 1], want_o, **TOL)
        torch.testing.assert_close(lse[b:b + 1], want_lse, **TOL)
        ref_o, ref_lse = naive(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                               allowed(mask, lq, n))
        torch.testing.assert_close(o[b:b + 1], ref_o, **TOL)
        torch.testing.assert_close(lse[b:b + 1], ref_lse, **TOL)


def batch_bias(n_seq: int, lk: int, seed: int = 5) -> ScoreMod:
    """`score + bias[b, kv]`: checks that per-sequence calls keep the batch index b."""
    bias = Capture.of("bias", rn(torch.Generator().manual_seed(seed), n_seq, lk))
    return ScoreMod(SCORE + Load(buffer_symbol("bias"), B_IDX, KV_IDX), (), (bias,), "bbias")


def test_paged_keeps_batch_index_and_empty_sequence():
    lens = [9, 0, 5]
    q, k, v, kc, vc, table, kv_len = make_paged(3, lens, 2, seed=7)
    score = batch_bias(3, 9)
    o, lse = paged_reference(AttentionSpec(score=score), q, kc, vc, table, kv_len)
    bias = score.captures[0].tensor
    for b, n in enumerate(lens):
        g = HQ // HKV
        s = q[b] @ k[b, :, :n].repeat_interleave(g, 0).transpose(-1, -2) / math.sqrt(D)
        s = s + bias[b, :n]
        want_lse = torch.logsumexp(s, -1)
        want_o = torch.softmax(s, -1) @ v[b, :, :n].repeat_interleave(g, 0) if n else 0 * o[b]
        torch.testing.assert_close(lse[b], want_lse, **TOL)
        torch.testing.assert_close(o[b], want_o, **TOL)
    assert (o[1] == 0).all() and torch.isneginf(lse[1]).all()


# -- K3 ragged --------------------------------------------------------------------------------

def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=I32)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lens_q,lens_k", [([5, 1, 9], [7, 3, 9]), ([5, 1, 9], [5, 1, 9]),
                                           ([3, 0, 2], [3, 4, 0])], ids=["lq<lk", "eq", "empty"])
def test_ragged_equals_per_sequence_dense(lens_q, lens_k, mask):
    gen = torch.Generator().manual_seed(sum(lens_k))
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = rn(gen, tq, HQ, D), rn(gen, tk, HKV, D), rn(gen, tk, HKV, DV)
    cq, ck = cu(lens_q), cu(lens_k)
    o, lse = ragged_reference(spec_of(mask, RaggedMemory()), q, k, v, cq, ck)
    assert o.shape == (sum(lens_q), HQ, DV) and lse.shape == (sum(lens_q), HQ)
    for i in range(3):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        want_o, want_lse = naive(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                 v[ks].transpose(0, 1)[None], allowed(mask, lens_q[i], lens_k[i]))
        torch.testing.assert_close(o[qs], want_o[0].transpose(0, 1), **TOL)
        torch.testing.assert_close(lse[qs], want_lse[0].T, **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_ragged_equals_document_mask_on_packed_sequence(causal):
    lens = [5, 1, 9]
    gen = torch.Generator().manual_seed(11)
    q, k, v = rn(gen, 15, HQ, D), rn(gen, 15, HKV, D), rn(gen, 15, HKV, DV)
    spec = AttentionSpec(mask=masks.causal() if causal else None)
    o, lse = ragged_reference(spec, q, k, v, cu(lens), cu(lens))
    doc = AttentionSpec(mask=masks.document(cu_seqlens=cu(lens), causal=causal))
    want_o, want_lse = attention_reference(doc, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None])
    torch.testing.assert_close(o, want_o[0].transpose(0, 1), **TOL)
    torch.testing.assert_close(lse, want_lse[0].T, **TOL)


def test_ragged_keeps_batch_index():
    lens = [4, 9, 2]
    gen = torch.Generator().manual_seed(3)
    q, k, v = rn(gen, 15, HQ, D), rn(gen, 15, HKV, D), rn(gen, 15, HKV, DV)
    score = batch_bias(3, 9)
    o, lse = ragged_reference(AttentionSpec(score=score), q, k, v, cu(lens), cu(lens))
    c = cu(lens)
    for i, n in enumerate(lens):
        s = slice(c[i], c[i + 1])
        qi, ki, vi = (x[s].transpose(0, 1)[None] for x in (q, k, v))
        _, plain_lse = naive(qi, ki, vi, torch.ones(n, n, dtype=torch.bool))
        bias = score.captures[0].tensor[i, :n]  # sequence i must read row b = i
        sc = qi @ ki.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(D) + bias
        torch.testing.assert_close(lse[s], torch.logsumexp(sc, -1)[0].T, **TOL)
        torch.testing.assert_close(o[s], (torch.softmax(sc, -1) @ vi.repeat_interleave(2, 1))[0]
                                   .transpose(0, 1), **TOL)
        assert not torch.allclose(lse[s], plain_lse[0].T)  # the bias did change something


# -- K4 persistent ----------------------------------------------------------------------------

@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lq,lk", [(7, 7), (1, 7), (3, 6)], ids=["prefill", "decode", "chunk"])
def test_persistent_equals_concatenated_slots(lq, lk, mask, sink):
    m, B = 3, 2
    gen = torch.Generator().manual_seed(lq * 10 + lk)
    q, k, v = rn(gen, B, HQ, lq, D), rn(gen, B, HKV, lk, D), rn(gen, B, HKV, lk, DV)
    mem_k, mem_v = rn(gen, HKV, m, D), rn(gen, HKV, m, DV)
    spec = spec_of(mask, PersistentMemory(m))
    sinks = rn(gen, HQ) if sink else None
    if sink:
        spec = spec.replace(normaliser=Normaliser("softmax_sink", Capture.of("sink", sinks)))
    o, lse = persistent_reference(spec, q, k, v, mem_k, mem_v)
    # dense over [mem; k], the mask extended by always-true columns for the slots
    kk = torch.cat([mem_k[None].expand(B, -1, -1, -1), k], dim=2)
    vv = torch.cat([mem_v[None].expand(B, -1, -1, -1), v], dim=2)
    ok = torch.cat([torch.ones(lq, m, dtype=torch.bool), allowed(mask, lq, lk)], dim=1)
    want_o, want_lse = naive(q, kk, vv, ok, sink=sinks)
    torch.testing.assert_close(o, want_o, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


# -- K5 per-head lengths ----------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [[11, 4], [11, 11, 4, 2], [0, 11]],
                         ids=["per-kv-head", "per-q-head", "empty-head"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lq", [11, 1], ids=["prefill", "decode"])
def test_per_head_lengths_read_only_the_last_entries(lq, mask, lengths):
    lk, B = 11, 2
    gen = torch.Generator().manual_seed(len(lengths) + lq)
    q, k, v = rn(gen, B, HQ, lq, D), rn(gen, B, HKV, lk, D), rn(gen, B, HKV, lk, DV)
    n = torch.tensor(lengths).repeat_interleave(HQ // len(lengths))  # per query head
    keep = n.view(HKV, -1).amax(1)
    ok = allowed(mask, lq, lk) & (torch.arange(lk) >= lk - n[:, None, None])
    want_o, want_lse = naive(q, k, v, ok)
    for h in range(HKV):  # what a head does not keep is garbage, and is never read
        k[:, h, : lk - keep[h]] = math.nan
        v[:, h, : lk - keep[h]] = math.inf
    spec = spec_of(mask, PerHeadLengths())
    o, lse = per_head_length_reference(spec, q, k, v, torch.tensor(lengths, dtype=I32))
    torch.testing.assert_close(o, want_o, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)
    if lengths[0] == 0:
        assert (o[:, :2] == 0).all() and torch.isneginf(lse[:, :2]).all()


# -- K6 offloaded -----------------------------------------------------------------------------

@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lq", [1, 6])
def test_offloaded_equals_dense_concatenation(lq, mask):
    blk, n_blocks, B = 4, 7, 2
    gen = torch.Generator().manual_seed(lq)
    kb, vb = rn(gen, n_blocks, blk, HKV, D), rn(gen, n_blocks, blk, HKV, DV)
    ids = torch.tensor([[5, 0, 3], [2, 2, 6]], dtype=I32)  # any order, repeats allowed
    q = rn(gen, B, HQ, lq, D)
    k = torch.stack([torch.cat([kb[i] for i in row.tolist()]) for row in ids]).transpose(1, 2)
    v = torch.stack([torch.cat([vb[i] for i in row.tolist()]) for row in ids]).transpose(1, 2)
    o, lse = offloaded_reference(spec_of(mask, OffloadedMemory(blk)), q, kb, vb, ids)
    want_o, want_lse = naive(q, k, v, allowed(mask, lq, 3 * blk))
    torch.testing.assert_close(o, want_o, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


# -- L8 hybrid --------------------------------------------------------------------------------

def test_hybrid_mixes_sliding_window_softmax_and_normalised_linear():
    B, H, L, alpha = 2, 2, 9, 0.3
    gen = torch.Generator().manual_seed(1)
    q, k, v = rn(gen, B, H, L, D), rn(gen, B, H, L, D), rn(gen, B, H, L, DV)
    soft = AttentionSpec(mask=masks.sliding_window(5))
    node = Hybrid(soft, LinearState("linear", feature_map="elu1", normalize=True), alpha)
    o, state = hybrid_reference(node, None, q, k, v)
    assert state is None
    o_soft, _ = naive(q, k, v, allowed("sw5", L, L))
    w = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # phi(q_t) . phi(k_j)
    w = w.masked_fill(~allowed("causal", L, L), 0)
    o_lin = (w @ v) / w.sum(-1, keepdim=True)  # the scale cancels when normalising
    torch.testing.assert_close(o, alpha * o_soft + (1 - alpha) * o_lin, **TOL)


def test_hybrid_gated_passes_linear_inputs_and_state():
    B, H, L = 1, 2, 6
    gen = torch.Generator().manual_seed(2)
    q, k, v = rn(gen, B, H, L, D), rn(gen, B, H, L, D), rn(gen, B, H, L, DV)
    g, s0 = F.logsigmoid(rn(gen, B, H, L) + 2), rn(gen, B, H, D, DV)
    soft = AttentionSpec(mask=masks.sinks_window(2, 3))
    node = Hybrid(soft, LinearState("scalar_gate"), 0.6)
    o, state = hybrid_reference(node, soft, q, k, v, g=g, initial_state=s0,
                                output_final_state=True, scale=0.2)
    qi, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
    ok = (kv < 2) | ((kv <= qi) & (qi - kv < 3))  # M6: the sinks are visible to every query
    o_soft, _ = naive(q, k, v, ok, scale=0.2)
    o_lin, s_lin = recurrent_reference(q, k, v, node.linear, g=g, scale=0.2, initial_state=s0,
                                       output_final_state=True)
    torch.testing.assert_close(o, 0.6 * o_soft + 0.4 * o_lin, **TOL)
    torch.testing.assert_close(state, s_lin, **TOL)


# -- bad inputs -------------------------------------------------------------------------------

def _paged_args(**change):
    q, _, _, kc, vc, table, kv_len = make_paged(3, [4, 7], 1)
    args = dict(spec=AttentionSpec(), q=q, k_cache=kc, v_cache=vc, page_table=table,
                kv_len=kv_len)
    args.update({k: (f(args) if callable(f) else f) for k, f in change.items()})
    return args


def _seq(L=5, Hq=HQ, Hkv=HKV):
    gen = torch.Generator().manual_seed(0)
    return rn(gen, 2, Hq, L, D), rn(gen, 2, Hkv, L, D), rn(gen, 2, Hkv, L, DV)


def _ragged_args(**change):
    gen = torch.Generator().manual_seed(0)
    args = dict(spec=AttentionSpec(), q=rn(gen, 6, HQ, D), k=rn(gen, 6, HKV, D),
                v=rn(gen, 6, HKV, DV), cu_seqlens_q=cu([2, 4]), cu_seqlens_k=cu([3, 3]))
    args.update(change)
    return args


BAD = {
    "paged-table-dtype": (paged_reference, lambda: _paged_args(
        page_table=lambda a: a["page_table"].long()), r"page_table: expected an int32 tensor"),
    "paged-table-range": (paged_reference, lambda: _paged_args(
        page_table=lambda a: a["page_table"].index_fill(1, torch.tensor([0]), 99)),
        r"page_table\[0\]: expected page ids in \[0, \d+\)"),
    "paged-kv-len-capacity": (paged_reference, lambda: _paged_args(
        kv_len=torch.tensor([4, 100], dtype=I32)),
        r"kv_len\[1\]: expected 0 <= kv_len <= max_pages \* page_size = 12, got 100"),
    "paged-kv-len-negative": (paged_reference, lambda: _paged_args(
        kv_len=torch.tensor([-1, 7], dtype=I32)), r"kv_len\[0\].*got -1"),
    "paged-cache-dtype": (paged_reference, lambda: _paged_args(
        v_cache=lambda a: a["v_cache"].float()), r"v_cache: expected q's dtype"),
    "paged-cache-shape": (paged_reference, lambda: _paged_args(
        k_cache=lambda a: a["k_cache"][..., :3]), r"k_cache: expected .*got \[\d+, 3, 2, 3\]"),
    "paged-page-size": (paged_reference, lambda: _paged_args(
        spec=AttentionSpec(memory=PagedMemory(4))), r"spec.memory.page_size: expected 3 .*got 4"),
    "paged-wrong-layout": (paged_reference, lambda: _paged_args(
        spec=AttentionSpec(memory=RaggedMemory())), r"spec.memory: expected PagedMemory"),
    "ragged-start": (ragged_reference, lambda: _ragged_args(
        cu_seqlens_q=torch.tensor([1, 2, 6], dtype=I32)), r"cu_seqlens_q: expected .* from 0"),
    "ragged-monotone": (ragged_reference, lambda: _ragged_args(
        cu_seqlens_k=torch.tensor([0, 4, 2, 6], dtype=I32),
        cu_seqlens_q=torch.tensor([0, 2, 3, 6], dtype=I32)), r"cu_seqlens_k: .*non-decreasing"),
    "ragged-total": (ragged_reference, lambda: _ragged_args(
        cu_seqlens_k=torch.tensor([0, 3, 5], dtype=I32)), r"cu_seqlens_k: .* to 6, got"),
    "ragged-count": (ragged_reference, lambda: _ragged_args(
        cu_seqlens_k=torch.tensor([0, 6], dtype=I32)), r"cu_seqlens_k: expected N \+ 1 = 3"),
    "ragged-int64": (ragged_reference, lambda: _ragged_args(
        cu_seqlens_q=cu([2, 4]).long()), r"cu_seqlens_q: expected an int32"),
    "ragged-gqa": (ragged_reference, lambda: _ragged_args(
        q=torch.zeros(6, 3, D, dtype=F64)), r"k: expected Hkv dividing Hq = 3"),
    "persistent-mem-heads": (persistent_reference, lambda: dict(
        zip(["q", "k", "v"], _seq()), spec=AttentionSpec(), mem_k=torch.zeros(3, 2, D, dtype=F64),
        mem_v=torch.zeros(3, 2, DV, dtype=F64)), r"mem_k: expected .*\[Hkv, m, Dqk\]"),
    "persistent-slots": (persistent_reference, lambda: dict(
        zip(["q", "k", "v"], _seq()), spec=AttentionSpec(memory=PersistentMemory(4)),
        mem_k=torch.zeros(HKV, 2, D, dtype=F64), mem_v=torch.zeros(HKV, 2, DV, dtype=F64)),
        r"spec.memory.slots: expected 2 .*got 4"),
    "per-head-range": (per_head_length_reference, lambda: dict(
        zip(["q", "k", "v"], _seq()), spec=AttentionSpec(),
        head_kv_len=torch.tensor([5, 6], dtype=I32)), r"head_kv_len: .*\[0, Lk = 5\]"),
    "per-head-count": (per_head_length_reference, lambda: dict(
        zip(["q", "k", "v"], _seq()), spec=AttentionSpec(),
        head_kv_len=torch.tensor([5, 5, 5], dtype=I32)), r"head_kv_len: expected 2 \(Hkv\)"),
    "per-head-k-shape": (per_head_length_reference, lambda: dict(
        q=_seq()[0], k=_seq(L=4)[1], v=_seq()[2], spec=AttentionSpec(),
        head_kv_len=torch.tensor([5, 5], dtype=I32)), r"v: expected .*\[B, Hkv, Lk, Dv\]"),
    "offloaded-range": (offloaded_reference, lambda: dict(
        spec=AttentionSpec(), q=_seq()[0], k_blocks_host=torch.zeros(3, 2, HKV, D, dtype=F64),
        v_blocks_host=torch.zeros(3, 2, HKV, DV, dtype=F64),
        block_ids=torch.tensor([[0, 3], [1, 2]], dtype=I32)),
        r"block_ids: expected ids in \[0, 3\)"),
    "offloaded-dtype": (offloaded_reference, lambda: dict(
        spec=AttentionSpec(), q=_seq()[0], k_blocks_host=torch.zeros(3, 2, HKV, D),
        v_blocks_host=torch.zeros(3, 2, HKV, DV),
        block_ids=torch.tensor([[0, 1], [1, 2]], dtype=I32)), r"k_blocks_host: expected host"),
    "offloaded-block": (offloaded_reference, lambda: dict(
        spec=AttentionSpec(memory=OffloadedMemory(4)), q=_seq()[0],
        k_blocks_host=torch.zeros(3, 2, HKV, D, dtype=F64),
        v_blocks_host=torch.zeros(3, 2, HKV, DV, dtype=F64),
        block_ids=torch.tensor([[0, 1], [1, 2]], dtype=I32)),
        r"spec.memory.block: expected 2 .*got 4"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_argument_expected_and_given(case):
    fn, make_args, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        fn(**make_args())


def test_hybrid_bad_inputs():
    q, k, v = _seq(Hq=HKV)
    node = Hybrid(AttentionSpec(mask=masks.causal()), LinearState("linear"))
    with pytest.raises(ValueError, match="softmax_spec: expected hybrid_node.softmax"):
        hybrid_reference(node, AttentionSpec(), q, k, v)
    with pytest.raises(ValueError, match="k: expected shape"):
        hybrid_reference(node, None, *_seq())  # Hq != Hkv: the linear part needs equal heads
    with pytest.raises(ValueError, match="hybrid_node: expected a Hybrid"):
        hybrid_reference(LinearState("linear"), AttentionSpec(), q, k, v)
    lin = AttentionSpec(normaliser=Normaliser("none"))
    with pytest.raises(ValueError, match="softmax_spec: expected a softmax AttentionSpec"):
        hybrid_reference(Hybrid(lin, LinearState("linear")), None, q, k, v)
