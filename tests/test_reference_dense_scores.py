"""attention_reference == an independent dense oracle for score mods S1-S8, composed scores, the
N2 sink, the softmax scale, traced FlexAttention-style score_mods and position-dependent scores
under reorders (CATALOG.md Sections 0, 2, 3, 4). Oracle: tests/dense_oracle.py."""

from __future__ import annotations

import math

import pytest
import torch

from attncc.library import masks as M
from attncc.library import scores as S
from attncc.backends.reference.forward import attention_reference
from attncc.ir.reorder import Hilbert2D, UserPermutation
from attncc.ir.spec import AttentionSpec
from attncc.ir.trace import trace_mask, trace_score
from tests import dense_oracle as D
from tests.dense_oracle import one_thread  # noqa: F401  (a fixture, see pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = D.F64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _idx(B, H, Lq, Lk):
    """b, h, q, kv as [B,1,1,1], [1,H,1,1], [1,1,Lq,1], [1,1,1,Lk]."""
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lk).view(1, 1, 1, Lk))


def _qkv(B, Hq, Hkv, Lq, Lk, seed=0):
    q, k, v = D.make_qkv(B, Hq, Hkv, Lq, Lk, seed=seed)
    return 3.0 * q, k, v  # scores of a few units, so soft-caps and biases matter


def _alibi_slopes(Hq):  # S3 default
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)], dtype=F64)


def _rel_bucket(q, kv, m):  # S4: relative distance clamped to [-m, m], shifted to [0, 2m]
    return (q - kv).clamp(-m, m) + m


def _case(name, shape, mod, formula, masked=True):
    B, Hq, Hkv, Lq, Lk = shape
    tag = "causal" if masked else "nomask"
    return pytest.param(shape, mod, formula, masked,
                        id=f"{name}-{tag}-B{B}-H{Hq}kv{Hkv}-{Lq}x{Lk}")


def _alibi(H):  # slope[h] as [1, H, 1, 1]
    return _alibi_slopes(H).view(1, H, 1, 1)


# Captured data, fixed seeds; each fits the shapes of the cases that use it.
SLOPES_2 = torch.tensor([0.5, 0.03125], dtype=F64)
REL_4x9, REL_2x601, REL_2x7 = _rand(4, 9, seed=1), _rand(2, 601, seed=2), _rand(2, 7, seed=11)
BIAS_BHQK, BIAS_1HQK = _rand(2, 2, 63, 63, seed=3), _rand(1, 4, 63, 200, seed=4)
BIAS_B11K, BIAS_11Q1 = _rand(2, 1, 1, 63, seed=5), _rand(1, 1, 257, 1, seed=6)
HB_4, HB_4_B = _rand(4, seed=7), _rand(4, seed=10)
LOGCOUNT_200 = torch.log(torch.randint(1, 50, (200,), generator=_gen(8)).to(F64))
LAMBDA_63 = torch.rand(63, generator=_gen(9), dtype=F64) + 0.05

