"""The canonicalize pass gives every spelling of one mask one canonical text and one key:
relations face one way (`a >= b` reads `b <= a`, `a > b` reads `b < a`, `==`/`!=` sides in
sympy's sort order), and the rewrite keeps the allowed pairs (brute-forced on a small grid)."""

from __future__ import annotations

import itertools

import pytest
import sympy

import attncc
from attncc.ir.symbols import H_IDX, KV_IDX, Q_IDX
from attncc.passes.canonicalize import Canonicalize, rewrite
from attncc.passes.pipeline import run_spec_passes


def traced(fn):
    return attncc.compile(fn).spec


def kv_le_q(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def q_ge_kv(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def late_heads_a(b, h, q_idx, kv_idx):  # relations without kv_idx: solve-for-kv leaves them
    return (q_idx >= h) & (q_idx > 2 * kv_idx) & ((h + 1) == (q_idx % 4))


def late_heads_b(b, h, q_idx, kv_idx):
    return (h <= q_idx) & (2 * kv_idx < q_idx) & ((q_idx % 4) == (h + 1))


@pytest.mark.parametrize("pair", [(kv_le_q, q_ge_kv), (late_heads_a, late_heads_b)],
                         ids=["causal_orientation", "relations_without_kv_linear_terms"])
def test_two_spellings_give_one_canonical_text_and_key(pair):
    first, second = (Canonicalize()(traced(fn)) for fn in pair)
    assert first.text() == second.text()
    assert first.kernel_text() == second.kernel_text() and first.key == second.key
    assert run_spec_passes(traced(pair[0])).spec.key == run_spec_passes(traced(pair[1])).spec.key
    assert ">" not in first.text()  # one direction only


def test_orientation_rules_and_the_kv_bounds_the_classifier_reads():
    assert rewrite(Q_IDX >= H_IDX) == sympy.Le(H_IDX, Q_IDX)
    assert rewrite(Q_IDX > H_IDX) == sympy.Lt(H_IDX, Q_IDX)
    assert rewrite(sympy.Eq(Q_IDX, H_IDX)).args == rewrite(sympy.Eq(H_IDX, Q_IDX)).args
    assert rewrite(sympy.Ne(Q_IDX, H_IDX)).args == rewrite(sympy.Ne(H_IDX, Q_IDX)).args
    # solve-for-kv's `kv_idx >= bound` stays as it is (classify-tiles reads that form)
    assert rewrite(KV_IDX >= Q_IDX - 3) == sympy.Ge(KV_IDX, Q_IDX - 3)
    assert rewrite(Q_IDX - 3 <= KV_IDX) == sympy.Ge(KV_IDX, Q_IDX - 3)


@pytest.mark.parametrize("expr", [
    Q_IDX >= H_IDX, Q_IDX > 2 * KV_IDX, sympy.Eq(Q_IDX % 3, H_IDX), sympy.Ne(KV_IDX % 2, H_IDX),
    (Q_IDX >= KV_IDX) & (KV_IDX * KV_IDX >= Q_IDX), sympy.Or(Q_IDX > H_IDX + KV_IDX, H_IDX >= 2),
], ids=str)
def test_rewrite_keeps_the_allowed_pairs(expr):
    out = rewrite(expr)
    for q, kv, h in itertools.product(range(7), range(7), range(3)):
        values = {Q_IDX: q, KV_IDX: kv, H_IDX: h}
        assert bool(expr.subs(values)) == bool(out.subs(values)), (q, kv, h, out)
