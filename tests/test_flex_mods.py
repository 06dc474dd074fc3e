"""The score mods of PyTorch's own FlexAttention test suite, traced by `attncc.compile`.

Each mod runs on the Triton kernel (the CPU interpreter here) in fp16 and fp32 and is compared
with `torch.nn.attention.flex_attention.flex_attention` run EAGER in fp64 on the same function:
the ground truth is PyTorch's own reading of the mod, not attncc's. Shapes are tiny and odd,
Lq != Lk both ways, GQA Hq/Hkv in {4/1, 4/2, 5/1}. Rows whose every score is -inf (inverse causal
with Lq > Lk) must give o = 0 and lse = -inf, as flex_attention does.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import attncc

G = torch.Generator().manual_seed(0)
B, D = 2, 16
# (Hq, Hkv, Lq, Lk): every GQA ratio of the brief, Lq != Lk both ways
SHAPES = [(4, 1, 7, 13), (4, 2, 11, 5), (5, 1, 9, 6)]
TOL = {torch.float16: 3e-3, torch.float32: 2e-5}  # |o - o_fp64| bound per input dtype
LSE_TOL = {torch.float16: 3e-3, torch.float32: 2e-5}

slopes = torch.exp2(-8.0 * torch.arange(1, 6, dtype=torch.float32) / 5)  # ALiBi, one per head
head_offset = torch.randn(5, generator=G)  # [Hq]
buf = torch.randn(B, 3, generator=G)  # reduced per batch: buf[b].sum()
WINDOW = 3


def identity(score, b, h, q_idx, kv_idx):
    return score


def times_two(score, b, h, q_idx, kv_idx):
    return score * 2


def squared(score, b, h, q_idx, kv_idx):
    return score * score


def causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, float("-inf"))


def inverse_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx <= kv_idx, score, float("-inf"))


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def rel_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score + (q_idx - kv_idx), float("-inf"))


def alibi(score, b, h, q_idx, kv_idx):
    return score + slopes[h] * (kv_idx - q_idx)


def windowed(score, b, h, q_idx, kv_idx):
    return torch.where((q_idx - kv_idx).abs() < WINDOW, score, float("-inf"))


def head_offset_mod(score, b, h, q_idx, kv_idx):
    return score + head_offset[h]


def trig(score, b, h, q_idx, kv_idx):
    return torch.sin(score) * torch.cos(h)


def trig2(score, b, h, q_idx, kv_idx):
    return score + torch.sin(b) + torch.cos(h) * torch.tan(q_idx * 0.1 - kv_idx * 0.05)


def reduced_buffer(score, b, h, q_idx, kv_idx):
    return score + buf[b].sum()


def reduced_buffer_kv(score, b, h, q_idx, kv_idx):  # a per-row constant cancels in softmax:
    return score + buf[b].sum() * (kv_idx - q_idx) * 0.1  # this one moves the output


MODS = [identity, times_two, squared, causal, inverse_causal, rel_bias, rel_causal, alibi,
        windowed, head_offset_mod, trig, trig2, reduced_buffer, reduced_buffer_kv]
_compiled: dict = {}


def compiled(mod) -> attncc.CompiledAttention:
    if mod not in _compiled:
        _compiled[mod] = attncc.compile(mod)
    return _compiled[mod]


def inputs(shape, dtype, requires_grad=False):
    Hq, Hkv, Lq, Lk = shape
    q = torch.randn(B, Hq, Lq, D, generator=G).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=G).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=G).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def flex(q, k, v, mod):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex_attention(q.double(), k.double(), v.double(), score_mod=mod,
                              enable_gqa=True, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mod", MODS, ids=[m.__name__ for m in MODS])
def test_flex_suite_mod_forward(mod, dtype):
    shape = SHAPES[MODS.index(mod) % len(SHAPES)]
    q, k, v = inputs(shape, dtype)
    o, lse = compiled(mod)(q, k, v, return_lse=True)
    o_ref, lse_ref = flex(q, k, v, mod)
    assert o.dtype == dtype and not o.isnan().any() and not lse.isnan().any()
    err = (o.double() - o_ref).abs().max().item()
    assert err <= TOL[dtype], f"{mod.__name__} {shape}: |o - o_ref| = {err:.2e}"
    # lse: the same -inf rows (no allowed key), finite ones close
    assert torch.equal(lse.isinf(), lse_ref.isinf())
    finite = lse_ref.isfinite()
    err = (lse.double()[finite] - lse_ref[finite]).abs().max().item()
    assert err <= LSE_TOL[dtype] * max(1.0, lse_ref[finite].abs().max().item())


def test_rows_with_every_score_minus_inf_give_zero_and_minus_inf():
    # inverse causal with Lq > Lk: query rows past the last key have no allowed key at all
    q, k, v = inputs((4, 2, 11, 5), torch.float32)
    o, lse = compiled(inverse_causal)(q, k, v, return_lse=True)
    assert torch.equal(o[:, :, 5:], torch.zeros_like(o[:, :, 5:]))
    assert (lse[:, :, 5:] == -math.inf).all() and lse[:, :, :5].isfinite().all()


def test_reduced_buffer_is_recomputed_each_call():
    attn = compiled(reduced_buffer_kv)
    q, k, v = inputs(SHAPES[0], torch.float32)
    before = attn(q, k, v)
    saved = buf.clone()
    try:
        buf[1] += 2.0  # new values in the captured tensor: the next call must see them
        o_ref, _ = flex(q, k, v, reduced_buffer_kv)
        assert (attn(q, k, v).double() - o_ref).abs().max() <= TOL[torch.float32]
        assert (attn(q, k, v) - before).abs().max() > 1e-2
        # a replacement passed under the source's name is reduced instead of the captured one
        new = torch.randn(B, 3, generator=G)
        o_new = attn(q, k, v, buf=new)
        buf.copy_(new)
        o_ref, _ = flex(q, k, v, reduced_buffer_kv)
        assert (o_new.double() - o_ref).abs().max() <= TOL[torch.float32]
    finally:
        buf.copy_(saved)


def test_reduction_spec_names_the_derived_capture():
    spec = compiled(reduced_buffer).spec
    (cap,) = spec.score.captures
    assert cap.name == "buf_sum" and cap.ndim == 1 and cap.reduction.source == "buf"
    assert "buf_sum:float32[1d] = sum(buf, dims>=1)" in spec.text()


# --- backward: the chain rule through sin / exp / where, and learnable captured tensors --------
# flex_attention has no CPU backward, so the gradient oracle is fp64 autograd through the same
# mod vmapped over (b, h, q_idx, kv_idx) exactly as flex_attention's eager path applies it

def dense_reference(q, k, v, mod):
    Hq, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (t.double().repeat_interleave(Hq // t.shape[1], dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    fn = mod
    for dims in [(0, None, None, None, 0), (0, None, None, 0, None), (0, None, 0, None, None),
                 (0, 0, None, None, None)]:
        fn = torch.vmap(fn, in_dims=dims)
    s = fn(s, *(torch.arange(n) for n in (q.shape[0], Hq, Lq, Lk)))
    empty = (s == -math.inf).all(-1, keepdim=True)  # no allowed key: o = 0
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return p @ v


def test_dense_reference_agrees_with_flex_attention():
    q, k, v = inputs((4, 2, 11, 5), torch.float32)
    for mod in (inverse_causal, trig2, reduced_buffer_kv):
        assert torch.allclose(dense_reference(q, k, v, mod), flex(q, k, v, mod)[0], atol=1e-12)

def sin_mod(score, b, h, q_idx, kv_idx):
    return torch.sin(score) + 0.5 * score


def exp_mod(score, b, h, q_idx, kv_idx):
    return torch.exp(score * 0.5) * 0.7


learn_scale = torch.randn(5, generator=G).requires_grad_(True)  # [Hq]
learn_buf = torch.randn(B, 3, generator=G).requires_grad_(True)  # [B, 3], reduced per batch


def learnable_where(score, b, h, q_idx, kv_idx):
    # a per-head temperature: an additive per-head bias would have a zero gradient (softmax is
    # shift invariant), so the test could not fail
    return torch.where(q_idx + 2 >= kv_idx, score * torch.cos(h) * learn_scale[h], float("-inf"))


def learnable_reduced(score, b, h, q_idx, kv_idx):
    return torch.erf(score) + learn_buf[b].sum() * torch.sigmoid(score)


def step_mod(score, b, h, q_idx, kv_idx):  # floor/sign differentiate to 0, maximum to a step
    return (score + torch.floor(score * 2) * 0.25 + torch.maximum(score, 0.5 * score)
            + torch.sign(score) * 0.1 + torch.tan(score * 0.2))


GRAD_MODS = [sin_mod, exp_mod, causal, learnable_where, learnable_reduced, step_mod]
GRAD_TOL = 3e-4  # fp32 inputs: |grad - grad_fp64| / (1 + max |grad_fp64|)


@pytest.mark.parametrize("mod", GRAD_MODS, ids=[m.__name__ for m in GRAD_MODS])
def test_flex_mod_backward_matches_autograd(mod):
    shape = (5, 1, 9, 6) if mod is not exp_mod else (4, 2, 7, 13)
    q, k, v = inputs(shape, torch.float32, requires_grad=True)
    captured = [learn_scale, learn_buf]
    for t in captured:
        t.grad = None
    do = torch.randn(B, shape[0], shape[2], D, generator=G)
    compiled(mod)(q, k, v).backward(do)
    got = [q.grad, k.grad, v.grad] + [t.grad for t in captured]
    for t in (q, k, v, *captured):
        t.grad = None
    dense_reference(q, k, v, mod).backward(do.double())
    want = [q.grad, k.grad, v.grad] + [t.grad for t in captured]
    for name, g, w in zip(["dq", "dk", "dv", "d_scale", "d_buf"], got, want):
        if w is None:  # this mod does not read the tensor
            assert g is None or not g.any(), f"{mod.__name__} {name}: expected no gradient"
            continue
        assert w.abs().max() > 1e-3, f"{mod.__name__} {name}: a vacuous comparison"
        err = (g.double() - w.double()).abs().max().item() / (1 + w.abs().max().item())
        assert err <= GRAD_TOL, f"{mod.__name__} {name}: relative error {err:.2e}"


def test_module_holds_the_source_of_a_reduction_and_learns_it():
    module = attncc.nn.Attention(score=learnable_reduced, learnable=["learn_buf"])
    assert isinstance(module.learn_buf, torch.nn.Parameter) and not hasattr(module,
                                                                           "learn_buf_sum")
    q, k, v = inputs((4, 1, 7, 13), torch.float32)
    do = torch.randn(B, 4, 7, D, generator=G)
    module(q, k, v).backward(do)
    learn_buf.grad = None
    with torch.no_grad():
        learn_buf.copy_(module.learn_buf)
    dense_reference(q, k, v, learnable_reduced).backward(do.double())
    err = (module.learn_buf.grad - learn_buf.grad).abs().max() / learn_buf.grad.abs().max()
    assert err <= GRAD_TOL
