"""attncc.nn modules against an independent oracle: torch's scaled_dot_product_attention with a
dense float mask holding the ALiBi bias and -inf outside the sliding window (GQA by repeating
kv heads). CPU runs the reference backend. Tolerance fp32 1e-5 (outputs) and 1e-4 (gradients).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncc
import attncc.nn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def sdpa_oracle(q, k, v, slopes, window):
    """q [B, Hq, L, D], k/v [B, Hkv, L, D]: causal sliding window + ALiBi via SDPA."""
    L, group = q.shape[2], q.shape[1] // k.shape[1]
    i = torch.arange(L)
    rel = (i[None, :] - i[:, None]).to(q.dtype)  # kv - q
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    bias = slopes.to(q.dtype)[:, None, None] * rel
    bias = bias.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                          v.repeat_interleave(group, 1), attn_mask=bias)


def make_mha(H=4, Hkv=2, E=32, window=5):
    torch.manual_seed(0)
    return attncc.nn.MultiHeadAttention(
        E, H, num_kv_heads=Hkv, mask=attncc.sliding_window(window),
        score=attncc.alibi(torch.linspace(0.1, 0.6, H)), learnable=["alibi_slopes"],
        backend="reference")


def mha_oracle(m, x, window):
    B, L, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    q = m.q_proj(x).view(B, L, H, D).transpose(1, 2)
    k = m.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
    v = m.v_proj(x).view(B, L, Hkv, D).transpose(1, 2)
    o = sdpa_oracle(q, k, v, m.attn.alibi_slopes, window)
    return m.out_proj(o.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("B,L,window", [(1, 1, 5), (2, 17, 5), (1, 63, 64)],
                         ids=["B1-L1-w5", "B2-L17-w5", "B1-L63-w64"])
def test_mha_matches_sdpa_oracle_with_gradients(B, L, window):
    m = make_mha(window=window)
    x = torch.randn(B, L, 32, requires_grad=True)
    y = m(x)
    w = torch.randn(y.shape)
    (y * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    ref = mha_oracle(m, x, window)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    (ref * w).sum().backward()
    want = [x.grad] + [p.grad for p in m.parameters()]
    assert [n for n, _ in m.named_parameters()][-1] == "attn.alibi_slopes"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert L == 1 or got[-1].abs().sum() > 0  # the slopes learn (L = 1: kv - q is 0)


def test_set_changes_the_window_in_place():
    m = make_mha(window=5)
    x = torch.randn(1, 17, 32)
    m.attn.set(window=2)
    torch.testing.assert_close(m(x), mha_oracle(m, x, 2), atol=1e-5, rtol=1e-5)
    assert m.attn.scalars.tolist() == [2.0]
    with pytest.raises(TypeError, match="set: expected one of this kernel's parameters"):
        m.attn.set(windw=3)


def test_attention_core_bhsd_and_buffers():
    doc = torch.tensor([0] * 5 + [1] * 8)
    core = attncc.nn.Attention(mask=attncc.document(doc), backend="reference")
    assert "doc" in dict(core.named_buffers()) and not list(core.parameters())
    q, k, v = (torch.randn(1, 2, 13, 16) for _ in range(3))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(13, 13, dtype=torch.bool).tril()
    torch.testing.assert_close(core(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
                               atol=1e-5, rtol=1e-5)


def test_half_module_casts_learnable_captures_back():
    m = make_mha().to(torch.bfloat16)
    x = torch.randn(1, 9, 32, dtype=torch.bfloat16)
    ref = mha_oracle(make_mha(), x.float(), 5)
    torch.testing.assert_close(m(x).float(), ref, atol=5e-2, rtol=5e-2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="learnable: expected names of floating captured"):
        attncc.nn.Attention(mask=attncc.causal(), learnable=["slopes"])
    with pytest.raises(ValueError, match="embed_dim: expected a multiple of num_heads=3"):
        attncc.nn.MultiHeadAttention(32, 3)
    with pytest.raises(TypeError, match="give a spec or mask=/score=, not both"):
        attncc.nn.Attention(attncc.Attention(), mask=attncc.causal())


def test_a_linear_spec_is_refused_at_construction():
    """attncc.nn runs softmax specs: a linear recurrence says so when the module is built
    (its compiled object takes no `layout=`, so a call would fail with a confusing message)."""
    spec = attncc.Attention(memory=attncc.recurrent_state(decay=0.9))
    with pytest.raises(TypeError, match="attncc.nn runs softmax specs.*CompiledLinearAttention"):
        attncc.nn.Attention(spec)
