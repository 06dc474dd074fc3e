"""Shard pairs and shard balance (attncc/passes/shard_pairs.py, shard_balance.py): tile counts per
(query shard, key shard) equal the dense mask's, a fully masked shard pair is never computed,
and head-tail / greedy assignments even the per-rank work (docs/context_parallel.md)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.ir.tiles import EMPTY, FULL, PARTIAL
from attncc.passes import shard_balance as sb
from attncc.passes.shard_pairs import Sharding, chunk_tiles, shard_pairs
from tests.test_tiles import brute_force, classified, tiles_of_dense


def dense_pairs(spec, L, sharding, bm, bn, kernel=False):
    """int64[W, W, 3] from the dense mask (`kernel`: from the kernel's own visit map, which may
    call partial a tile that only the union of two pieces covers, M5)."""
    tiles = (classified if kernel else brute_force)(spec, L, L, bm, bn).long()
    size = L // sharding.n_chunks
    W = sharding.world
    out = torch.zeros(W, W, 3, dtype=torch.long)
    for i, qc in enumerate(sharding.chunks):
        for j, kc in enumerate(sharding.chunks):
            for a in qc:
                for b in kc:
                    block = tiles[a * size // bm:(a + 1) * size // bm,
                                  b * size // bn:(b + 1) * size // bn]
                    for c in (EMPTY, PARTIAL, FULL):
                        out[i, j, c] += int((block == c).sum())
    return out


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


L, BM, BN = 128, 4, 8
MASKS = {
    "causal": attncc.causal(),
    "full": attncc.full(),
    "sliding-window-1": attncc.sliding_window(1),
    "sliding-window-13": attncc.sliding_window(13),
    "sliding-window-40": attncc.sliding_window(40),
    "document-cu": attncc.document(cu_seqlens=cu([5, 30, 1, 20, 72])),  # crosses shard bounds
    "document-cu-bidir": attncc.document(cu_seqlens=cu([17, 50, 61]), causal=False),
    "document-ids": attncc.document(torch.tensor([0] * 20 + [1] * 50 + [2] * 58)),
    "prefix-lm-0": attncc.prefix_lm(0),
    "prefix-lm-21": attncc.prefix_lm(21),
    "prefix-lm-60": attncc.prefix_lm(60),
}
# one interval of keys per query row: the kernel's classes are the exact ones
UNION = {"prefix-lm-21", "prefix-lm-60"}
SHARDINGS = [sb.contiguous(2), sb.contiguous(4), sb.head_tail(2), sb.head_tail(4),
             Sharding(4, ((3, 0), (1, 2)), "scrambled")]


@pytest.mark.parametrize("sharding", SHARDINGS, ids=lambda s: f"{s.name}-W{s.world}")
@pytest.mark.parametrize("name", list(MASKS))
def test_shard_pairs_equal_the_dense_mask(name, sharding):
    spec = attncc.Attention(mask=MASKS[name])
    ours = shard_pairs(spec, L, sharding, block_m=BM, block_n=BN)
    truth = dense_pairs(spec, L, sharding, BM, BN)
    visited = ours[..., PARTIAL] + ours[..., FULL]
    assert torch.equal(visited, truth[..., PARTIAL] + truth[..., FULL]), "visited != nonempty"
    assert torch.equal(ours.sum(-1), truth.sum(-1))
    if name in UNION:  # sound: never a false full; the kernel's visit map exactly
        assert torch.all(ours[..., FULL] <= truth[..., FULL])
        truth = dense_pairs(spec, L, sharding, BM, BN, kernel=True)
    assert torch.equal(ours, truth), f"\n{ours.permute(2, 0, 1)}\n{truth.permute(2, 0, 1)}"


def test_reordered_rows_are_classified_at_their_original_positions():
    """`positions`: row r of the sharded sequence is token positions[r] (a reordered spec)."""
    spec = attncc.Attention(mask=attncc.sliding_window(20))
    positions = torch.randperm(L, generator=torch.Generator().manual_seed(0))
    sharding = sb.head_tail(2)
    ours = shard_pairs(spec, L, sharding, block_m=BM, block_n=BN, positions=positions)
    q, k = positions[:, None], positions[None, :]
    tiles = tiles_of_dense((k <= q) & (q - k < 20), BM, BN).long()
    size = L // sharding.n_chunks
    for i, qc in enumerate(sharding.chunks):
        for j, kc in enumerate(sharding.chunks):
            for c in (EMPTY, PARTIAL, FULL):
                n = sum(int((tiles[a * size // BM:(a + 1) * size // BM,
                                   b * size // BN:(b + 1) * size // BN] == c).sum())
                        for a in qc for b in kc)
                assert int(ours[i, j, c]) == n, (i, j, c)


def test_sources():
    """Closed-form ranges where the spec has them; the exact block classifier otherwise."""
    doc_ids = attncc.Attention(mask=MASKS["document-ids"])
    assert chunk_tiles(doc_ids, L, 4, block_m=BM, block_n=BN).source == "block-map"
    causal = attncc.Attention(mask=attncc.causal())
    assert chunk_tiles(causal, L, 4, block_m=BM, block_n=BN).source == "closed-form"


@settings(max_examples=25, deadline=None)
@given(world=st.sampled_from([2, 4]), chunks_per_rank=st.sampled_from([1, 2]),
       tiles_per_chunk=st.integers(1, 3), bm=st.sampled_from([2, 4]), bn=st.sampled_from([2, 4]),
       kind=st.sampled_from(["sw", "prefix", "doc"]), a=st.integers(0, 200),
       seed=st.integers(0, 1000))
def test_shard_pairs_property(world, chunks_per_rank, tiles_per_chunk, bm, bn, kind, a, seed):
    n_chunks = world * chunks_per_rank
    length = n_chunks * tiles_per_chunk * max(bm, bn)
    if kind == "sw":
        mask = attncc.sliding_window(1 + a % length)
    elif kind == "prefix":
        mask = attncc.prefix_lm(a % (length + 1))
    else:
        cuts = torch.randperm(length - 1, generator=torch.Generator().manual_seed(seed))[:3]
        mask = attncc.document(cu_seqlens=torch.tensor(
            [0, *sorted((cuts + 1).tolist()), length], dtype=torch.int32))
    order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed)).view(world, -1)
    sharding = Sharding(n_chunks, tuple(tuple(r) for r in order.tolist()))
    spec = attncc.Attention(mask=mask)
    ours = shard_pairs(spec, length, sharding, block_m=bm, block_n=bn)
    assert torch.equal(ours, dense_pairs(spec, length, sharding, bm, bn, kernel=True))
    truth = dense_pairs(spec, length, sharding, bm, bn)
    assert torch.equal(ours[..., EMPTY], truth[..., EMPTY])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_causal_contiguous_skips_masked_pairs(world):
    """Rank i never computes keys of a later rank: half the pairs (less the diagonal) vanish."""
    spec = attncc.Attention(mask=attncc.causal())
    pairs = shard_pairs(spec, 64 * world, sb.contiguous(world), block_m=16, block_n=16)
    computed = pairs[..., PARTIAL] + pairs[..., FULL]
    assert torch.all(computed[0, 1:] == 0)  # rank 0: only its own pair
    assert torch.equal(computed == 0, torch.ones(world, world).triu(1).bool())
    assert torch.all(pairs[..., PARTIAL].diagonal() > 0)  # diagonal pairs hold the mask edge


@pytest.mark.parametrize("world", [2, 4, 8])
def test_head_tail_evens_causal_work(world):
    """Issue 16: balancing evens the per-rank tile counts, within 10% for causal at world 4."""
    spec = attncc.Attention(mask=attncc.causal())
    L_ = 2 * world * 128
    contiguous = sb.rank_work(chunk_tiles(spec, L_, world, block_m=64, block_n=64),
                              sb.contiguous(world))
    tiles = chunk_tiles(spec, L_, 2 * world, block_m=64, block_n=64)
    balanced = sb.rank_work(tiles, sb.head_tail(world))
    assert sb.imbalance(contiguous) > 0.4  # rank W-1 holds (2W - 1)x the tiles of rank 0
    assert sb.imbalance(balanced) <= 0.10, balanced
    assert float(contiguous.sum()) == float(balanced.sum())  # the same tiles, moved
    assert sb.greedy(tiles, world).chunks == sb.head_tail(world).chunks


def test_greedy_balances_uneven_documents():
    """Documents of very different lengths: contiguous shards are uneven, greedy evens them."""
    world, L_ = 4, 512
    spec = attncc.Attention(mask=attncc.document(cu_seqlens=cu([300, 100, 60, 40, 12])))
    tiles = chunk_tiles(spec, L_, 4 * world, block_m=8, block_n=8)
    greedy = sb.greedy(tiles, world)
    work = sb.rank_work(tiles, greedy)
    assert sb.imbalance(work) < 0.10, work
    by_four = Sharding(16, tuple(tuple(range(4 * r, 4 * r + 4)) for r in range(world)))
    assert sb.imbalance(sb.rank_work(tiles, by_four)) > 3 * sb.imbalance(work)
    assert sorted(c for r in greedy.chunks for c in r) == list(range(16))


def test_bad_sharding_is_refused():
    spec = attncc.Attention(mask=attncc.causal())
    with pytest.raises(ValueError, match="multiple of chunks"):
        chunk_tiles(spec, 100, 4, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="exactly one rank"):
        Sharding(4, ((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="same number of chunks"):
        Sharding(3, ((0, 1), (2,)))
    with pytest.raises(ValueError, match="do not split evenly"):
        sb.greedy(chunk_tiles(spec, 96, 6, block_m=4, block_n=4), 4)
    with pytest.raises(ValueError, match="cuts 8 chunks"):
        chunk_tiles(spec, 96, 4, block_m=4, block_n=4).pairs(sb.head_tail(4))


def test_ranges_are_global_offsets():
    assert sb.head_tail(2).ranges(40) == (((0, 10), (30, 40)), ((10, 20), (20, 30)))
