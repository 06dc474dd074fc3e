"""Tracing beyond the basic operators: casts, elementwise functions, non-finite constants,
reductions of captured tensors, and the errors and warnings for what no kernel can compute.

Every error names the function, its file:line and the construct; every supported construct is
checked for meaning (the traced expression evaluated by the reference evaluator, or a kernel run
on the Triton interpreter, against the function itself run by torch)."""

from __future__ import annotations

import inspect
import math
import warnings
from contextlib import contextmanager

import pytest
import sympy
import torch

import attncc
from attncc.backends import cache
from attncc.ir.eval import evaluate
from attncc.backends.triton.printer import TritonPrinter
from attncc.backends.triton.source import SourceError, check_source
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX, SCORE
from attncc.ir.trace import trace_mask, trace_score

B, H, LQ, LK = 2, 3, 7, 9
G = torch.Generator().manual_seed(1)
table = {0: 1.0, 1: 2.0}
buf3 = torch.randn(B, 2, 3, generator=G)


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))


@contextmanager
def expect(exc, *parts):
    with pytest.raises(exc) as info:
        yield info
    for part in parts:
        assert part in str(info.value), f"{part!r} not in message {str(info.value)!r}"


def where(fn, text: str) -> str:
    lines, first = inspect.getsourcelines(fn)
    return f"{__file__}:{first + next(i for i, ln in enumerate(lines) if text in ln)}"


def grid():
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(LQ).view(1, 1, LQ, 1)
    kv = torch.arange(LK).view(1, 1, 1, LK)
    score = torch.randn(B, H, LQ, LK, generator=G, dtype=torch.float64) * 3
    return score, b, h, q, kv


def check_score(fn) -> None:
    """The traced expression means what `fn` computes on real index tensors, applied the way
    FlexAttention applies it (vmapped over b, h, q_idx, kv_idx: `buf[b].sum()` is per b)."""
    node = trace_score(fn)
    score, b, h, q, kv = grid()
    each = fn
    for dims in [(0, None, None, None, 0), (0, None, None, 0, None), (0, None, 0, None, None),
                 (0, 0, None, None, None)]:
        each = torch.vmap(each, in_dims=dims)
    want = each(score, *(t.flatten() for t in (b, h, q, kv))).double()
    env = {B_IDX: b, H_IDX: h, Q_IDX: q, KV_IDX: kv, SCORE: score}
    got = torch.as_tensor(evaluate(node.expr, env, {c.name: c.tensor for c in node.captures}))
    # rtol 1e-6: torch computes `torch.sqrt(h + 1)` of an int64 index in fp32, attncc in fp64
    torch.testing.assert_close(got.double().expand(B, H, LQ, LK), want, rtol=1e-6, atol=1e-6,
                               equal_nan=True)


# --- supported: casts, elementwise functions, identity -----------------------------------------

def cast_index(score, b, h, q_idx, kv_idx):
    return score + h.float() * 0.5 + q_idx.to(torch.float32) / (kv_idx.double() + 1)


def cast_bool(score, b, h, q_idx, kv_idx):
    return score * (q_idx >= kv_idx).float() + (kv_idx > 2).to(score.dtype) + b.long()


def elementwise(score, b, h, q_idx, kv_idx):
    a = score.abs() + 1
    return (torch.floor(score) * 0.1 + torch.ceil(score * 0.3) + torch.trunc(score)
            + torch.sign(score) + torch.erf(score) + torch.log1p(a) + torch.expm1(score * 0.1)
            + torch.sinh(score * 0.1) + torch.cosh(score * 0.1) + torch.pow(a, 1.5)
            + torch.relu(score) + torch.square(score) * 0.1 + torch.reciprocal(a)
            + torch.rsqrt(a) + torch.sigmoid(score) + torch.exp2(score * 0.1) + torch.log2(a)
            + torch.log10(a) + torch.sqrt(h + 1) + score.sin() * score.cos() + torch.tan(b)
            + ((q_idx - kv_idx) * 1.0 + 0.5) ** -2 * 0.5 + torch.where(score > 0, score * 0.5, -score)
            + torch.floor(q_idx * 0.5) + torch.exp(-score.abs()) + torch.log(a)
            + torch.mul(score, 0.5) + torch.sub(kv_idx, q_idx) * 0.1)


