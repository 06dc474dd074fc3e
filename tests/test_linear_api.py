"""Linear-recurrence attention through the user API: `recurrent_state` names the catalogue
rules, `attncc.compile` returns a kernel-backed callable, and it agrees with the fp64 one-token
recurrence (tolerance: fp32 1e-4 of the reference's largest value)."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.backends.reference.linear import recurrent_reference

_g = torch.Generator().manual_seed(0)

STATES = {
    "L1": (dict(), "linear"),
    "L1-elu1-norm": (dict(feature_map="elu1", normalize=True), "linear"),
    "L2": (dict(decay=0.9), "decay"),
    "L3": (dict(decay="scalar"), "scalar_gate"),
    "L4": (dict(decay="vector"), "vector_gate"),
    "L5": (dict(update="delta"), "delta"),
    "L6": (dict(update="delta", decay="scalar"), "gated_delta"),
    "L7": (dict(block=4), "block_causal"),
}


def _inputs(node, B=1, H=2, L=37, Dk=16, Dv=24, device="cpu"):
    q, k = (torch.randn(B, H, L, Dk, generator=_g) for _ in range(2))
    k = torch.nn.functional.normalize(k, dim=-1)  # delta rules want unit keys
    v = torch.randn(B, H, L, Dv, generator=_g)
    extra = {}
    if node.rule in ("scalar_gate", "gated_delta"):
        extra["g"] = -torch.rand(B, H, L, generator=_g)
    if node.rule == "vector_gate":
        extra["g"] = -torch.rand(B, H, L, Dk, generator=_g)
    if node.rule in ("delta", "gated_delta"):
        extra["beta"] = torch.rand(B, H, L, generator=_g)
    return q, k, v, extra


@pytest.mark.parametrize("name", STATES)
def test_recurrent_state_names_the_catalogue_rule(name):
    kwargs, rule = STATES[name]
    assert attncc.recurrent_state(**kwargs).rule == rule


@pytest.mark.parametrize("name", list(STATES))
def test_compiled_linear_attention_matches_the_recurrence(name, device):
    node = attncc.recurrent_state(**STATES[name][0])
    attn = attncc.compile(attncc.Attention(memory=node))
    assert isinstance(attn, attncc.CompiledLinearAttention)
    q, k, v, extra = _inputs(node)
    s0 = torch.randn(1, 2, node.feature_dim(16), node.state_dv(24), generator=_g)
    o, state = attn(q.to(device), k.to(device), v.to(device), initial_state=s0.to(device),
                    return_state=True, backend="triton",
                    **{n: t.to(device) for n, t in extra.items()})
    ro, rs = recurrent_reference(q.double(), k.double(), v.double(), node,
                                 initial_state=s0.double(), output_final_state=True,
                                 **{n: t.double() for n, t in extra.items()})
    tol = 1e-4 * max(1.0, float(ro.abs().max()))
    torch.testing.assert_close(o.double().cpu(), ro, atol=tol, rtol=1e-4)
    state_tol = 1e-4 * max(1.0, float(rs.abs().max()))
    torch.testing.assert_close(state.double().cpu(), rs, atol=state_tol, rtol=1e-4)


@pytest.mark.parametrize("name", ["L3", "L6", "L7"])
def test_prefill_picks_chunked_and_decode_recurrent(name, device):
    node = attncc.recurrent_state(**STATES[name][0])
    attn = attncc.compile(attncc.Attention(memory=node))
    assert attn.chunked is not None
    assert (attn.recurrent is None) == (name == "L7")  # L7 has no one-token form
    q, k, v, extra = _inputs(node, L=12)
    dev = {n: t.to(device) for n, t in extra.items()}
    o, s = attn(q.to(device), k.to(device), v.to(device), return_state=True, **dev)
    ro, rs = recurrent_reference(q, k, v, node, output_final_state=True, **extra)
    torch.testing.assert_close(o.cpu(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.cpu(), rs, atol=1e-4, rtol=1e-4)


def test_cpu_without_interpreter_warns_and_runs_the_reference(monkeypatch):
    from attncc import config
    attn = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(block=4)))
    q, k, v, _ = _inputs(attn.node, L=8)
    monkeypatch.setattr(config, "triton_interpret", lambda: False)
    with pytest.warns(UserWarning, match="running the PyTorch reference.*TRITON_INTERPRET"):
        o = attn(q, k, v)
    ro, _ = recurrent_reference(q, k, v, attn.node)
    torch.testing.assert_close(o, ro)


def test_constructor_and_spec_errors():
    with pytest.raises(ValueError, match="update: expected one of"):
        attncc.recurrent_state(update="gated")
    with pytest.raises(ValueError, match="no catalogue rule"):
        attncc.recurrent_state(update="delta", decay="vector")
    with pytest.raises(ValueError, match="takes no mask or score mod yet"):
        attncc.Attention(mask=attncc.causal(), memory=attncc.recurrent_state())
    attn = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(decay="scalar")))
    q, k, v, _ = _inputs(attn.node)
    with pytest.raises(ValueError, match="g: "):
        attn(q, k, v, backend="triton")  # a gated rule without its gate: before any launch
