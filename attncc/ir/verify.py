"""`verify(spec)`: well-formedness of an AttentionSpec, run between passes in tests.

Checks: every free symbol is an index, shape, score (score mods only) or declared parameter;
every `Load` names a declared capture with the right rank; masks are boolean; integer division
and modulo divide by something provably positive (kernels and the reference agree only then).
"""

from __future__ import annotations

import sympy

from attncc.ir.nodes import Mask, ScoreMod
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import INDEX_SYMBOLS, SCORE, SHAPE_SYMBOLS, Load


class VerifyError(ValueError):
    """The IR breaks an invariant; the message names the axis and the offending part."""


def _check_expr(axis: str, node: Mask | ScoreMod, captures: dict[str, int]) -> None:
    allowed = {*INDEX_SYMBOLS, *SHAPE_SYMBOLS, *(p.symbol for p in node.params)}
    if axis == "score":
        allowed.add(SCORE)
    loads = node.expr.atoms(Load)
    buffers = {ld.args[0] for ld in loads}
    for sym in node.expr.free_symbols - buffers:
        if sym not in allowed:
            raise VerifyError(f"{axis}: unknown symbol {sym} in {node.expr}; declared parameters "
                              f"are {[p.name for p in node.params]}")
    for ld in loads:
        name, ndim = ld.args[0].name, len(ld.args) - 1
        if name not in captures:
            raise VerifyError(f"{axis}: load from undeclared tensor {name!r}")
        if captures[name] != ndim:
            raise VerifyError(f"{axis}: tensor {name!r} is {captures[name]}-d but is indexed "
                              f"with {ndim} indices")
    for div in node.expr.atoms(sympy.Mod):
        _positive(axis, div.args[1], div)
    for fl in node.expr.atoms(sympy.floor, sympy.ceiling):
        num, den = fl.args[0].as_numer_denom()
        if den != 1 and num.is_integer and den.is_integer:
            _positive(axis, den, fl)


def _positive(axis: str, divisor: sympy.Basic, where: sympy.Basic) -> None:
    if not divisor.is_positive:
        raise VerifyError(f"{axis}: integer division by {divisor} in {where}: the divisor must be "
                          "provably positive (a positive literal or a positive parameter)")


def _is_boolean(expr: sympy.Basic) -> bool:
    """True for relations, logic and true/false; a bare Symbol is a sympy Boolean too (it may
    stand for a truth value), but attncc's symbols are numbers: the identity score `score`."""
    return isinstance(expr, sympy.logic.boolalg.Boolean) and not isinstance(expr, sympy.Symbol)


def verify(spec: AttentionSpec) -> AttentionSpec:
    """Return `spec` unchanged if well formed, else raise VerifyError."""
    captures = {c.name: c.ndim for c in spec.captures}
    names = [p.name for p in spec.params]
    if len(names) != len(set(names)):
        raise VerifyError(f"parameters: duplicate names in {names}")
    if spec.mask is not None:
        if not _is_boolean(spec.mask.expr):
            raise VerifyError(f"mask: expected a boolean expression, got {spec.mask.expr}")
        _check_expr("mask", spec.mask, captures)
    if spec.score is not None:
        if _is_boolean(spec.score.expr):
            raise VerifyError(f"score: expected a numeric expression, got {spec.score.expr}")
        _check_expr("score", spec.score, captures)
    if spec.normaliser.sink is not None and spec.normaliser.sink.ndim != 1:
        raise VerifyError(f"normaliser: sink must be 1-d [Hq], got {spec.normaliser.sink.ndim}-d")
    return spec
