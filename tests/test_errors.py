"""Bad inputs raise the documented error before any launch, and the message names the argument,
what was expected and what was given. `TritonForward.launch` is patched to raise, so an error
that slipped past validation would surface as AssertionError("launched") instead."""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

import attncc
from attncc.backends.triton import forward as triton_backend

F32 = torch.float32


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))

    def launch(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(triton_backend.TritonForward, "launch", launch)


def qkv(B=1, Hq=2, Hkv=2, Lq=8, Lk=8, D=16, Dv=None, dtype=F32):
    return (torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
            torch.randn(B, Hkv, Lk, Dv or D, dtype=dtype))


@pytest.fixture
def attn():
    # backend="triton": a call that passes validation goes straight to launch
    return attncc.compile(attncc.Attention(mask=attncc.sliding_window(4)), backend="triton")


@contextlib.contextmanager
def expect(exc, *parts):
    """pytest.raises(exc), and every part appears in the message."""
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in message {msg!r}"


def test_a_valid_call_reaches_the_patched_launch(attn):
    with pytest.raises(AssertionError, match="launched"):
        attn(*qkv())


# --- q, k, v -------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_not_a_tensor(attn, which):
    args = list(qkv())
    args[which] = args[which].tolist()
    name = "qkv"[which]
    with expect(TypeError, f"{name}:", "torch.Tensor", "list"):
        attn(*args)


@pytest.mark.parametrize("layout, form", [("bhsd", "[B, H, L, D]"), ("bshd", "[B, L, H, D]")])
def test_wrong_rank(attn, layout, form):
    q, k, v = qkv()
    with expect(ValueError, "k:", "4-d", form, "(1, 2, 8)"):
        attn(q, k[..., 0], v, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_unsupported_dtype(attn, dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with expect(TypeError, "q:", "float16, bfloat16 or float32", str(dtype)):
        attn(q, k, v)


def test_k_dtype_differs_from_q(attn):
    q, k, v = qkv()
    with expect(TypeError, "k:", "torch.float32 (the dtype of q)", "torch.float16"):
        attn(q, k.half(), v)


def test_k_on_another_device(attn):
    q, k, v = qkv()
    with expect(ValueError, "k:", "device cpu", "meta"):
        attn(q, k.to("meta"), v)


def test_batch_mismatch(attn):
    q, _, v = qkv(B=2)
    _, k, _ = qkv(B=3)
    with expect(ValueError, "k:", "batch size 2", "got 3"):
        attn(q, k, v)


@pytest.mark.parametrize("shape, given", [((1, 1, 8, 16), "1 heads and length 8"),
                                          ((1, 2, 7, 16), "2 heads and length 7")])
def test_v_heads_or_length_mismatch(attn, shape, given):
    q, k, _ = qkv()
    with expect(ValueError, "v:", "2 heads and length 8 (as k)", given):
        attn(q, k, torch.randn(shape))


def test_k_head_dim_differs_from_q(attn):
    q, _, v = qkv(D=16)
    k = torch.randn(1, 2, 8, 32)
    with expect(ValueError, "k:", "head dim 16", "got 32"):
        attn(q, k, v)


def test_query_heads_not_a_multiple_of_kv_heads(attn):
    with expect(ValueError, "k:", "Hq % Hkv == 0", "3 query heads", "Hkv = 2"):
        attn(*qkv(Hq=3, Hkv=2))


@pytest.mark.parametrize("D, Dv, name", [(300, 16, "q"), (16, 257, "v")])
def test_head_dim_too_large(attn, D, Dv, name):
    with expect(ValueError, f"{name}:", "between 1 and 256", f"got {max(D, Dv)}"):
        attn(*qkv(Lq=2, Lk=2, D=D, Dv=Dv))


# --- call options ----------------------------------------------------------------------------

def test_bad_layout(attn):
    with expect(ValueError, "layout:", "'bhsd'", "'bshd'", "'bsdh'"):
        attn(*qkv(), layout="bsdh")


def test_bad_backend_at_compile():
    with expect(ValueError, "backend:", "'auto'", "'triton'", "'cuda'", "'reference'", "'tpu'"):
        attncc.compile(attncc.Attention(mask=attncc.causal()), backend="tpu")


def test_bad_backend_at_call(attn):
    with expect(ValueError, "backend:", "'auto'", "'triton'", "'cuda'", "'reference'", "'tpu'"):
        attn(*qkv(), backend="tpu")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "0.5", True],
                         ids=repr)
def test_non_finite_or_non_float_scale(attn, scale):
    with expect(ValueError, "scale:", "finite float or None", repr(scale)):
        attn(*qkv(), scale=scale)


def test_unknown_runtime_keyword(attn):
    with expect(TypeError, "'windw'", "['window']"):
        attn(*qkv(), windw=3)


def test_runtime_int_parameter_of_wrong_type(attn):
    with expect(TypeError, "'window'", "int", "float 2.5"):
        attn(*qkv(), window=2.5)


def test_runtime_int_parameter_given_a_bool(attn):
    with expect(TypeError, "'window'", "int", "bool True"):
        attn(*qkv(), window=True)


@pytest.mark.parametrize("window", [0, -3])
def test_runtime_window_not_positive(attn, window):
    with expect(ValueError, "'window'", "positive", f"got {window}"):
        attn(*qkv(), window=window)


@pytest.mark.parametrize("score, name, value, err, parts", [
    (attncc.softcap(30.0), "softcap", "big", TypeError, ["a float value", "str 'big'"]),
    (attncc.softcap(30.0), "softcap", -1.0, ValueError, ["positive", "-1.0"]),
    (attncc.scale(2.0), "factor", float("nan"), ValueError, ["finite", "nan"]),
    (attncc.scale(2.0), "factor", False, TypeError, ["a float value", "bool False"]),
], ids=["str", "negative", "nan", "bool"])
def test_runtime_float_parameter_checked(score, name, value, err, parts):
    attn = attncc.compile(attncc.Attention(score=score), backend="triton")
    with expect(err, f"{name!r}", *parts):
        attn(*qkv(), **{name: value})


# --- captured tensors --------------------------------------------------------------------------

@pytest.fixture
def doc_attn():
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    return attncc.compile(attncc.Attention(mask=attncc.document(doc)), backend="triton")


def test_captured_tensor_on_another_device(doc_attn):
    doc = torch.zeros(8, dtype=torch.int64, device="meta")
    with expect(ValueError, "doc:", "on cpu (the device of q)", "meta"):
        doc_attn(*qkv(), doc=doc)


def test_captured_tensor_built_on_another_device():
    doc = torch.zeros(8, dtype=torch.int64, device="meta")
    attn = attncc.compile(attncc.Attention(mask=attncc.document(doc)), backend="triton")
    with expect(ValueError, "doc:", "on cpu", "meta"):
        attn(*qkv())


def test_captured_tensor_too_short(doc_attn):
    # Lq = 4 fits the 6 ids; Lk = 8 does not
    with expect(ValueError, "doc:", "kv_idx up to 7", "size >= 8", "(6,)"):
        doc_attn(*qkv(Lq=4, Lk=8), doc=torch.zeros(6, dtype=torch.int64))


def test_captured_tensor_too_short_as_compiled():
    attn = attncc.compile(attncc.Attention(mask=attncc.document(torch.zeros(5, dtype=torch.int64))),
                          backend="triton")
    with expect(ValueError, "doc:", "size >= 8", "(5,)"):
        attn(*qkv())


@pytest.mark.parametrize("doc, given", [
    (torch.zeros(8, dtype=torch.float32), "1-d torch.float32"),
    (torch.zeros(1, 8, dtype=torch.int64), "2-d torch.int64"),
    ([0] * 8, "list"),
], ids=["dtype", "rank", "list"])
def test_replacement_captured_tensor_of_wrong_kind(doc_attn, doc, given):
    with expect(TypeError, "doc:", "1-d int64 tensor", given):
        doc_attn(*qkv(), doc=doc)


# --- tracing -----------------------------------------------------------------------------------

def test_mask_returning_a_number():
    def distance(b, h, q_idx, kv_idx):
        return q_idx - kv_idx

    with expect(TypeError, "mask_mod", "distance", "boolean", "int", "q_idx"):
        attncc.Attention(mask=distance)
    with expect(TypeError, "distance", "boolean"):
        attncc.compile(mask=distance)(lambda score, b, h, q_idx, kv_idx: score)


def test_score_returning_a_boolean():
    def oops(score, b, h, q_idx, kv_idx):
        return score > 0

    with expect(TypeError, "score_mod", "oops", "numeric", "boolean", "mask_mod"):
        attncc.compile(oops)


@pytest.mark.parametrize("n", [3, 6])
def test_wrong_arity_to_compile(n):
    fn = eval(f"lambda {', '.join('abcdef'[:n])}: a")
    with expect(TypeError, "mask_mod(b, h, q_idx, kv_idx)", "score_mod(score, b, h, q_idx, kv_idx)",
                f"{n} arguments"):
        attncc.compile(fn)


def test_wrong_arity_to_attention():
    with expect(TypeError, "mask_mod", "(b, h, q_idx, kv_idx)", "3 arguments"):
        attncc.Attention(mask=lambda b, q_idx, kv_idx: q_idx >= kv_idx)
    with expect(TypeError, "score_mod", "(score, b, h, q_idx, kv_idx)", "4 arguments"):
        attncc.Attention(score=lambda score, h, q_idx, kv_idx: score)


def test_compile_of_a_mask_mod_with_mask_given_too():
    with expect(TypeError, "is a mask_mod", "mask="):
        attncc.compile(mask=attncc.causal())(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)


def _line_of(fn, text: str) -> int:
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_python_if_on_traced_value():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx >= kv_idx:
            return q_idx >= 0
        return q_idx < 0

    where = f"{__file__}:{_line_of(branchy, 'if q_idx')}"
    with expect(attncc.TraceError, "branchy", where, "`if`", "&"):
        attncc.compile(branchy)


def test_python_and_on_traced_value():
    def both(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) and (h == 0)

    where = f"{__file__}:{_line_of(both, ' and ')}"
    with expect(attncc.TraceError, "both", where, "`and`"):
        attncc.Attention(mask=both)


def test_item_on_traced_value():
    def concrete(score, b, h, q_idx, kv_idx):
        return score + q_idx.item()

    with expect(attncc.TraceError, "concrete", f"{__file__}:{_line_of(concrete, '.item()')}",
                ".item()"):
        attncc.compile(concrete)


def test_unsupported_torch_call_is_named():
    def normalised(score, b, h, q_idx, kv_idx):
        return torch.softmax(score, dim=-1)

    with expect(attncc.TraceError, "normalised", "`softmax`", "supported:", "tanh"):
        attncc.compile(normalised)


def _not(b, h, q_idx, kv_idx):
    return not (q_idx < kv_idx)


def _int(score, b, h, q_idx, kv_idx):
    return score + int(q_idx)


def _math(score, b, h, q_idx, kv_idx):
    return math.tanh(score)


@pytest.mark.parametrize("fn, construct", [(_not, "`not`"), (_int, "int()"),
                                           (_math, "math.* call")], ids=["not", "int", "math"])
def test_other_concrete_uses_of_traced_values(fn, construct):
    line = fn.__code__.co_firstlineno + 1
    with expect(attncc.TraceError, fn.__qualname__, f"{__file__}:{line}", construct):
        attncc.compile(fn)


def test_mask_has_no_truth_value():
    with expect(TypeError, "no truth value", "&, |, ~"):
        bool(attncc.causal())
    with pytest.raises(TypeError):
        attncc.causal() and attncc.sliding_window(4)  # noqa: B018


# --- named-mask constructors -------------------------------------------------------------------

@pytest.mark.parametrize("make, parts", [
    (lambda: attncc.sliding_window(0), ["window:", "int >= 1", "got 0"]),
    (lambda: attncc.sliding_window(2.5), ["window:", "int >= 1", "got 2.5"]),
    (lambda: attncc.chunked(-1), ["chunk:", "int >= 1", "got -1"]),
    (lambda: attncc.document(), ["document:", "exactly one of doc= or cu_seqlens=", "neither"]),
    (lambda: attncc.document(torch.zeros(4, dtype=torch.int64),
                             cu_seqlens=torch.tensor([0, 4])), ["document:", "both"]),
], ids=["sw0", "sw_float", "chunked_neg", "doc_neither", "doc_both"])
def test_named_mask_constructor_errors(make, parts):
    with expect(ValueError, *parts):
        make()
