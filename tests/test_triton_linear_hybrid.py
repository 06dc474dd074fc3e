"""L8 (hybrid) and L7 decode on the kernels: each part of a hybrid runs its generated kernel
(the softmax forward for the window part, the chunked linear-state kernel for the linear part),
mixed by `mix_hybrid`, against the fp64 `hybrid_reference`; and L7's block-at-a-time decode
continues a chunked prefill exactly. Tolerance: fp32 1e-4 of max(reference max magnitude, 1)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.linear import mix_hybrid, recurrent_reference
from attncc.backends.reference.memory import hybrid_reference
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.ir.linear import Hybrid, LinearState


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    err = (actual.double().cpu() - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max error {err:.3g} vs reference max {ref:.3g}"


HYBRIDS = {
    "sw8+elu1_norm": (attncc.causal() & attncc.sliding_window(8),
                      LinearState("linear", feature_map="elu1", normalize=True), 0.5),
    "sinks2_w8+gated_delta": (attncc.sinks_window(2, 8), LinearState("gated_delta"), 0.3),
}


@pytest.mark.parametrize("L", [1, 65])
@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_L8_from_the_kernels(name, L, device):
    mask, lin, alpha = HYBRIDS[name]
    soft = attncc.Attention(mask=mask)
    node = Hybrid(soft, lin, alpha)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, L, 16, generator=gen) for _ in range(2))
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(1, 2, L, 16, generator=gen)
    extra = {}
    if lin.rule == "gated_delta":
        extra = {"g": -0.5 * torch.rand(1, 2, L, generator=gen),
                 "beta": torch.rand(1, 2, L, generator=gen)}
    s0 = torch.randn(1, 2, 16, lin.state_dv(16), generator=gen).abs()
    q, k, v, s0 = (x.to(device) for x in (q, k, v, s0))  # drawn on the CPU, then moved
    extra = {n: x.to(device) for n, x in extra.items()}
    o_soft = attncc.compile(soft)(q, k, v)
    o_lin, s = TritonChunkedLinear(lin, chunk=16)(q, k, v, initial_state=s0, return_state=True,
                                                  **extra)
    o = mix_hybrid(node, o_soft, o_lin)
    ro, rs = hybrid_reference(node, None, q.double().cpu(), k.double().cpu(), v.double().cpu(),
                              initial_state=s0.double().cpu(), output_final_state=True,
                              **{n: x.double().cpu() for n, x in extra.items()})
    assert_near(o, ro)
    assert_near(s, rs)


@pytest.mark.parametrize("block", [4, 40])
def test_block_causal_prefill_then_block_decode_equals_one_run(block, device):
    # L7 decodes a block at a time: a prefill ending on a block boundary, then one more block
    node = LinearState("block_causal", feature_map="elu1", normalize=True, block=block)
    gen = torch.Generator().manual_seed(1)
    L = 3 * block
    q, k, v = (torch.randn(1, 2, L, 16, generator=gen).to(device) for _ in range(3))
    kern = TritonChunkedLinear(node, chunk=16)
    cut = 2 * block
    o_pre, s_pre = kern(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], return_state=True)
    o_dec, s_dec = kern(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=s_pre,
                        return_state=True)
    ro, rs = recurrent_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), node,
                                 output_final_state=True)
    assert_near(torch.cat([o_pre, o_dec], dim=2), ro)
    assert_near(s_dec, rs)
