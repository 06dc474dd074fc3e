"""attncc's reference recurrences (the spec) against flash-linear-attention's naive ones.

Optional: runs when `fla-core` (and its `einops`) is installed (`pip install --no-deps fla-core
einops`; the naive functions are plain PyTorch and run on the CPU), else every test is skipped
with that reason. fla computes in fp32, attncc's reference here in fp64, on the same fp32
inputs: tolerance 1e-4 of max(|fla|, 1).

Conventions mapped here: fla takes [B, T, H, D] (most) or [B, H, T, D] (delta_rule_recurrence,
retention, based); its default scale is Dk^-1/2 like attncc's; g is a log gate as in attncc;
based's 1 + s + s^2/2 has s = scale q.k, so attncc's taylor2 gets q * scale and scale = 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attncc.backends.reference.linear import recurrent_reference
from attncc.ir.linear import LinearState

pytest.importorskip("einops", reason="fla's naive modules import einops")
pytest.importorskip("fla", reason="flash-linear-attention (fla-core) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fla: "roll back to CPU"

B, H, L, DK, DV = 2, 3, 37, 16, 24


def inputs(seed: int = 0, dk: int = DK):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, L, H, dk, generator=gen) for _ in range(2))
    v = torch.randn(B, L, H, DV, generator=gen)
    s0 = torch.randn(B, H, dk, DV, generator=gen)
    return q, k, v, s0, gen


def bhld(x: torch.Tensor) -> torch.Tensor:
    """fla's [B, T, H, ...] -> attncc's [B, H, T, ...], in fp64."""
    return x.transpose(1, 2).double()


def assert_near(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = (ours.double() - theirs.double()).abs().max().item()
    ref = theirs.abs().max().item()
    assert err <= 1e-4 * max(ref, 1.0), f"max error {err:.3g} vs fla max {ref:.3g}"


def ours(node, q, k, v, s0=None, **extra):
    return recurrent_reference(bhld(q), bhld(k), bhld(v), node, output_final_state=True,
                               initial_state=None if s0 is None else s0.double(),
                               **{n: bhld(x) for n, x in extra.items()}, )


def test_L1_linear_attention():
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    q, k, v, s0, _ = inputs()
    o_f, s_f = naive_recurrent_linear_attn(q, k, v, initial_state=s0, output_final_state=True)
    o, s = ours(LinearState("linear"), q, k, v, s0)
    assert_near(o.transpose(1, 2), o_f)
    assert_near(s, s_f)


def test_L1_elu1_normalised():
    # fla's normaliser: o / (scale q . cumsum(k) + 1e-10); phi applied by hand on fla's side
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    q, k, v, _, _ = inputs(1)
    o_f, (s_f, z_f) = naive_recurrent_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v,
                                                  output_final_state=True, normalize=True)
    o, s = ours(LinearState("linear", feature_map="elu1", normalize=True), q, k, v)
    assert_near(o.transpose(1, 2), o_f)
    assert_near(s[..., :DV], s_f)
    assert_near(s[..., DV], z_f[:, 0])


@pytest.mark.parametrize("use_norm", [False, True], ids=["plain", "norm"])
def test_L1_taylor2_is_based(use_norm):
    from fla.ops.based.naive import naive_parallel_based
    q, k, v, _, _ = inputs(2, dk=8)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # based takes [B, H, T, D]
    o_f = naive_parallel_based(q, k, v, use_norm=use_norm)
    node = LinearState("linear", feature_map="taylor2", normalize=use_norm)
    o, _ = recurrent_reference(q.double() * 8 ** -0.5, k.double(), v.double(), node, scale=1.0)
    assert_near(o, o_f)


def test_L2_constant_decay_is_retention():
    from fla.ops.retention.naive import naive_retention
    q, k, v, _, _ = inputs(3)
    o_f = naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    node = LinearState("decay", decay=tuple(1 - 2.0 ** (-5 - h) for h in range(H)))
    o, _ = ours(node, q, k, v)
    assert_near(o, o_f)


def test_L3_scalar_gate_is_simple_gla():
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    q, k, v, s0, gen = inputs(4)
    g = F.logsigmoid(torch.randn(B, L, H, generator=gen))
    o_f, s_f = naive_recurrent_simple_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = ours(LinearState("scalar_gate"), q, k, v, s0, g=g)
    assert_near(o.transpose(1, 2), o_f)
    assert_near(s, s_f)


def test_L4_vector_gate_is_gla():
    from fla.ops.gla.naive import naive_recurrent_gla
    q, k, v, s0, gen = inputs(5)
    g = F.logsigmoid(torch.randn(B, L, H, DK, generator=gen))
    o_f, s_f = naive_recurrent_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = ours(LinearState("vector_gate"), q, k, v, s0, g=g)
    assert_near(o.transpose(1, 2), o_f)
    assert_near(s, s_f)


def test_L5_delta_rule():
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    q, k, v, s0, gen = inputs(6)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(B, L, H, generator=gen)
    o_f, s_f = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)),
                                     initial_state=s0.clone())
    o, s = ours(LinearState("delta"), q, k, v, s0, beta=beta)
    assert_near(o, o_f)
    assert_near(s, s_f)


def test_L6_gated_delta_rule():
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    q, k, v, s0, gen = inputs(7)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(B, L, H, generator=gen)
    g = F.logsigmoid(torch.randn(B, L, H, generator=gen) + 2)
    o_f, s_f = naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=s0,
                                                output_final_state=True)
    o, s = ours(LinearState("gated_delta"), q, k, v, s0, g=g, beta=beta)
    assert_near(o.transpose(1, 2), o_f)
    assert_near(s, s_f)
