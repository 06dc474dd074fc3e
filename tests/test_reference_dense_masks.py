"""attention_reference == an independent dense oracle for masks M1-M20, mask algebra, fully
masked rows and reorders R1-R6 (CATALOG.md Sections 0, 1, 4). Oracle: tests/dense_oracle.py."""

from __future__ import annotations

import pytest
import torch

from attncc.library import masks as M
from attncc.backends.reference.forward import attention_reference
from attncc.ir.reorder import (Hilbert2D, Hilbert3D, Morton2D, SegmentSort, TileMajor,
                               UserPermutation)
from attncc.ir.spec import AttentionSpec
from attncc.ir.trace import trace_mask
from tests import dense_oracle as D
from tests.dense_oracle import one_thread  # noqa: F401  (a fixture, see pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")

I64 = torch.int64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _doc_ids(L: int, n_docs: int, seed: int) -> torch.Tensor:
    """Sorted random document ids (packed sequences) of length L."""
    cuts = torch.randint(0, n_docs, (L,), generator=_gen(seed))
    return cuts.sort().values.to(I64)


def _topk_idx(B, H, n_blocks, k, seed):
    idx = torch.randint(-1, n_blocks, (B, H, n_blocks, k), generator=_gen(seed))
    return idx.to(I64)  # -1 entries are unused slots


def _hilbert_rank(n: int) -> torch.Tensor:
    """rank[cell] for the classical curve on n x n, cells numbered y * n + x."""
    rank = torch.empty(n * n, dtype=I64)
    for d in range(n * n):
        x, y = D.hilbert_d2xy(n, d)
        rank[y * n + x] = d
    return rank


def _case(name, shape, build):
    B, Hq, Hkv, Lq, Lk = shape
    return pytest.param(shape, build, id=f"{name}-B{B}-H{Hq}kv{Hkv}-{Lq}x{Lk}")


# Captured data, fixed seeds; each fits the shapes of the cases that use it.
GLOBAL_63 = torch.rand(63, generator=_gen(1)) < 0.1
FIRST_200 = torch.arange(200) == 0
EVERY_20TH = torch.arange(63) % 20 == 7
DOC_63, DOC_63_B = _doc_ids(63, 5, 2), _doc_ids(63, 6, 11)
DOC_MOD3 = torch.arange(64) % 3  # documents interleaved, not contiguous
TOPK_8 = _topk_idx(2, 2, 8, 2, seed=3)  # [B, H, 8 query blocks, 2 picks]
TOPK_13 = _topk_idx(1, 4, 13, 3, seed=4)
TOPK_ROWS_63 = torch.randint(-1, 25, (2, 2, 63, 3), generator=_gen(12))  # per query row
BIGBIRD_8 = (torch.arange(8) == 0, torch.rand(8, 8, generator=_gen(5)) < 0.2)
BIGBIRD_13 = (torch.zeros(13, dtype=torch.bool), M.bigbird_random_blocks(13, 2, seed=3))
TREE_7, TREE_15 = D.random_tree_ancestors(7, 6), D.random_tree_ancestors(15, 7)
CLASSES_1001 = torch.tensor([1, 0, 0, 1])

