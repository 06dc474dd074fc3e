"""The chunked linear-state Triton kernel against the fp64 spec loop (`recurrent_reference`).

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
Tolerances (max error relative to max(reference max magnitude, 1)): fp32 1e-4; fp16 2e-2
(inputs rounded to 16 bits; the L1-L6 kernels' dot operands and scratch (W, U / V', the
per-chunk states) in fp16 as on a GPU, fp32 accumulation and an fp32 state: the tolerance did
not change; L = 65 measures up to 7.4e-4 on o and 3.1e-4 on the state); bf16 4e-2 (the interpreter's bf16 dot is wrong, so bf16 runs its dots and scratch
in fp32 there).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.backends.triton.linear.chunked import TritonChunkedLinear, compile_chunked_for_target
from attncc.ir.linear import LinearState

NODES = {
    "linear": LinearState("linear"),
    "linear_elu1": LinearState("linear", feature_map="elu1"),
    "linear_elu1_norm": LinearState("linear", feature_map="elu1", normalize=True),
    "decay": LinearState("decay", decay=(0.9, 0.6)),
    "scalar_gate": LinearState("scalar_gate"),
    "vector_gate": LinearState("vector_gate"),
    "delta": LinearState("delta"),
    "gated_delta": LinearState("gated_delta"),
}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
_KERNELS: dict[tuple[str, int | None], TritonChunkedLinear] = {}


def kernel(name: str, chunk: int | None = None) -> TritonChunkedLinear:
    if (name, chunk) not in _KERNELS:
        _KERNELS[name, chunk] = TritonChunkedLinear(NODES[name], chunk=chunk)
    return _KERNELS[name, chunk]


def make_inputs(node: LinearState, B: int, H: int, L: int, dk: int, dv: int, *,
                device: str, dtype: torch.dtype = torch.float32, initial: bool = False,
                seed: int = 0, g_scale: float = 0.5):
    """Inputs in `dtype` (state in fp32) on `device`: drawn on the CPU generator then moved, so
    values do not depend on the device."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, dk, generator=gen) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=gen)
    if node.rule in ("delta", "gated_delta"):  # unit-norm keys, as DeltaNet's users have
        k = F.normalize(k, dim=-1)
    extra = {}
    if node.rule in ("scalar_gate", "gated_delta"):
        extra["g"] = -g_scale * torch.rand(B, H, L, generator=gen)
    if node.rule == "vector_gate":
        extra["g"] = -g_scale * torch.rand(B, H, L, dk, generator=gen)
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
    assert torch.isfinite(actual).all()
    err = (actual.double().cpu() - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max error {err:.3g} vs reference max {ref:.3g}"


def run_and_check(name: str, L: int, chunk: int, device: str, *, dtype=torch.float32,
                  initial=False, B=1, H=2, dk=16, dv=16) -> None:
    node = NODES[name]
    q, k, v, extra, state = make_inputs(node, B, H, L, dk, dv, device=device, dtype=dtype,
                                        initial=initial)
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
def test_fp32_matches_reference(name, chunk, L, initial, device):
    run_and_check(name, L, chunk, device, initial=initial)


@pytest.mark.parametrize("name,chunk", [("scalar_gate", 16), ("scalar_gate", 32),
                                        ("gated_delta", 64), ("vector_gate", 32)])
def test_long_sequence_L300(name, chunk, device):
    run_and_check(name, 300, chunk, device, initial=True, H=1)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "decay", "vector_gate", "gated_delta"])
def test_odd_head_dims_and_default_chunk(name, device):
    # Dk 20 (padded key lanes stay 0 after phi), Dv 24 (padded value columns, z at index 24)
    run_and_check(name, 37, None, device, initial=True, dk=20, dv=24)


@pytest.mark.parametrize("dk,dv", [(256, 16), (32, 256)], ids=["dk256_dv16", "dk32_dv256"])
@pytest.mark.parametrize("name", ["gated_delta", "vector_gate"])
def test_largest_head_dims(name, dk, dv, device):
    # Dk 256: the whole key dim in one tile, value block 32; Dv 256: four value programs
    run_and_check(name, 20, 16, device, initial=True, H=1, dk=dk, dv=dv)


