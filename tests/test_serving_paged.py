"""Serving kernels on paged KV (K2) against the fp64 reference (interpreter on CPU).

Tolerances (max abs error against fp64 on inputs rounded to the tested dtype): fp32 (IEEE dots)
2e-5 on o and lse; fp16 2e-3 on o (p is rounded to fp16 before p @ v), 2e-4 on lse; bf16
(upcast before tl.dot under the interpreter) 2e-2 on o, 2e-3 on lse. Split-KV partials are
fp32, so splitting adds nothing visible at these tolerances.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.backends.reference.memory import paged_reference

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-4), torch.bfloat16: (2e-2, 2e-3)}
HQ, HKV = 4, 2
SINKS = torch.tensor([0.5, -1.0, 2.0, 1.0])


def specs(memory) -> dict[str, attncc.AttentionSpec]:
    """The Done-when set: M1, M2+S2, S3 (ALiBi), N2 (sink), each with `memory`."""
    return {
        "M1": attncc.Attention(mask=attncc.causal(), memory=memory),
        "M2+S2": attncc.Attention(mask=attncc.causal() & attncc.sliding_window(37),
                                  score=attncc.softcap(5.0), memory=memory),
        "S3": attncc.Attention(mask=attncc.causal(), score=attncc.alibi(), memory=memory),
        "N2": attncc.Attention(mask=attncc.causal(), normaliser=attncc.sink(SINKS),
                               memory=memory),
    }


SPEC_IDS = list(specs(attncc.paged(1)))


def paged_inputs(lens: list[int], page_size: int, D: int, dtype, seed: int = 0, spare: int = 3,
                 device="cpu"):
    """Random caches with pages placed at random: (k_cache, v_cache, page_table, kv_len), made
    on the CPU (seeded) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page_size) for n in lens) + 1
    num_pages = len(lens) * max_pages + spare
    kc = torch.randn(num_pages, page_size, HKV, D, generator=g).to(dtype)
    vc = torch.randn(num_pages, page_size, HKV, D, generator=g).to(dtype)
    table = torch.randperm(num_pages, generator=g)[:len(lens) * max_pages]
    out = kc, vc, table.view(len(lens), max_pages).int(), torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(device) for t in out)


def cpu64(*ts):
    """fp64 CPU copies for the references (which run on the CPU)."""
    return [t.double().cpu() for t in ts]