# build(Lq, Lk, Hq) -> (attncc Mask, oracle bool tensor broadcastable to [B, Hq, Lq, Lk])
MASK_CASES = [
    _case("M1-causal", (1, 2, 2, 1, 1), lambda Lq, Lk, H: (M.causal(), D.m_causal(Lq, Lk))),
    _case("M1-causal", (2, 4, 2, 63, 63), lambda Lq, Lk, H: (M.causal(), D.m_causal(Lq, Lk))),
    _case("M1-causal", (1, 4, 1, 63, 200), lambda Lq, Lk, H: (M.causal(), D.m_causal(Lq, Lk))),
    _case("M1-causal-decode", (2, 2, 1, 1, 257),
          lambda Lq, Lk, H: (M.causal(), D.m_causal(Lq, Lk))),
    _case("M1-causal-Lq>Lk", (1, 2, 2, 200, 63),  # first 137 rows see no key
          lambda Lq, Lk, H: (M.causal(), D.m_causal(Lq, Lk))),
    _case("M2-sw1", (2, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.sliding_window(1), D.m_sliding(Lq, Lk, 1))),
    _case("M2-sw16", (1, 2, 1, 257, 257),
          lambda Lq, Lk, H: (M.sliding_window(16), D.m_sliding(Lq, Lk, 16))),
    _case("M2-sw16", (1, 2, 2, 63, 200),
          lambda Lq, Lk, H: (M.sliding_window(16), D.m_sliding(Lq, Lk, 16))),
    _case("M2-sw100-decode", (1, 4, 4, 1, 200),
          lambda Lq, Lk, H: (M.sliding_window(100), D.m_sliding(Lq, Lk, 100))),
    _case("M3-biwin0", (2, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.bidirectional_window(0), D.m_biwin(Lq, Lk, 0))),
    _case("M3-biwin5", (1, 4, 2, 200, 200),
          lambda Lq, Lk, H: (M.bidirectional_window(5), D.m_biwin(Lq, Lk, 5))),
    _case("M4-w8d2", (1, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.dilated_window(8, 2), D.m_dilated(Lq, Lk, 8, 2))),
    _case("M4-w12d3-causal", (2, 2, 1, 63, 63),
          lambda Lq, Lk, H: (M.dilated_window(12, 3, causal=True),
                             D.m_dilated(Lq, Lk, 12, 3, causal=True))),
    _case("M5-prefix0", (1, 2, 2, 63, 257),
          lambda Lq, Lk, H: (M.prefix_lm(0), D.m_prefix(Lq, Lk, 0))),
    _case("M5-prefix10", (2, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.prefix_lm(10), D.m_prefix(Lq, Lk, 10))),
    _case("M5-prefix150", (1, 2, 1, 63, 200),
          lambda Lq, Lk, H: (M.prefix_lm(150), D.m_prefix(Lq, Lk, 150))),
    _case("M6-s4w8", (2, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.sinks_window(4, 8), D.m_sinks(Lq, Lk, 4, 8))),
    _case("M6-s1w16", (1, 2, 2, 63, 200),
          lambda Lq, Lk, H: (M.sinks_window(1, 16), D.m_sinks(Lq, Lk, 1, 16))),
    _case("M6-s0w3", (1, 2, 2, 257, 257),
          lambda Lq, Lk, H: (M.sinks_window(0, 3), D.m_sinks(Lq, Lk, 0, 3))),
    _case("M7-c1", (2, 2, 1, 63, 63), lambda Lq, Lk, H: (M.chunked(1), D.m_chunked(Lq, Lk, 1))),
    _case("M7-c16", (1, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.chunked(16), D.m_chunked(Lq, Lk, 16))),
    _case("M7-c64", (1, 2, 2, 257, 257),
          lambda Lq, Lk, H: (M.chunked(64), D.m_chunked(Lq, Lk, 64))),
    _case("M8-c8", (2, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.block_causal(8), D.m_block_causal(Lq, Lk, 8))),
    _case("M8-c50", (1, 2, 2, 63, 200),
          lambda Lq, Lk, H: (M.block_causal(50), D.m_block_causal(Lq, Lk, 50))),
    _case("M8-c16", (1, 2, 2, 5, 200),
          lambda Lq, Lk, H: (M.block_causal(16), D.m_block_causal(Lq, Lk, 16))),
    _case("M9-b8-n2-s3-d1", (1, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.strided_heads(8, 2, 3, 1), D.m_strided(H, Lq, Lk, 8, 2, 3, 1))),
    _case("M9-b16-n1-s4-d0", (1, 4, 1, 200, 200),
          lambda Lq, Lk, H: (M.strided_heads(16, 1, 4, 0), D.m_strided(H, Lq, Lk, 16, 1, 4, 0))),
    _case("M10-w3", (2, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.global_tokens(3, GLOBAL_63), D.m_global(Lq, Lk, 3, GLOBAL_63))),
    _case("M10-w0-first", (1, 2, 2, 200, 200),
          lambda Lq, Lk, H: (M.global_tokens(0, FIRST_200), D.m_global(Lq, Lk, 0, FIRST_200))),
    _case("M11-doc", (2, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.document(DOC_63), D.m_document(DOC_63))),
    _case("M11-doc-interleaved", (1, 2, 1, 64, 64),
          lambda Lq, Lk, H: (M.document(DOC_MOD3), D.m_document(DOC_MOD3))),
    _case("M11-cu_seqlens", (1, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.document(cu_seqlens=torch.tensor([0, 5, 30, 31, 63])),
                             D.m_document(D.doc_from_cu_seqlens([0, 5, 30, 31, 63])))),
    _case("M12-8x8-k3x3", (1, 2, 2, 64, 64),
          lambda Lq, Lk, H: (M.neighbourhood_2d(8, 8, 3, 3), D.m_neigh_2d(8, 8, 3, 3))),
    _case("M12-8x8-k5x3", (2, 2, 1, 64, 64),
          lambda Lq, Lk, H: (M.neighbourhood_2d(8, 8, 5, 3), D.m_neigh_2d(8, 8, 5, 3))),
    _case("M12-6x10-k3x5", (1, 2, 2, 60, 60),
          lambda Lq, Lk, H: (M.neighbourhood_2d(6, 10, 3, 5), D.m_neigh_2d(6, 10, 3, 5))),
    _case("M12-7x9-k7x1", (1, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.neighbourhood_2d(7, 9, 7, 1), D.m_neigh_2d(7, 9, 7, 1))),
    _case("M13-2x4x4-k1x3x3", (1, 2, 2, 32, 32),
          lambda Lq, Lk, H: (M.neighbourhood_3d(2, 4, 4, (1, 3, 3)),
                             D.m_neigh_3d((2, 4, 4), (1, 3, 3)))),
    _case("M13-3x4x5-k3x3x3", (1, 2, 1, 60, 60),
          lambda Lq, Lk, H: (M.neighbourhood_3d(3, 4, 5, (3, 3, 3)),
                             D.m_neigh_3d((3, 4, 5), (3, 3, 3)))),
    _case("M13-sta-4x6x8-t2x2x4-k1x3x1", (1, 2, 2, 192, 192),
          lambda Lq, Lk, H: (M.neighbourhood_3d(4, 6, 8, (1, 3, 1), tile=(2, 2, 4)),
                             D.m_neigh_3d((4, 6, 8), (1, 3, 1), tile=(2, 2, 4)))),
    _case("M13-sta-3x5x6-t2x2x3-k1x3x1", (1, 2, 2, 90, 90),  # edge tiles are short
          lambda Lq, Lk, H: (M.neighbourhood_3d(3, 5, 6, (1, 3, 1), tile=(2, 2, 3)),
                             D.m_neigh_3d((3, 5, 6), (1, 3, 1), tile=(2, 2, 3)))),
    _case("M14-8x8", (1, 2, 2, 64, 64),
          lambda Lq, Lk, H: (M.criss_cross(8, 8), D.m_criss_cross(8, 8))),
    _case("M14-7x9", (2, 2, 1, 63, 63),
          lambda Lq, Lk, H: (M.criss_cross(7, 9), D.m_criss_cross(7, 9))),
    _case("M15-8x8-t4-s0-c2", (1, 2, 2, 64, 64),
          lambda Lq, Lk, H: (M.hilberta(8, 8, 4, 0, 2),
                             D.m_hilberta(_hilbert_rank(8), 8, 8, 4, 0, 2))),
    _case("M15-8x8-t16-s8-c2", (1, 2, 2, 64, 64),
          lambda Lq, Lk, H: (M.hilberta(8, 8, 16, 8, 2),
                             D.m_hilberta(_hilbert_rank(8), 8, 8, 16, 8, 2))),
    _case("M15-16x16-t16-s8-c4", (1, 2, 1, 256, 256),
          lambda Lq, Lk, H: (M.hilberta(16, 16, 16, 8, 4),
                             D.m_hilberta(_hilbert_rank(16), 16, 16, 16, 8, 4))),
    _case("M16-b8-causal", (2, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.block_topk(TOPK_8, 8), D.m_block_topk(TOPK_8, Lq, Lk, 8))),
    _case("M16-b16-noncausal", (1, 4, 2, 200, 200),
          lambda Lq, Lk, H: (M.block_topk(TOPK_13, 16, causal=False),
                             D.m_block_topk(TOPK_13, Lq, Lk, 16, causal=False))),
    _case("M16-per-token-b8-causal", (2, 2, 1, 63, 63),
          lambda Lq, Lk, H: (M.block_topk(TOPK_ROWS_63, 8, per_token=True),
                             D.m_block_topk(TOPK_ROWS_63, Lq, Lk, 8, per_token=True))),
    _case("M16-per-token-b8-noncausal-Lk200", (2, 2, 2, 63, 200),
          lambda Lq, Lk, H: (M.block_topk(TOPK_ROWS_63, 8, causal=False, per_token=True),
                             D.m_block_topk(TOPK_ROWS_63, Lq, Lk, 8, causal=False,
                                            per_token=True))),
    _case("M17-b8-r1-g0", (1, 2, 2, 63, 63),
          lambda Lq, Lk, H: (M.bigbird(8, 1, *BIGBIRD_8), D.m_bigbird(Lq, 8, 1, *BIGBIRD_8))),
    _case("M17-b16-r0-seeded", (1, 2, 1, 200, 200),
          lambda Lq, Lk, H: (M.bigbird(16, 0, *BIGBIRD_13), D.m_bigbird(Lq, 16, 0, *BIGBIRD_13))),
    _case("M18-0110-s2w8", (1, 4, 2, 63, 63),
          lambda Lq, Lk, H: (M.per_head_classes(torch.tensor([0, 1, 1, 0]), 2, 8),
                             D.m_head_classes(H, Lq, Lk, torch.tensor([0, 1, 1, 0]), 2, 8))),
    _case("M18-1010-s4w16-decode", (2, 4, 1, 1, 200),
          lambda Lq, Lk, H: (M.per_head_classes(torch.tensor([1, 0, 1, 0]), 4, 16),
                             D.m_head_classes(H, Lq, Lk, torch.tensor([1, 0, 1, 0]), 4, 16))),
    _case("M19-P20-n7", (1, 2, 2, 7, 27),
          lambda Lq, Lk, H: (M.tree(20, TREE_7), D.m_tree(Lq, Lk, 20, TREE_7))),
    _case("M19-P0-n15", (2, 2, 1, 15, 15),
          lambda Lq, Lk, H: (M.tree(0, TREE_15), D.m_tree(Lq, Lk, 0, TREE_15))),
    _case("M19-P193-n7", (1, 4, 2, 7, 200),
          lambda Lq, Lk, H: (M.tree(193, TREE_7), D.m_tree(Lq, Lk, 193, TREE_7))),
    _case("M20-full-decode", (2, 4, 2, 1, 257), lambda Lq, Lk, H: (M.full(), None)),
    _case("M20-full-latent", (1, 2, 1, 7, 200), lambda Lq, Lk, H: (M.full(), None)),
    _case("M20-no-mask", (1, 2, 2, 63, 63), lambda Lq, Lk, H: (None, None)),
]


