"""What the backends' expression printers share: the dispatch over sympy node types and the rules
whose printed form differs only in spelling.

`ExprPrinter(names).doprint(expr)` prints an IR expression as kernel source. A backend's printer
subclasses it and sets its tokens (boolean constants, `&`/`&&`, function names, the select form),
its literals (`_integer`, `_number`) and the rules that print differently (`Load`, `sign`, the
elementwise functions one language lacks). A node is printed by `FUNCTIONS[its class name]` (a
one-argument float function) or else by the printer's `_print_<class name>` method; a node with
neither is an explicit error.
"""

from __future__ import annotations

import math
from typing import Mapping

import sympy


class ExprPrinter:
    BACKEND = ""  # names the printer in its errors
    VARIABLE = ""  # what a symbol prints as, in the error for an unnamed one
    TRUE = FALSE = ""
    AND = OR = ""  # the operators that join conditions
    NOT = ""  # format of a negated condition
    SELECT = ""  # format of `cond ? a : b`
    ONE = ""  # the float literal 1 (the numerator of a reciprocal)
    TO_FLOAT = ""  # format of an integer expression converted to float
    SQRT = EXP2 = LOG2 = FLOOR = CEIL = ""  # float functions the rules compose
    FLOORDIV = MOD = MIN = MAX = ABS = ""  # integer-safe helpers with floor semantics
    FUNCTIONS: Mapping[str, str] = {}  # sympy class name -> one-argument float function
    NAN = INF = NEG_INF = ""  # the non-finite float literals

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names  # symbol name -> the kernel's variable name

    def doprint(self, expr: sympy.Basic) -> str:
        return self._p(expr)

    @classmethod
    def rules(cls) -> set[str]:
        """The sympy class names this printer prints (other than symbols and numbers)."""
        return set(cls.FUNCTIONS) | {name.removeprefix("_print_") for name in dir(cls)
                                     if name.startswith("_print_")}

    def _p(self, e: sympy.Basic) -> str:
        if e.is_Symbol:
            if e.name not in self.names:
                raise KeyError(f"{self.BACKEND} printer: no {self.VARIABLE} for symbol {e.name}")
            return self.names[e.name]
        if e is sympy.true:
            return self.TRUE
        if e is sympy.false:
            return self.FALSE
        if e.is_Integer:
            return self._integer(int(e))
        if e is sympy.zoo:
            raise NotImplementedError(f"{self.BACKEND} printer: complex infinity (a division by "
                                      "zero) has no kernel value")
        if e.is_number:  # 1/3, -oo, nan, pi, 2/sqrt(pi) (erf's derivative): one float literal
            return self._number(e)
        kind = type(e).__name__
        if kind in self.FUNCTIONS:
            return f"{self.FUNCTIONS[kind]}({self._float(e.args[0])})"
        method = getattr(self, "_print_" + kind, None)
        if method is None:
            raise NotImplementedError(f"{self.BACKEND} printer: no rule for {kind} ({e})")
        return method(e)

    # literals -----------------------------------------------------------------------------
    def _integer(self, value: int) -> str:
        return str(value)

    def _number(self, e: sympy.Basic) -> str:
        value = float(e)  # raises TypeError on zoo: no kernel value (the tracer refuses x / 0)
        if math.isnan(value):
            return self.NAN
        if math.isinf(value):
            return self.INF if value > 0 else self.NEG_INF
        return self._finite(value)

    def _finite(self, value: float) -> str:
        return repr(value)

    def _float(self, e):
        text = self._p(e)
        return text if not e.is_integer else self.TO_FLOAT.format(text)

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
            return f"({self.ONE} / {self._p(base)})"
        if exp == sympy.Rational(1, 2):
            return f"{self.SQRT}({self._float(base)})"
        if exp == -sympy.Rational(1, 2):
            return self._rsqrt(self._float(base))
        if exp.is_Integer and 2 <= abs(exp) <= 8:  # exact for negative bases too
            product = "(" + " * ".join([self._p(base)] * abs(int(exp))) + ")"
            return product if exp > 0 else f"({self.ONE} / {product})"
        if base == 2:
            return f"{self.EXP2}({self._float(exp)})"
        return f"{self.EXP2}({self._float(exp)} * {self.LOG2}({self._float(base)}))"

    def _rsqrt(self, x: str) -> str:
        return f"({self.ONE} / {self.SQRT}({x}))"

    def _int_division(self, e):
        num, den = e.args[0].as_numer_denom()
        if den != 1 and num.is_integer and den.is_integer:
            return num, den
        return None

    def _print_floor(self, e):
        nd = self._int_division(e)
        if nd:
            return f"{self.FLOORDIV}({self._p(nd[0])}, {self._p(nd[1])})"
        return f"{self.FLOOR}({self._float(e.args[0])})"

    def _print_ceiling(self, e):
        nd = self._int_division(e)
        if nd:
            return f"(-{self.FLOORDIV}({self._p(-nd[0])}, {self._p(nd[1])}))"
        return f"{self.CEIL}({self._float(e.args[0])})"

    def _print_Mod(self, e):
        return f"{self.MOD}({self._p(e.args[0])}, {self._p(e.args[1])})"

    def _nest(self, fn: str, args) -> str:
        out = self._p(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._p(a)})"
        return out

    def _print_Min(self, e):
        return self._nest(self.MIN, e.args)

    def _print_Max(self, e):
        return self._nest(self.MAX, e.args)

    def _print_Abs(self, e):
        return f"{self.ABS}({self._p(e.args[0])})"

    def _print_Piecewise(self, e):
        *pairs, (last, cond) = e.args  # the last condition is True (sympy's canonical form)
        out = self._p(last)
        for value, c in reversed(pairs):
            out = self.SELECT.format(self._p(c), self._p(value), out)
        return out

    # logic --------------------------------------------------------------------------------
    def _bool(self, e) -> str:
        """A condition operand (a backend may need to convert a Load of a bool tensor)."""
        return self._p(e)

    def _rel(self, e, op):
        return f"({self._p(e.lhs)} {op} {self._p(e.rhs)})"

    def _print_Equality(self, e): return self._rel(e, "==")
    def _print_Unequality(self, e): return self._rel(e, "!=")
    def _print_LessThan(self, e): return self._rel(e, "<=")
    def _print_StrictLessThan(self, e): return self._rel(e, "<")
    def _print_GreaterThan(self, e): return self._rel(e, ">=")
    def _print_StrictGreaterThan(self, e): return self._rel(e, ">")

    def _print_And(self, e):
        return "(" + f" {self.AND} ".join(self._bool(a) for a in e.args) + ")"

    def _print_Or(self, e):
        return "(" + f" {self.OR} ".join(self._bool(a) for a in e.args) + ")"

    def _print_ITE(self, e):  # a boolean-valued Piecewise, as sympy folds it inside conditions
        return self.SELECT.format(*(self._bool(x) for x in e.args))

    def _print_Equivalent(self, e):  # `==` of two conditions
        first, *rest = (self._bool(a) for a in e.args)
        return "(" + f" {self.AND} ".join(f"({first} == {r})" for r in rest) + ")"

    def _print_Not(self, e):
        return self.NOT.format(self._bool(e.args[0]))
