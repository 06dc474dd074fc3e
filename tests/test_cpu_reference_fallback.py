"""CPU tensors with TRITON_INTERPRET unset run the PyTorch reference with a warning: it must
handle every shape the kernel handles (Lq = 0), compute in fp32 for fp16 inputs as the kernel
accumulates, and its warning must name the caller's line.

Tolerances (max abs on o against fp64, inputs rounded to fp16 first): 2e-3, as the kernel's
fp16 tolerance in tests/test_triton_forward.py; the fallback, computing in fp32, is at the fp16
rounding of o (about 5e-4 here), where computing in fp16 gave several times that."""

from __future__ import annotations

import warnings

import pytest
import torch

import attncc
from attncc import config
from attncc.backends.reference.forward import attention_reference

_g = torch.Generator().manual_seed(0)


def _qkv(Lq, Lk, dtype, D=64):
    return [torch.randn(1, 2, n, D, generator=_g).to(dtype) for n in (Lq, Lk, Lk)]


@pytest.fixture
def no_interpreter():
    with config.override(TRITON_INTERPRET="0"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_empty_queries(no_interpreter):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    q, k, v = _qkv(0, 9, torch.float32)
    o, lse = attn(q, k, v, return_lse=True)
    assert o.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


def test_fp16_is_computed_in_fp32(no_interpreter):
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    q, k, v = _qkv(300, 300, torch.float16)
    o, lse = attn(q, k, v, return_lse=True)
    assert o.dtype == torch.float16
    ro, rlse = attention_reference(attn.spec, q.double(), k.double(), v.double())
    # error of o rounded once to fp16 from the exact result: the best any fp16 output can do
    floor = (ro.half().double() - ro).abs().max().item()
    err = (o.double() - ro).abs().max().item()
    assert err <= 1.01 * floor + 1e-6, (err, floor)
    assert (lse.double() - rlse).abs().max().item() < 1e-4


def test_warning_names_the_callers_line():
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    q, k, v = _qkv(5, 5, torch.float32)
    with config.override(TRITON_INTERPRET="0"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attn(q, k, v)
    ours = [w for w in seen if "TRITON_INTERPRET is not set" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__, [(w.filename, w.lineno) for w in ours]