@pytest.mark.parametrize("shape, build", MASK_CASES)
def test_named_mask_matches_dense(shape, build):
    B, Hq, Hkv, Lq, Lk = shape
    mask, allowed = build(Lq, Lk, Hq)
    q, k, v = D.make_qkv(B, Hq, Hkv, Lq, Lk)
    D.check(AttentionSpec(mask=mask), q, k, v, allowed)


@pytest.mark.parametrize("mask, oracle", [
    pytest.param(M.bidirectional_window(5), lambda Lq, Lk: D.m_biwin(Lq, Lk, 5), id="M3-biwin5"),
    pytest.param(M.chunked(16), lambda Lq, Lk: D.m_chunked(Lq, Lk, 16), id="M7-c16"),
    pytest.param(M.strided_heads(8, 2, 3, 1), lambda Lq, Lk: D.m_strided(2, Lq, Lk, 8, 2, 3, 1),
                 id="M9-b8-n2-s3-d1"),
])
def test_aligned_q_formulas_for_lq_ne_lk(mask, oracle):
    """M3/M7/M9 read the aligned position `qp = q + Lk - Lq` (docs/semantics.md)."""
    q, k, v = D.make_qkv(1, 2, 1, 63, 200)
    D.check(AttentionSpec(mask=mask), q, k, v, oracle(63, 200))