def dense_of(kc, vc, table, lens, b):
    """Sequence b's keys gathered from its pages: [1, Hkv, n, D]."""
    n = int(lens[b])
    pages = table[b, :-(-n // kc.shape[1])].long()
    return (kc[pages].flatten(0, 1)[:n].permute(1, 0, 2)[None],
            vc[pages].flatten(0, 1)[:n].permute(1, 0, 2)[None])


def close(o, lse, ro, rl, dtype):
    o_tol, lse_tol = TOL[dtype]
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.double().cpu(), ro.cpu(), atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(lse.double().cpu(), rl.cpu(), atol=lse_tol, rtol=lse_tol)


CASES = [  # (page size, kv lengths, Lq, D, dtype)
    (1, [17, 63], 1, 32, torch.float32),
    (16, [65, 130, 1], 4, 32, torch.float32),
    (128, [63, 150], 1, 16, torch.float16),
    (16, [130, 17], 4, 32, torch.bfloat16),
]


@pytest.mark.parametrize("spec_id", SPEC_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[0]}-Lk{'_'.join(map(str, c[1]))}"
                         f"-Lq{c[2]}-d{c[3]}-{str(c[4]).removeprefix('torch.')}")
def test_paged_equals_dense(case, spec_id, device):
    """Paged with random page placement equals the dense reference of every sequence."""
    P, lens, Lq, D, dtype = case
    spec = specs(attncc.paged(P))[spec_id]
    kc, vc, table, kv_len = paged_inputs(lens, P, D, dtype, device=device)
    q = torch.randn(len(lens), HQ, Lq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = q.to(device)
    attn = attncc.compile(spec)
    o, lse = attn(q, kc, vc, page_table=table, kv_len=kv_len, return_lse=True)
    ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
    close(o, lse, ro, rl, dtype)
    for b in range(len(lens)):  # the dense oracle on the gathered keys says the same
        k, v = dense_of(*cpu64(kc, vc), table.cpu(), kv_len.cpu(), b)
        do, dl = attention_reference(spec.replace(memory=attncc.ir.nodes.DenseMemory()),
                                     q[b:b + 1].double().cpu(), k, v)
        close(o[b:b + 1], lse[b:b + 1], do, dl, dtype)


@pytest.mark.parametrize("spec_id", SPEC_IDS)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_equals_prefill_last_rows(spec_id, splits, device):
    """Decode steps (Lq 1 and 4, split-KV or not) give prefill's last rows."""
    P, D, dtype, lens = 16, 32, torch.float32, [65, 40]
    spec = specs(attncc.paged(P))[spec_id]
    kc, vc, table, kv_len = paged_inputs(lens, P, D, dtype, seed=2, device=device)
    attn = attncc.compile(spec)
    L = max(lens)
    q = torch.randn(len(lens), HQ, L, D, generator=torch.Generator().manual_seed(3)).to(device)
    for b, n in enumerate(lens):  # each request's prefill: its own n rows against its n keys
        full = attn(q[b:b + 1, :, L - n:], kc, vc, page_table=table[b:b + 1],
                    kv_len=kv_len[b:b + 1], num_splits=1)
        for Lq in (1, 4):
            rows = q[:, :, L - Lq:]
            dec = attn(rows, kc, vc, page_table=table, kv_len=kv_len, num_splits=splits)
            torch.testing.assert_close(dec[b], full[0, :, n - Lq:], atol=2e-5, rtol=2e-5)


def test_head_major_pages_and_graph_style_replay(device):
    """One plan, replayed with new page tables and lengths (what a CUDA graph does), on
    head-major caches [num_pages, Hkv, P, D]."""
    P, D = 16, 32
    spec = specs(attncc.paged(P))["M2+S2"]
    attn = attncc.compile(spec)
    plan = attn.plan(batch=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     max_pages=10, dtype=torch.float32, return_lse=True, device=device)
    assert plan.num_splits > 1
    for seed, lens in enumerate([[1, 17], [130, 65], [144, 0]]):
        kc, vc, table, kv_len = paged_inputs(lens, P, D, torch.float32, seed=seed, device=device)
        table = torch.cat([table, table.new_zeros(2, 10 - table.shape[1])], 1)
        q = torch.randn(2, HQ, 1, D, generator=torch.Generator().manual_seed(seed)).to(device)
        o, lse = attn.run(plan, q, kc.transpose(1, 2), vc.transpose(1, 2), page_table=table,
                          kv_len=kv_len, kv_layout="hnd")
        ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
        close(o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("splits", [1, 2])
def test_sliding_window_decode_reads_only_window_tiles(splits, device):
    """Decode at n = 150 with a window of 37 reads kv tiles 3 and 4 only (tile 32 under the
    interpreter): 2 tiles per kv head, not all 5; pages before them hold NaN, never read."""
    P, D, n, w = 16, 32, 150, 37
    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(w),
                            memory=attncc.paged(P))
    kc, vc, table, kv_len = paged_inputs([n], P, D, torch.float32, device=device)
    poisoned = table[0, :96 // P].long()  # tokens 0..95: tiles 0-2
    kc[poisoned], vc[poisoned] = float("nan"), float("nan")
    q = torch.randn(1, HQ, 1, D).to(device)
    attn = attncc.compile(spec)
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                     max_pages=table.shape[1], dtype=torch.float32, num_splits=splits,
                     return_lse=True, device=device, block_n=32)  # the tile counts below
    assert plan.block_n == 32
    visits = torch.zeros(1, dtype=torch.int32, device=device)
    o, lse = attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len, _visits=visits)
    assert visits.tolist() == [2 * HKV]
    clean = cpu64(kc.nan_to_num(0.0), vc.nan_to_num(0.0))
    ro, rl = paged_reference(spec, q.double().cpu(), *clean, table.cpu(), kv_len.cpu())
    close(o, lse, ro, rl, torch.float32)


def test_sinks_window_skips_the_gap(device):
    """M6 (sinks 4, window 20) at n = 150: the sink tile 0 and the window tile 4, not 1-3."""
    P, D, n = 16, 32, 150
    spec = attncc.Attention(mask=attncc.sinks_window(4, 20), memory=attncc.paged(P))
    kc, vc, table, kv_len = paged_inputs([n], P, D, torch.float32, device=device)
    q = torch.randn(1, HQ, 1, D).to(device)
    attn = attncc.compile(spec)
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                     max_pages=table.shape[1], dtype=torch.float32, return_lse=True,
                     device=device)
    visits = torch.zeros(1, dtype=torch.int32, device=device)
    o, lse = attn.run(plan, q, kc, vc, page_table=table, kv_len=kv_len, _visits=visits)
    assert visits.tolist() == [2 * HKV]
    ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu())
    close(o, lse, ro, rl, torch.float32)


def test_runtime_parameters_bind_per_call(device):
    """`window=` overrides the spec's window without recompiling (bound by the plan)."""
    spec = specs(attncc.paged(16))["M2+S2"]
    kc, vc, table, kv_len = paged_inputs([130, 65], 16, 32, torch.float32, device=device)
    q = torch.randn(2, HQ, 4, 32).to(device)
    attn = attncc.compile(spec)
    o, lse = attn(q, kc, vc, page_table=table, kv_len=kv_len, window=9, return_lse=True)
    ro, rl = paged_reference(spec, *cpu64(q, kc, vc), table.cpu(), kv_len.cpu(),
                             params={"window": 9})
    close(o, lse, ro, rl, torch.float32)


@pytest.mark.parametrize("hkv", [1, 4], ids=["mqa-G4", "mha-G1"])
@pytest.mark.parametrize("Lq", [1, 4])
def test_group_sizes(hkv, Lq, device):
    """GQA packing with one kv head for all query heads, and with none shared."""
    P, D, lens = 16, 32, [63, 130]
    g = torch.Generator().manual_seed(4)
    kc, vc = torch.randn(20, P, hkv, D, generator=g), torch.randn(20, P, hkv, D, generator=g)
    table = torch.randperm(20, generator=g)[:18].view(2, 9).int()
    kv_len = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(2, HQ, Lq, D, generator=g)
    ref_in = cpu64(q, kc, vc)
    q, kc, vc, table, kv_len = (t.to(device) for t in (q, kc, vc, table, kv_len))
    spec = specs(attncc.paged(P))["S3"]
    o, lse = attncc.compile(spec)(q, kc, vc, page_table=table, kv_len=kv_len, return_lse=True)
    ro, rl = paged_reference(spec, *ref_in, table.cpu(), kv_len.cpu())
    close(o, lse, ro, rl, torch.float32)
