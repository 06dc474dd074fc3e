"""The recurrent linear-state Triton kernel against the fp64 spec loop (`recurrent_reference`).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
Tolerances (max error relative to the reference's max magnitude): fp32 1e-4, fp16/bf16 2e-2 /
4e-2 (inputs rounded to 16 bits, the state and the arithmetic in fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attncc.backends import cache
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.ir.linear import LinearState

NODES = {
    "linear": LinearState("linear"),
    "linear_elu1_norm": LinearState("linear", feature_map="elu1", normalize=True),
    "decay": LinearState("decay", decay=(0.9, 0.6)),
    "scalar_gate": LinearState("scalar_gate"),
    "vector_gate": LinearState("vector_gate"),
    "delta": LinearState("delta"),
    "gated_delta": LinearState("gated_delta"),
}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
_KERNELS: dict[tuple[str, int | None], TritonRecurrentLinear] = {}


def kernel(name: str, block_v: int | None = None) -> TritonRecurrentLinear:
    if (name, block_v) not in _KERNELS:
        _KERNELS[name, block_v] = TritonRecurrentLinear(NODES[name], block_v=block_v)
    return _KERNELS[name, block_v]


def make_inputs(node: LinearState, B: int, H: int, L: int, dk: int, dv: int, *,
                device: str, dtype: torch.dtype = torch.float32, initial: bool = False,
                seed: int = 0):
    """Inputs in `dtype` (state in fp32) on `device`; delta rules get unit-norm keys, as their
    users do. Drawn on the CPU generator then moved, so values do not depend on the device."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, dk, generator=gen) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen)
    if node.rule in ("delta", "gated_delta"):
        k = F.normalize(k, dim=-1)
    extra = {}
    if node.rule in ("scalar_gate", "gated_delta"):
        extra["g"] = -0.5 * torch.rand(B, H, L, generator=gen)
    if node.rule == "vector_gate":
        extra["g"] = -0.5 * torch.rand(B, H, L, dk, generator=gen)
    if node.rule in ("delta", "gated_delta"):
        extra["beta"] = torch.rand(B, H, L, generator=gen)
    state = None
    if initial:
        state = torch.randn(B, H, dk, node.state_dv(dv), generator=gen)
        if node.normalize:
            state[..., -1] = state[..., -1].abs()  # z sums phi(k) > 0
    q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
    state = None if state is None else state.to(device)
    return q, k, v, {name: x.to(dtype).to(device) for name, x in extra.items()}, state


def d(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.double().cpu()  # the fp64 reference runs on the CPU


def reference(node, q, k, v, extra, state):
    return recurrent_reference(d(q), d(k), d(v), node, initial_state=d(state),
                               output_final_state=True, **{n: d(x) for n, x in extra.items()})


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    err = (actual.double().cpu() - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max error {err:.3g} vs reference max {ref:.3g}"


def run_and_check(name: str, L: int, device: str, *, dtype=torch.float32, initial=False, B=1,
                  H=2, dk=16, dv=16, block_v=None) -> None:
    node = NODES[name]
    q, k, v, extra, state = make_inputs(node, B, H, L, dk, dv, device=device, dtype=dtype,
                                        initial=initial)
    o, s = kernel(name, block_v)(q, k, v, initial_state=state, return_state=True, **extra)
    ro, rs = reference(node, q, k, v, extra, state)
    assert o.dtype == dtype and o.shape == (B, H, L, dv)
    assert s.dtype == torch.float32 and s.shape == rs.shape
    assert_near(o, ro, TOL[dtype])
    assert_near(s, rs, TOL[dtype])


@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "state_in"])
@pytest.mark.parametrize("L", [1, 63, 64, 65])
@pytest.mark.parametrize("name", list(NODES))
def test_fp32_matches_reference(name, L, initial, device):
    run_and_check(name, L, device, initial=initial)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "gated_delta"])