def _combo(name, build, shape=(1, 4, 2, 63, 63)):
    return _case(name, shape, build)


COMBO_CASES = [
    _combo("causal&~sw4", lambda Lq, Lk: (M.causal() & ~M.sliding_window(4),
                                          D.m_causal(Lq, Lk) & ~D.m_sliding(Lq, Lk, 4))),
    _combo("causal&~sw4", lambda Lq, Lk: (M.causal() & ~M.sliding_window(4),
                                          D.m_causal(Lq, Lk) & ~D.m_sliding(Lq, Lk, 4)),
           (1, 2, 1, 63, 200)),
    _combo("sw5&~sw2-same-param-name",
           lambda Lq, Lk: (M.sliding_window(5) & ~M.sliding_window(2),
                           D.m_sliding(Lq, Lk, 5) & ~D.m_sliding(Lq, Lk, 2))),
    _combo("prefix8|biwin2", lambda Lq, Lk: (M.prefix_lm(8) | M.bidirectional_window(2),
                                             D.m_prefix(Lq, Lk, 8) | D.m_biwin(Lq, Lk, 2))),
    _combo("~causal", lambda Lq, Lk: (~M.causal(), ~D.m_causal(Lq, Lk))),
    _combo("(causal&~c16)|sinks2w1",
           lambda Lq, Lk: ((M.causal() & ~M.chunked(16)) | M.sinks_window(2, 1),
                           (D.m_causal(Lq, Lk) & ~D.m_chunked(Lq, Lk, 16))
                           | D.m_sinks(Lq, Lk, 2, 1))),
    _combo("doc&doc-same-capture-name",
           lambda Lq, Lk: (M.document(DOC_63) & M.document(DOC_63_B),
                           D.m_document(DOC_63) & D.m_document(DOC_63_B))),
    _combo("chunked16|global0",
           lambda Lq, Lk: (M.chunked(16) | M.global_tokens(0, EVERY_20TH),
                           D.m_chunked(Lq, Lk, 16) | D.m_global(Lq, Lk, 0, EVERY_20TH))),
    _combo("M18&doc",
           lambda Lq, Lk: (M.per_head_classes(CLASSES_1001, 1, 6) & M.document(DOC_63_B),
                           D.m_head_classes(4, Lq, Lk, CLASSES_1001, 1, 6)
                           & D.m_document(DOC_63_B))),
]


