"""Gradients of the linear-state rules L1-L6: the generated backward kernel, and autograd through
`CompiledLinearAttention`, against torch.autograd through the fp64 spec loop
(`attncc.backends.reference.linear_backward.reference_backward`).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py): tiny shapes. Tests
taking the `device` fixture run on CUDA in the GPU tier (the oracle stays on the CPU).
Tolerances (max error relative to max(1, the reference gradient's max magnitude)): fp32 1e-4;
fp16 / bf16 2e-2 / 4e-2 (inputs and do rounded to 16 bits, which the oracle sees too; states,
arithmetic and partial sums in fp32, gradients rounded to 16 bits once).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.triton.linear.aot import compile_linear_backward_for_target
from attncc.backends.triton.linear.backward import TritonLinearBackward
from attncc.ir.linear import LinearState
from attncc.backends.reference.linear_backward import reference_backward

NODES = {
    "L1": LinearState("linear"),
    "L1_elu1": LinearState("linear", feature_map="elu1"),
    "L1_elu1_norm": LinearState("linear", feature_map="elu1", normalize=True),
    "L2": LinearState("decay", decay=(0.9, 0.6)),
    "L3": LinearState("scalar_gate"),
    "L4": LinearState("vector_gate"),
    "L5": LinearState("delta"),
    "L6": LinearState("gated_delta"),
}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
_KERNELS: dict[tuple[str, int, int | None], TritonLinearBackward] = {}


def kernel(name: str, chunk: int = 16, block_v: int | None = None) -> TritonLinearBackward:
    if (name, chunk, block_v) not in _KERNELS:
        _KERNELS[name, chunk, block_v] = TritonLinearBackward(NODES[name], chunk=chunk,
                                                              block_v=block_v)
    return _KERNELS[name, chunk, block_v]


def make_inputs(node: LinearState, B: int, H: int, L: int, dk: int, dv: int, *,
                dtype: torch.dtype = torch.float32, initial: bool = False, seed: int = 0):
    """(inputs {name: tensor in `dtype`, state fp32}, do, d_final_state); delta rules get
    unit-norm keys, as their users do."""
    gen = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, H, L, dk, generator=gen), "k": torch.randn(B, H, L, dk, generator=gen),
         "v": torch.randn(B, H, L, dv, generator=gen)}
    if node.rule in ("delta", "gated_delta"):
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.rand(B, H, L, generator=gen)
    if node.rule in ("scalar_gate", "gated_delta"):
        x["g"] = -0.5 * torch.rand(B, H, L, generator=gen)
    if node.rule == "vector_gate":
        x["g"] = -0.5 * torch.rand(B, H, L, dk, generator=gen)
    x = {n: t.to(dtype) for n, t in x.items()}
    dvs = node.state_dv(dv)  # + the z column when normalising
    if initial:
        x["initial_state"] = torch.randn(B, H, dk, dvs, generator=gen)
        if node.normalize:
            x["initial_state"][..., -1] = x["initial_state"][..., -1].abs()  # z sums phi(k) > 0
    do = torch.randn(B, H, L, dv, generator=gen).to(dtype)
    ds = torch.randn(B, H, dk, dvs, generator=gen)
    return x, do, ds


def oracle(node, x, do, ds):
    return reference_backward(x["q"], x["k"], x["v"], node, do, g=x.get("g"),
                              beta=x.get("beta"), initial_state=x.get("initial_state"),
                              d_final_state=ds)


def assert_near(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"d{name}: shape {actual.shape} vs {expected.shape}"
    err = (actual.double().cpu() - expected.cpu()).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"d{name}: max error {err:.3g} vs reference max {ref:.3g}"


def run_and_check(name: str, L: int, *, dtype=torch.float32, initial=True, final_grad=True,
                  B=1, H=2, dk=16, dv=16, chunk=16, block_v=None, device="cpu") -> None:
    node = NODES[name]
    x, do, ds = make_inputs(node, B, H, L, dk, dv, dtype=dtype, initial=initial)
    ds = ds if final_grad else None
    o = None
    if node.normalize:  # the normaliser's backward reads the forward's output
        o, _ = recurrent_reference(x["q"], x["k"], x["v"], node,
                                   initial_state=x.get("initial_state"))
    on = {n: t.to(device) for n, t in x.items()}
    got = kernel(name, chunk, block_v)(
        on["q"], on["k"], on["v"], do.to(device), g=on.get("g"), beta=on.get("beta"),
        initial_state=on.get("initial_state"), d_final_state=None if ds is None else ds.to(device),
        o=None if o is None else o.to(device))
    got = {n: None if t is None else t.cpu() for n, t in got.items()}
    want = oracle(node, x, do, ds)
    for n, t in x.items():
        assert got[n].dtype == t.dtype, f"d{n}: dtype {got[n].dtype}, input {t.dtype}"
        assert_near(n, got[n], want[n], TOL[dtype])
    for n in set(got) - set(x):
        assert got[n] is None, f"d{n}: expected None for an absent input"


@pytest.mark.parametrize("L,initial", [(1, False), (1, True), (17, False), (17, True), (65, True)],
                         ids=["L1-zero_state", "L1-state_in", "L17-zero_state", "L17-state_in",
                              "L65-state_in"])
@pytest.mark.parametrize("name", list(NODES))
def test_fp32_matches_autograd_of_reference(name, L, initial, device):
    run_and_check(name, L, initial=initial, final_grad=initial, device=device)


@pytest.mark.parametrize("name,dtype", [("L4", torch.float16), ("L6", torch.float16),
                                        ("L6", torch.bfloat16)], ids=["L4-fp16", "L6-fp16",
                                                                      "L6-bf16"])
def test_half_precision(name, dtype, device):
    run_and_check(name, 17, dtype=dtype, device=device)


def test_L6_L130_batch2_chunk32(device):
    run_and_check("L6", 130, B=2, H=1, chunk=32, device=device)


@pytest.mark.parametrize("name", ["L4", "L5"])
def test_split_value_blocks_and_dk_ne_dv(name, device):
    # Dv 40 padded to 64 in 16-column programs: dq, dk, dg, dbeta are sums of 4 partials
    run_and_check(name, 17, dk=32, dv=40, block_v=16, device=device)


def test_small_chunk_many_checkpoints(device):
    run_and_check("L3", 17, chunk=4, device=device)


def test_only_the_final_state_is_used(device):
    """do = 0 (o unused): every gradient flows from the final state alone."""
    spec = attncc.Attention(memory=attncc.recurrent_state(update="additive", decay="scalar"))
    attn = attncc.compile(spec)
    x, do, ds = make_inputs(spec.memory, 1, 2, 17, 16, 16, initial=True, seed=4)
    leaves = {n: t.clone().to(device).requires_grad_(True) for n, t in x.items()}  # oracle: x
    _, state = attn(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"],
                    initial_state=leaves["initial_state"], return_state=True)
    (state * ds.to(device)).sum().backward()
    want = oracle(spec.memory, x, torch.zeros_like(do), ds)
    assert leaves["q"].grad is None or leaves["q"].grad.abs().max() == 0
    for n in ("k", "v", "g", "initial_state"):
        assert_near(n, leaves[n].grad, want[n], 1e-4)


def test_dropping_the_dbeta_term_is_detected(device):
    """The comparison can fail: the reference with beta's gradient zeroed is rejected."""
    node = NODES["L5"]
    x, do, ds = make_inputs(node, 1, 2, 17, 16, 16, initial=True)
    on = {n: t.to(device) for n, t in x.items()}
    got = kernel("L5")(on["q"], on["k"], on["v"], do.to(device), beta=on["beta"],
                       initial_state=on["initial_state"], d_final_state=ds.to(device))
    want = oracle(node, x, do, ds)
    assert_near("beta", got["beta"], want["beta"], 1e-4)
    with pytest.raises(AssertionError, match="dbeta"):
        assert_near("beta", torch.zeros_like(got["beta"]), want["beta"], 1e-4)


