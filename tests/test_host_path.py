"""The lean eager path (issue 15, "a lean host path"): an eager call with nothing to record
runs the op's implementation without the dispatcher, and every other call still goes through
`attncc::attention_fwd`; the remembered q/k/v checks still refuse a bad call every time.
Timings are in benchmarks/host_overhead.py, not here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc
from attncc.ops.softmax import custom_op

ATTN = attncc.compile(attncc.Attention(mask=attncc.sliding_window(5)))


@pytest.fixture
def op_calls(monkeypatch) -> list[str]:
    """Keys the op's implementation looked up (the direct path looks up nothing)."""
    seen: list[str] = []
    lookup = custom_op.lookup

    def counted(key):
        seen.append(key)
        return lookup(key)
    monkeypatch.setattr(custom_op, "lookup", counted)
    return seen


def qkv(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 9, 16, generator=g).requires_grad_(requires_grad)
                 for _ in range(3))


def test_an_eager_call_with_nothing_to_record_skips_the_dispatcher(op_calls):
    q, k, v = qkv()
    o, lse = ATTN(q, k, v, window=3, return_lse=True)
    assert op_calls == []
    # the same call through the op (a gradient is wanted): identical o and lse
    qg, kg, vg = qkv(requires_grad=True)
    og, lseg = ATTN(qg, kg, vg, window=3, return_lse=True)
    assert op_calls == [ATTN.key]
    assert torch.equal(o, og.detach()) and torch.equal(lse, lseg.detach())
    og.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_no_grad_and_inference_mode_take_the_direct_path(op_calls):
    q, k, v = qkv(requires_grad=True)
    with torch.no_grad():
        ATTN(q, k, v)
    with torch.inference_mode():
        ATTN(*qkv())
    assert op_calls == []


def test_a_dispatch_mode_still_sees_the_op(op_calls):
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = qkv()
    with Record():
        ATTN(q, k, v)
    assert "attncc.attention_fwd.default" in seen and op_calls == [ATTN.key]


def test_a_parameter_is_checked_on_the_direct_path_as_in_the_op():
    q, k, v = qkv()
    for value, error in ((0, "expected a positive value, got 0"),
                         (2.5, "expected an int value, got float 2.5"),
                         (torch.tensor(2.5), "expected an int value, got 2.5"),
                         (torch.tensor(0), "expected a positive value, got 0")):
        with pytest.raises((TypeError, ValueError), match=error):
            ATTN(q, k, v, window=value)
    o = ATTN(q, k, v, window=torch.tensor(3))
    assert torch.equal(o, ATTN(q, k, v, window=3))


def test_remembered_qkv_checks_refuse_a_bad_call_every_time():
    q, k, v = qkv()
    ATTN(q, k, v)  # this combination is remembered
    for _ in range(2):
        with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
            ATTN(q, k.half(), v)
        with pytest.raises(ValueError, match="v: expected 2 heads and length 9"):
            ATTN(q, k, v[:, :1])
    ATTN(q, k, v)


def test_jit_trace_records_the_op():
    """torch.jit.trace records dispatched ops: a traced call must go through the op (the
    direct path would leave the attention out of the trace)."""
    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    q = torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        traced = torch.jit.trace(lambda q, k, v: attn(q, k, v, backend="reference"), (q, q, q),
                                 check_trace=False)
    assert "attncc::attention_fwd" in str(traced.graph)
    q2 = torch.randn(1, 2, 9, 8)
    torch.testing.assert_close(traced(q2, q2, q2), attn(q2, q2, q2, backend="reference"))
