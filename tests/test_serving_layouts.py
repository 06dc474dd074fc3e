"""Serving kernels on ragged (K3), persistent-slot (K4) and per-head-length (K5) memory, M18
head classes in one launch, and cascade (shared prefix), against the fp64 references of
`attncc.backends.reference.memory`. Tolerances as in test_serving_paged (fp32: 2e-5)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.backends.reference.memory import (
    paged_reference,
    per_head_length_reference,
    persistent_reference,
    ragged_reference,
)
from attncc.ir.nodes import DenseMemory
from tests.test_serving_paged import (
    HKV,
    HQ,
    SINKS,
    SPEC_IDS,
    close,
    cpu64,
    paged_inputs,
    specs,
)

F32 = torch.float32


def _randn(*shape, seed=0, device="cpu"):
    """Seeded on the CPU (same values on every device), then moved to `device`."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


RAGGED = {  # id -> (cu_seqlens_q, cu_seqlens_k): prefill, an empty request, decode rows
    "q5_0_17-k40_3_77": ([0, 5, 5, 22], [0, 40, 43, 120]),
    "q1_4-k63_130": ([0, 1, 5], [0, 63, 193]),
}


@pytest.mark.parametrize("spec_id", SPEC_IDS)
@pytest.mark.parametrize("lens_id", list(RAGGED))
def test_ragged_equals_per_request(spec_id, lens_id, device):
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in RAGGED[lens_id])
    spec = specs(attncc.ragged())[spec_id]
    D = 32
    q, k, v = _randn(int(cq[-1]), HQ, D), _randn(int(ck[-1]), HKV, D, seed=1), \
        _randn(int(ck[-1]), HKV, D, seed=2)
    ref_in = cpu64(q, k, v)
    q, k, v = q.to(device), k.to(device), v.to(device)
    attn = attncc.compile(spec)
    o, lse = attn(q, k, v, cu_seqlens_q=cq.to(device), cu_seqlens_k=ck.to(device),
                  return_lse=True)
    ro, rl = ragged_reference(spec, *ref_in, cq, ck)
    close(o, lse, ro, rl, F32)


@pytest.mark.parametrize("spec_id", SPEC_IDS)
@pytest.mark.parametrize("Lq,Lk", [(1, 70), (17, 63)], ids=["Lq1-Lk70", "Lq17-Lk63"])
def test_persistent_slots(spec_id, Lq, Lk, device):
    spec = specs(attncc.persistent(3))[spec_id]
    D, dev = 32, {"device": device}
    q, k, v = (_randn(2, HQ, Lq, D, **dev), _randn(2, HKV, Lk, D, seed=1, **dev),
               _randn(2, HKV, Lk, D, seed=2, **dev))
    mk, mv = _randn(HKV, 3, D, seed=3, **dev), _randn(HKV, 3, D, seed=4, **dev)
    o, lse = attncc.compile(spec)(q, k, v, mem_k=mk, mem_v=mv, return_lse=True)
    ro, rl = persistent_reference(spec, *cpu64(q, k, v, mk, mv))
    close(o, lse, ro, rl, F32)