@pytest.mark.parametrize("rule,decay,L", [("delta", "scalar", 17), ("additive", "vector", 17),
                                          ("delta", "none", 1)],
                         ids=["L6-L17-chunked_fwd", "L4-L17-chunked_fwd", "L5-L1-recurrent_fwd"])
def test_autograd_through_compiled_attention(rule, decay, L, device):
    """(o * do).sum() plus the final state's term, backward through the user API (chunked
    forward for L > 1, recurrent for L = 1; the generated backward kernel): every input's grad."""
    spec = attncc.Attention(memory=attncc.recurrent_state(update=rule, decay=decay))
    attn = attncc.compile(spec)
    node = spec.memory
    x, do, ds = make_inputs(node, 1, 2, L, 16, 16, initial=True, seed=1)
    leaves = {n: t.clone().to(device).requires_grad_(True) for n, t in x.items()}  # oracle: x
    o, state = attn(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                    beta=leaves.get("beta"), initial_state=leaves["initial_state"],
                    return_state=True)
    ((o * do.to(device)).sum() + (state * ds.to(device)).sum()).backward()
    want = oracle(node, x, do, ds)
    for n, t in leaves.items():
        assert_near(n, t.grad, want[n], 1e-4)


def test_normaliser_through_compiled_attention_varlen(device):
    """L1 elu1 + normaliser, packed (two sequences): o and the final state (z column included)."""
    spec = attncc.Attention(memory=attncc.recurrent_state(feature_map="elu1", normalize=True))
    attn = attncc.compile(spec)
    cu = torch.tensor([0, 7, 20])
    x, do, _ = make_inputs(spec.memory, 1, 2, 20, 16, 16, seed=7)
    packed = {n: t[0].transpose(0, 1).contiguous() for n, t in x.items()}
    dop = do[0].transpose(0, 1).contiguous()
    gen = torch.Generator().manual_seed(8)
    s0, dsn = torch.rand(2, 2, 16, 17, generator=gen), torch.randn(2, 2, 16, 17, generator=gen)
    leaves = {n: t.clone().to(device).requires_grad_(True) for n, t in packed.items()}
    s0l = s0.clone().to(device).requires_grad_(True)
    o, state = attn(leaves["q"], leaves["k"], leaves["v"], initial_state=s0l,
                    cu_seqlens=cu.to(device), return_state=True)
    ((o * dop.to(device)).sum() + (state * dsn.to(device)).sum()).backward()
    want = reference_backward(packed["q"], packed["k"], packed["v"], spec.memory, dop,
                              initial_state=s0, d_final_state=dsn, cu_seqlens=cu)
    for n, t in [*leaves.items(), ("initial_state", s0l)]:
        assert_near(n, t.grad, want[n], 1e-4)