@pytest.mark.parametrize("shape, build", COMBO_CASES)
def test_mask_algebra_matches_dense(shape, build):
    B, Hq, Hkv, Lq, Lk = shape
    mask, allowed = build(Lq, Lk)
    q, k, v = D.make_qkv(B, Hq, Hkv, Lq, Lk, seed=1)
    D.check(AttentionSpec(mask=mask), q, k, v, allowed)


def _assert_empty_rows(o, lse, rows):
    assert rows.any()
    assert torch.equal(o[:, :, rows], torch.zeros_like(o[:, :, rows]))
    assert bool((lse[:, :, rows] == float("-inf")).all())
    assert bool(torch.isfinite(lse[:, :, ~rows]).all())


@pytest.mark.parametrize("chunks", [{"q_chunk": 1, "kv_chunk": 7}, D.CHUNKS,
                                    {"q_chunk": 128, "kv_chunk": 1024}],
                         ids=lambda c: f"q{c['q_chunk']}-kv{c['kv_chunk']}")
def test_fully_masked_rows_are_zero_and_minus_inf(chunks):
    q, k, v = D.make_qkv(1, 2, 1, 63, 63)
    o, lse = D.check(AttentionSpec(mask=~M.causal()), q, k, v, ~D.m_causal(63, 63),
                     chunks=chunks)
    _assert_empty_rows(o, lse, torch.arange(63) == 62)  # the last query has no later key
    q, k, v = D.make_qkv(1, 2, 2, 200, 63)
    o, lse = D.check(AttentionSpec(mask=M.causal()), q, k, v, D.m_causal(200, 63), chunks=chunks)
    _assert_empty_rows(o, lse, torch.arange(200) < 137)  # qp = q - 137 < 0: no key at all


