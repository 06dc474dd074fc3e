"""The symbols every attention expression is written in, and the few sympy functions attncc adds.

Index symbols (`b, h, q_idx, kv_idx`) are non-negative integers; shape symbols (`Lq, Lk, Hq, Hkv`)
are positive integers bound at launch; `score` is the real score a score mod rewrites.
"""

from __future__ import annotations

import sympy

B_IDX = sympy.Symbol("b", integer=True, nonnegative=True)
H_IDX = sympy.Symbol("h", integer=True, nonnegative=True)
Q_IDX = sympy.Symbol("q_idx", integer=True, nonnegative=True)
KV_IDX = sympy.Symbol("kv_idx", integer=True, nonnegative=True)
SCORE = sympy.Symbol("score", real=True)

LQ = sympy.Symbol("Lq", integer=True, positive=True)
LK = sympy.Symbol("Lk", integer=True, positive=True)
HQ = sympy.Symbol("Hq", integer=True, positive=True)
HKV = sympy.Symbol("Hkv", integer=True, positive=True)

INDEX_SYMBOLS = (B_IDX, H_IDX, Q_IDX, KV_IDX)
SHAPE_SYMBOLS = (LQ, LK, HQ, HKV)
RESERVED_NAMES = frozenset(s.name for s in (*INDEX_SYMBOLS, *SHAPE_SYMBOLS, SCORE))

# The aligned query position of named masks and scores (docs/semantics.md, "Query positions when
# Lq != Lk"): the last query meets the last key, so a decode row (Lq = 1) sits at Lk - 1.
QP = Q_IDX + LK - LQ


class Load(sympy.Function):
    """`Load(buffer, i0, i1, ...)`: element of a captured tensor; out-of-range indices read 0.

    `buffer` is a Symbol naming the capture. Reading 0 outside the tensor is the defined
    semantics (kernels mask the load, the reference does the same), so a guarded access such as
    `(kv >= P) & anc[q, kv - P]` never faults on the unguarded side.
    """

    @classmethod
    def eval(cls, *args):  # noqa: D102 - sympy hook: never evaluates, stays symbolic
        return None

    def _eval_is_extended_real(self) -> bool:
        # captured tensors hold real numbers: without this sympy keeps `re(...)` / `im(...)`
        # parts (abs(exp(load)) -> exp(re(load))) that no kernel prints
        return True


class Sigmoid(sympy.Function):
    """Logistic function, kept as one node so kernels print `tl.sigmoid`."""

    @classmethod
    def eval(cls, x):  # noqa: D102
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None

    def fdiff(self, argindex=1):  # noqa: D102 - the backward differentiates score mods
        return self * (1 - self)


def param_symbol(name: str, kind: str, positive: bool = False) -> sympy.Symbol:
    """The symbol of a runtime scalar; `positive` lets passes divide by it safely."""
    if kind == "int":
        return sympy.Symbol(name, integer=True, positive=True) if positive else sympy.Symbol(
            name, integer=True)
    return sympy.Symbol(name, real=True, positive=True) if positive else sympy.Symbol(
        name, real=True)


def buffer_symbol(name: str) -> sympy.Symbol:
    """The symbol naming a captured tensor inside `Load`."""
    return sympy.Symbol(name)

# The first and last valid query row of one query tile: tile classes are expressions in these.
Q_FIRST = sympy.Symbol("q_first", integer=True, nonnegative=True)
Q_LAST = sympy.Symbol("q_last", integer=True, nonnegative=True)