# (ScoreMod, f(s, b, h, q, kv) written from the CATALOG formula); indices broadcast as _idx.
SCORE_CASES = [
    _case("S1-scale0.5", (2, 4, 2, 63, 63), S.scale(0.5), lambda s, b, h, q, kv: 0.5 * s,
          masked=False),
    _case("S1-scale3", (1, 2, 1, 63, 200), S.scale(3.0), lambda s, b, h, q, kv: 3.0 * s),
    _case("S2-softcap1", (2, 4, 2, 63, 63), S.softcap(1.0),
          lambda s, b, h, q, kv: 1.0 * torch.tanh(s / 1.0)),
    _case("S2-softcap5", (1, 2, 2, 257, 257), S.softcap(5.0),
          lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0), masked=False),
    _case("S2-softcap50-decode", (2, 4, 1, 1, 200), S.softcap(50.0),
          lambda s, b, h, q, kv: 50.0 * torch.tanh(s / 50.0)),
    _case("S3-alibi", (2, 4, 2, 63, 63), S.alibi(),
          lambda s, b, h, q, kv: s + _alibi(4) * (kv - q)),
    _case("S3-alibi", (1, 4, 1, 63, 200), S.alibi(),  # q is the aligned qp = q + 137
          lambda s, b, h, q, kv: s + _alibi(4) * (kv - (q + 137))),
    _case("S3-alibi-captured", (2, 2, 2, 63, 63), S.alibi(SLOPES_2),
          lambda s, b, h, q, kv: s + SLOPES_2[h] * (kv - q), masked=False),
    _case("S4-relbias-m4", (2, 4, 2, 63, 63), S.relative_bias(REL_4x9),
          lambda s, b, h, q, kv: s + REL_4x9[h, _rel_bucket(q, kv, 4)]),
    _case("S4-relbias-m300", (1, 2, 1, 63, 200), S.relative_bias(REL_2x601),  # qp = q + 137
          lambda s, b, h, q, kv: s + REL_2x601[h, q + 137 - kv + 300], masked=False),
    _case("S5-bias-BHQK", (2, 2, 1, 63, 63), S.bias(BIAS_BHQK),
          lambda s, b, h, q, kv: s + BIAS_BHQK),
    _case("S5-bias-1HQK", (2, 4, 2, 63, 200), S.bias(BIAS_1HQK),
          lambda s, b, h, q, kv: s + BIAS_1HQK[0, h, q, kv]),
    _case("S5-bias-B11K", (2, 2, 2, 63, 63), S.bias(BIAS_B11K),
          lambda s, b, h, q, kv: s + BIAS_B11K[b, 0, 0, kv], masked=False),
    _case("S5-bias-11Q1", (1, 2, 1, 257, 257), S.bias(BIAS_11Q1),
          lambda s, b, h, q, kv: s + BIAS_11Q1[0, 0, q, 0]),
    _case("S6-headbias", (2, 4, 2, 63, 63), S.head_bias(HB_4),
          lambda s, b, h, q, kv: s + HB_4[h]),
    _case("S7-logcount", (1, 4, 1, 63, 200), S.log_count(LOGCOUNT_200),
          lambda s, b, h, q, kv: s + LOGCOUNT_200[kv]),
    _case("S8-calibration", (2, 2, 2, 63, 63), S.calibration(LAMBDA_63),
          lambda s, b, h, q, kv: s + torch.log(LAMBDA_63[kv])),
    _case("softcap20.then(alibi)", (2, 4, 2, 63, 63), S.softcap(20.0).then(S.alibi()),
          lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0) + _alibi(4) * (kv - q)),
    _case("scale2.then(softcap5).then(headbias)", (1, 4, 1, 63, 63),
          S.scale(2.0).then(S.softcap(5.0)).then(S.head_bias(HB_4_B)),
          lambda s, b, h, q, kv: 5.0 * torch.tanh(2.0 * s / 5.0) + HB_4_B[h], masked=False),
    _case("softcap5.then(softcap2)-same-param-name", (1, 2, 2, 63, 63),
          S.softcap(5.0).then(S.softcap(2.0)),
          lambda s, b, h, q, kv: 2.0 * torch.tanh(5.0 * torch.tanh(s / 5.0) / 2.0)),
    _case("relbias.then(bias)", (2, 2, 1, 63, 63), S.relative_bias(REL_2x7).then(S.bias(BIAS_BHQK)),
          lambda s, b, h, q, kv: s + REL_2x7[h, _rel_bucket(q, kv, 3)] + BIAS_BHQK[b, h, q, kv]),
]


@pytest.mark.parametrize("shape, mod, formula, masked", SCORE_CASES)
def test_score_mod_matches_dense(shape, mod, formula, masked):
    B, Hq, Hkv, Lq, Lk = shape
    idx = _idx(B, Hq, Lq, Lk)
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, seed=1)
    mask, allowed = (M.causal(), D.m_causal(Lq, Lk)) if masked else (None, None)
    D.check(AttentionSpec(mask=mask, score=mod), q, k, v, allowed,
            score=lambda s: formula(s, *idx))


