"""K5 compact caches (DuoAttention): streaming kv heads read only `sink + R` entries of their own
cache, full heads their full cache, in one launch; against the fp64 reference of M18 (full heads
causal, streaming heads sinks_window(s, w)) on the full dense KV. Tolerances as in
test_serving_paged (fp32: 2e-5 on o and lse; fp16: 2e-3 / 2e-4)."""

from __future__ import annotations

import re

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from attncc.backends.triton.serve_aot import compile_serve_for_target
from attncc.ir.nodes import DenseMemory
from attncc.ops.serving.stream import append_stream, compact_from_dense
from tests.test_serving_paged import HKV, HQ, SINKS, close, cpu64, paged_inputs

F32 = torch.float32
S, W = 4, 20  # sinks, window
STREAM = torch.tensor([-1, 0], dtype=torch.int32)  # kv head 0 full, kv head 1 streaming
Q_CLASS = torch.tensor([0, 0, 1, 1], dtype=torch.int32)  # query heads' M18 class (G = 2)
VARIANTS = {"M1": {}, "M2+S2": {"mask": attncc.causal() & attncc.sliding_window(37),
                                "score": attncc.softcap(5.0)},
            "S3": {"score": attncc.alibi()}, "N2": {"normaliser": attncc.sink(SINKS)}}


