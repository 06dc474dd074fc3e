"""Serving kernels place a request's queries at the end of its own keys: with kv_len[b] = n and
Lq queries, row i sits at position qp = i + n - Lq (docs/semantics.md, "Query positions when
Lq != Lk"). A decode step of `chunked(c)` over a paged or dense KV cache attends to the chunk
of position n - 1, never to chunk 0.

The oracle: a brute-force predicate (M7 written with qp in plain Python), the dense fp64 softmax
of tests/dense_oracle.py on each request's gathered keys. Pages wholly before the chunk's first
kv tile hold NaN, so reading them shows; the kernel's tile counter says how many tiles it read.

Tolerances (fp32, IEEE dots, max abs error against fp64): 2e-5 on o and lse.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ops.serving.compiled import ServingAttention
from tests.dense_oracle import dense_attention
from tests.test_serving_paged import HKV, HQ, dense_of, paged_inputs

C, P, D, TILE = 20, 16, 32, 32
LENS = [131, 47, 1, 60]  # chunks of the last key: 120..130, 40..46, 0..0, 60..60
TOL = {"atol": 2e-5, "rtol": 2e-5}


def chunked_allowed(Lq: int, n: int) -> torch.Tensor:
    """bool [Lq, n]: M7 `qp // c == kv // c and kv <= qp` with qp = i + n - Lq."""
    out = torch.zeros(Lq, n, dtype=torch.bool)
    for i in range(Lq):
        qp = i + n - Lq
        for kv in range(n):
            out[i, kv] = qp // C == kv // C and kv <= qp
    return out


def tiles_read(Lq: int, n: int) -> int:
    """kv tiles of TILE keys holding an allowed pair of any row."""
    hit = chunked_allowed(Lq, n).any(0)
    return len({kv // TILE for kv in range(n) if hit[kv]})


def _poison_before_chunk(kc, vc, table, lens, Lq):
    """NaN in every page wholly before the first kv tile the rows' chunks touch."""
    for b, n in enumerate(lens):
        first_tile = (max(n - Lq, 0) // C * C) // TILE
        pages = table[b, :first_tile * TILE // P].long()
        kc[pages], vc[pages] = float("nan"), float("nan")


def _check(o, lse, q, keys, lens):
    """keys(b) -> (k [1, Hkv, n, D], v) fp64 of request b, clean."""
    Lq = q.shape[2]
    for b, n in enumerate(lens):
        k, v = keys(b)
        ro, rl = dense_attention(q[b:b + 1].double().cpu(), k, v, chunked_allowed(Lq, n))
        assert not torch.isnan(o[b]).any()
        torch.testing.assert_close(o[b:b + 1].double().cpu(), ro, **TOL)
        torch.testing.assert_close(lse[b:b + 1].double().cpu(), rl, **TOL)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("Lq", [1, 3])
def test_paged_chunked_decode_attends_to_its_own_chunk(Lq, splits, device):
    spec = attncc.Attention(mask=attncc.chunked(C), memory=attncc.paged(P))
    kc, vc, table, kv_len = paged_inputs(LENS, P, D, torch.float32, seed=11)
    clean = (kc.double(), vc.double())
    lens = [max(n, Lq) for n in LENS]  # a request holds at least its own rows
    kv_len = torch.tensor(lens, dtype=torch.int32)
    _poison_before_chunk(kc, vc, table, lens, Lq)
    q = torch.randn(len(lens), HQ, Lq, D, generator=torch.Generator().manual_seed(12))
    attn = attncc.compile(spec)
    plan = attn.plan(batch=len(lens), num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=Lq,
                     max_pages=table.shape[1], dtype=torch.float32, num_splits=splits,
                     return_lse=True, device=device, block_n=TILE)
    visits = torch.zeros(len(lens), dtype=torch.int32, device=device)
    o, lse = attn.run(plan, *(t.to(device) for t in (q, kc, vc)), page_table=table.to(device),
                      kv_len=kv_len.to(device), _visits=visits)
    _check(o, lse, q, lambda b: dense_of(*clean, table, kv_len, b), lens)
    assert visits.tolist() == [HKV * tiles_read(Lq, n) for n in lens]


@pytest.mark.parametrize("Lq", [1, 3])
def test_dense_cache_chunked_decode_attends_to_its_own_chunk(Lq, device):
    """Dense cache [B, Hkv, Lk, D] with per-request kv_len: position n - 1 is the last row."""
    spec = attncc.Attention(mask=attncc.chunked(C))
    g = torch.Generator().manual_seed(13)
    lens = [max(n, Lq) for n in LENS]
    Lk = max(lens) + 5  # slack past every request's keys: never read
    k, v = torch.randn(len(lens), HKV, Lk, D, generator=g), torch.randn(len(lens), HKV, Lk, D,
                                                                         generator=g)
    clean = (k.double(), v.double())
    for b, n in enumerate(lens):
        first = (max(n - Lq, 0) // C * C) // TILE * TILE
        k[b, :, :first], v[b, :, :first] = float("nan"), float("nan")
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    q = torch.randn(len(lens), HQ, Lq, D, generator=g)
    attn = ServingAttention(spec)
    plan = attn.plan(batch=len(lens), num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=Lq,
                     kv_capacity=Lk, dtype=torch.float32, return_lse=True, device=device,
                     block_n=TILE)
    visits = torch.zeros(len(lens), dtype=torch.int32, device=device)
    o, lse = attn.run(plan, *(t.to(device) for t in (q, k, v)), _visits=visits,
                      kv_len=torch.tensor(lens, dtype=torch.int32, device=device))
    _check(o, lse, q, lambda b: (clean[0][b:b + 1, :, :lens[b]], clean[1][b:b + 1, :, :lens[b]]),
           lens)
    assert visits.tolist() == [HKV * tiles_read(Lq, n) for n in lens]