def test_calibration_zero_weight_is_a_dropped_key():
    """S8 with lambda = 0: log 0 = -inf, the key gets weight 0; row 0 (causal: key 0 only)
    then has no mass at all and gives o = 0, lse = -inf."""
    lam = torch.rand(63, generator=_gen(13), dtype=F64) + 0.1
    lam[[0, 5, 6, 40]] = 0.0
    q, k, v = _qkv(1, 2, 1, 63, 63, seed=2)
    o, lse = D.check(AttentionSpec(mask=M.causal(), score=S.calibration(lam)), q, k, v,
                     D.m_causal(63, 63), score=lambda s: s + torch.log(lam))
    assert torch.equal(o[:, :, 0], torch.zeros_like(o[:, :, 0]))
    assert bool((lse[:, :, 0] == -math.inf).all()) and bool(torch.isfinite(lse[:, :, 1:]).all())


@pytest.mark.parametrize("shape", [(2, 4, 2, 63, 63), (1, 4, 1, 1, 257), (2, 2, 2, 63, 200)],
                         ids=lambda s: "B{}-H{}kv{}-{}x{}".format(*s))
@pytest.mark.parametrize("mask_name", ["none", "causal", "sw8"])
def test_sink_normaliser_matches_dense(shape, mask_name):
    """N2: the denominator gets + e^{sink[h]}; attncc's lse includes the sink term."""
    B, Hq, Hkv, Lq, Lk = shape
    mask, allowed = {"none": (None, None), "causal": (M.causal(), D.m_causal(Lq, Lk)),
                     "sw8": (M.sliding_window(8), D.m_sliding(Lq, Lk, 8))}[mask_name]
    sink = _rand(Hq, seed=14) + 2.0
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, seed=3)
    D.check(AttentionSpec(mask=mask, normaliser=S.sink(sink)), q, k, v, allowed, sink=sink)


def test_sink_with_softcap_and_fully_masked_row():
    """A row with no allowed key and a sink: o = 0 and lse = sink[h] (never NaN)."""
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    q, k, v = _qkv(2, 4, 2, 63, 63, seed=4)
    o, lse = D.check(AttentionSpec(mask=~M.causal(), score=S.softcap(4.0),
                                   normaliser=S.sink(sink)), q, k, v, ~D.m_causal(63, 63),
                     score=lambda s: 4.0 * torch.tanh(s / 4.0), sink=sink)
    assert torch.equal(o[:, :, -1], torch.zeros_like(o[:, :, -1]))
    torch.testing.assert_close(lse[:, :, -1], sink.expand(2, 4), atol=0, rtol=0)


def test_scale_default_spec_and_call():
    """s = scale <q, k>: 1/sqrt(Dqk) by default, else spec.scale, else the call's scale=."""
    q, k, v = _qkv(1, 2, 1, 63, 63, seed=5)
    base = AttentionSpec(mask=M.causal())
    allowed = D.m_causal(63, 63)
    D.check(base, q, k, v, allowed)  # the oracle's default is 1/sqrt(8)
    o_spec, _ = attention_reference(base.replace(scale=0.3), q, k, v, **D.CHUNKS)
    o_ref, _ = D.dense_attention(q, k, v, allowed, scale=0.3)
    torch.testing.assert_close(o_spec, o_ref, **D.TOL)
    D.check(base.replace(scale=0.3), q, k, v, allowed, scale=0.7)  # the call wins


def test_runtime_param_and_capture_override_scores():
    q, k, v = _qkv(1, 2, 2, 63, 63, seed=6)
    D.check(AttentionSpec(score=S.softcap(5.0)), q, k, v, score=lambda s: 2.0 * torch.tanh(s / 2.0),
            params={"softcap": 2.0})
    hb1, hb2 = _rand(2, seed=15), _rand(2, seed=16)
    D.check(AttentionSpec(score=S.head_bias(hb1)), q, k, v,
            score=lambda s: s + hb2.view(1, 2, 1, 1), captures={"head_bias": hb2})