def test_long_sequence_L300(name, device):
    run_and_check(name, 300, device, initial=True, H=1)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "vector_gate", "gated_delta"])
def test_split_dv_and_dk_ne_dv(name, device):
    # Dk 16, Dv 40 padded to 64 and split into 16-column programs; z written once
    run_and_check(name, 33, device, initial=True, dk=16, dv=40, block_v=16)


@pytest.mark.parametrize("name", ["delta", "decay"])
def test_head_dims_32_and_odd(name, device):
    run_and_check(name, 37, device, initial=True, dk=32, dv=24)


@pytest.mark.parametrize("dk,dv", [(20, 24), (128, 128)], ids=["dk20_dv24", "dk128_dv128"])
@pytest.mark.parametrize("name", ["linear_elu1_norm", "gated_delta"])
def test_padded_and_largest_head_dims(name, dk, dv, device):
    # dk 20: padded key lanes must stay 0 after phi (elu1(0) = 1); dk 128: the largest tile
    run_and_check(name, 9, device, initial=True, dk=dk, dv=dv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["scalar_gate", "gated_delta"])
def test_half_precision(name, dtype, device):
    run_and_check(name, 65, device, dtype=dtype, initial=True)


def test_strided_inputs_bshd_views(device):
    node = NODES["vector_gate"]
    q, k, v, extra, state = make_inputs(node, 2, 2, 40, 16, 16, device=device, initial=True)
    # the same values laid out as BSHD memory, viewed as BHSD (non-contiguous strides)
    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    o, s = kernel("vector_gate")(qs, ks, vs, initial_state=state, return_state=True, **extra)
    ro, rs = reference(node, q, k, v, extra, state)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "gated_delta", "decay"])
def test_prefill_then_decode_equals_one_run(name, device):
    node, L = NODES[name], 50
    q, k, v, extra, state = make_inputs(node, 1, 2, L, 16, 16, device=device, initial=True,
                                        seed=3)
    kern = kernel(name)
    o_all, s_all = kern(q, k, v, initial_state=state, return_state=True, **extra)
    head = {n: x[:, :, :L - 1] for n, x in extra.items()}
    tail = {n: x[:, :, L - 1:] for n, x in extra.items()}
    o_pre, s_pre = kern(q[:, :, :L - 1], k[:, :, :L - 1], v[:, :, :L - 1],
                        initial_state=state, return_state=True, **head)
    o_dec, s_dec = kern(q[:, :, L - 1:], k[:, :, L - 1:], v[:, :, L - 1:],
                        initial_state=s_pre, return_state=True, **tail)
    torch.testing.assert_close(torch.cat([o_pre, o_dec], dim=2), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_dec, s_all, rtol=1e-5, atol=1e-5)


def test_no_state_returned_and_default_zero_state(device):
    node = NODES["scalar_gate"]
    q, k, v, extra, _ = make_inputs(node, 1, 1, 20, 16, 16, device=device)
    o = kernel("scalar_gate")(q, k, v, **extra)
    assert isinstance(o, torch.Tensor)
    assert_near(o, reference(node, q, k, v, extra, None)[0], 1e-4)


def test_normalised_zero_denominator_gives_zero_not_nan(device):
    node = LinearState("linear", normalize=True)  # identity phi: z . q can be exactly 0
    q, k, v, _, _ = make_inputs(node, 1, 1, 6, 16, 16, device=device)
    q[:, :, :3] = 0
    o = TritonRecurrentLinear(node)(q, k, v)
    assert torch.isfinite(o).all() and (o[:, :, :3] == 0).all()
    assert_near(o[:, :, 3:], reference(node, q, k, v, {}, None)[0][:, :, 3:], 1e-3)


def test_gated_rule_without_g_raises_before_launch():
    q = k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"g: expected a tensor \[B, H, L\]"):
        kernel("gated_delta")(q, k, v, beta=torch.rand(1, 2, 8))
    with pytest.raises(ValueError, match=r"g: expected all entries <= 0"):
        kernel("scalar_gate")(q, k, v, g=torch.ones(1, 2, 8))


