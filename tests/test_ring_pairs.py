"""The ring strategy's pieces in one process, no process group (docs/context_parallel.md):
`at_pair_offset` (attncc/ir/shard.py) makes a (query chunk, key chunk) pair read both at their
global positions, so the LSE merge of a query chunk's pairs is the whole sequence's rows, and a
pair visits exactly the tiles the shard-pair pass counts for it; the ring's schedule
(`attncc.dist.ring.plan_ring`) skips exactly the fully masked chunk pairs.
Interpreter, against the fp64 reference; fp32 tolerance 1e-4 (max abs error)."""

from __future__ import annotations

import pytest
import sympy
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.dist.ring import computed_pairs, plan_ring
from attncc.ir.shard import PAIR_PARAMS, at_pair_offset, pair_names
from attncc.ir.symbols import KV_IDX, Q_IDX
from attncc.ir.tiles import FULL, PARTIAL
from attncc.ops.merge import merge
from attncc.passes import shard_balance
from attncc.passes.shard_pairs import chunk_tiles

L, C = 32, 4
DOC = torch.tensor([0] * 11 + [1] * 14 + [2] * 7)  # documents crossing the chunk cuts


def _doc_mod(b, h, q_idx, kv_idx):  # traced: raw rows and keys index a captured tensor
    return (DOC[q_idx] == DOC[kv_idx]) & (kv_idx <= q_idx)


SPECS = {
    "causal": attncc.Attention(mask=attncc.causal()),  # reads q_idx + Lk - Lq
    "sliding-window": attncc.Attention(mask=attncc.sliding_window(5)),
    "traced": attncc.Attention(mask=_doc_mod),
    "prefix-alibi": attncc.Attention(mask=attncc.prefix_lm(11), score=attncc.alibi()),
    "full": attncc.Attention(),  # reads no position: unchanged, no offsets
}


@pytest.mark.parametrize("name", list(SPECS))
def test_merged_pairs_at_their_offsets_give_the_whole_sequence(name):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    want, want_lse = attention_reference(spec, q.double(), k.double(), v.double())
    attn = attncc.compile(at_pair_offset(spec))
    names = pair_names(attn.spec)
    assert bool(names) == (name != "full")
    n = L // C
    for cq in (2, 0, 3):
        parts = [attn(q[:, :, cq * n:(cq + 1) * n], k[:, :, ck * n:(ck + 1) * n],
                      v[:, :, ck * n:(ck + 1) * n], return_lse=True,
                      **{p: (cq * n, ck * n, L)[i] for p, i in names.items()})
                 for ck in range(C)]
        o, lse = merge([p[0] for p in parts], [p[1] for p in parts])
        rows = slice(cq * n, (cq + 1) * n)
        assert (o.double() - want[:, :, rows]).abs().max().item() < 1e-4, cq
        assert (lse.double() - want_lse[:, :, rows]).abs().max().item() < 1e-4, cq


def test_the_key_offset_matters():
    """Causal, query chunk 2 against key chunk 1: at its offset every key is allowed; read at
    position 0 (the offset left out) the result differs."""
    attn = attncc.compile(at_pair_offset(SPECS["causal"]))
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    right = attn(q, k, v, shard_q_offset=16, shard_kv_offset=8, shard_len=L)
    full = attncc.compile(attncc.Attention())(q, k, v)
    torch.testing.assert_close(right, full, rtol=0, atol=1e-5)
    wrong = attn(q, k, v, shard_q_offset=16, shard_kv_offset=20, shard_len=L)
    assert (wrong - full).abs().max() > 0.1