def _randn(*shape, seed=0, device="cpu"):
    """Seeded on the CPU (same values on every device), then moved to `device`."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _spec(variant, memory):
    kw = dict(VARIANTS[variant])
    return attncc.Attention(mask=kw.pop("mask", attncc.causal()), memory=memory, **kw)


def _reference(variant, q, k, v, kv_len):
    """M18 on the full dense KV (all heads), one request at a time (its own Lk), on the CPU."""
    q, k, v, kv_len = q.cpu(), k.cpu(), v.cpu(), kv_len.cpu()
    spec = _spec(variant, DenseMemory())
    spec = spec.replace(mask=spec.mask & attncc.per_head_classes(Q_CLASS, S, W))
    outs = [attention_reference(spec, q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                v[b:b + 1, :, :n].double()) for b, n in enumerate(kv_len.tolist())]
    return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])


def _split(k, v, kv_len, ring):
    """Full heads' dense cache and the streaming heads' compact cache of sink + ring."""
    full = (STREAM < 0).to(k.device)
    ks, vs = compact_from_dense(k[:, ~full], v[:, ~full], kv_len, S, ring)
    return k[:, full].contiguous(), v[:, full].contiguous(), ks, vs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("Lq", [1, 4])
def test_compact_equals_m18_dense(variant, Lq, device):
    """Dense full cache with per-request lengths (130 and 65 > s + w: the ring has wrapped)."""
    D, L, dev = 32, 130, {"device": device}
    kv_len = torch.tensor([130, 65], dtype=torch.int32, device=device)
    k, v, q = (_randn(2, HKV, L, D, seed=1, **dev), _randn(2, HKV, L, D, seed=2, **dev),
               _randn(2, HQ, Lq, D, **dev))
    kf, vf, ks, vs = _split(k, v, kv_len, W + Lq - 1)
    assert ks.shape == (2, 1, S + W + Lq - 1, D)  # the streaming head keeps only s + R entries
    attn = attncc.compile(_spec(variant, attncc.per_head_lengths(sink=S, window=W)))
    o, lse = attn(q, kf, vf, kv_len=kv_len, k_stream=ks, v_stream=vs, stream_heads=STREAM,
                  return_lse=True)
    ro, rl = _reference(variant, q, k, v, kv_len)
    close(o, lse, ro, rl, F32)


@pytest.mark.parametrize("variant", ["M1", "N2"])
def test_compact_with_paged_full_heads(variant, device):
    """Full heads on a paged cache (only the full heads' pages), streaming heads compact."""
    D, P = 32, 16
    kc, vc, table, kv_len = paged_inputs([130, 65], P, D, F32, seed=5, device=device)
    k = torch.zeros(2, HKV, 130, D, device=device)
    v = torch.zeros(2, HKV, 130, D, device=device)
    for b, n in enumerate(kv_len.tolist()):
        pages = table[b, :-(-n // P)].long()
        k[b, :, :n] = kc[pages].flatten(0, 1)[:n].permute(1, 0, 2)
        v[b, :, :n] = vc[pages].flatten(0, 1)[:n].permute(1, 0, 2)
    ks, vs = compact_from_dense(k[:, 1:], v[:, 1:], kv_len, S, W)
    q = _randn(2, HQ, 1, D, seed=6, device=device)
    attn = attncc.compile(_spec(variant, attncc.per_head_lengths(sink=S, window=W)))
    o, lse = attn(q, kc[:, :, :1].contiguous(), vc[:, :, :1].contiguous(), page_table=table,
                  kv_len=kv_len, k_stream=ks, v_stream=vs, stream_heads=STREAM, return_lse=True)
    ro, rl = _reference(variant, q, k, v, kv_len)
    close(o, lse, ro, rl, F32)


def test_decode_loop_through_the_ring(device):
    """Prefill 10 tokens, then decode 20 steps (> w) appending through the ring; every step
    matches M18 on the full dense KV. The streaming head's cache is s + w entries; full-cache
    rows not yet written hold NaN (never read)."""
    D, L0, steps, dt = 16, 10, 20, torch.float16
    W2 = 8
    k_all = _randn(1, HKV, L0 + steps, D, seed=7).to(dt).to(device)
    v_all = _randn(1, HKV, L0 + steps, D, seed=8).to(dt).to(device)
    spec = _spec("S3", attncc.per_head_lengths(sink=S, window=W2))
    attn = attncc.compile(spec)
    kf = torch.full((1, 1, L0 + steps, D), float("nan"), dtype=dt, device=device)
    vf = kf.clone()
    kf[:, :, :L0], vf[:, :, :L0] = k_all[:, :1, :L0], v_all[:, :1, :L0]
    ks, vs = compact_from_dense(k_all[:, 1:, :L0], v_all[:, 1:, :L0],
                                torch.tensor([L0], device=device), S, W2)
    assert ks.shape == vs.shape == (1, 1, S + W2, D)
    assert ks.numel() * ks.element_size() == (S + W2) * D * 2
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_q_len=1,
                     kv_capacity=L0 + steps, dtype=dt, return_lse=True, stream_heads=STREAM,
                     device=device)
    ref_spec = spec.replace(memory=DenseMemory())
    for t in range(L0, L0 + steps):  # token t is decoded: append it, then attend
        n = torch.tensor([t], dtype=torch.int32, device=device)
        kf[:, :, t], vf[:, :, t] = k_all[:, :1, t], v_all[:, :1, t]
        append_stream(ks, vs, k_all[:, 1:, t:t + 1], v_all[:, 1:, t:t + 1], n, S)
        q = _randn(1, HQ, 1, D, seed=100 + t).to(dt).to(device)
        o, lse = attn.run(plan, q, kf, vf, kv_len=n + 1, k_stream=ks, v_stream=vs)
        ref = ref_spec.replace(mask=ref_spec.mask & attncc.per_head_classes(Q_CLASS, S, W2))
        ro, rl = attention_reference(ref, *cpu64(q, k_all[:, :, :t + 1], v_all[:, :, :t + 1]))
        close(o, lse, ro, rl, dt)


def test_ring_too_small_for_lq_is_an_error(device):
    D = 16
    attn = attncc.compile(_spec("M1", attncc.per_head_lengths(sink=S, window=W)))
    k = _randn(1, 1, 40, D, device=device)
    ks = _randn(1, 1, S + W, D, device=device)
    with pytest.raises(ValueError, match=r"k_stream: expected sink \+ ring entries with ring >= "
                                         r"window \+ Lq - 1 = 23"):
        attn(_randn(1, HQ, 4, D, device=device), k, k, k_stream=ks, v_stream=ks,
             stream_heads=STREAM)
    with pytest.raises(ValueError, match=r"stream_heads: expected an int tensor \[Hkv\]"):
        attn(_randn(1, HQ, 1, D, device=device), k, k, k_stream=ks, v_stream=ks,
             stream_heads=torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize("arch,variant", [(90, "streaming_heads"), (80, "streaming_heads"),
                                          (90, "streaming_heads_paged")])
def test_streaming_kernel_compiles_for_gpu(arch, variant, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    attn = attncc.compile(_spec("M2+S2", attncc.per_head_lengths(sink=S, window=W)))
    art = compile_serve_for_target(attn.kernels, arch, "float16", 128, variant)
    assert len(art.cubin) > 0
    assert re.search(rf"\.entry\s+{art.name}\s*\(", art.ptx)
    assert re.search(rf"^\.target\s+sm_{arch}", art.ptx, re.MULTILINE)


def test_streaming_head_skips_the_gap(device):
    """Lk = 130, 32-key tiles (interpreter): the full head reads tiles 0-4, the streaming head
    only tile 0 (sinks) and tiles 3-4 (window 110..129): 8 tile reads, not 10."""
    D, L = 16, 130
    kv_len, dev = torch.tensor([L], dtype=torch.int32, device=device), {"device": device}
    k, v, q = (_randn(1, HKV, L, D, seed=1, **dev), _randn(1, HKV, L, D, seed=2, **dev),
               _randn(1, HQ, 1, D, **dev))
    kf, vf, ks, vs = _split(k, v, kv_len, W)
    attn = attncc.compile(_spec("M1", attncc.per_head_lengths(sink=S, window=W)))
    plan = attn.plan(batch=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_capacity=L,
                     dtype=F32, num_splits=2, return_lse=True, stream_heads=STREAM,
                     device=device, block_n=32)  # the visit count below assumes 32-key tiles
    visits = torch.zeros(1, dtype=torch.int32, device=device)
    o, lse = attn.run(plan, q, kf, vf, k_stream=ks, v_stream=vs, _visits=visits)
    assert visits.tolist() == [8]
    ro, rl = _reference("M1", q, k, v, kv_len)
    close(o, lse, ro, rl, F32)
