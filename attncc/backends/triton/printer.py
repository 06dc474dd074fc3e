"""Print IR expressions as Triton source.

`TritonPrinter(names).doprint(expr)` gives a Triton expression. Integer `floor(a / c)` and
`Mod(a, c)` print as the template's `_floordiv`/`_mod` helpers, which give floor semantics
whatever Triton's `//` does (truncating when compiled, flooring in the interpreter). `Load`
prints as a masked `tl.load` that reads 0 outside the tensor, the IR's defined semantics.
Non-finite constants print as `float("-inf")` (a Triton constexpr), never as a bare name.
Elementwise functions use only what `triton.language` offers in both triton 3.6 and 3.9
(tl.sin/cos/exp/log/sqrt/rsqrt/erf/floor/ceil/sigmoid/...); the others are compositions.
"""

from __future__ import annotations

import math
from typing import Mapping

import sympy

from attncc.backends.keys import capture_arg_names
from attncc.ir.symbols import Load, Sigmoid

LOG2E = 1.4426950408889634
# part of every cache key that holds printed expressions: bump it when a rule prints differently,
# so entries printed by the old rules are never loaded again (version 1: a bare `-inf`;
# version 2: a score that does not read `score` left unbroadcast to the score tile)
PRINTER_VERSION = 3