def test_the_rewrite_reads_both_offsets():
    spec = at_pair_offset(attncc.Attention(mask=attncc.causal()))
    q_off, kv_off, _ = (sympy.Symbol(p, integer=True) for p in PAIR_PARAMS)
    assert spec.mask.expr == (KV_IDX + kv_off <= Q_IDX + q_off)
    assert pair_names(spec) == {"shard_q_offset": 0, "shard_kv_offset": 1, "shard_len": 2}
    with pytest.raises(ValueError, match="reorder .* is not supported yet"):
        at_pair_offset(attncc.Attention(mask=attncc.causal(), reorder=attncc.permutation()))
    with pytest.raises(ValueError, match="already has a parameter or tensor named"):
        at_pair_offset(attncc.Attention(mask=attncc.Mask(
            KV_IDX <= Q_IDX + sympy.Symbol("shard_len", integer=True),
            (attncc.Param("shard_len", "int", 1),))))


def test_the_ring_skips_fully_masked_pairs():
    causal = attncc.Attention(mask=attncc.causal())
    # contiguous: rank r's queries meet keys of ranks 0..r only
    assert computed_pairs(causal, 64, shard_balance.contiguous(4)) == [1, 2, 3, 4]
    # head-tail: chunks r and 7-r meet r+1 and 8-r key chunks, 9 on every rank (balanced)
    assert computed_pairs(causal, 64, shard_balance.head_tail(4)) == [9, 9, 9, 9]
    # a window of 5 reaches one chunk back: rank 0 has no chunk before it
    window = attncc.Attention(mask=attncc.sliding_window(5))
    assert computed_pairs(window, 64, shard_balance.contiguous(4)) == [1, 2, 2, 2]
    assert computed_pairs(attncc.Attention(), 64, shard_balance.contiguous(4)) == [4] * 4


def test_skipped_pairs_are_empty_and_computed_ones_are_not():
    """Against the dense mask of documents crossing the cuts (a traced mask: the block-map
    path), every chunk pair of every step: skipped iff no allowed position."""
    spec = SPECS["traced"]
    sharding = shard_balance.head_tail(2)  # 4 chunks of 8
    allowed = torch.tensor([[bool(_doc_mod(0, 0, i, j)) for j in range(L)] for i in range(L)])
    n = L // sharding.n_chunks
    for rank in range(sharding.world):
        plan = plan_ring(spec, L, sharding, rank)
        for s, step in enumerate(plan.steps):
            theirs = sharding.chunks[(rank - s) % sharding.world]
            for i, qc in enumerate(sharding.chunks[rank]):
                for j, kc in enumerate(theirs):
                    block = allowed[qc * n:(qc + 1) * n, kc * n:(kc + 1) * n]
                    assert ((i, j) in step) == bool(block.any()), (rank, s, qc, kc)


@pytest.mark.parametrize("mask", ["causal", "sliding-window"])
def test_a_pair_visits_the_tiles_the_shard_pairs_count(mask):
    """The kernel on a (query chunk, key chunk) pair at its offsets visits exactly the partial
    and full tiles that `chunk_tiles` counts for that pair: the tile classes read both
    offsets, so the diagonal pair of a causal mask skips its upper tiles."""
    tile, n_chunks, length = 16, 4, 2 * L
    spec = attncc.Attention(mask=attncc.causal() if mask == "causal"
                            else attncc.sliding_window(20),
                            schedule=attncc.Schedule(block_m=tile, block_n=tile))
    want = chunk_tiles(spec, length, n_chunks, block_m=tile, block_n=tile).counts
    attn = attncc.compile(at_pair_offset(spec))
    names = pair_names(attn.spec)
    n = length // n_chunks
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    for cq in range(n_chunks):
        for ck in range(n_chunks):
            visits = torch.zeros(1, n // tile, n // tile, dtype=torch.int8)
            attn(q, k, v, _visits=visits, **{p: (cq * n, ck * n, length)[i]
                                             for p, i in names.items()})
            assert int((visits == 1).sum()) == int(want[cq, ck, PARTIAL]), (cq, ck)
            assert int((visits == 2).sum()) == int(want[cq, ck, FULL]), (cq, ck)