def test_traced_document_mask_equals_named_and_dense():
    doc = _doc_ids(63, 5, 13)

    def doc_mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    q, k, v = D.make_qkv(2, 4, 2, 63, 63, seed=2)
    traced, _ = D.check(AttentionSpec(mask=trace_mask(doc_mask)), q, k, v, D.m_document(doc))
    named, _ = D.check(AttentionSpec(mask=M.document(doc)), q, k, v, D.m_document(doc))
    torch.testing.assert_close(traced, named, atol=0, rtol=0)


def test_traced_mask_with_query_docs_missing_from_keys():
    """A query whose document id no key has sees no key: o = 0, lse = -inf, no NaN."""
    q_doc = torch.tensor([0, 3, 1, 7, 2, 2, 9] * 9)  # docs 7 and 9 have no key
    kv_doc = torch.arange(200) % 4

    def cross_doc(b, h, q_idx, kv_idx):
        return q_doc[q_idx] == kv_doc[kv_idx]

    q, k, v = D.make_qkv(1, 2, 1, 63, 200, seed=3)
    allowed = q_doc.view(-1, 1) == kv_doc.view(1, -1)
    o, lse = D.check(AttentionSpec(mask=trace_mask(cross_doc)), q, k, v, allowed)
    _assert_empty_rows(o, lse, (q_doc == 7) | (q_doc == 9))


def test_traced_mask_sees_raw_positions():
    """Section 0: a traced mask means exactly `kv_idx <= q_idx`; the named causal aligns ends."""
    q, k, v = D.make_qkv(1, 2, 2, 63, 200, seed=4)
    qi, kv, _ = D.grid(63, 200)
    D.check(AttentionSpec(mask=trace_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)),
            q, k, v, kv <= qi)


def test_runtime_params_and_captures_override_spec_values():
    q, k, v = D.make_qkv(1, 2, 1, 63, 63, seed=5)
    D.check(AttentionSpec(mask=M.sliding_window(4)), q, k, v, D.m_sliding(63, 63, 9),
            params={"window": 9})
    doc1, doc2 = _doc_ids(63, 3, 14), _doc_ids(63, 7, 15)
    D.check(AttentionSpec(mask=M.document(doc1)), q, k, v, D.m_document(doc2),
            captures={"doc": doc2})


def test_cu_seqlens_padding_tokens_join_no_document():
    """A padded batch (L > cu_seqlens[-1]) passes total=L: the padding tokens form one more
    sequence, so no real document sees padding keys (here: non-causal)."""
    cu = [0, 5, 30, 50]
    doc = torch.cat([D.doc_from_cu_seqlens(cu), torch.full((13,), -1, dtype=I64)])
    q, k, v = D.make_qkv(1, 2, 2, 63, 63, seed=6)
    allowed = doc.view(-1, 1) == doc.view(1, -1)
    D.check(AttentionSpec(mask=M.document(cu_seqlens=torch.tensor(cu), causal=False, total=63)),
            q, k, v, allowed)


# ---- reorders R1-R6: semantics never change (CATALOG Section 4) -------------------------------

def _reorder_case(name, reorder, L, build, inputs=lambda L: {}):
    return pytest.param(reorder, L, build, inputs, id=f"{name}-L{L}")