def test_wrong_state_shape_raises():
    q = k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"initial_state: expected shape"):
        kernel("linear")(q, k, v, initial_state=torch.zeros(1, 2, 16, 17))
    with pytest.raises(ValueError, match=r"initial_state: expected shape .* \[1, 2, 16, 17\]"):
        kernel("linear_elu1_norm")(q, k, v, initial_state=torch.zeros(1, 2, 16, 16))


def test_block_causal_has_no_one_token_kernel():
    with pytest.raises(NotImplementedError, match="block_causal.*chunked"):
        TritonRecurrentLinear(LinearState("block_causal", block=4))


@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "state_in"])
@pytest.mark.parametrize("dk,L", [(16, 17), (5, 33)], ids=["dk16_L17", "dk5_L33"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_taylor2_feature_map(normalize, dk, L, initial, device):
    # F = 1 + D + D^2 (273 for D = 16, padded to 512): phi built from two gathered loads
    node = LinearState("linear", feature_map="taylor2", normalize=normalize)
    q, k, v, extra, state = make_inputs(node, 1, 2, L, dk, 24, device=device, initial=False)
    q, k = q * 0.5, k * 0.5  # BASED scales q, k by D^(-1/4); keeps phi(q).phi(k) moderate
    if initial:
        gen = torch.Generator().manual_seed(5)
        state = torch.randn(1, 2, node.feature_dim(dk), node.state_dv(24), generator=gen)
        if normalize:
            state[..., -1] = state[..., -1].abs() + 1  # z . phi(q) stays away from 0
        state = state.to(device)
    o, s = TritonRecurrentLinear(node)(q, k, v, initial_state=state, return_state=True)
    ro, rs = reference(node, q, k, v, extra, state)
    assert s.shape == (1, 2, node.feature_dim(dk), node.state_dv(24))
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


def test_taylor2_head_dim_above_limit_raises_before_launch():
    node = LinearState("linear", feature_map="taylor2")
    q = k = v = torch.randn(1, 1, 3, 17)
    with pytest.raises(ValueError, match=r"F <= 273.*head dim 17"):
        TritonRecurrentLinear(node)(q, k, v)


def test_source_has_only_its_rule_lines_and_is_cached():
    delta = kernel("delta").source
    assert "beta_t = tl.load" in delta and "tl.exp(g_t)" not in delta
    plain = kernel("linear").source
    assert "beta_t" not in plain and "g_t" not in plain and "z = z + k_t" not in plain
    assert "z = z + k_t" in kernel("linear_elu1_norm").source
    builds = cache.stats.builds
    again = TritonRecurrentLinear(NODES["delta"])
    assert cache.stats.builds == builds and again.source == delta


AOT = [("linear_elu1_norm", 80, "float16", 64, 64), ("vector_gate", 90, "bfloat16", 128, 128),
       ("gated_delta", 90, "float16", 128, 128), ("gated_delta", 80, "bfloat16", 64, 128),
       ("decay", 90, "float32", 32, 48)]


@pytest.mark.parametrize("name,arch,dtype,dk,dv", AOT, ids=[f"{n}-sm{a}-{d}-{k}x{v}"
                                                            for n, a, d, k, v in AOT])
def test_kernel_compiles_for_gpu(name, arch, dtype, dk, dv):
    """The recurrent kernel goes through Triton's whole pipeline (ptxas included) for a real
    target, with no GPU: it is not only an interpreter program."""
    from attncc.backends.triton.linear.aot import compile_linear_for_target
    art = compile_linear_for_target(TritonRecurrentLinear(NODES[name]), arch, dtype, dk, dv)
    assert len(art.cubin) > 0 and f".target sm_{arch}" in art.ptx
