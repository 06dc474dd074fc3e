"""Traced masks that compare conditions: `==` / `!=` of two conditions (Equivalent / Xor), a
condition compared with a number (counts as 0 / 1), an int torch.where inside a condition (sympy
folds it into ITE), and `int // 1` of a captured read; kernel (interpreter, fp32) and fp64
reference against a brute-force mask from calling the function on every (q, kv) pair."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.forward import attention_reference

TAB = torch.arange(23, dtype=torch.int64) % 5


def cond_eq(b, h, q, kv):
    return (torch.where(q > 3, q, kv) > 2) == (kv < 5)


def cond_ne_and_number(b, h, q, kv):
    return ((q > 3) != (kv < 5)) & ((q >= kv) == 1)


def nested_where(b, h, q, kv):
    return (q < torch.where(q < torch.where(q < kv, q, kv), q, kv)) | (kv <= q)


def floordiv_one(b, h, q, kv):
    return TAB[q] // 1 >= torch.floor(TAB[kv])


@pytest.mark.parametrize("fn", [cond_eq, cond_ne_and_number, nested_where, floordiv_one],
                         ids=lambda f: f.__name__)
def test_traced_condition_matches_brute_force(fn, device):
    L, D = 23, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, D, generator=g) for _ in range(3))
    allowed = torch.tensor([[bool(fn(torch.tensor(0), torch.tensor(0), torch.tensor(i),
                                     torch.tensor(j))) for j in range(L)] for i in range(L)])
    s = (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5
    expected = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0) @ v.double()
    spec = attncc.Attention(mask=fn, schedule=attncc.Schedule(block_m=16, block_n=16))
    ref, _ = attention_reference(spec, q.double(), k.double(), v.double())
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)
    out = attncc.compile(spec)(q.to(device), k.to(device), v.to(device)).cpu()
    torch.testing.assert_close(out.double(), expected, rtol=3e-5, atol=3e-5)  # fp32 tolerance