@pytest.mark.parametrize("fn", [cast_index, cast_bool, elementwise],
                         ids=["cast_index", "cast_bool", "elementwise"])
def test_supported_constructs_trace_to_their_meaning(fn):
    check_score(fn)


def test_elementwise_functions_print_to_triton_and_run():
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.randn(1, 2, 5, 16, generator=G)
    k = torch.randn(1, 1, 9, 16, generator=G)
    v = torch.randn(1, 1, 9, 16, generator=G)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx != kv_idx, elementwise(score, b, h, q_idx, kv_idx) * 0.1,
                           float("-inf"))

    attn = attncc.compile(mod)
    for name in ("tl.sin(", "tl.cos(", "tl.erf(", "tl.floor(", 'float("-inf")'):
        assert name in attn.kernels.kernel.source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = flex_attention(q.double(), k.double(), v.double(), score_mod=mod,
                              enable_gqa=True)
    assert (attn(q, k, v).double() - want).abs().max() < 1e-4


def test_identity_score_verifies_and_compiles():
    spec = attncc.Attention(score=lambda score, b, h, q_idx, kv_idx: score)
    assert spec.score.expr == SCORE
    attncc.compile(spec)


@pytest.mark.parametrize("value, text", [(-math.inf, 'float("-inf")'), (math.inf, 'float("inf")'),
                                         (math.nan, 'float("nan")')], ids=["-inf", "inf", "nan"])
def test_non_finite_constants_print_as_triton_floats(value, text):
    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, value)

    node = trace_score(mod)
    printed = TritonPrinter({"score": "score", "q_idx": "q_idx", "kv_idx": "kv_idx"}).doprint(
        node.expr)
    assert text in printed
    out = evaluate(node.expr, {SCORE: torch.zeros(()), Q_IDX: torch.tensor(0),
                               KV_IDX: torch.tensor(1)}, {})
    assert torch.equal(torch.as_tensor(out).isnan(), torch.tensor(math.isnan(value)))
    assert math.isnan(value) or out.item() == value


# --- a rendered source that would not compile is never stored ----------------------------------

def test_check_source_names_an_undefined_name():
    check_source("import triton\n@triton.jit\ndef k(x):\n    return x + 1\n", "ok.py")
    with expect(SourceError, "k.py", "'inf'", "line 3", "x * -inf"):
        check_source("import triton\ndef k(x):\n    return x * -inf\n", "k.py")
    with expect(SourceError, "k.py", "does not parse"):
        check_source("def k(x):\n    return x +\n", "k.py")


def test_broken_source_raises_and_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    # the printer as it was: `repr(float(-oo))` is the bare name `-inf`
    monkeypatch.setattr(TritonPrinter, "_number", lambda self, e: repr(float(e)))

    def causal_inf(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, float("-inf"))

    with expect(SourceError, "undefined name 'inf'"):
        attncc.compile(causal_inf)
    assert cache.list_entries(tmp_path) == []
    monkeypatch.undo()  # the fixed printer: the same spec now builds and is stored
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    attncc.compile(causal_inf)
    assert len(cache.list_entries(tmp_path)) == 1


# --- reductions of captured tensors ------------------------------------------------------------

def reduce_3d(score, b, h, q_idx, kv_idx):
    return score + buf3[b].amax() + torch.sum(buf3[b, :]) + buf3[b][1].mean()


def test_reductions_become_derived_captures():
    check_score(reduce_3d)
    names = sorted(c.name for c in trace_score(reduce_3d).captures)
    assert names == ["buf3_amax", "buf3_mean", "buf3_sum"]


def partial_value(score, b, h, q_idx, kv_idx):
    return score + buf3[b]


def partial_dim(score, b, h, q_idx, kv_idx):
    return score + buf3[b].sum(dim=0)


