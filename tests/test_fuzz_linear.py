"""Property: the linear-recurrence kernels (chunked for prefill at a random chunk size, and the
path `attncc.compile` picks: recurrent for one token) match attncc's fp64 one-token-at-a-time
recurrence (`attncc.backends.reference.linear.recurrent_reference`) for random rules L1-L6,
feature maps, normalisation, lengths, head dims, initial states, strides and dtypes.

Tolerance (max error relative to the reference's max magnitude, as in
tests/test_triton_linear.py): fp32 1e-4, fp16 2e-2 (inputs rounded to fp16, state in fp32).
Gates are finite (g in [-3, 0]): -inf gates are a known defect being fixed elsewhere.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.ir.linear import LinearState
from tests.fuzz_support import fuzz_settings, log_example

TOL = {"float32": 1e-4, "float16": 2e-2}
_CHUNKED: dict[tuple[str, int | None], TritonChunkedLinear] = {}


class LinearCase(NamedTuple):
    rule: str  # linear | decay | scalar_gate | vector_gate | delta | gated_delta
    feature_map: str
    normalize: bool
    B: int
    H: int
    L: int
    Dk: int
    Dv: int
    chunk: int | None
    dtype: str
    initial: bool
    bshd_storage: bool
    seed: int


@st.composite
def linear_cases(draw) -> LinearCase:
    rule = draw(st.sampled_from(["linear", "decay", "scalar_gate", "vector_gate", "delta",
                                 "gated_delta"]))
    additive = rule == "linear"
    return LinearCase(
        rule=rule, feature_map=draw(st.sampled_from(["identity", "elu1"])) if additive
        else "identity", normalize=draw(st.booleans()) if additive else False,
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)),
        L=draw(st.one_of(st.just(1), st.integers(1, 40))), Dk=draw(st.sampled_from([16, 32])),
        Dv=draw(st.sampled_from([16, 32, 24])), chunk=draw(st.sampled_from([None, 16, 32])),
        dtype=draw(st.sampled_from(["float32", "float16"])), initial=draw(st.booleans()),
        bshd_storage=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _node(c: LinearCase) -> LinearState:
    if c.rule == "decay":
        return LinearState("decay", decay=tuple(0.95 - 0.3 * h for h in range(c.H)))
    return LinearState(c.rule, c.feature_map, c.normalize)


def _inputs(c: LinearCase, node: LinearState):
    g = torch.Generator().manual_seed(c.seed)
    q, k = (torch.randn(c.B, c.H, c.L, c.Dk, generator=g) for _ in range(2))
    v = torch.randn(c.B, c.H, c.L, c.Dv, generator=g)
    if c.rule in ("delta", "gated_delta"):
        k = F.normalize(k, dim=-1)  # the delta rule's users keep keys unit-norm
    extra = {}
    if c.rule in ("scalar_gate", "gated_delta"):
        extra["g"] = -3 * torch.rand(c.B, c.H, c.L, generator=g) * (torch.rand(1, generator=g)
                                                                     > 0.2)
    if c.rule == "vector_gate":
        extra["g"] = -3 * torch.rand(c.B, c.H, c.L, c.Dk, generator=g)
    if c.rule in ("delta", "gated_delta"):
        extra["beta"] = torch.rand(c.B, c.H, c.L, generator=g)
    state = None
    if c.initial:
        state = torch.randn(c.B, c.H, node.feature_dim(c.Dk), node.state_dv(c.Dv), generator=g)
        if node.normalize:
            state[..., -1] = state[..., -1].abs()  # z sums phi(k) > 0
    dt = getattr(torch, c.dtype)
    q, k, v = (x.to(dt) for x in (q, k, v))
    extra = {n: x.to(dt) for n, x in extra.items()}
    if c.bshd_storage:
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    return q, k, v, extra, state


def _near(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got = got.double()
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's output"
    err = (got - want).abs().max().item() if want.numel() else 0.0
    ref = want.abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(ref, 1.0), f"{name}: max error {err:.3g} vs reference max {ref:.3g}"


@fuzz_settings(12, 1500)
@given(linear_cases())
def test_fuzz_linear_kernels_match_recurrence(c: LinearCase):
    log_example("linear", c)
    node = _node(c)
    q, k, v, extra, state = _inputs(c, node)

    def d(x):
        return None if x is None else x.double()
    ro, rs = recurrent_reference(d(q), d(k), d(v), node, initial_state=d(state),
                                 output_final_state=True, **{n: d(x) for n, x in extra.items()})
    key = (node.text(), c.chunk)
    if key not in _CHUNKED:
        _CHUNKED[key] = TritonChunkedLinear(node, chunk=c.chunk)
    o, s = _CHUNKED[key](q, k, v, initial_state=state, return_state=True, **extra)
    tol = TOL[c.dtype]
    assert o.shape == ro.shape and o.dtype == q.dtype and s.shape == rs.shape
    _near("chunked o", o, ro, tol)
    _near("chunked state", s, rs, tol)
    spec = attncc.Attention(memory=attncc.recurrent_state(
        update="delta" if "delta" in c.rule else "additive",
        decay={"linear": "none", "delta": "none", "scalar_gate": "scalar",
               "gated_delta": "scalar", "vector_gate": "vector"}.get(c.rule, node.decay),
        feature_map=c.feature_map, normalize=c.normalize))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o2, s2 = attncc.compile(spec)(q, k, v, initial_state=state, return_state=True,
                                      backend="triton", **extra)
    _near("compiled o", o2, ro, tol)
    _near("compiled state", s2, rs, tol)