def test_head_dim_above_limit_raises_before_launch():
    q, k, v, extra, _ = make_inputs(NODES["delta"], 1, 1, 4, 272, 16, device="cpu")
    with pytest.raises(ValueError, match=r"Dk <= 256.*got 272"):
        kernel("delta", 16)(q, k, v, **extra)
    node = LinearState("linear", feature_map="taylor2")
    q = torch.randn(1, 1, 3, 17)
    with pytest.raises(ValueError, match=r"F <= 273.*head dim 17 \(F = 307\)"):
        TritonChunkedLinear(node, chunk=16)(q, q, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["scalar_gate", "vector_gate", "gated_delta"])
def test_half_precision(name, dtype, device):
    run_and_check(name, 65, 32, device, dtype=dtype, initial=True)


@pytest.mark.parametrize("name", ["linear_elu1_norm", "decay", "scalar_gate", "vector_gate",
                                  "delta", "gated_delta"])
def test_chunked_prefill_then_recurrent_decode_equals_one_run(name, device):
    node, L = NODES[name], 50
    q, k, v, extra, state = make_inputs(node, 1, 2, L, 16, 16, device=device, initial=True,
                                        seed=3)
    ro, rs = reference(node, q, k, v, extra, state)
    head = {n: x[:, :, :L - 1] for n, x in extra.items()}
    tail = {n: x[:, :, L - 1:] for n, x in extra.items()}
    o_pre, s_pre = kernel(name, 16)(q[:, :, :L - 1], k[:, :, :L - 1], v[:, :, :L - 1],
                                    initial_state=state, return_state=True, **head)
    o_dec, s_dec = TritonRecurrentLinear(node)(q[:, :, L - 1:], k[:, :, L - 1:], v[:, :, L - 1:],
                                               initial_state=s_pre, return_state=True, **tail)
    assert_near(torch.cat([o_pre, o_dec], dim=2), ro, 1e-4)
    assert_near(s_dec, rs, 1e-4)


@pytest.mark.parametrize("name", ["scalar_gate", "vector_gate", "gated_delta"])
def test_strongly_negative_gates_stay_finite(name, device):
    # g = -20 a token: b reaches -640 inside a chunk; e^{-b} would overflow, e^{b_i - b_j} cannot
    node = NODES[name]
    q, k, v, extra, state = make_inputs(node, 1, 2, 40, 16, 16, device=device, initial=True)
    extra["g"] = torch.full_like(extra["g"], -20.0)
    extra["g"][..., 5:9] = 0.0  # some tokens keep everything: e^0 next to e^-640
    o, s = kernel(name, 32)(q, k, v, initial_state=state, return_state=True, **extra)
    ro, rs = reference(node, q, k, v, extra, state)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


def test_no_state_returned_and_errors_before_launch(device):
    node = NODES["scalar_gate"]
    q, k, v, extra, _ = make_inputs(node, 1, 1, 20, 16, 16, device=device)
    o = kernel("scalar_gate", 16)(q, k, v, **extra)
    assert isinstance(o, torch.Tensor)
    assert_near(o, reference(node, q, k, v, extra, None)[0], 1e-4)
    with pytest.raises(ValueError, match=r"g: expected all entries <= 0"):
        kernel("scalar_gate", 16)(q, k, v, g=torch.ones(1, 1, 20, device=device))
    with pytest.raises(ValueError, match=r"chunk: expected a power of two >= 16"):
        TritonChunkedLinear(node, chunk=24)


