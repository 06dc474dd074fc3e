"""The lean eager path (issue 15, "a lean host path"): an eager call with nothing to record
runs the op's implementation without the dispatcher, and every other call still goes through
`attncc::attention_fwd`; the remembered q/k/v checks still refuse a bad call every time.
Timings are in benchmarks/host_overhead.py, not here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc
from attncc.backends.triton import forward as forward_module
from attncc.ops.softmax import binding, custom_op

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


@pytest.mark.parametrize("runtime", [
    {"window": 3}, {"window": 2**53}, {"window": 2**53 + 1}, {"window": True}, {"window": 2.0},
    {"window": 0}, {"window": -4}, {"window": torch.tensor(3)}, {"other": 3},
    {"softcap": 5}, {"softcap": 2.5}, {"softcap": float("inf")}, {"softcap": float("nan")},
    {"softcap": -1.0}, {"softcap": 0.0}, {"softcap": False}, {"softcap": 2**60}])
def test_numbers_bind_as_the_general_path_does(runtime):
    """`bind_numbers` (plain numbers for parameters, the eager direct path) gives exactly
    what the general binding and `unpack_row` give, or None where they do something else
    (raise, read a tensor, round an int through float64): every value it accepts passed
    every check."""
    specs = (attncc.Attention(mask=attncc.sliding_window(5)),
             attncc.Attention(mask=attncc.causal(), score=attncc.softcap(30.0)))
    for spec in specs:
        sig = binding.CallSignature.of(spec)
        fast = binding.bind_numbers(sig, runtime, 0.25)
        try:
            general = binding.unpack_row(sig, binding.bind_row(
                sig, runtime, 0.25, torch.device("cpu"), {})[1])
        except (TypeError, ValueError):
            general = None
        if fast is not None:
            assert fast == general and all(type(x) is type(y) for x, y in zip(
                fast[1].values(), general[1].values())), (runtime, fast, general)
        plain = all(type(x) in (int, float) and abs(x) <= 2**53 for x in runtime.values())
        if general is not None and plain and set(runtime) <= {p.name for p in spec.params}:
            assert fast is not None  # the fast binding takes every plain call the general takes


def test_arguments_read_from_sources_equal_argument_values():
    """The forward's per-kernel argument sources give, launch after launch, exactly what
    `argument_values` finds by name: block map and strides, positions, a bool capture (as
    uint8), a 2-d capture's strides and sizes, parameters."""
    g = torch.Generator().manual_seed(0)
    doc = torch.arange(40, dtype=torch.int32) // 7
    keep = torch.rand(5, generator=g) > 0.5  # bigbird's random blocks: a bool capture
    slopes = torch.rand(2, generator=g)  # a float capture read per head
    specs = [(attncc.Attention(mask=attncc.document(doc)), {"doc": doc}),
             (attncc.Attention(mask=attncc.causal() & attncc.sliding_window(9),
                               reorder=attncc.Hilbert2D(5, 8)), {}),
             (attncc.Attention(mask=attncc.bigbird(8, 1, keep, attncc.bigbird_random_blocks(
                 5, 2, seed=1))), {}),
             (attncc.Attention(mask=attncc.causal(), score=attncc.alibi(slopes)), {}),
             (attncc.Attention(mask=attncc.causal(), score=attncc.softcap(3.0)), {})]
    kv_tiles = torch.zeros(2, 3, 4, 2, 5, dtype=torch.int32)[:, :, ::2]
    positions = (torch.arange(40, dtype=torch.int32), torch.arange(40, dtype=torch.int32))
    for spec, given in specs:
        forward = attncc.compile(spec).kernels.kernel
        params = {p.name: p.value for p in spec.params}
        tensors = {c.name: c.tensor for c in spec.captures} | given
        expected = forward_module.argument_values(forward.plan, params, tensors, kv_tiles,
                                                  positions, forward.kernel_arguments)
        sources = forward._sources
        assert sources is not None, spec.text()
        got = forward_module._read_arguments(sources[0], forward.captures, params, tensors,
                                             kv_tiles, positions)
        assert len(got) == len(expected) and all(
            (x.data_ptr(), x.dtype, x.shape, x.stride()) == (y.data_ptr(), y.dtype, y.shape,
                                                             y.stride())
            if isinstance(y, torch.Tensor) else (type(x), x) == (type(y), y)
            for x, y in zip(got, expected, strict=True)), spec.text()


def test_kernel_header_reads_the_generated_def_line():
    """A prebuilt forward launches with the argument names read from kernel.py's `def` line
    (no module execution): they must be exactly the jit function's."""
    from attncc.backends.triton.source import KernelHeader

    attn = attncc.compile(attncc.Attention(mask=attncc.causal()))
    forward = attn.kernels.kernel
    header = forward.kernel.header()
    fn = forward.jit_function()
    assert header.__name__ == fn.__name__ == forward.name
    assert header.arg_names == list(fn.arg_names)
    assert header.launch_metadata is None
    with pytest.raises(ValueError, match="no `def missing"):
        KernelHeader.read(forward.source, "missing")
