"""L8 hybrid compiled from the user API (`attncc.compile(attncc.hybrid(...))`): the softmax and
linear kernels' mix against an explicit fp64 computation of both parts (masked softmax, the
linear rule written as a masked matrix product), with a scalar alpha and with one alpha per head
(heads of two kinds in one layer), odd lengths, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.backends.reference.linear import mix_hybrid
from attncc.ir.linear import Hybrid

TOL32 = dict(atol=2e-5, rtol=2e-4)  # fp32 kernels against the fp64 oracle


def rn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def softmax_window(q, k, v, window: int, scale: float) -> torch.Tensor:
    L = q.shape[2]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = (scale * q @ k.transpose(-1, -2)).masked_fill(~((j <= i) & (i - j < window)), -math.inf)
    return torch.softmax(s, -1) @ v


def taylor_normalised(q, k, v) -> torch.Tensor:
    """Causal linear attention with the 2nd-order Taylor kernel 1 + x + x^2 / 2, normalised."""
    x = q @ k.transpose(-1, -2)
    w = (1 + x + x * x / 2).tril()
    return (w @ v) / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("L", [1, 37])
@pytest.mark.parametrize("alpha", [0.3, (1.0, 0.0, 0.25)], ids=["scalar", "per_head"])
def test_hybrid_sliding_window_and_taylor_match_both_parts(L, alpha):
    B, H, D, DV, W = 1, 3, 4, 5, 6
    gen = torch.Generator().manual_seed(L)
    q, k, v = 0.5 * rn(gen, B, H, L, D), 0.5 * rn(gen, B, H, L, D), rn(gen, B, H, L, DV)
    node = attncc.hybrid(attncc.Attention(mask=attncc.sliding_window(W)),
                         attncc.recurrent_state(feature_map="taylor2", normalize=True), alpha)
    attn = attncc.compile(node)
    assert isinstance(attn, attncc.CompiledHybrid)
    o, state = attn(q.float(), k.float(), v.float(), return_state=True)
    a = torch.tensor(alpha if isinstance(alpha, tuple) else (alpha,) * H,
                     dtype=torch.float64)[:, None, None]
    want = a * softmax_window(q, k, v, W, D ** -0.5) + (1 - a) * taylor_normalised(q, k, v)
    torch.testing.assert_close(o.double(), want, **TOL32)
    assert state.shape == (B, H, 1 + D + D * D, DV + 1)


def test_hybrid_gated_linear_takes_its_inputs_and_state():
    B, H, L, D = 1, 2, 19, 8
    gen = torch.Generator().manual_seed(3)
    q, k, v = rn(gen, B, H, L, D), rn(gen, B, H, L, D), rn(gen, B, H, L, D)
    g, s0 = F.logsigmoid(rn(gen, B, H, L) + 2), rn(gen, B, H, D, D)
    node = attncc.hybrid(attncc.Attention(mask=attncc.causal()),
                         attncc.recurrent_state(decay="scalar"), 0.6)
    o, state = attncc.compile(node)(q.float(), k.float(), v.float(), g=g.float(),
                                    initial_state=s0.float(), return_state=True, scale=0.2)
    S, outs = s0.clone(), []
    for t in range(L):  # L3, one token at a time
        S = g[:, :, t, None, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(0.2 * (q[:, :, t, :, None] * S).sum(-2))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = (0.2 * q @ k.transpose(-1, -2)).masked_fill(j > i, -math.inf)
    want = 0.6 * (torch.softmax(s, -1) @ v) + 0.4 * torch.stack(outs, 2)
    torch.testing.assert_close(o.double(), want, **TOL32)
    torch.testing.assert_close(state.double(), S, **TOL32)


def test_mix_hybrid_per_head_alpha():
    node = Hybrid(attncc.Attention(), attncc.recurrent_state(), (1.0, 0.0))
    a, b = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    out = mix_hybrid(node, a, b)
    assert out[:, 0].eq(1).all() and out[:, 1].eq(0).all()
    assert "alpha=(1.0, 0.0)" in node.text()


def test_hybrid_bad_arguments():
    lin = attncc.recurrent_state()
    with pytest.raises(ValueError, match="alpha"):
        attncc.hybrid(attncc.Attention(), lin, (0.5, 2.0))
    with pytest.raises(ValueError, match="softmax: expected a dense softmax spec"):
        attncc.hybrid(attncc.Attention(memory=lin), lin)
    attn = attncc.compile(attncc.hybrid(attncc.Attention(), lin, (1.0, 0.0, 0.5)))
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"alpha: expected one value per head \(2\)"):
        attn(q, q, q)
    with pytest.raises(ValueError, match="k: expected"):
        attn(q, torch.randn(1, 1, 4, 4), q)


def test_per_head_alpha_runs_each_part_on_its_heads_only(monkeypatch):
    """alpha (1, 0, 0.5, 0): the linear part runs on heads 1, 2, 3 (with their decays), the
    head-independent window softmax on heads 0, 2; results equal running both on all heads."""
    B, H, L, D = 1, 4, 21, 8
    gen = torch.Generator().manual_seed(5)
    q, k, v = (rn(gen, B, H, L, D).float() for _ in range(3))
    s0 = rn(gen, B, H, D, D).float()
    decays = (0.5, 0.9, 0.8, 0.99)
    alpha = (1.0, 0.0, 0.5, 0.0)
    soft = attncc.Attention(mask=attncc.sliding_window(5))
    attn = attncc.compile(attncc.hybrid(soft, attncc.recurrent_state(decay=decays), alpha))
    assert attn.linear_heads == [1, 2, 3] and attn.softmax_heads == [0, 2]
    assert attn.linear.node.decay == (0.9, 0.8, 0.99)
    seen = []
    for part in ("softmax", "linear"):
        run = getattr(attn, part)
        monkeypatch.setattr(attn, part, lambda *a, _run=run, _p=part, **kw:
                            seen.append((_p, a[0].shape[1])) or _run(*a, **kw))
    o, state = attn(q, k, v, initial_state=s0, return_state=True)
    assert sorted(seen) == [("linear", 3), ("softmax", 2)]
    full_soft = attncc.compile(soft)(q, k, v)
    full_lin, full_state = attncc.compile(attncc.Attention(
        memory=attncc.recurrent_state(decay=decays)))(q, k, v, initial_state=s0,
                                                      return_state=True)
    a = torch.tensor(alpha)[:, None, None]
    torch.testing.assert_close(o, a * full_soft + (1 - a) * full_lin, **TOL32)
    torch.testing.assert_close(state[:, 1:], full_state[:, 1:], **TOL32)
    torch.testing.assert_close(state[:, 0], s0[:, 0])  # no linear part: the initial state


def test_head_dependent_softmax_runs_on_every_head():
    idx = torch.full((1, 2, 2, 1), -1, dtype=torch.int32)
    soft = attncc.Attention(mask=attncc.block_topk(idx, 8))
    attn = attncc.compile(attncc.hybrid(soft, attncc.recurrent_state(), (1.0, 0.0)))
    assert attn.softmax_heads is None and attn.linear_heads == [1]
    with pytest.raises(ValueError, match=r"linear.decay: expected one value per head \(2"):
        attncc.compile(attncc.hybrid(soft, attncc.recurrent_state(decay=(0.5, 0.6, 0.7)),
                                     (1.0, 0.0)))
