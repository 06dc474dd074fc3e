"""A linear rule is data: `LinearState` carries its parts (gate, write, block) and
`attncc.ir.linear.RULE_TABLE` names the valid combinations. The named and the parts forms build
the same node (same text, same key); a new combination of existing parts is one table row, and
the backends' per-part tables then run it (checked here with a row the catalogue lacks: a vector
gate with the delta rule, against an fp64 loop written out below and autograd through it).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py): tiny shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.backends.reference.linear import recurrent_reference
from attncc.backends.reference.linear_chunked import chunked_reference
from attncc.backends.triton.linear.backward import TritonLinearBackward
from attncc.backends.triton.linear.chunked import TritonChunkedLinear
from attncc.backends.triton.linear.family import backward_kernel
from attncc.backends.triton.linear.recurrent import TritonRecurrentLinear
from attncc.ir import linear as ir
from attncc.ir.linear import LinearState, Rule
from attncc.backends.reference.linear_backward import reference_backward


def _parts_kwargs(row: Rule) -> dict:
    return dict(gate=row.gate, write=row.write, block=4 if row.blocked else None,
                decay=0.9 if row.gate == "constant" else None)


@pytest.mark.parametrize("row", ir.RULE_TABLE, ids=[r.name for r in ir.RULE_TABLE])
def test_named_and_parts_forms_build_the_same_node(row):
    kw = _parts_kwargs(row)
    by_parts = LinearState(**kw)
    by_name = LinearState(row.name, decay=kw["decay"], block=kw["block"])
    assert by_parts == by_name and by_parts.key == by_name.key
    assert by_parts.text() == by_name.text() and by_parts.text().startswith(
        f"linear(rule={row.name}, ")
    assert (by_parts.rule, by_parts.catalog_id) == (row.name, row.catalog_id)
    assert (by_parts.gate, by_parts.write) == (row.gate, row.write)


def test_every_rule_has_its_own_key():
    nodes = [LinearState(**_parts_kwargs(r)) for r in ir.RULE_TABLE]
    assert len({n.key for n in nodes}) == len(nodes)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gate="exp"), "gate"),
    (dict(write="overwrite"), "write"),
    (dict(gate="vector", write="delta"), "not a rule"),
    (dict(gate="scalar", block=4), "not a rule"),
    (dict(rule="delta", write="delta"), "rule"),
    (dict(gate="constant"), "decay"),
    (dict(block=0), "block"),
], ids=["gate", "write", "vector-delta", "gated-block", "name-and-parts", "constant-no-decay",
        "block-0"])
def test_parts_form_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearState(**kwargs)


def test_recurrent_state_builds_parts():
    node = attncc.recurrent_state(update="delta", decay="scalar")
    assert (node.gate, node.write, node.block) == ("scalar", "delta", None)
    assert attncc.recurrent_state(decay=(0.5, 1.0)).gate == "constant"


# --- a new combination of existing parts: one row in the IR's table, nothing else ---

VECTOR_DELTA = Rule("vector_delta", "L6v", "vector", "delta", False, False)


@pytest.fixture
def vector_delta(monkeypatch) -> LinearState:
    """The IR with one more row (what adding the rule to attncc/ir/linear.py would do)."""
    monkeypatch.setattr(ir, "RULE_TABLE", ir.RULE_TABLE + (VECTOR_DELTA,))
    monkeypatch.setitem(ir.RULES, VECTOR_DELTA.name, VECTOR_DELTA.catalog_id)
    monkeypatch.setitem(ir._BY_NAME, VECTOR_DELTA.name, VECTOR_DELTA)
    monkeypatch.setitem(ir._BY_PARTS, ("vector", "delta", False), VECTOR_DELTA)
    return LinearState(gate="vector", write="delta")


def _inputs(B=1, H=2, L=7, dk=16, dv=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, dk, generator=gen)
    k = F.normalize(torch.randn(B, H, L, dk, generator=gen), dim=-1)
    v = torch.randn(B, H, L, dv, generator=gen)
    g = -0.5 * torch.rand(B, H, L, dk, generator=gen)
    beta = torch.rand(B, H, L, generator=gen)
    s0 = torch.randn(B, H, dk, dv, generator=gen)
    return q, k, v, g, beta, s0


def _loop(q, k, v, g, beta, s0):
    """S_t = (I - beta_t k_t k_t^T) diag(e^{g_t}) S_{t-1} + beta_t k_t v_t^T; o_t = S_t^T q_t
    / sqrt(Dk), in fp64: the rule written out once, independently of any table."""
    S = s0.double().clone()
    o = torch.zeros(v.shape, dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1])
    for t in range(q.shape[2]):
        qt, kt, vt = (x[:, :, t].double() for x in (q, k, v))
        S = torch.exp(g[:, :, t].double())[..., None] * S
        bt = beta[:, :, t].double()[..., None, None]
        eye = torch.eye(S.shape[-2], dtype=torch.float64)
        S = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ S + bt * kt[..., :, None] * \
            vt[..., None, :]
        o[:, :, t] = scale * torch.einsum("bhf,bhfv->bhv", qt, S)
    return o, S


def test_a_new_row_runs_in_the_reference(vector_delta):
    q, k, v, g, beta, s0 = _inputs()
    assert vector_delta.rule == "vector_delta"
    assert vector_delta.extra_inputs() == (("g", "[B, H, L, Dk]"), ("beta", "[B, H, L]"))
    o, s = recurrent_reference(q.double(), k.double(), v.double(), vector_delta, g=g.double(),
                               beta=beta.double(), initial_state=s0.double(),
                               output_final_state=True)
    want_o, want_s = _loop(q, k, v, g, beta, s0)
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(s, want_s)
    with pytest.raises(NotImplementedError, match="one gate per token"):
        chunked_reference(q, k, v, vector_delta, chunk=4, g=g, beta=beta)


def test_a_new_row_runs_in_the_kernels(vector_delta):
    q, k, v, g, beta, s0 = _inputs()
    with pytest.raises(NotImplementedError, match="no chunked template"):
        TritonChunkedLinear(vector_delta)
    o, s = TritonRecurrentLinear(vector_delta)(q, k, v, g=g, beta=beta, initial_state=s0,
                                               return_state=True)
    want_o, want_s = _loop(q, k, v, g, beta, s0)
    torch.testing.assert_close(o.double(), want_o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), want_s, atol=1e-4, rtol=1e-4)
    # through the public API: no chunked kernel, so prefill runs the recurrent one
    attn = attncc.compile(attncc.Attention(memory=attncc.recurrent_state(update="delta",
                                                                         decay="vector")))
    assert attn.chunked is None and attn.recurrent is not None
    o2 = attn(q, k, v, g=g, beta=beta, initial_state=s0)
    torch.testing.assert_close(o2.double(), want_o, atol=1e-4, rtol=1e-4)


def test_a_new_row_has_a_backward_kernel(vector_delta):
    q, k, v, g, beta, s0 = _inputs(L=5)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(v.shape, generator=gen)
    ds = torch.randn(s0.shape, generator=gen)
    assert type(backward_kernel(vector_delta)) is TritonLinearBackward  # no chunked form
    got = TritonLinearBackward(vector_delta, chunk=4)(q, k, v, do, g=g, beta=beta,
                                                      initial_state=s0, d_final_state=ds)
    want = reference_backward(q, k, v, vector_delta, do, g=g, beta=beta, initial_state=s0,
                              d_final_state=ds)
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        tol = 1e-4 * max(1.0, want[name].abs().max().item())
        torch.testing.assert_close(got[name].double(), want[name].double(), atol=tol, rtol=1e-4)