@pytest.mark.parametrize("fn, construct", [
    (partial_value, "3-d captured tensor indexed with 1 indices, used as a value"),
    (partial_dim, "`.sum(dim=0)`"),
], ids=["value", "dim"])
def test_partial_index_errors(fn, construct):
    with expect(attncc.TraceError, fn.__qualname__, where(fn, "return"), construct):
        trace_score(fn)


# --- errors: the function, the line and the construct ------------------------------------------

def dict_key(score, b, h, q_idx, kv_idx):
    return score + table[h]


def length(score, b, h, q_idx, kv_idx):
    return score + len(q_idx)


def tensor_of(score, b, h, q_idx, kv_idx):
    return score + torch.tensor(q_idx)


def float_to_int(score, b, h, q_idx, kv_idx):
    return score.long() + q_idx


def to_device(score, b, h, q_idx, kv_idx):
    return score.to("cpu")


def divide_by_zero(score, b, h, q_idx, kv_idx):
    return score / 0


def floordiv_by_zero(b, h, q_idx, kv_idx):
    return q_idx // 0 == kv_idx


def mod_by_zero(b, h, q_idx, kv_idx):
    return q_idx % (kv_idx - kv_idx) == 0


def log_zero(score, b, h, q_idx, kv_idx):
    return score + torch.log(q_idx * 0)


def forever(score, b, h, q_idx, kv_idx):
    return forever(score, b, h, q_idx, kv_idx)


def no_return(score, b, h, q_idx, kv_idx):
    score + 1  # noqa: B018


def other_exception(score, b, h, q_idx, kv_idx):
    return score + q_idx.no_such_method()


ERRORS = [
    (dict_key, "table[h]", "dict key"),
    (length, "len(", "len() of a traced value"),
    (tensor_of, "torch.tensor", "torch.tensor() of a traced value"),
    (float_to_int, ".long()", "`.long()` of a float value"),
    (to_device, ".to(", "`.to('cpu')`"),
    (divide_by_zero, "/ 0", "`/` by zero"),
    (floordiv_by_zero, "// 0", "`//` by zero"),
    (mod_by_zero, "%", "`%` by zero"),
    (log_zero, "def log_zero", "infinite for every input"),
    (forever, "return forever", "unbounded recursion"),
    (no_return, "def no_return", "returned None"),
    (other_exception, "no_such_method", "AttributeError"),
]


@pytest.mark.parametrize("fn, line_text, construct", ERRORS, ids=[e[0].__name__ for e in ERRORS])
def test_trace_errors_name_function_line_and_construct(fn, line_text, construct):
    with expect(attncc.TraceError, fn.__qualname__, where(fn, line_text), construct):
        attncc.compile(fn)


def test_random_call_warns_at_the_users_line():
    def noisy(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (torch.rand(()) < 2.0)

    with pytest.warns(UserWarning, match="torch.rand.*frozen.*not deterministic") as record:
        trace_mask(noisy)
    (w,) = [r for r in record if "torch.rand" in str(r.message)]
    assert f"{w.filename}:{w.lineno}" == where(noisy, "torch.rand")


def test_deterministic_mask_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)


def test_printer_refuses_complex_infinity():
    with expect(NotImplementedError, "complex infinity"):
        TritonPrinter({}).doprint(sympy.zoo)


def test_a_source_read_directly_and_reduced_takes_one_override():
    buf = torch.randn(B, 3, generator=G)

    def both(score, b, h, q_idx, kv_idx):
        return score * (1 + 0.1 * buf[b, 0] * buf[b].sum())  # not a per-row shift

    attn = attncc.compile(both)
    assert sorted(c.name for c in attn.spec.captures) == ["buf", "buf_sum"]
    q, k, v = (torch.randn(B, 2, 5, 16, generator=G) for _ in range(3))
    new = torch.randn(B, 3, generator=G)
    got = attn(q, k, v, buf=new)
    buf.copy_(new)  # the closure now holds the override's values: the reference reads them
    assert (got - attn(q, k, v, backend="reference")).abs().max() < 1e-5
    assert (got - attn(q, k, v, buf=torch.zeros(B, 3), backend="reference")).abs().max() > 1e-3
