"""Tracing FlexAttention-style mask_mod / score_mod functions.

Meaning is checked, not just structure: a FlexAttention function is valid torch code, so calling
it on real broadcast index tensors gives the ground truth, and the traced expression evaluated by
`attncc.ir.eval.evaluate` on the same grid must agree.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ir.eval import evaluate
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX, SCORE
from attncc.ir.trace import trace_mask, trace_score

B, H, LQ, LK = 2, 3, 9, 11  # every index grid below; odd sizes on purpose
G = torch.Generator().manual_seed(0)

# captured tensors (module globals and closures both get traced by name)
doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])  # [LK] int64
doc2d = torch.randint(0, 3, (B, LK), generator=G).sort(dim=1).values  # [B, LK]
bias_table = torch.randn(H, 2 * max(LQ, LK) + 1, generator=G, dtype=torch.float64)  # [H, 23]
is_global = torch.tensor([True, False, False, True] + [False] * (LK - 4))  # [LK] bool
temperature = torch.tensor(0.7, dtype=torch.float64)  # 0-d float
limit = torch.tensor(4)  # 0-d int
flag = torch.tensor(True)  # 0-d bool
head_scale = torch.rand(H, generator=G, dtype=torch.float64) + 0.5
OFF = max(LQ, LK)  # keeps `q_idx - kv_idx + OFF` inside bias_table


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))  # compile() renders into the cache


def grid():
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(LQ).view(1, 1, LQ, 1)
    kv = torch.arange(LK).view(1, 1, 1, LK)
    score = torch.randn(B, H, LQ, LK, generator=G, dtype=torch.float64) * 3
    return score, b, h, q, kv


def evaluated(node, score, b, h, q, kv) -> torch.Tensor:
    env = {B_IDX: b, H_IDX: h, Q_IDX: q, KV_IDX: kv, SCORE: score}
    tensors = {c.name: c.tensor for c in node.captures}
    out = evaluate(node.expr, env, tensors)
    return torch.as_tensor(out).expand(B, H, LQ, LK)


def check_mask(fn) -> attncc.Mask:
    mask = trace_mask(fn)
    score, b, h, q, kv = grid()
    want = torch.as_tensor(fn(b, h, q, kv)).expand(B, H, LQ, LK)
    got = evaluated(mask, score, b, h, q, kv)
    assert got.dtype == torch.bool
    assert torch.equal(got, want), f"{fn.__name__}: {mask.expr}"
    assert 0 < want.sum() < want.numel(), "a test mask should allow some pairs and not others"
    return mask


def check_score(fn) -> attncc.ScoreMod:
    mod = trace_score(fn)
    score, b, h, q, kv = grid()
    want = fn(score, b, h, q, kv).double().expand(B, H, LQ, LK)
    got = evaluated(mod, score, b, h, q, kv).double()
    # ground truth may run partly in fp32 (int tensors promote to the default dtype)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mod.expr}\n{m}")
    return mod


# --- masks -----------------------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_or_sink(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx < 3) & (kv_idx <= q_idx)) | (kv_idx == 0)


def comparisons(b, h, q_idx, kv_idx):
    return ((q_idx > kv_idx) | (q_idx == kv_idx + 2)) & (kv_idx != 1) & ~(q_idx < 2) & (h <= 1)


def blocks_and_strides(b, h, q_idx, kv_idx):
    # Python `//` and `%` floor on negatives: (q - kv) takes both signs here
    return (q_idx // 4 == kv_idx // 4) | ((q_idx - kv_idx) % 3 == 0) | ((kv_idx - q_idx) // 5 == 1)


def same_document(b, h, q_idx, kv_idx):
    return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)


def same_document_per_batch(b, h, q_idx, kv_idx):
    return doc2d[b, q_idx] == doc2d[b, kv_idx]


def longformer(b, h, q_idx, kv_idx):
    return is_global[q_idx] | is_global[kv_idx] | (abs(q_idx - kv_idx) <= 1)


def within_limit(b, h, q_idx, kv_idx):
    return (abs(q_idx - kv_idx) < limit) & flag


def closure_mask():
    local_doc = doc.clone()

    def local(b, h, q_idx, kv_idx):
        return torch.logical_and(local_doc[kv_idx] == local_doc[q_idx], torch.logical_not(
            torch.remainder(kv_idx, 2) == 1))
    return local


def exclusive_or(b, h, q_idx, kv_idx):
    # `^` from both sides, including a 0-d tensor and a Python bool on the left
    return (flag ^ (q_idx >= kv_idx)) ^ (kv_idx % 2 == 0) ^ (h == 1) ^ True


def torch_where_mask(b, h, q_idx, kv_idx):
    return torch.where(h == 0, q_idx >= kv_idx, q_idx <= kv_idx)


MASKS = [causal, window_or_sink, comparisons, blocks_and_strides, same_document,
         same_document_per_batch, longformer, within_limit, closure_mask(), exclusive_or,
         torch_where_mask]


@pytest.mark.parametrize("fn", MASKS, ids=lambda f: f.__name__)
def test_traced_mask_means_what_the_function_computes(fn):
    check_mask(fn)


# --- score mods --------------------------------------------------------------------------------

def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def python_ops(score, b, h, q_idx, kv_idx):
    return -score * 0.5 + (q_idx - kv_idx) * 0.25 - h / 2 + 3 ** (b - 1.0) + (kv_idx + 1) ** 2 / 50


def masked_where(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, float("-inf"))


def where_two_scores(score, b, h, q_idx, kv_idx):
    return torch.where((q_idx - kv_idx) % 2 == 0, score * 2, -score)


def alibi_like(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * abs(q_idx - kv_idx) / 8


def exp_log(score, b, h, q_idx, kv_idx):
    return score - torch.log(1.0 + abs(q_idx - kv_idx)) + torch.exp(-(kv_idx * 0.1))


def min_max(score, b, h, q_idx, kv_idx):
    return torch.minimum(torch.maximum(score, (kv_idx - q_idx) * 0.5), temperature * 5)


def sigmoid_gate(score, b, h, q_idx, kv_idx):
    return score * torch.sigmoid(score) + torch.sigmoid(q_idx * 0.3 - kv_idx * 0.2)


def integer_div_mod(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx) // 3 + (q_idx + 2 * kv_idx) % 5


def relative_bias_2d(score, b, h, q_idx, kv_idx):
    return score + bias_table[h, q_idx - kv_idx + OFF]


def per_head_1d(score, b, h, q_idx, kv_idx):
    return score * head_scale[h]


def zero_d_capture(score, b, h, q_idx, kv_idx):
    return score * temperature + temperature  # tensor on both sides of the operator


def tensor_methods(score, b, h, q_idx, kv_idx):
    return score.tanh() * 2 + (q_idx - kv_idx).abs() * 0.1 + score.sigmoid()


def bool_capture_in_score(score, b, h, q_idx, kv_idx):
    return torch.where(is_global[kv_idx], score + 1.0, score)


SCORES = [softcap, python_ops, masked_where, where_two_scores, alibi_like, exp_log, min_max,
          sigmoid_gate, integer_div_mod, relative_bias_2d, per_head_1d, zero_d_capture,
          tensor_methods, bool_capture_in_score]


@pytest.mark.parametrize("fn", SCORES, ids=lambda f: f.__name__)
def test_traced_score_means_what_the_function_computes(fn):
    check_score(fn)


def test_masked_where_keeps_minus_infinity():
    score, b, h, q, kv = grid()
    got = evaluated(trace_score(masked_where), score, b, h, q, kv)
    assert torch.isneginf(got[..., 0, 1:]).all() and torch.isfinite(got[..., -1, :LQ]).all()


# --- captured tensors ----------------------------------------------------------------------------

def test_captures_are_named_after_their_variables():
    assert [c.name for c in trace_mask(same_document).captures] == ["doc"]
    assert [c.name for c in trace_mask(closure_mask()).captures] == ["local_doc"]
    assert [c.name for c in trace_score(relative_bias_2d).captures] == ["bias_table"]
    assert [c.name for c in trace_score(zero_d_capture).captures] == ["temperature"]
    longformer_mask = trace_mask(longformer)
    assert [(c.name, c.dtype, c.ndim) for c in longformer_mask.captures] == [
        ("is_global", "bool", 1)]
    assert "is_global" in longformer_mask.text()


def test_capture_keeps_its_tensor_and_kind():
    (cap,) = trace_score(relative_bias_2d).captures
    assert cap.tensor is bias_table and (cap.dtype, cap.ndim) == ("float64", 2)
    (cap,) = trace_score(zero_d_capture).captures
    assert cap.tensor is temperature and cap.ndim == 0


# --- keys and compile forms ------------------------------------------------------------------

def test_same_expression_same_key():
    def mine(b, h, q, kv):  # other names, same expression as `causal`
        return q >= kv

    a = attncc.Attention(mask=causal)
    b = attncc.Attention(mask=mine)
    c = attncc.Attention(mask=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    assert a.key == b.key == c.key
    assert a.key != attncc.Attention(mask=window_or_sink).key
    assert attncc.Attention(score=softcap).key == attncc.Attention(score=softcap).key


def test_runtime_values_do_not_change_the_key():
    sw128 = attncc.Attention(mask=attncc.sliding_window(128))
    sw256 = attncc.Attention(mask=attncc.sliding_window(256))
    assert sw128.key == sw256.key and sw128.text() != sw256.text()
    assert (attncc.Attention(score=attncc.softcap(30.0)).key
            == attncc.Attention(score=attncc.softcap(50.0)).key)
    other_doc = torch.tensor([5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 7])  # same dtype and rank
    assert attncc.Attention(mask=attncc.document(doc)).key == attncc.Attention(
        mask=attncc.document(other_doc)).key
    keys = {attncc.Attention(mask=m).key for m in
            (attncc.causal(), attncc.sliding_window(128), attncc.chunked(128),
             attncc.document(doc), attncc.document(doc, causal=False), None)}
    assert len(keys) == 6


def test_decorator_forms_produce_compiled_attention():
    @attncc.compile
    def plain(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    @attncc.compile(mask=attncc.causal())
    def capped(score, b, h, q_idx, kv_idx):
        return 20.0 * torch.tanh(score / 20.0)

    @attncc.compile(score=softcap)
    def masked(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    spec = attncc.Attention(mask=attncc.causal(), score=attncc.softcap(20.0))
    compiled = attncc.compile(spec)
    for c in (plain, capped, masked, compiled):
        assert isinstance(c, attncc.CompiledAttention)
    assert plain.spec.mask.expr == trace_mask(causal).expr and plain.spec.score is None
    assert capped.spec.mask == attncc.causal()
    assert capped.spec.score.expr == trace_score(softcap).expr
    assert masked.spec.key == attncc.Attention(mask=causal, score=softcap).key
    assert compiled.spec is spec
    assert plain.name.startswith("attn_fwd_plain_") and capped.name.startswith("attn_fwd_causal_")


def test_compile_spec_rejects_extra_arguments():
    with pytest.raises(TypeError, match="put them in the Attention"):
        attncc.compile(attncc.Attention(), mask=attncc.causal())
