"""Packed varlen inputs (`cu_seqlens`) for the chunked and recurrent linear-state kernels, against
the fp64 one-token recurrence run on each sequence (`reference_linear_varlen.varlen_reference`).

Layout (as K3 RaggedMemory): q, k [T, H, Dk], v [T, H, Dv], states [N, H, F, Dv'].
Tolerance: fp32 1e-4 of max(reference max magnitude, 1). The interpreter is slow: tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_varlen import varlen_reference
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.ir.linear import LinearState

NODES = {
    "linear_elu1_norm": LinearState("linear", feature_map="elu1", normalize=True),
    "decay": LinearState("decay", decay=(0.9, 0.6)),
    "scalar_gate": LinearState("scalar_gate"),
    "vector_gate": LinearState("vector_gate"),
    "gated_delta": LinearState("gated_delta"),
}
SEQLENS = [17, 1, 0, 40]  # a one-token and an empty sequence between two chunked ones


def packed_inputs(node: LinearState, seqlens: list[int], *, device: str, H: int = 2,
                  dk: int = 16, dv: int = 24, seed: int = 0):
    """Packed inputs and cu_seqlens on `device`: drawn on the CPU generator then moved, so values
    do not depend on the device."""
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(seqlens), len(seqlens)
    q, k = (torch.randn(T, H, dk, generator=gen) for _ in range(2))
    if node.rule in ("delta", "gated_delta"):
        k = F.normalize(k, dim=-1)
    v = torch.randn(T, H, dv, generator=gen)
    extra = {}
    if node.rule in ("scalar_gate", "gated_delta"):
        extra["g"] = -0.5 * torch.rand(T, H, generator=gen)
    if node.rule == "vector_gate":
        extra["g"] = -0.5 * torch.rand(T, H, dk, generator=gen)
    if node.rule in ("delta", "gated_delta"):
        extra["beta"] = torch.rand(T, H, generator=gen)
    state = torch.randn(N, H, dk, node.state_dv(dv), generator=gen)
    if node.normalize:
        state[..., -1] = state[..., -1].abs()
    cu = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q, k, v, state, cu = (x.to(device) for x in (q, k, v, state, cu))
    return q, k, v, {n: x.to(device) for n, x in extra.items()}, state, cu


def d(x: torch.Tensor) -> torch.Tensor:
    return x.double().cpu()  # the fp64 reference runs on the CPU


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    err = (actual.double().cpu() - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max error {err:.3g} vs reference max {ref:.3g}"


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", list(NODES))
def test_varlen_matches_per_sequence_recurrence(name, form, device):
    node = NODES[name]
    q, k, v, extra, state, cu = packed_inputs(node, SEQLENS, device=device)
    kern = TritonChunkedLinear(node, chunk=16) if form == "chunked" else TritonRecurrentLinear(node)
    o, s = kern(q, k, v, initial_state=state, return_state=True, cu_seqlens=cu, **extra)
    ro, rs = varlen_reference(d(q), d(k), d(v), node, cu_seqlens=cu.cpu(),
                              initial_state=d(state), output_final_state=True,
                              **{n: d(x) for n, x in extra.items()})
    assert_near(o, ro)
    assert_near(s, rs)
    assert torch.equal(s[2], state[2].float())  # the empty sequence keeps its state


def test_varlen_reference_is_the_dense_one_per_sequence():
    # the oracle itself: sequence 3 alone through recurrent_reference, laid out [B, H, L, D]
    node = NODES["gated_delta"]
    q, k, v, extra, state, cu = packed_inputs(node, SEQLENS, device="cpu")
    ro, rs = varlen_reference(q, k, v, node, cu_seqlens=cu, initial_state=state,
                              output_final_state=True, **extra)
    sl = slice(int(cu[3]), int(cu[4]))
    d = {n: x[sl].transpose(0, 1)[None] for n, x in extra.items()}
    o3, s3 = recurrent_reference(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                 v[sl].transpose(0, 1)[None], node, initial_state=state[3:4],
                                 output_final_state=True, **d)
    torch.testing.assert_close(ro[sl], o3[0].transpose(0, 1))
    torch.testing.assert_close(rs[3:4], s3)


def test_varlen_through_the_api_prefill_then_decode(device):
    # a packed prefill, then one decode token per sequence from the returned states
    node = attncc.recurrent_state(update="delta", decay="scalar")
    attn = attncc.compile(attncc.Attention(memory=node))
    lens = [9, 20]
    q, k, v, extra, state, cu = packed_inputs(node, [n + 1 for n in lens], device=device, seed=2)
    last = (cu.cpu()[1:] - 1).long()  # CPU indices pick from the CPU reference below
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[last] = False
    keep_d, last_d = keep.to(device), last.to(device)
    cu_pre = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    o_pre, s_pre = attn(q[keep_d], k[keep_d], v[keep_d], initial_state=state, return_state=True,
                        cu_seqlens=cu_pre, **{n: x[keep_d] for n, x in extra.items()})
    cu_dec = torch.arange(len(lens) + 1, dtype=torch.int32).to(device)
    o_dec, s_dec = attn(q[last_d], k[last_d], v[last_d], initial_state=s_pre, return_state=True,
                        cu_seqlens=cu_dec, **{n: x[last_d] for n, x in extra.items()})
    ro, rs = varlen_reference(d(q), d(k), d(v), node, cu_seqlens=cu.cpu(),
                              initial_state=d(state), output_final_state=True,
                              **{n: d(x) for n, x in extra.items()})
    assert_near(o_pre, ro[keep])
    assert_near(o_dec, ro[last])
    assert_near(s_dec, rs)


def test_varlen_errors_before_launch():
    node = NODES["scalar_gate"]
    q, k, v, extra, state, cu = packed_inputs(node, [5, 6], device="cpu")
    kern = TritonChunkedLinear(node, chunk=16)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected 0 = cu\[0\].*T = 11"):
        kern(q, k, v, cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32), **extra)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected an int32 or int64 tensor"):
        kern(q, k, v, cu_seqlens=cu.float(), **extra)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[N, H, F, Dv'\]"):
        kern(q, k, v, cu_seqlens=cu, initial_state=state[:1], **extra)
    with pytest.raises(ValueError, match=r"q: expected a packed tensor \[T, H, D\]"):
        kern(q[None], k[None], v[None], cu_seqlens=cu, **extra)
    # shapes are reported in the caller's packed layout, not the kernel's [1, H, T, D] view
    with pytest.raises(ValueError, match=r"g: expected shape \[T, H\] = \[11, 2\], got \[10, 2\]"):
        kern(q, k, v, cu_seqlens=cu, g=extra["g"][:-1])
    with pytest.raises(ValueError, match=r"k: expected shape \[T, H, Dk\] = \[11, 2, "):
        kern(q, k[:-1], v, cu_seqlens=cu, **extra)
    delta = TritonChunkedLinear(NODES["gated_delta"], chunk=16)
    q, k, v, extra, state, cu = packed_inputs(NODES["gated_delta"], [5, 6], device="cpu")
    with pytest.raises(ValueError, match=r"beta: expected shape \[T, H\] = \[11, 2\]"):
        delta(q, k, v, cu_seqlens=cu, g=extra["g"], beta=extra["beta"][:, :1])
