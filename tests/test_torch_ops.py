"""attncc as torch custom ops: opcheck, eager gradients against fp64 reference autograd,
torch.compile(fullgraph=True) against eager with zero recompiles when runtime values change,
and torch.export of a small transformer block.

CPU execution goes through the reference backend (backend="reference"); one opcheck runs the
Triton forward under the interpreter. Tolerances: gradients are computed in fp32 from inputs
rounded to the tested dtype, compared with fp64 autograd on those inputs: fp32 1e-4, bf16 3e-2
(bf16 rounding of the returned gradients). Compiled vs eager: the same op runs in both, so 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import attncc
import attncc.nn
from attncc.backends.reference.forward import attention_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, layout="bhsd", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # seeded on the CPU: same values on every device
    shapes = [(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)]
    out = [torch.randn(*s, generator=g).to(dtype).to(device) for s in shapes]
    if layout == "bshd":
        out = [t.transpose(1, 2).contiguous() for t in out]
    return [t.requires_grad_() for t in out]


def _specs(Hq):
    g = torch.Generator().manual_seed(1)
    slopes = torch.rand(Hq, generator=g)
    table = torch.randn(Hq, 7, generator=g)
    sink = torch.randn(Hq, generator=g)
    doc = torch.tensor([0] * 20 + [1] * 30 + [2] * 20)
    return {
        "causal": (attncc.Attention(mask=attncc.causal()), {}),
        "sw-alibi": (attncc.Attention(mask=attncc.sliding_window(7), score=attncc.alibi(slopes)),
                     {"alibi_slopes": slopes}),
        "doc-relbias": (attncc.Attention(mask=attncc.document(doc),
                                         score=attncc.relative_bias(table)),
                        {"rel_table": table}),
        "softcap-sink": (attncc.Attention(mask=attncc.causal(), score=attncc.softcap(2.0),
                                          normaliser=attncc.sink(sink)),
                         {"sink": sink}),
    }


def _op_args(attn, q, k, v, caps, layout="bhsd", backend="reference", scale=0.3, **extra):
    sig = attn.signature
    params = torch.tensor([scale] + [float(p.value) for p in sig.params], dtype=torch.float64)
    captures = [caps.get(c.name, c.tensor) for c in sig.captures]
    return (attn.key, q, k, v, captures, params, [], layout, False, backend)


OPCHECK = {  # id -> (spec name, B, Hq, Hkv, Lq, Lk, D, layout)
    "causal-L17-d16": ("causal", 1, 2, 2, 17, 17, 16, "bhsd"),
    "sw-alibi-gqa-L17-Lk23-d16": ("sw-alibi", 2, 4, 2, 17, 23, 16, "bhsd"),
    "doc-relbias-L70-d32-bshd": ("doc-relbias", 1, 2, 1, 70, 70, 32, "bshd"),
    "softcap-sink-L1-Lk9-d16": ("softcap-sink", 1, 2, 2, 1, 9, 16, "bhsd"),
}


@pytest.mark.parametrize("case", OPCHECK, ids=list(OPCHECK))
def test_opcheck(case):
    name, B, Hq, Hkv, Lq, Lk, D, layout = OPCHECK[case]
    spec, caps = _specs(Hq)[name]
    attn = attncc.compile(spec)
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, layout=layout)
    caps = {n: t.clone().requires_grad_() for n, t in caps.items()}
    opcheck(torch.ops.attncc.attention_fwd.default, _op_args(attn, q, k, v, caps, layout))


def test_opcheck_triton_forward_interpreter(device):
    spec, caps = _specs(2)["sw-alibi"]
    caps = {n: t.to(device) for n, t in caps.items()}
    attn = attncc.compile(spec)
    q, k, v = (t.detach() for t in _qkv(1, 2, 1, 17, 17, 16, device=device))
    opcheck(torch.ops.attncc.attention_fwd.default,
            _op_args(attn, q, k, v, caps, backend="triton"))


GRADS = {  # id -> (spec name, B, Hq, Hkv, Lq, Lk, D, dtype, layout)
    "sw-alibi-gqa-L17-Lk23-d16-fp32": ("sw-alibi", 2, 4, 2, 17, 23, 16, torch.float32, "bhsd"),
    "doc-relbias-L70-d32-fp32-bshd": ("doc-relbias", 1, 2, 1, 70, 70, 32, torch.float32, "bshd"),
    "softcap-sink-L1-Lk9-d16-fp32": ("softcap-sink", 1, 2, 2, 1, 9, 16, torch.float32, "bhsd"),
    "causal-L17-d16-bf16": ("causal", 1, 2, 2, 17, 17, 16, torch.bfloat16, "bhsd"),
}


@pytest.mark.parametrize("case", GRADS, ids=list(GRADS))
def test_eager_gradients_match_fp64_reference(case):
    name, B, Hq, Hkv, Lq, Lk, D, dtype, layout = GRADS[case]
    spec, caps = _specs(Hq)[name]
    attn = attncc.compile(spec, backend="reference")
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, layout)
    caps = {n: t.clone().requires_grad_() for n, t in caps.items()}
    o, lse = attn(q, k, v, return_lse=True, layout=layout, **caps)
    g = torch.Generator().manual_seed(5)
    wo, wl = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    (o.float() * wo).sum().backward(inputs=[q, k, v, *caps.values()], retain_graph=True)
    (torch.where(lse.isfinite(), lse, 0) * wl).sum().backward(inputs=[q, k, v, *caps.values()])

    def bhsd(t):
        return t.transpose(1, 2) if layout == "bshd" else t
    ref_in = [bhsd(t.detach()).double().requires_grad_() for t in (q, k, v)]
    ref_caps = {n: t.detach().double().requires_grad_() for n, t in caps.items()}
    ro, rl = attention_reference(spec, *ref_in, captures=ref_caps)
    loss = (bhsd(ro) * wo.double()).sum() + (torch.where(rl.isfinite(), rl, 0) * wl).sum()
    loss.backward()
    tol = GRAD_TOL[dtype]
    pairs = [(bhsd(t.grad), r.grad) for t, r in zip((q, k, v), ref_in)]
    pairs += [(caps[n].grad, ref_caps[n].grad) for n in caps]
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_permuted_layout_gradients_equal_original_order():
    attn = attncc.compile(attncc.Attention(mask=attncc.neighbourhood_2d(5, 5, 3, 3),
                                           reorder=attncc.hilbert((5, 5))), backend="reference")
    q, k, v = _qkv(1, 2, 2, 25, 25, 16)
    q_pos, kv_pos = (p.long() for p in attn.positions.get(25, 25, q.device, {}))
    w = torch.randn(1, 2, 25, 16)
    (attn(q, k, v) * w).sum().backward()
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    o_p = attn(q[:, :, q_pos], k[:, :, kv_pos], v[:, :, kv_pos], permuted=True)
    (o_p * w[:, :, q_pos]).sum().backward()
    for t, g in zip((q, k, v), want):
        torch.testing.assert_close(t.grad, g, atol=1e-5, rtol=1e-5)


class CountingBackend:
    """A torch.compile backend that counts graph compilations (first compile + recompiles)."""

    def __init__(self, inner="aot_eager"):
        self.compiles, self.inner = 0, torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return self.inner(gm, example_inputs)


def test_fullgraph_matches_eager_and_never_recompiles_for_new_values():
    torch._dynamo.reset()
    spec, caps = _specs(2)["sw-alibi"]
    attn = attncc.compile(spec, backend="reference")
    q, k, v = _qkv(1, 2, 1, 17, 17, 16)
    slopes = caps["alibi_slopes"].clone().requires_grad_()

    def f(q, k, v, window, slopes):
        return attn(q, k, v, window=window, alibi_slopes=slopes).square().sum()

    counter = CountingBackend()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for window, factor in [(7, 1.0), (3, 1.0), (3, 2.0), (12, 0.5)]:
        with torch.no_grad():
            slopes.mul_(factor)  # a captured tensor's values change in place
        args = (q, k, v, torch.tensor(window), slopes)
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, [q, k, v, slopes])
        want = f(*args)
        want_grads = torch.autograd.grad(want, [q, k, v, slopes])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    compiled(q, k, v, torch.tensor(5), slopes.detach().clone().requires_grad_())  # new tensor
    assert counter.compiles == 1


def _block(backend="reference"):
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.attn = attncc.nn.MultiHeadAttention(
                32, 4, num_kv_heads=2, mask=attncc.sliding_window(5),
                score=attncc.alibi(torch.full((4,), 0.25)), learnable=["alibi_slopes"],
                backend=backend)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                           torch.nn.Linear(64, 32))

        def forward(self, x):
            x = x + self.attn(self.norm(x))
            return x + self.mlp(x)

    return Block()


def test_fullgraph_block_module_scalar_change_no_recompile():
    torch._dynamo.reset()
    block = _block()
    x = torch.randn(2, 13, 32)
    counter = CountingBackend()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    for window in (5, 2, 9):
        block.attn.attn.set(window=window)
        torch.testing.assert_close(compiled(x), block(x), atol=1e-6, rtol=1e-6)
    compiled(x).sum().backward()
    assert block.attn.attn.alibi_slopes.grad is not None
    assert counter.compiles == 1


def test_export_block_runs_and_matches():
    block = _block()
    x = torch.randn(2, 13, 32)
    ep = torch.export.export(block, (x,))
    code = ep.graph_module.code
    assert "torch.ops.attncc.attention_fwd.default('sw_alibi-" in code
    torch.testing.assert_close(ep.module()(x), block(x), atol=1e-6, rtol=1e-6)
    x2 = torch.randn(2, 13, 32)
    torch.testing.assert_close(ep.module()(x2), block(x2), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ep.module()(x2), ep.module()(x), atol=1e-3)


def test_unknown_kernel_key_names_the_argument():
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 4, 4, 16))
    with pytest.raises(ValueError, match="kernel: expected the key of an attention compiled"):
        torch.ops.attncc.attention_fwd(
            "nope-0", q, k, v, [], torch.tensor([0.25], dtype=torch.float64), [], "bhsd",
            False, "reference")


@pytest.mark.parametrize("value,exc,part", [
    (torch.tensor(2.5), ValueError, "expected an int value, got 2.5"),
    (torch.tensor(0), ValueError, "expected a positive value"),
    (torch.tensor([1, 2]), TypeError, "one-element real CPU tensor"),
], ids=["non-integral", "not-positive", "two-elements"])
def test_tensor_runtime_values_are_checked_before_launch(value, exc, part):
    attn = attncc.compile(attncc.Attention(mask=attncc.sliding_window(3)), backend="reference")
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 4, 4, 16))
    with pytest.raises(exc, match=part):
        attn(q, k, v, window=value)


def test_tensor_runtime_value_equals_python_value():
    attn = attncc.compile(attncc.Attention(mask=attncc.sliding_window(3)), backend="reference")
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 17, 17, 16))
    torch.testing.assert_close(attn(q, k, v, window=torch.tensor(4)), attn(q, k, v, window=4))
    assert not torch.equal(attn(q, k, v, window=4), attn(q, k, v, window=3))


def test_counter_sees_a_python_number_recompile_once():
    """The control for the zero-recompile tests: a changing Python int is a graph constant, so
    dynamo recompiles once (then treats it as dynamic); the counter must see that."""
    torch._dynamo.reset()
    attn = attncc.compile(attncc.Attention(mask=attncc.sliding_window(3)), backend="reference")
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 17, 17, 16))
    counter = CountingBackend()
    compiled = torch.compile(lambda q, w: attn(q, k, v, window=w), fullgraph=True,
                             backend=counter)
    for w in (3, 4, 5, 6):
        torch.testing.assert_close(compiled(q, w), attn(q, k, v, window=w))
    assert counter.compiles == 2


def test_two_compiles_of_a_spec_share_the_key_and_eager_runs_its_own_object():
    a = attncc.compile(attncc.Attention(mask=attncc.sliding_window(3)), backend="reference")
    b = attncc.compile(attncc.Attention(mask=attncc.sliding_window(9)), backend="reference")
    assert a.key == b.key and a.key.startswith("sw-") and len(a.key) == len("sw-") + 64
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 9, 9, 16))
    ran = []

    def spy(obj, name):  # the object's own reference family records that it ran
        family = obj.families["reference"]
        forward = family.forward

        def reference(*args, **kwargs):
            ran.append(name)
            return forward(*args, **kwargs)
        family.forward = reference

    spy(a, "a"), spy(b, "b")
    a(q, k, v)
    b(q, k, v)
    assert ran == ["a", "b"]


def test_triton_backward_through_the_op_matches_reference_backend(device):
    """backend="auto": the Triton forward and backward (interpreter on CPU) through the ops
    give the reference backend's gradients, capture gradients included (fp32, 1e-4)."""
    spec, caps = _specs(2)["sw-alibi"]
    attn = attncc.compile(spec)
    q, k, v = _qkv(1, 2, 1, 17, 17, 16, device=device)
    slopes = caps["alibi_slopes"].to(device).clone().requires_grad_()
    grads = []
    for backend in ("triton", "reference"):
        o, lse = attn(q, k, v, return_lse=True, backend=backend, alibi_slopes=slopes)
        grads.append(torch.autograd.grad(o.square().sum() + lse.sum(), [q, k, v, slopes]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