REORDER_CASES = [
    *(_reorder_case(f"{name}-{h}x{w}-na2d-k3x3", r, h * w,
                    lambda L, h=h, w=w: (M.neighbourhood_2d(h, w, 3, 3), D.m_neigh_2d(h, w, 3, 3)))
      for name, r, (h, w) in [
          ("R1-hilbert", Hilbert2D(8, 8), (8, 8)), ("R1-hilbert", Hilbert2D(6, 10), (6, 10)),
          ("R2-morton", Morton2D(8, 8), (8, 8)), ("R2-morton", Morton2D(6, 10), (6, 10)),
          ("R3-tiles4x4", TileMajor((8, 8), (4, 4)), (8, 8)),
          ("R3-tiles3x4", TileMajor((6, 10), (3, 4)), (6, 10))]),
    *(_reorder_case(f"{name}-causal", r, r.length(), lambda L: (M.causal(), D.m_causal(L, L)))
      for name, r in [("R1-hilbert-8x8", Hilbert2D(8, 8)), ("R1-hilbert-6x10", Hilbert2D(6, 10)),
                      ("R2-morton-8x8", Morton2D(8, 8)),
                      ("R3-tiles3x4-6x10", TileMajor((6, 10), (3, 4)))]),
    _reorder_case("R4-hilbert3d-2x4x4-na3d", Hilbert3D(2, 4, 4), 32,
                  lambda L: (M.neighbourhood_3d(2, 4, 4, (1, 3, 3)),
                             D.m_neigh_3d((2, 4, 4), (1, 3, 3)))),
    _reorder_case("R4-hilbert3d-3x4x5-causal", Hilbert3D(3, 4, 5), 60,
                  lambda L: (M.causal(), D.m_causal(L, L))),
    _reorder_case("R5-segsort16-causal", SegmentSort(16), 63,
                  lambda L: (M.causal(), D.m_causal(L, L)),
                  lambda L: {"key_score": torch.randn(L, generator=_gen(20), dtype=D.F64)}),
    _reorder_case("R5-segsort8-sw5", SegmentSort(8), 200,
                  lambda L: (M.sliding_window(5), D.m_sliding(L, L, 5)),
                  lambda L: {"key_score": torch.randn(L, generator=_gen(21))}),
    _reorder_case("R6-userperm-doc", UserPermutation(), 63,
                  lambda L: (M.document(DOC_63), D.m_document(DOC_63)),
                  lambda L: {"perm": torch.randperm(L, generator=_gen(23))}),
    _reorder_case("R6-userperm-causal", UserPermutation(), 257,
                  lambda L: (M.causal(), D.m_causal(L, L)),
                  lambda L: {"perm": torch.randperm(L, generator=_gen(24))}),
]


@pytest.mark.parametrize("reorder, L, build, inputs", REORDER_CASES)
def test_reorder_equals_plain_order_and_dense(reorder, L, build, inputs):
    """P^-1 Attn(PQ, PK, PV) with the mask on ORIGINAL positions == Attn(Q, K, V) == oracle."""
    mask, allowed = build(L)
    reorder_inputs = inputs(L)
    perm = reorder.permutation(L, **reorder_inputs)
    assert not torch.equal(perm, torch.arange(L))  # the test would be vacuous otherwise
    q, k, v = D.make_qkv(2, 4, 2, L, L, seed=7)
    spec = AttentionSpec(mask=mask)
    o, lse = D.check(spec.replace(reorder=reorder), q, k, v, allowed,
                     reorder_inputs=reorder_inputs)
    o_plain, lse_plain = attention_reference(spec, q, k, v, **D.CHUNKS)
    torch.testing.assert_close(o, o_plain, **D.TOL)
    torch.testing.assert_close(lse, lse_plain, **D.TOL)


def test_bigbird_random_blocks_fixed_seed():
    """M17's R is drawn once from a fixed seed: same seed, same R; `per_row` blocks per row."""
    r1, r2 = M.bigbird_random_blocks(13, 3, seed=3), M.bigbird_random_blocks(13, 3, seed=3)
    assert torch.equal(r1, r2) and r1.dtype == torch.bool
    assert torch.equal(r1.sum(1), torch.full((13,), 3))
    assert not torch.equal(r1, M.bigbird_random_blocks(13, 3, seed=4))


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_hilbert2d_is_the_classical_curve(n):
    """The M15 oracle ranks cells by the textbook curve; R1 on 2^k x 2^k must be that curve."""
    assert torch.equal(Hilbert2D(n, n).permutation(n * n),
                       torch.sort(_hilbert_rank(n)).indices)