def test_o_sum_backward_with_expanded_grad(device):
    """o.sum().backward() hands the kernel a do with zero strides; bshd-strided q, k, v."""
    spec = attncc.Attention(memory=attncc.recurrent_state(update="delta"))
    attn = attncc.compile(spec)
    x, do, _ = make_inputs(spec.memory, 1, 2, 17, 16, 16, seed=5)
    leaves = {n: t.to(device).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
              for n, t in x.items() if n in ("q", "k", "v")}
    attn(leaves["q"], leaves["k"], leaves["v"], beta=x["beta"].to(device)).sum().backward()
    want = oracle(spec.memory, x, torch.ones_like(do), None)
    for n, t in leaves.items():
        assert_near(n, t.grad, want[n], 1e-4)


def test_reference_backend_is_differentiable():
    spec = attncc.Attention(memory=attncc.recurrent_state(update="delta", decay="scalar"))
    attn = attncc.compile(spec)
    x, do, ds = make_inputs(spec.memory, 1, 2, 9, 16, 16, initial=True, seed=6)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    o, state = attn(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], beta=leaves["beta"],
                    initial_state=leaves["initial_state"], return_state=True,
                    backend="reference")
    ((o * do).sum() + (state * ds).sum()).backward()
    want = oracle(spec.memory, x, do, ds)
    for n, t in leaves.items():
        assert_near(n, t.grad, want[n], 1e-4)  # the reference computes in fp32


