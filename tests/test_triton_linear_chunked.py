"""The chunked linear-state Triton kernel against the fp64 spec loop (`recurrent_reference`).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
Tolerances (max error relative to max(reference max magnitude, 1)): fp32 1e-4; fp16 2e-2
(inputs rounded to 16 bits, the state and every product in fp32).
"""

from __future__ import annotations

import pytest
import torch

from attncc.backends.reference_linear import recurrent_reference
from attncc.backends.triton_linear import TritonRecurrentLinear
from attncc.backends.triton_linear_chunked import TritonChunkedLinear, compile_chunked_for_target
from attncc.ir.linear import LinearState

NODES = {
    "linear": LinearState("linear"),
    "linear_elu1": LinearState("linear", feature_map="elu1"),
    "linear_elu1_norm": LinearState("linear", feature_map="elu1", normalize=True),
    "decay": LinearState("decay", decay=(0.9, 0.6)),
    "scalar_gate": LinearState("scalar_gate"),
}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
_KERNELS: dict[tuple[str, int | None], TritonChunkedLinear] = {}


def kernel(name: str, chunk: int | None = None) -> TritonChunkedLinear:
    if (name, chunk) not in _KERNELS:
        _KERNELS[name, chunk] = TritonChunkedLinear(NODES[name], chunk=chunk)
    return _KERNELS[name, chunk]


def make_inputs(node: LinearState, B: int, H: int, L: int, dk: int, dv: int, *,
                dtype: torch.dtype = torch.float32, initial: bool = False, seed: int = 0,
                g_scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, dk, generator=gen) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen)
    extra = {}
    if node.rule == "scalar_gate":
        extra["g"] = -g_scale * torch.rand(B, H, L, generator=gen)
    state = None
    if initial:
        state = torch.randn(B, H, dk, node.state_dv(dv), generator=gen)
        if node.normalize:
            state[..., -1] = state[..., -1].abs()  # z sums phi(k) > 0
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return q, k, v, {name: x.to(dtype) for name, x in extra.items()}, state


def d(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.double()


def reference(node, q, k, v, extra, state):
    return recurrent_reference(d(q), d(k), d(v), node, initial_state=d(state),
                               output_final_state=True, **{n: d(x) for n, x in extra.items()})


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max error {err:.3g} vs reference max {ref:.3g}"


def run_and_check(name: str, L: int, chunk: int, *, dtype=torch.float32, initial=False, B=1,
                  H=2, dk=16, dv=16) -> None:
    node = NODES[name]
    q, k, v, extra, state = make_inputs(node, B, H, L, dk, dv, dtype=dtype, initial=initial)
    o, s = kernel(name, chunk)(q, k, v, initial_state=state, return_state=True, **extra)
    ro, rs = reference(node, q, k, v, extra, state)
    assert o.dtype == dtype and o.shape == (B, H, L, dv)
    assert s.dtype == torch.float32 and s.shape == rs.shape
    assert_near(o, ro, TOL[dtype])
    assert_near(s, rs, TOL[dtype])


@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "state_in"])
@pytest.mark.parametrize("L", [1, 63, 64, 65])
@pytest.mark.parametrize("chunk", [16, 32], ids=["c16", "c32"])
@pytest.mark.parametrize("name", list(NODES))
def test_fp32_matches_reference(name, chunk, L, initial):
    run_and_check(name, L, chunk, initial=initial)


@pytest.mark.parametrize("chunk", [16, 32], ids=["c16", "c32"])
def test_long_sequence_L300(chunk):
    run_and_check("scalar_gate", 300, chunk, initial=True)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "decay"])
def test_odd_head_dims_and_default_chunk(name):
    # Dk 20 (padded key lanes stay 0 after phi), Dv 24 (padded value columns, z at index 24)
    run_and_check(name, 37, None, initial=True, dk=20, dv=24)


def test_fp16():
    run_and_check("scalar_gate", 65, 32, dtype=torch.float16, initial=True)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "decay", "scalar_gate"])
def test_chunked_prefill_then_recurrent_decode_equals_one_run(name):
    node, L = NODES[name], 50
    q, k, v, extra, state = make_inputs(node, 1, 2, L, 16, 16, initial=True, seed=3)
    ro, rs = reference(node, q, k, v, extra, state)
    head = {n: x[:, :, :L - 1] for n, x in extra.items()}
    tail = {n: x[:, :, L - 1:] for n, x in extra.items()}
    o_pre, s_pre = kernel(name, 16)(q[:, :, :L - 1], k[:, :, :L - 1], v[:, :, :L - 1],
                                    initial_state=state, return_state=True, **head)
    o_dec, s_dec = TritonRecurrentLinear(node)(q[:, :, L - 1:], k[:, :, L - 1:], v[:, :, L - 1:],
                                               initial_state=s_pre, return_state=True, **tail)
    assert_near(torch.cat([o_pre, o_dec], dim=2), ro, 1e-4)
    assert_near(s_dec, rs, 1e-4)


def test_strongly_negative_gates_stay_finite():
    # g = -20 a token: b reaches -640 inside a chunk; e^{-b} would overflow, e^{b_i - b_j} cannot
    node = NODES["scalar_gate"]
    q, k, v, _, state = make_inputs(node, 1, 2, 40, 16, 16, initial=True)
    g = torch.full((1, 2, 40), -20.0)
    o, s = kernel("scalar_gate", 32)(q, k, v, g=g, initial_state=state, return_state=True)
    ro, rs = reference(node, q, k, v, {"g": g}, state)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


def test_no_state_returned_and_errors_before_launch():
    node = NODES["scalar_gate"]
    q, k, v, extra, _ = make_inputs(node, 1, 1, 20, 16, 16)
    o = kernel("scalar_gate", 16)(q, k, v, **extra)
    assert isinstance(o, torch.Tensor)
    assert_near(o, reference(node, q, k, v, extra, None)[0], 1e-4)
    with pytest.raises(ValueError, match=r"g: expected all entries <= 0"):
        kernel("scalar_gate", 16)(q, k, v, g=torch.ones(1, 1, 20))
    with pytest.raises(ValueError, match=r"chunk: expected a power of two >= 16"):
        TritonChunkedLinear(node, chunk=24)


@pytest.mark.parametrize("node", [LinearState("vector_gate"), LinearState("delta"),
                                  LinearState("gated_delta"), LinearState("block_causal", block=4),
                                  LinearState("linear", feature_map="taylor2")],
                         ids=["vector_gate", "delta", "gated_delta", "block_causal", "taylor2"])
def test_unsupported_raise_naming_them(node):
    name = node.feature_map if node.feature_map == "taylor2" else node.rule
    with pytest.raises(NotImplementedError, match=f"{name}.*TritonRecurrentLinear"):
        TritonChunkedLinear(node)


@pytest.mark.parametrize("name,arch,dtype", [("scalar_gate", 90, "float16"),
                                             ("linear_elu1_norm", 80, "bfloat16"),
                                             ("decay", 90, "bfloat16")])
def test_aot_compiles_for_real_gpus(name, arch, dtype):
    art = compile_chunked_for_target(kernel(name), arch, dtype, 64, 64)
    assert art.arch == arch and art.cubin and f".target sm_{arch}" in art.ptx
    if arch == 90:  # 8 warps, tf32 dots: no spills (sm_80 elu1_norm still spills ~0.5 KB)
        assert art.stack_bytes in (None, 0)
