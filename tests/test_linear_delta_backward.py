"""The chunked (WY) backward of the delta rules L5, L6
(`attncc.backends.triton.linear.backward_delta`) against torch.autograd through the fp64 spec
loop (`attncc.backends.reference.linear_backward.reference_backward`), and its routing.

Under the interpreter: chunk 16, tiny shapes, odd lengths (1, 17, 40: a partial last chunk),
head dims that are not powers of two (Dk 20 padded to 32, Dv 24; Dk 80 in two key blocks of
the dq/dk kernel, Dv 40 in three value blocks). Tolerances as tests/test_linear_backward.py (max
error relative to max(1, the reference gradient's max magnitude)): fp32 1e-4; fp16 / bf16
2e-2 / 4e-2 (inputs and do rounded to 16 bits, which the oracle sees too; under the
interpreter the dots run in fp32, on a GPU in the input type with fp32 accumulation). Extreme
gates (-inf, -1e9) as tests/test_linear_extreme_gates.py: finite and close wherever the
recurrence's gradient is. The sm_90 compile checks the four kernels build for bf16 d128 chunk
64 and use warpgroup tensor-core ops (HGMMA) without spilling.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from attncc.backends.reference.linear_backward import reference_backward
from attncc.backends.triton.linear.backward import TritonLinearBackward
from attncc.backends.triton.linear.backward_delta import (PARTS, TritonDeltaChunkedBackward,
                                                          compile_delta_backward_for_target)
from attncc.backends.triton.linear.family import backward_kernel
from attncc.ir.linear import LinearState
from tests.test_linear_backward import NODES, TOL, assert_near, make_inputs, oracle

_KERNELS: dict[tuple[str, int | None], TritonDeltaChunkedBackward] = {}


def kernel(name: str, block_v: int | None = None) -> TritonDeltaChunkedBackward:
    if (name, block_v) not in _KERNELS:
        _KERNELS[name, block_v] = TritonDeltaChunkedBackward(NODES[name], chunk=16,
                                                             block_v=block_v)
    return _KERNELS[name, block_v]


def run(name: str, x: dict, do: torch.Tensor, ds: torch.Tensor | None, *,
        block_v: int | None = None, device: str = "cpu") -> dict:
    on = {n: t.to(device) for n, t in x.items()}
    got = kernel(name, block_v)(
        on["q"], on["k"], on["v"], do.to(device), g=on.get("g"), beta=on["beta"],
        initial_state=on.get("initial_state"), d_final_state=None if ds is None else ds.to(device))
    return {n: None if t is None else t.cpu() for n, t in got.items()}


def check(name: str, x: dict, do: torch.Tensor, ds: torch.Tensor | None, tol: float, *,
          block_v: int | None = None, device: str = "cpu") -> None:
    got = run(name, x, do, ds, block_v=block_v, device=device)
    want = oracle(NODES[name], x, do, ds)
    for n, t in x.items():
        assert got[n].dtype == t.dtype, f"d{n}: dtype {got[n].dtype}, input {t.dtype}"
        assert torch.isfinite(got[n]).all() == torch.isfinite(want[n]).all()
        assert_near(n, got[n], want[n], tol)
    if "g" not in x:
        assert got["g"] is None


@pytest.mark.parametrize("L,initial", [(1, False), (17, True), (40, True)],
                         ids=["L1-zero_state", "L17-state_in", "L40-state_in"])
@pytest.mark.parametrize("name", ["L5", "L6"])
def test_fp32_matches_autograd_of_reference(name, L, initial, device):
    x, do, ds = make_inputs(NODES[name], 1, 2, L, 20, 24, initial=initial)
    check(name, x, do, ds if initial else None, 1e-4, device=device)


def test_key_and_value_blocks_batch2(device):
    # Dk 80: two key blocks in the dq/dk kernel (the gate's gradient summed over them); Dv 40
    # in three 16-column blocks; two batch entries
    x, do, ds = make_inputs(NODES["L6"], 2, 1, 33, 80, 40, initial=True, seed=3)
    check("L6", x, do, ds, 1e-4, block_v=16, device=device)


@pytest.mark.parametrize("name,dtype", [("L5", torch.bfloat16), ("L6", torch.float16),
                                        ("L6", torch.bfloat16)],
                         ids=["L5-bf16", "L6-fp16", "L6-bf16"])
def test_half_precision(name, dtype, device):
    x, do, ds = make_inputs(NODES[name], 1, 2, 40, 32, 32, dtype=dtype, initial=True)
    check(name, x, do, ds, TOL[dtype], device=device)


@pytest.mark.parametrize("name", ["L5", "L6"])
def test_varlen_matches_reference(name, device):
    node = NODES[name]
    cu = torch.tensor([0, 5, 5, 38])  # an empty sequence; 33 tokens: three chunks
    x, do, _ = make_inputs(node, 1, 2, 38, 16, 24, seed=2)
    packed = {n: t[0].transpose(0, 1).contiguous() for n, t in x.items()}  # [T, H, ...]
    dop = do[0].transpose(0, 1).contiguous()
    gen = torch.Generator().manual_seed(9)
    s0 = torch.randn(3, 2, 16, 24, generator=gen)
    dsn = torch.randn(3, 2, 16, 24, generator=gen)
    on = {n: t.to(device) for n, t in packed.items()}
    got = kernel(name)(on["q"], on["k"], on["v"], dop.to(device), g=on.get("g"),
                       beta=on["beta"], initial_state=s0.to(device),
                       d_final_state=dsn.to(device), cu_seqlens=cu.to(device))
    want = reference_backward(packed["q"], packed["k"], packed["v"], node, dop,
                              g=packed.get("g"), beta=packed["beta"], initial_state=s0,
                              d_final_state=dsn, cu_seqlens=cu)
    for n in [*packed, "initial_state"]:
        assert_near(n, got[n].cpu(), want[n], 1e-4)


@pytest.mark.parametrize("token,value", [(0, float("-inf")), (16, float("-inf")),
                                         (31, float("-inf")), (7, -1e9)],
                         ids=["t0_-inf", "t16_-inf", "t31_-inf", "t7_-1e9"])
def test_extreme_gates(token, value, device):
    x, do, ds = make_inputs(NODES["L6"], 1, 2, 33, 16, 24, initial=True)
    x["g"][..., token] = value
    want = oracle(NODES["L6"], x, do, ds)
    assert all(torch.isfinite(t).all() for t in want.values() if t is not None)
    check("L6", x, do, ds, 1e-4, device=device)


def test_the_comparison_can_fail(device):
    """dbeta without the WY part of chunk 1 (its rows scaled by 1/2 there) is rejected, and so
    is a gate gradient without what flows into chunk 0 from chunk 1."""
    x, do, ds = make_inputs(NODES["L6"], 1, 2, 33, 16, 16, initial=True)
    got = run("L6", x, do, ds, device=device)
    want = oracle(NODES["L6"], x, do, ds)
    per_chunk = got["g"].clone()
    per_chunk[..., :16] -= per_chunk[..., 16:17]
    with pytest.raises(AssertionError, match="dg"):
        assert_near("g", per_chunk, want["g"], 1e-4)
    half = got["beta"].clone()
    half[..., 16:32] *= 0.5
    with pytest.raises(AssertionError, match="dbeta"):
        assert_near("beta", half, want["beta"], 1e-4)


def test_routing_and_bad_construction():
    for name in ("L5", "L6"):
        assert type(backward_kernel(NODES[name])) is TritonDeltaChunkedBackward, name
    for node in (LinearState("scalar_gate"), LinearState("block_causal", block=4)):
        with pytest.raises(NotImplementedError, match="no chunked delta-rule backward"):
            TritonDeltaChunkedBackward(node)
    with pytest.raises(ValueError, match="chunk"):
        TritonDeltaChunkedBackward(NODES["L5"], chunk=8)
    with pytest.raises(TypeError, match="node"):
        TritonDeltaChunkedBackward("delta")
    x, do, _ = make_inputs(NODES["L5"], 1, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="do: expected"):
        kernel("L5")(x["q"], x["k"], x["v"], do[..., :8], beta=x["beta"])
    # the token sweep stays available for L5 / L6 (tests/test_linear_backward.py)
    assert isinstance(TritonLinearBackward(NODES["L6"]), TritonLinearBackward)


def test_compiles_for_sm90_bf16_d128():
    back = TritonDeltaChunkedBackward(NODES["L6"])
    for part in PARTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            art = compile_delta_backward_for_target(back, part, 90, "bfloat16", 128, 128)
        assert art.arch == 90 and len(art.cubin) > 0 and ".target sm_90" in art.ptx
        print(f"{art.name} sm_90 bfloat16 128x128: {art.n_regs} regs, "
              f"{art.stack_bytes} stack bytes, {art.shared_bytes} shared bytes")
        assert art.shared_bytes <= 227 * 1024
        assert art.stack_bytes in (None, 0), f"{part}: {art.stack_bytes} bytes of spills"
        assert "wgmma" in art.ptx, f"{part}: no warpgroup tensor-core op"