def test_no_backward_kernel_warns_and_differentiates_the_reference(device):
    spec = attncc.Attention(memory=attncc.recurrent_state(block=4))
    attn = attncc.compile(spec)
    x, do, _ = make_inputs(spec.memory, 1, 1, 6, 16, 16)
    on = {n: t.to(device) for n, t in x.items()}  # the forward kernel runs on `device`
    q = on["q"].clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="block_causal"):
        o = attn(q, on["k"], on["v"])
    (o * do.to(device)).sum().backward()
    want = reference_backward(x["q"], x["k"], x["v"], spec.memory, do)
    assert_near("q", q.grad, want["q"], 1e-4)
    qp = x["q"][0].transpose(0, 1).contiguous().requires_grad_(True)  # packed: [T, H, D]
    kp, vp = (x[n][0].transpose(0, 1) for n in "kv")
    qpd = qp.detach().to(device).requires_grad_(True)
    cu = torch.tensor([0, 2, 6])
    with pytest.warns(UserWarning, match="block_causal"):
        o = attn(qpd, kp.to(device), vp.to(device), cu_seqlens=cu.to(device))
    (o * do[0].transpose(0, 1).to(device)).sum().backward()
    want = reference_backward(qp, kp, vp, spec.memory, do[0].transpose(0, 1), cu_seqlens=cu)
    assert_near("q", qpd.grad, want["q"], 1e-4)


def test_unsupported_rules_raise():
    with pytest.raises(NotImplementedError, match="block_causal"):
        TritonLinearBackward(LinearState("block_causal", block=4))
    with pytest.raises(NotImplementedError, match="taylor2"):
        TritonLinearBackward(LinearState("linear", feature_map="taylor2"))
    with pytest.raises(TypeError, match="node"):
        TritonLinearBackward("gated_delta")


def test_bad_do_shape_raises_before_launch():
    x, do, _ = make_inputs(NODES["L1"], 1, 2, 5, 16, 16)
    with pytest.raises(ValueError, match="do: expected"):
        kernel("L1")(x["q"], x["k"], x["v"], do[..., :8])


def test_varlen_matches_reference(device):
    node = NODES["L6"]
    cu = torch.tensor([0, 5, 5, 22])
    x, do, _ = make_inputs(node, 1, 2, 22, 16, 16, seed=2)
    packed = {n: t[0].transpose(0, 1).contiguous() for n, t in x.items()}  # [T, H, ...]
    dop = do[0].transpose(0, 1).contiguous()
    s0 = torch.randn(3, 2, 16, 16)
    dsn = torch.randn(3, 2, 16, 16)
    on = {n: t.to(device) for n, t in packed.items()}  # the oracle keeps the CPU copies
    got = kernel("L6")(on["q"], on["k"], on["v"], dop.to(device), g=on["g"], beta=on["beta"],
                       initial_state=s0.to(device), d_final_state=dsn.to(device),
                       cu_seqlens=cu.to(device))
    want = reference_backward(packed["q"], packed["k"], packed["v"], node, dop, g=packed["g"],
                              beta=packed["beta"], initial_state=s0, d_final_state=dsn,
                              cu_seqlens=cu)
    for n in ("q", "k", "v", "g", "beta", "initial_state"):
        assert_near(n, got[n], want[n], 1e-4)


CASES = [("L6", 90, "bfloat16", 128, 128, False), ("L4", 80, "float16", 64, 64, False),
         ("L1_elu1", 80, "float32", 64, 64, False), ("L5", 90, "float16", 64, 64, True),
         ("L1_elu1_norm", 90, "bfloat16", 64, 64, False)]


@pytest.mark.parametrize("name,arch,dtype,dk,dv,varlen", CASES, ids=[
    f"{n}-sm{a}-{d}-{k}x{v}{'-varlen' if vl else ''}" for n, a, d, k, v, vl in CASES])
def test_backward_compiles_for_gpu(name, arch, dtype, dk, dv, varlen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = compile_linear_backward_for_target(kernel(name, 32), arch, dtype, dk, dv,
                                                 varlen=varlen)
    assert art.arch == arch and len(art.cubin) > 0 and f".target sm_{arch}" in art.ptx
    print(f"{art.name} sm_{arch} {dtype} {dk}x{dv}: {art.n_regs} regs, "
          f"{art.stack_bytes} stack bytes, {art.shared_bytes} shared bytes")