class TritonPrinter:
    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names  # symbol name -> kernel variable name

    def doprint(self, expr: sympy.Basic) -> str:
        return self._p(expr)

    def _p(self, e: sympy.Basic) -> str:
        if e.is_Symbol:
            if e.name not in self.names:
                raise KeyError(f"triton printer: no kernel variable for symbol {e.name}")
            return self.names[e.name]
        if e is sympy.true:
            return "True"
        if e is sympy.false:
            return "False"
        if e.is_Integer:
            return str(int(e))
        if e is sympy.zoo:
            raise NotImplementedError("triton printer: complex infinity (a division by zero) "
                                      "has no kernel value")
        if e.is_number:  # 1/3, -oo, nan, pi, 2/sqrt(pi) (erf's derivative): one float literal
            return _float_literal(e)
        method = getattr(self, "_print_" + type(e).__name__, None)
        if method is None:
            raise NotImplementedError(f"triton printer: no rule for {type(e).__name__} ({e})")
        return method(e)

    # arithmetic ---------------------------------------------------------------------------
    def _print_Add(self, e):
        return "(" + " + ".join(self._p(a) for a in e.args) + ")"

    def _print_Mul(self, e):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self._p(rest)})"
        return "(" + " * ".join(self._p(a) for a in e.args) + ")"

    def _print_Pow(self, e):
        base, exp = e.args
        if exp == -1:
            return f"(1.0 / {self._p(base)})"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._float(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"tl.rsqrt({self._float(base)})"
        if exp.is_Integer and 2 <= abs(exp) <= 8:  # exact for negative bases too
            product = "(" + " * ".join([self._p(base)] * abs(int(exp))) + ")"
            return product if exp > 0 else f"(1.0 / {product})"
        if base == 2:
            return f"tl.exp2({self._float(exp)})"
        return f"tl.exp2({self._float(exp)} * tl.log2({self._float(base)}))"

    def _float(self, e):
        text = self._p(e)
        return text if not e.is_integer else f"({text} * 1.0)"

    def _int_division(self, e):
        num, den = e.args[0].as_numer_denom()
        if den != 1 and num.is_integer and den.is_integer:
            return num, den
        return None

    def _print_floor(self, e):
        nd = self._int_division(e)
        if nd:
            return f"_floordiv({self._p(nd[0])}, {self._p(nd[1])})"
        return f"tl.floor({self._float(e.args[0])})"

    def _print_ceiling(self, e):
        nd = self._int_division(e)
        if nd:
            return f"(-_floordiv({self._p(-nd[0])}, {self._p(nd[1])}))"
        return f"tl.ceil({self._float(e.args[0])})"

    def _print_Mod(self, e):
        return f"_mod({self._p(e.args[0])}, {self._p(e.args[1])})"

    def _nest(self, fn: str, args) -> str:
        out = self._p(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._p(a)})"
        return out

    def _print_Min(self, e):
        return self._nest("tl.minimum", e.args)

    def _print_Max(self, e):
        return self._nest("tl.maximum", e.args)

    def _print_Abs(self, e):
        return f"tl.abs({self._p(e.args[0])})"

    def _print_exp(self, e):
        return f"tl.exp({self._float(e.args[0])})"

    def _print_log(self, e):
        return f"tl.log({self._float(e.args[0])})"

    def _print_sin(self, e):
        return f"tl.sin({self._float(e.args[0])})"

    def _print_cos(self, e):
        return f"tl.cos({self._float(e.args[0])})"

    def _print_tan(self, e):
        x = self._float(e.args[0])
        return f"(tl.sin({x}) / tl.cos({x}))"

    def _print_sinh(self, e):
        x = self._float(e.args[0])
        return f"(0.5 * (tl.exp({x}) - tl.exp(-{x})))"

    def _print_cosh(self, e):
        x = self._float(e.args[0])
        return f"(0.5 * (tl.exp({x}) + tl.exp(-{x})))"

    def _print_erf(self, e):
        return f"tl.erf({self._float(e.args[0])})"

    def _print_sign(self, e):
        x = self._p(e.args[0])
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"

    def _print_Heaviside(self, e):  # the derivative of Max/Min: H(0) is sympy's 1/2
        x, h0 = self._p(e.args[0]), self._p(e.args[1] if len(e.args) > 1 else sympy.Rational(1, 2))
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, 0.0, {h0}))"

    def _print_tanh(self, e):  # tanh(x) = 2 sigmoid(2x) - 1: tl.sigmoid exists on every version
        return f"(2.0 * tl.sigmoid(2.0 * {self._float(e.args[0])}) - 1.0)"

    def _print_Sigmoid(self, e):
        return f"tl.sigmoid({self._float(e.args[0])})"

    def _print_Piecewise(self, e):
        *pairs, (last, cond) = e.args
        out = self._p(last)
        for value, c in reversed(pairs):
            out = f"tl.where({self._p(c)}, {self._p(value)}, {out})"
        return out

    # logic --------------------------------------------------------------------------------
    def _rel(self, e, op):
        return f"({self._p(e.lhs)} {op} {self._p(e.rhs)})"

    def _print_Equality(self, e): return self._rel(e, "==")
    def _print_Unequality(self, e): return self._rel(e, "!=")
    def _print_LessThan(self, e): return self._rel(e, "<=")
    def _print_StrictLessThan(self, e): return self._rel(e, "<")
    def _print_GreaterThan(self, e): return self._rel(e, ">=")
    def _print_StrictGreaterThan(self, e): return self._rel(e, ">")

    def _print_And(self, e):
        return "(" + " & ".join(self._p(a) for a in e.args) + ")"

    def _print_Or(self, e):
        return "(" + " | ".join(self._p(a) for a in e.args) + ")"

    def _print_Xor(self, e):
        return "(" + " ^ ".join(self._p(a) for a in e.args) + ")"

    def _print_ITE(self, e):  # a boolean-valued Piecewise, as sympy folds it inside conditions
        c, a, b = (self._p(x) for x in e.args)
        return f"tl.where({c}, {a}, {b})"

    def _print_Equivalent(self, e):  # `==` of two conditions
        first, *rest = (self._p(a) for a in e.args)
        return "(" + " & ".join(f"({first} == {r})" for r in rest) + ")"

    def _print_Not(self, e):
        return f"({self._p(e.args[0])} == 0)"

    # captured tensors ---------------------------------------------------------------------
    def _print_Load(self, e):
        name, index = e.args[0].name, e.args[1:]
        ptr, strides, sizes = capture_arg_names(name, len(index))
        if not index:
            return f"tl.load({ptr})"
        idx = [self._p(i) for i in index]
        offset = " + ".join(f"{i} * {s}" for i, s in zip(idx, strides))
        inside = " & ".join(  # indices provably >= 0 need no lower check
            (f"({i} < {n})" if raw.is_nonnegative else f"({i} >= 0) & ({i} < {n})")
            for raw, i, n in zip(index, idx, sizes))
        # `!= 0`: the interpreter rejects a load mask that mixes scalar and block booleans
        return f"tl.load({ptr} + {offset}, mask=({inside}) != 0, other=0)"


def _float_literal(e: sympy.Basic) -> str:
    value = float(e)  # raises TypeError on zoo: no kernel value (the tracer refuses x / 0)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


_ = (Load, Sigmoid)  # the printer dispatches on these class names
