"""The chunked (matrix-form) backward of the additive linear rules L1-L4
(`attncc.backends.triton.linear.backward_chunked`) against torch.autograd through the fp64 spec
loop (`attncc.backends.reference.linear_backward.reference_backward`), and its routing.

Under the interpreter: chunk 16, tiny shapes, odd lengths (1, 17, 40: a partial last chunk),
head dims that are not powers of two (Dk 20 padded to 32, Dv 24 / 40 split into value blocks;
Dk 80 in two key blocks). Tolerances as tests/test_linear_backward.py (max error relative to
max(1, the reference gradient's max magnitude)): fp32 1e-4; fp16 / bf16 2e-2 / 4e-2 (inputs
and do rounded to 16 bits, which the oracle sees too; under the interpreter the dots run in
fp32, on a GPU in the input type with fp32 accumulation). Extreme gates (-inf, -1e9) as
tests/test_linear_extreme_gates.py: finite and close wherever the recurrence's gradient is.
The sm_90 / sm_80 compiles check the three kernels build and, on sm_90 bf16 d128, that they use
warpgroup tensor-core ops (HGMMA) and spill nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_backward import reference_backward
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.backends.triton.linear.backward import TritonLinearBackward
from attncc.backends.triton.linear.backward_chunked import (TritonChunkedLinearBackward,
                                                            compile_chunked_backward_for_target)
from attncc.backends.triton.linear.backward_delta import TritonDeltaChunkedBackward
from attncc.backends.triton.linear.family import backward_kernel
from attncc.ir.linear import LinearState
from tests.test_linear_backward import NODES, TOL, assert_near, make_inputs, oracle

ADDITIVE = ["L1", "L1_elu1", "L1_elu1_norm", "L2", "L3", "L4"]
_KERNELS: dict[tuple[str, int | None], TritonChunkedLinearBackward] = {}


def kernel(name: str, block_v: int | None = None) -> TritonChunkedLinearBackward:
    if (name, block_v) not in _KERNELS:
        _KERNELS[name, block_v] = TritonChunkedLinearBackward(NODES[name], chunk=16,
                                                              block_v=block_v)
    return _KERNELS[name, block_v]


def check(name: str, x: dict, do: torch.Tensor, ds: torch.Tensor | None, tol: float, *,
          block_v: int | None = None, device: str = "cpu") -> None:
    node = NODES[name]
    o = None
    if node.normalize:  # the normaliser's backward reads the forward's output
        o, _ = recurrent_reference(x["q"], x["k"], x["v"], node,
                                   initial_state=x.get("initial_state"))
    on = {n: t.to(device) for n, t in x.items()}
    got = kernel(name, block_v)(
        on["q"], on["k"], on["v"], do.to(device), g=on.get("g"),
        initial_state=on.get("initial_state"), d_final_state=None if ds is None else ds.to(device),
        o=None if o is None else o.to(device))
    want = oracle(node, x, do, ds)
    for n, t in x.items():
        assert got[n].dtype == t.dtype, f"d{n}: dtype {got[n].dtype}, input {t.dtype}"
        assert torch.isfinite(got[n]).all() == torch.isfinite(want[n]).all()
        assert_near(n, got[n].cpu(), want[n], tol)
    assert got["beta"] is None


@pytest.mark.parametrize("L,initial", [(1, False), (17, True), (40, True)],
                         ids=["L1-zero_state", "L17-state_in", "L40-state_in"])
@pytest.mark.parametrize("name", ADDITIVE)
def test_fp32_matches_autograd_of_reference(name, L, initial, device):
    x, do, ds = make_inputs(NODES[name], 1, 2, L, 20, 24, initial=initial)
    check(name, x, do, ds if initial else None, 1e-4, device=device)


@pytest.mark.parametrize("name", ["L3", "L4"])
def test_key_and_value_blocks_batch2(name, device):
    # Dk 80: two key blocks (a scalar gate's gradient is summed over them); Dv 40 in three
    # 16-column blocks; two batch entries
    x, do, ds = make_inputs(NODES[name], 2, 1, 33, 80, 40, initial=True, seed=3)
    check(name, x, do, ds, 1e-4, block_v=16, device=device)


@pytest.mark.parametrize("name,dtype", [("L1", torch.bfloat16), ("L3", torch.float16),
                                        ("L4", torch.bfloat16)],
                         ids=["L1-bf16", "L3-fp16", "L4-bf16"])
def test_half_precision(name, dtype, device):
    x, do, ds = make_inputs(NODES[name], 1, 2, 40, 32, 32, dtype=dtype, initial=True)
    check(name, x, do, ds, TOL[dtype], device=device)


@pytest.mark.parametrize("name", ["L3", "L4", "L1_elu1_norm"])
def test_varlen_matches_reference(name, device):
    node = NODES[name]
    cu = torch.tensor([0, 5, 5, 38])  # an empty sequence; 33 tokens: three chunks
    x, do, _ = make_inputs(node, 1, 2, 38, 16, 24, seed=2)
    packed = {n: t[0].transpose(0, 1).contiguous() for n, t in x.items()}  # [T, H, ...]
    dop = do[0].transpose(0, 1).contiguous()
    gen = torch.Generator().manual_seed(9)
    s0 = torch.rand(3, 2, 16, node.state_dv(24), generator=gen)  # z >= 0 when normalising
    dsn = torch.randn(3, 2, 16, node.state_dv(24), generator=gen)
    o = None
    if node.normalize:
        o, _ = varlen_reference(packed["q"], packed["k"], packed["v"], node, cu_seqlens=cu,
                                initial_state=s0)
    on = {n: t.to(device) for n, t in packed.items()}
    got = kernel(name)(on["q"], on["k"], on["v"], dop.to(device), g=on.get("g"),
                       initial_state=s0.to(device), d_final_state=dsn.to(device),
                       cu_seqlens=cu.to(device), o=None if o is None else o.to(device))
    want = reference_backward(packed["q"], packed["k"], packed["v"], node, dop,
                              g=packed.get("g"), initial_state=s0, d_final_state=dsn,
                              cu_seqlens=cu)
    for n in [*packed, "initial_state"]:
        assert_near(n, got[n].cpu(), want[n], 1e-4)


@pytest.mark.parametrize("token,value", [(0, float("-inf")), (16, float("-inf")),
                                         (31, float("-inf")), (7, -1e9)],
                         ids=["t0_-inf", "t16_-inf", "t31_-inf", "t7_-1e9"])
@pytest.mark.parametrize("name", ["L3", "L4"])
def test_extreme_gates(name, token, value, device):
    x, do, ds = make_inputs(NODES[name], 1, 2, 33, 16, 24, initial=True)
    if NODES[name].rule == "vector_gate":
        x["g"][..., token, ::2] = value  # every other channel forgets; the rest keep theirs
    else:
        x["g"][..., token] = value
    want = oracle(NODES[name], x, do, ds)
    assert all(torch.isfinite(t).all() for t in want.values() if t is not None)
    check(name, x, do, ds, 1e-4, device=device)


def test_the_comparison_can_fail(device):
    """A gate gradient without the part after the chunk (rowsum(h dh)) is rejected."""
    x, do, ds = make_inputs(NODES["L3"], 1, 2, 33, 16, 16, initial=True)
    on = {n: t.to(device) for n, t in x.items()}
    got = kernel("L3")(on["q"], on["k"], on["v"], do.to(device), g=on["g"],
                       initial_state=on["initial_state"], d_final_state=ds.to(device))
    want = oracle(NODES["L3"], x, do, ds)
    per_chunk = got["g"].cpu().clone()
    per_chunk[..., :16] -= per_chunk[..., 16:17]  # chunk 0 loses what flows in from chunk 1
    with pytest.raises(AssertionError, match="dg"):
        assert_near("g", per_chunk, want["g"], 1e-4)


def test_routing_by_rule():
    """L1-L4 (phi identity, elu1) take the chunked backward, L5 / L6 the chunked WY backward
    (tests/test_linear_delta_backward.py), none the token sweep."""
    for name in ADDITIVE:
        assert isinstance(backward_kernel(NODES[name]), TritonChunkedLinearBackward), name
    for name in ("L5", "L6"):
        assert type(backward_kernel(NODES[name])) is TritonDeltaChunkedBackward, name
        assert not isinstance(backward_kernel(NODES[name]), TritonLinearBackward), name


def test_bad_construction_and_inputs_raise():
    for node in (LinearState("delta"), LinearState("gated_delta"),
                 LinearState("linear", feature_map="taylor2"), LinearState("block_causal",
                                                                           block=4)):
        with pytest.raises(NotImplementedError, match="no chunked backward"):
            TritonChunkedLinearBackward(node)
    with pytest.raises(ValueError, match="chunk"):
        TritonChunkedLinearBackward(NODES["L3"], chunk=8)
    with pytest.raises(TypeError, match="node"):
        TritonChunkedLinearBackward("scalar_gate")
    x, do, _ = make_inputs(NODES["L1"], 1, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="do: expected"):
        kernel("L1")(x["q"], x["k"], x["v"], do[..., :8])
    big = torch.zeros(1, 1, 3, 264)
    with pytest.raises(ValueError, match="Dk <= 256"):
        kernel("L1")(big, big, x["v"], do)


CASES = [("L3", 90, "bfloat16", 128, 128, False), ("L4", 80, "float16", 64, 64, True),
         ("L1_elu1_norm", 90, "float32", 64, 64, False)]


@pytest.mark.parametrize("name,arch,dtype,dk,dv,varlen", CASES, ids=[
    f"{n}-sm{a}-{d}-{k}x{v}{'-varlen' if vl else ''}" for n, a, d, k, v, vl in CASES])
def test_compiles_for_gpu(name, arch, dtype, dk, dv, varlen):
    back = TritonChunkedLinearBackward(NODES[name])
    for part in ("states", "dqk", "dv"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            art = compile_chunked_backward_for_target(back, part, arch, dtype, dk, dv,
                                                      varlen=varlen)
        assert art.arch == arch and len(art.cubin) > 0 and f".target sm_{arch}" in art.ptx
        print(f"{art.name} sm_{arch} {dtype} {dk}x{dv}: {art.n_regs} regs, "
              f"{art.stack_bytes} stack bytes, {art.shared_bytes} shared bytes")
        assert art.shared_bytes <= 163 * 1024  # launchable on sm_80 and sm_90
        if arch == 90 and dtype == "bfloat16":
            assert art.stack_bytes in (None, 0), f"{part}: {art.stack_bytes} bytes of spills"
            assert "wgmma" in art.ptx, f"{part}: no warpgroup tensor-core op"


def test_autograd_through_compiled_attention_expanded_grad(device):
    """o.sum().backward() through the user API (L4: the chunked backward) hands the kernels a
    do with zero strides; q, k, v bshd-strided."""
    spec = attncc.Attention(memory=attncc.recurrent_state(update="additive", decay="vector"))
    attn = attncc.compile(spec)
    x, do, _ = make_inputs(spec.memory, 1, 2, 17, 16, 16, seed=5)
    leaves = {n: t.to(device).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
              for n, t in x.items() if n in ("q", "k", "v")}
    attn(leaves["q"], leaves["k"], leaves["v"], g=x["g"].to(device)).sum().backward()
    want = oracle(spec.memory, x, torch.ones_like(do), None)
    for n, t in leaves.items():
        assert_near(n, t.grad.cpu(), want[n], 1e-4)
