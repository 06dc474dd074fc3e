"""The Triton forward kernel against the fp64 reference (interpreter on CPU, compiled on GPU).

Tolerances (max abs error against fp64, inputs rounded to the tested dtype first):
fp32 (IEEE dots) 2e-5 on o and lse; fp16 2e-3 on o (p is rounded to fp16 before p @ v), 1e-4
on lse (fp32 arithmetic); bf16 (interpreter: upcast before tl.dot, see triton_backend) 2e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference
from tests.catalog_cases import masks, scores

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, dv or D, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def check(spec, B, Hq, Hkv, Lq, Lk, D, dtype, device, dv=None, **call):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, dv)
    attn = attncc.compile(spec)
    o, lse = attn(q, k, v, return_lse=True, backend="triton", **call)
    ro, rl = attention_reference(spec, q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                 q_chunk=64, kv_chunk=64,
                                 params={k_: v_ for k_, v_ in call.items()
                                         if not isinstance(v_, torch.Tensor)})
    o_tol, lse_tol = TOL[dtype]
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.double().cpu(), ro, atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(lse.double().cpu(), rl, atol=lse_tol, rtol=lse_tol)
    return attn


SHAPES = {  # id -> (B, Hq, Hkv, Lq, Lk, D, dtype)
    "L63-Lk200-gqa-d32-fp32": (1, 4, 2, 63, 200, 32, torch.float32),
    "L257-mqa-d72-fp16": (2, 2, 1, 257, 257, 72, torch.float16),
}


MASK_CASES = [(m, shape) for shape, (B, Hq, _, Lq, Lk, _, _) in SHAPES.items()
              for m in masks(B, Hq, Lq, Lk)]  # grid masks (M12) only where Lq == Lk


@pytest.mark.filterwarnings("ignore:divide by zero")
@pytest.mark.parametrize("mask_id,shape", MASK_CASES, ids=[f"{m}-{s}" for m, s in MASK_CASES])
def test_every_mask(mask_id, shape, device):
    B, Hq, Hkv, Lq, Lk, D, dtype = SHAPES[shape]
    check(attncc.Attention(mask=masks(B, Hq, Lq, Lk)[mask_id]), B, Hq, Hkv, Lq, Lk, D, dtype,
          device)


@pytest.mark.filterwarnings("ignore:divide by zero")  # S8 takes log(0) on padding columns
@pytest.mark.parametrize("score_id", list(scores(1, 2, 200, 200)))
def test_every_score_mod(score_id, device):
    B, Hq, Hkv, L, D = 1, 2, 1, 200, 128
    spec = attncc.Attention(mask=attncc.causal(), score=scores(B, Hq, L, L)[score_id])
    check(spec, B, Hq, Hkv, L, L, D, torch.float16, device)


@pytest.mark.parametrize("score_id", ["S2-softcap", "S3-alibi", "S5-bias", "S7-log-count"])
def test_score_mods_decode(score_id, device):
    spec = attncc.Attention(mask=attncc.causal(), score=scores(1, 2, 1, 257)[score_id])
    check(spec, 1, 2, 2, 1, 257, 32, torch.float32, device)


@pytest.mark.parametrize("mask_id", ["M1-causal", "M6-sinks-window", "M11-document"])
def test_sink_normaliser(mask_id, device):
    sinks = torch.tensor([0.5, -1.0, 2.0, 8.0])
    spec = attncc.Attention(mask=masks(1, 4, 200, 200)[mask_id], normaliser=attncc.sink(sinks))
    check(spec, 1, 4, 2, 200, 200, 32, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [32, 72, 128])
@pytest.mark.parametrize("L", [1, 63, 200, 257])
def test_lengths_head_dims_dtypes(L, D, dtype, device):
    spec = attncc.Attention(mask=attncc.causal() & attncc.sliding_window(100),
                            score=attncc.softcap(20.0))
    check(spec, 1, 2, 1, L, L, D, dtype, device)


@pytest.mark.parametrize("Lq,Lk", [(1, 257), (63, 200), (200, 63), (257, 1)])
def test_lq_differs_from_lk(Lq, Lk, device):
    check(attncc.Attention(mask=attncc.causal()), 1, 3, 1, Lq, Lk, 32, torch.float32, device)


@pytest.mark.parametrize("D,Dv", [(16, 16), (96, 96), (256, 256), (40, 24)])
def test_head_dims_edges(D, Dv, device):
    check(attncc.Attention(mask=attncc.causal()), 1, 1, 1, 70, 70, D, torch.float32, device,
          dv=Dv)


def test_bf16_interpreter_upcast_path(device):
    """bf16 end to end; in the interpreter the dots run on upcast fp32 tiles (named path)."""
    check(attncc.Attention(mask=attncc.sliding_window(50), score=attncc.softcap(10.0)),
          1, 2, 1, 129, 129, 64, torch.bfloat16, device)


def test_bshd_layout_and_strided_views(device):
    B, H, L, D = 2, 3, 77, 32
    q, k, v = _inputs(B, H, H, L, L, D, torch.float32, device)
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    o_bhsd = attn(q, k, v, backend="triton")
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    o_bshd = attn(qs, ks, vs, layout="bshd", backend="triton")
    assert o_bshd.shape == (B, L, H, D)
    torch.testing.assert_close(o_bshd.transpose(1, 2), o_bhsd, atol=1e-6, rtol=1e-6)
    wide = torch.randn(B, H, L, 2 * D, device=device)[..., ::2]  # non-unit last stride
    o_view = attn(wide, k, v, backend="triton")
    torch.testing.assert_close(o_view, attn(wide.contiguous(), k, v, backend="triton"))


def test_fully_masked_rows_are_zero_with_minus_inf_lse(device):
    """Rows whose document id appears in no key: o = 0 and lse = -inf, never NaN."""
    doc_q = torch.tensor([0, 0, 5, 5, 1, 1, 1])
    doc_k = torch.tensor([0, 0, 1, 1, 1, 1, 1])

    def mod(b, h, q_idx, kv_idx):
        return qdoc[q_idx] == kdoc[kv_idx]

    qdoc, kdoc = doc_q.to(device), doc_k.to(device)
    attn = attncc.compile(mod)
    q, k, v = _inputs(1, 1, 1, 7, 7, 16, torch.float32, device)
    o, lse = attn(q, k, v, return_lse=True, backend="triton")
    assert torch.all(o[0, 0, 2:4] == 0) and torch.all(lse[0, 0, 2:4] == -math.inf)
    assert not torch.isnan(o).any()
    check(attncc.Attention(mask=mod), 1, 1, 1, 7, 7, 16, torch.float32, device)


def test_runtime_parameters_and_captures_rebind_without_recompiling(device):
    doc = torch.sort(torch.randint(0, 3, (90,)))[0]
    attn = check(attncc.Attention(mask=attncc.causal() & attncc.sliding_window(30)),
                 1, 1, 1, 90, 90, 16, torch.float32, device, window=11)
    source_before = attn.kernels.kernel.source
    check(attncc.Attention(mask=attncc.causal() & attncc.sliding_window(30)),
          1, 1, 1, 90, 90, 16, torch.float32, device, window=64)
    assert attn.kernels.kernel.source == source_before
    doc_spec = attncc.Attention(mask=attncc.document(doc))
    other = torch.sort(torch.randint(0, 5, (90,)))[0]
    q, k, v = _inputs(1, 1, 1, 90, 90, 16, torch.float32, device)
    o = attncc.compile(doc_spec)(q, k, v, backend="triton", doc=other.to(device))
    ro, _ = attention_reference(attncc.Attention(mask=attncc.document(other)),
                                q.double().cpu(), k.double().cpu(), v.double().cpu())
    torch.testing.assert_close(o.double().cpu(), ro, atol=2e-5, rtol=2e-5)


def test_traced_flex_style_functions_match_named(device):
    doc = torch.sort(torch.randint(0, 3, (120,)))[0]

    @attncc.compile
    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    @attncc.compile(mask=attncc.causal())
    def capped(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    q, k, v = _inputs(1, 2, 1, 120, 120, 32, torch.float32, device)
    for attn, named in ((doc_causal, attncc.Attention(mask=attncc.document(doc))),
                        (capped, attncc.Attention(mask=attncc.causal(),
                                                  score=attncc.softcap(30.0)))):
        ro, _ = attention_reference(named, q.double(), k.double(), v.double())
        torch.testing.assert_close(attn(q, k, v, backend="triton").double().cpu(), ro.cpu(),
                                   atol=2e-5, rtol=2e-5)