@pytest.mark.parametrize("spec_id", SPEC_IDS)
@pytest.mark.parametrize("lens", [[70, 24], [17, 70, 1, 40]], ids=["per-kv-head", "per-q-head"])
def test_per_head_lengths(spec_id, lens, device):
    """Streaming heads keep their last n keys; entries before them hold NaN and are never read."""
    spec = specs(attncc.per_head_lengths())[spec_id]
    D, Lk = 32, 70
    q, k, v = _randn(2, HQ, 4, D), _randn(2, HKV, Lk, D, seed=1), _randn(2, HKV, Lk, D, seed=2)
    n = torch.tensor(lens, dtype=torch.int32)
    keep = n.repeat_interleave(HQ // len(lens)).view(HKV, -1).amax(1)
    dropped = (torch.arange(Lk) < Lk - keep[:, None])[None, :, :, None]
    kn, vn = k.masked_fill(dropped, float("nan")), v.masked_fill(dropped, float("nan"))
    o, lse = attncc.compile(spec)(q.to(device), kn.to(device), vn.to(device),
                                  head_kv_len=n.to(device), return_lse=True)
    ro, rl = per_head_length_reference(spec, q.double(), k.double(), v.double(), n)
    close(o, lse, ro, rl, F32)


M18 = {"M18": {}, "M18+S2": {"score": attncc.softcap(5.0)}, "M18+S3": {"score": attncc.alibi()},
       "M18+N2": {"normaliser": attncc.sink(SINKS)}}


@pytest.mark.parametrize("variant", list(M18))
@pytest.mark.parametrize("Lq", [1, 4])
def test_streaming_and_full_heads_one_launch(variant, Lq, device):
    """M18 (DuoAttention): full heads causal, streaming heads sinks + window, on paged KV."""
    heads = torch.tensor([0, 1, 1, 0], dtype=torch.int32)  # one of each class per kv group
    spec = attncc.Attention(mask=attncc.per_head_classes(heads, 4, 20), memory=attncc.paged(16),
                            **M18[variant])
    kc, vc, table, kv_len = paged_inputs([130, 65], 16, 32, F32, seed=5, device=device)
    q = _randn(2, HQ, Lq, 32, seed=6, device=device)
    o, lse = attncc.compile(spec)(q, kc, vc, page_table=table, kv_len=kv_len, return_lse=True)
    ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
    close(o, lse, ro, rl, F32)


@pytest.mark.parametrize("spec_id", SPEC_IDS)
@pytest.mark.parametrize("prefix", [45, 1], ids=["prefix45", "prefix1"])
def test_cascade_equals_full_attention(spec_id, prefix, device):
    """Shared prefix computed once + each request's paged suffix, merged = full attention."""
    spec = specs(attncc.paged(16))[spec_id]
    D, Lq = 32, 3
    pk, pv = _randn(prefix, HKV, D, seed=7), _randn(prefix, HKV, D, seed=8)
    kc, vc, table, kv_len = paged_inputs([10, 30, 0], 16, D, F32, seed=9)
    q = _randn(3, HQ, Lq, D, seed=10)
    attn = attncc.compile(spec)
    plan = attn.plan(batch=3, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=Lq,
                     max_pages=table.shape[1], dtype=F32, return_lse=True, device=device)
    o, lse = attn.cascade(plan, *(t.to(device) for t in (q, pk, pv, kc, vc)),
                          page_table=table.to(device), kv_len=kv_len.to(device))
    dense = spec.replace(memory=DenseMemory())
    for b, n in enumerate(kv_len.tolist()):  # the CPU copies: the references run there
        pages = table[b, :-(-n // 16)].long()
        k = torch.cat([pk, kc[pages].flatten(0, 1)[:n]]).permute(1, 0, 2)[None]
        v = torch.cat([pv, vc[pages].flatten(0, 1)[:n]]).permute(1, 0, 2)[None]
        ro, rl = attention_reference(dense, q[b:b + 1].double(), k.double(), v.double())
        close(o[b:b + 1], lse[b:b + 1], ro, rl, F32)


_DOC = torch.sort(torch.randint(0, 4, (130,), generator=torch.Generator().manual_seed(11)))[0]


def _doc_causal(b, h, q_idx, kv_idx):  # a traced mask_mod reading a captured tensor
    return (_DOC.int()[q_idx] == _DOC.int()[kv_idx]) & (kv_idx <= q_idx)


OTHER = {  # masks and scores beyond the Done-when set: none, data-dependent, per-request bias
    "no-mask": {},
    "traced-doc": {"mask": _doc_causal},
    "S5-bias-per-request": {"mask": attncc.causal(),
                            "score": attncc.bias(_randn(2, 1, 1, 130, seed=12))},
}


@pytest.mark.parametrize("other", list(OTHER))
def test_other_masks_and_scores_paged(other, device):
    spec = attncc.Attention(memory=attncc.paged(16), **OTHER[other])
    kc, vc, table, kv_len = paged_inputs([130, 65], 16, 32, F32, seed=13, device=device)
    q = _randn(2, HQ, 3, 32, seed=14, device=device)
    o, lse = attncc.compile(spec)(q, kc, vc, page_table=table, kv_len=kv_len, return_lse=True)
    ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
    close(o, lse, ro, rl, F32)