def test_traced_softcap_equals_named_and_dense():
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return 20.0 * torch.tanh(score / 20.0)

    q, k, v = _qkv(2, 4, 2, 63, 63, seed=7)
    q = 4.0 * q  # |s| well past the cap
    def cap(s):
        return 20.0 * torch.tanh(s / 20.0)

    allowed = D.m_causal(63, 63)
    traced, _ = D.check(AttentionSpec(mask=M.causal(), score=trace_score(softcap_mod)),
                        q, k, v, allowed, score=cap)
    named, _ = D.check(AttentionSpec(mask=M.causal(), score=S.softcap(20.0)), q, k, v,
                       allowed, score=cap)
    torch.testing.assert_close(traced, named, **D.TOL)


def test_traced_document_and_alibi_equal_named():
    """FlexAttention-style: document mask via a captured tensor, ALiBi via captured slopes."""
    doc = torch.randint(0, 4, (63,), generator=_gen(17)).sort().values
    slopes = torch.tensor([0.25, 0.0625], dtype=F64)

    def doc_mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    q, k, v = _qkv(2, 2, 1, 63, 63, seed=8)
    _, _, qi, kv = _idx(2, 2, 63, 63)

    def formula(s):
        return s + slopes.view(1, 2, 1, 1) * (kv - qi)

    traced, _ = D.check(AttentionSpec(mask=trace_mask(doc_mask), score=trace_score(alibi_mod)),
                        q, k, v, D.m_document(doc), score=formula)
    named, _ = D.check(AttentionSpec(mask=M.document(doc), score=S.alibi(slopes)),
                       q, k, v, D.m_document(doc), score=formula)
    torch.testing.assert_close(traced, named, **D.TOL)


@pytest.mark.parametrize("reorder, inputs", [
    pytest.param(Hilbert2D(8, 8), {}, id="R1-hilbert-8x8"),
    pytest.param(UserPermutation(), {"perm": torch.randperm(64, generator=_gen(18))},
                 id="R6-userperm-64"),
])
def test_position_dependent_scores_under_reorder(reorder, inputs):
    """ALiBi, a relative-bias table and a [B,H,L,L] bias read ORIGINAL positions after `pi`."""
    B, H, L = 2, 4, 64
    table, bias = _rand(H, 9, seed=19), _rand(B, H, L, L, seed=20)
    mod = S.alibi().then(S.relative_bias(table)).then(S.bias(bias))
    _, h, qi, kv = _idx(B, H, L, L)

    def formula(s):
        return s + _alibi(H) * (kv - qi) + table[h, _rel_bucket(qi, kv, 4)] + bias

    spec = AttentionSpec(mask=M.causal(), score=mod, normaliser=S.sink(_rand(H, seed=21)))
    q, k, v = _qkv(B, H, 2, L, L, seed=9)
    o, lse = D.check(spec.replace(reorder=reorder), q, k, v, D.m_causal(L, L), score=formula,
                     sink=spec.normaliser.sink.tensor, reorder_inputs=inputs)
    o_plain, lse_plain = attention_reference(spec, q, k, v, **D.CHUNKS)
    torch.testing.assert_close(o, o_plain, **D.TOL)
    torch.testing.assert_close(lse, lse_plain, **D.TOL)


@pytest.mark.parametrize("name", ["alibi-default-Hq3", "traced-0.1*(kv-q)"])
def test_position_terms_are_fp64(name):
    """An fp64 reference must evaluate position-dependent float terms in fp64: the default ALiBi
    slope 2^(-8(h+1)/Hq) for Hq = 3 and a traced `score + 0.1 * (kv_idx - q_idx)`."""
    B, H, L = 1, 3, 200
    _, _, qi, kv = _idx(B, H, L, L)
    if name.startswith("alibi"):
        mod, term = S.alibi(), _alibi(H) * (kv - qi)
    else:
        mod = trace_score(lambda score, b, h, q_idx, kv_idx: score + 0.1 * (kv_idx - q_idx))
        term = 0.1 * (kv - qi).to(F64)  # int64 * Python float would be float32
    q, k, v = _qkv(B, H, 1, L, L, seed=10)
    D.check(AttentionSpec(mask=M.causal(), score=mod), q, k, v, D.m_causal(L, L),
            score=lambda s: s + term)