def test_inconsistent_inputs_raise_before_launch():
    q, k, v, extra, _ = make_inputs(NODES["gated_delta"], 1, 2, 20, 16, 16, device="cpu")
    kern = kernel("gated_delta", 16)
    with pytest.raises(ValueError, match=r"g: expected a tensor \[B, H, L\]"):
        kern(q, k, v, beta=extra["beta"])  # a gated spec without its gate
    with pytest.raises(ValueError, match=r"beta: expected a tensor \[B, H, L\]"):
        kern(q, k, v, g=extra["g"])
    with pytest.raises(ValueError, match=r"g: expected shape \[B, H, L\] = \[1, 2, 20\], "
                                         r"got \[1, 2, 20, 16\]"):
        kern(q, k, v, g=-torch.rand(1, 2, 20, 16), beta=extra["beta"])
    with pytest.raises(ValueError, match=r"g: expected all entries <= 0.*got max 0.5"):
        kern(q, k, v, g=extra["g"] + 0.5 - extra["g"].max(), beta=extra["beta"])
    with pytest.raises(ValueError, match=r"initial_state: expected shape .* got \[1, 2, 16, 8\]"):
        kern(q, k, v, initial_state=torch.zeros(1, 2, 16, 8), **extra)
    with pytest.raises(ValueError, match=r"initial_state: expected a floating-point dtype"):
        kern(q, k, v, initial_state=torch.zeros(1, 2, 16, 16, dtype=torch.int32), **extra)
    qv, kv, vv, ev, _ = make_inputs(NODES["vector_gate"], 1, 2, 20, 16, 16, device="cpu")
    with pytest.raises(ValueError, match=r"g: expected shape \[B, H, L, Dk\]"):
        kernel("vector_gate", 16)(qv, kv, vv, g=ev["g"][..., 0])


BLOCKS = [1, 3, 16, 40]  # 16 and 40 straddle the interpreter's chunk of 16 or not; 40 > chunk


@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "state_in"])
@pytest.mark.parametrize("L", [1, 63, 64, 65])
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{b}" for b in BLOCKS])
def test_block_causal_L7(block, L, initial, device):
    # block <= chunk: whole blocks per tile under a block mask; block > chunk: two passes
    node = LinearState("block_causal", feature_map="elu1", normalize=True, block=block)
    q, k, v, extra, state = make_inputs(node, 1, 2, L, 16, 24, device=device, initial=initial)
    o, s = TritonChunkedLinear(node, chunk=16)(q, k, v, initial_state=state, return_state=True)
    ro, rs = reference(node, q, k, v, extra, state)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


def test_block_causal_identity_phi_and_bf16(device):
    node = LinearState("block_causal", block=5)
    q, k, v, extra, state = make_inputs(node, 2, 1, 37, 32, 16, device=device,
                                        dtype=torch.bfloat16, initial=True)
    o, s = TritonChunkedLinear(node, chunk=32)(q, k, v, initial_state=state, return_state=True)
    ro, rs = reference(node, q, k, v, extra, state)
    assert_near(o, ro, TOL[torch.bfloat16])
    assert_near(s, rs, TOL[torch.bfloat16])


@pytest.mark.parametrize("rule,block", [("linear", None), ("block_causal", 4)])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_taylor2_feature_map(rule, block, normalize, device):
    # BASED: phi(x) = [1, x, x (x) x / sqrt 2], F = 1 + 8 + 64 = 73 (padded to 128)
    node = LinearState(rule, feature_map="taylor2", normalize=normalize, block=block)
    q, k, v, extra, _ = make_inputs(node, 1, 2, 41, 8, 16, device=device)
    q, k = q * 8 ** -0.25, k * 8 ** -0.25
    state = torch.randn(1, 2, node.feature_dim(8), node.state_dv(16),
                        generator=torch.Generator().manual_seed(4))
    if normalize:
        state[..., -1] = state[..., -1].abs() + 1
    state = state.to(device)
    o, s = TritonChunkedLinear(node, chunk=16)(q, k, v, initial_state=state, return_state=True)
    ro, rs = reference(node, q, k, v, extra, state)
    assert_near(o, ro, 1e-4)
    assert_near(s, rs, 1e-4)


@pytest.mark.parametrize("name,arch,dtype", [("scalar_gate", 90, "float16"),
                                             ("linear_elu1_norm", 80, "bfloat16"),
                                             ("decay", 90, "bfloat16")])
def test_aot_compiles_for_real_gpus(name, arch, dtype):
    arts = compile_chunked_for_target(kernel(name), arch, dtype, 64, 64)
    assert [a.name for a in arts] == kernel(name).function_names()  # sweep, output
    for art in arts:
        assert art.arch == arch and art.cubin and f".target sm_{arch}" in art.ptx
        assert art.stack_bytes in (None, 0), f"{art.name}: {art.stack_bytes} bytes of stack"
