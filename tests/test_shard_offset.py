"""attncc/ir/shard.py: a spec rewritten by `at_query_offset` reads every query index at its
global position `q_idx + shard_q_offset`, so a slice of queries run against all keys gives the
rows of the whole sequence (the basis of attncc.dist; docs/context_parallel.md), and visits
exactly the tiles that the shard-pair pass counts for its chunk. Single process, interpreter,
against the fp64 reference; fp32 tolerance 1e-4 (max abs error)."""

from __future__ import annotations

import pytest
import sympy
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.ir.shard import SHARD_OFFSET, at_query_offset, offset_names
from attncc.ir.symbols import KV_IDX, Q_IDX
from attncc.ir.tiles import FULL, PARTIAL
from attncc.passes.shard_pairs import chunk_tiles

L = 32
DOC = torch.tensor([0] * 11 + [1] * 14 + [2] * 7)  # documents crossing the cut at 16


def _doc_mod(b, h, q_idx, kv_idx):  # traced: reads the raw row q_idx
    return (DOC[q_idx] == DOC[kv_idx]) & (kv_idx <= q_idx)


SPECS = {
    "causal": attncc.Attention(mask=attncc.causal()),  # reads the aligned position
    "document": attncc.Attention(mask=attncc.document(DOC)),  # reads the raw row
    "traced": attncc.Attention(mask=_doc_mod),
    "bidirectional-alibi": attncc.Attention(mask=attncc.bidirectional_window(5),
                                            score=attncc.alibi()),  # both axes take an offset
    "full": attncc.Attention(),  # reads no query index: unchanged, no offset
}


@pytest.mark.parametrize("name", list(SPECS))
def test_slices_at_their_offsets_give_the_whole_sequence(name):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    want = attention_reference(spec, q.double(), k.double(), v.double())[0]
    attn = attncc.compile(at_query_offset(spec))
    names = offset_names(attn.spec)
    assert bool(names) == (name != "full")
    rows = [attn(q[:, :, s:s + 8], k, v, **{n: s for n in names}) for s in (24, 0, 8, 16)]
    got = torch.cat([rows[1], rows[2], rows[3], rows[0]], 2)
    assert (got.double() - want).abs().max().item() < 1e-4


def test_the_rewrite_reads_the_offset():
    spec = at_query_offset(attncc.Attention(mask=attncc.causal()))
    offset = sympy.Symbol(SHARD_OFFSET, integer=True)
    assert spec.mask.expr == (KV_IDX <= Q_IDX + offset)
    assert offset_names(spec) == (SHARD_OFFSET,)


def test_unsupported_specs_say_why():
    with pytest.raises(ValueError, match="reorder .* is not supported yet"):
        at_query_offset(attncc.Attention(mask=attncc.causal(), reorder=attncc.permutation()))
    with pytest.raises(ValueError, match="already has a parameter or tensor named"):
        at_query_offset(attncc.Attention(mask=attncc.Mask(
            KV_IDX <= Q_IDX + sympy.Symbol(SHARD_OFFSET, integer=True),
            (attncc.Param(SHARD_OFFSET, "int", 1),))))
    with pytest.raises(ValueError, match="not a dense sequence"):
        at_query_offset(attncc.Attention(memory=attncc.paged(16)))


@pytest.mark.parametrize("mask", ["causal", "sliding-window"])
def test_a_shard_visits_the_tiles_the_shard_pairs_count(mask):
    """The kernel on a query chunk at its offset visits, per key chunk, exactly the partial
    and full tiles that `chunk_tiles` (attncc/passes/shard_pairs.py) counts for that chunk
    pair: fully masked shard pairs are skipped by the kernel itself, at global positions."""
    tile, n_chunks = 16, 4
    spec = attncc.Attention(mask=attncc.causal() if mask == "causal"
                            else attncc.sliding_window(20),
                            schedule=attncc.Schedule(block_m=tile, block_n=tile))
    want = chunk_tiles(spec, L * 2, n_chunks, block_m=tile, block_n=tile).counts
    attn = attncc.compile(at_query_offset(spec))
    size = 2 * L // n_chunks
    q, k, v = (torch.randn(1, 1, 2 * L, 16) for _ in range(3))
    skipped = 0
    for cq in range(n_chunks):
        visits = torch.zeros(1, size // tile, 2 * L // tile, dtype=torch.int8)
        attn(q[:, :, cq * size:(cq + 1) * size], k, v, _visits=visits,
             **{n: cq * size for n in offset_names(attn.spec)})
        per_key_chunk = visits[0].view(size // tile, n_chunks, size // tile)
        for ck in range(n_chunks):
            got = per_key_chunk[:, ck]
            assert int((got == 1).sum()) == int(want[cq, ck, PARTIAL]), (cq, ck)
            assert int((got == 2).sum()) == int(want[cq, ck, FULL]), (cq, ck)
            skipped += int(want[cq, ck, PARTIAL] + want[cq, ck, FULL] == 0)
    assert skipped >= n_chunks * (n_chunks - 1) // 2  # causal: the pairs above the diagonal
