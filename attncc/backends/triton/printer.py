"""Print IR expressions as Triton source.

`TritonPrinter(names).doprint(expr)` gives a Triton expression. Integer `floor(a / c)` and
`Mod(a, c)` print as the template's `_floordiv`/`_mod` helpers, which give floor semantics
whatever Triton's `//` does (truncating when compiled, flooring in the interpreter). `Load`
prints as a masked `tl.load` that reads 0 outside the tensor, the IR's defined semantics.
Non-finite constants print as `float("-inf")` (a Triton constexpr), never as a bare name.
Elementwise functions use only what `triton.language` offers in both triton 3.6 and 3.9
(tl.sin/cos/exp/log/sqrt/rsqrt/erf/floor/ceil/sigmoid/...); the others are compositions.
The dispatch and the rules the CUDA printer spells alike live in `attncc.backends.expr_printer`.
"""

from __future__ import annotations

import sympy

from attncc.backends.expr_printer import ExprPrinter
from attncc.backends.keys import capture_arg_names
from attncc.ir.symbols import Load, Sigmoid

LOG2E = 1.4426950408889634
# part of every cache key that holds printed expressions: bump it when a rule prints differently,
# so entries printed by the old rules are never loaded again (version 1: a bare `-inf`;
# version 2: a score that does not read `score` left unbroadcast to the score tile)
PRINTER_VERSION = 3


class TritonPrinter(ExprPrinter):
    BACKEND, VARIABLE = "triton", "kernel variable"
    TRUE, FALSE = "True", "False"
    AND, OR, NOT = "&", "|", "({} == 0)"
    SELECT = "tl.where({}, {}, {})"
    ONE, TO_FLOAT = "1.0", "({} * 1.0)"
    SQRT, EXP2, LOG2, FLOOR, CEIL = "tl.sqrt", "tl.exp2", "tl.log2", "tl.floor", "tl.ceil"
    FLOORDIV, MOD, MIN, MAX, ABS = "_floordiv", "_mod", "tl.minimum", "tl.maximum", "tl.abs"
    FUNCTIONS = {"exp": "tl.exp", "log": "tl.log", "sin": "tl.sin", "cos": "tl.cos",
                 "erf": "tl.erf", "Sigmoid": "tl.sigmoid"}
    NAN, INF, NEG_INF = 'float("nan")', 'float("inf")', 'float("-inf")'

    def _rsqrt(self, x):
        return f"tl.rsqrt({x})"

    def _print_tan(self, e):
        x = self._float(e.args[0])
        return f"(tl.sin({x}) / tl.cos({x}))"

    def _print_sinh(self, e):
        x = self._float(e.args[0])
        return f"(0.5 * (tl.exp({x}) - tl.exp(-{x})))"

    def _print_cosh(self, e):
        x = self._float(e.args[0])
        return f"(0.5 * (tl.exp({x}) + tl.exp(-{x})))"

    def _print_tanh(self, e):  # tanh(x) = 2 sigmoid(2x) - 1: tl.sigmoid exists on every version
        return f"(2.0 * tl.sigmoid(2.0 * {self._float(e.args[0])}) - 1.0)"

    def _print_sign(self, e):
        x = self._p(e.args[0])
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"

    def _print_Heaviside(self, e):  # the derivative of Max/Min: H(0) is sympy's 1/2
        x, h0 = self._p(e.args[0]), self._p(e.args[1] if len(e.args) > 1 else sympy.Rational(1, 2))
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, 0.0, {h0}))"

    def _print_Xor(self, e):
        return "(" + " ^ ".join(self._p(a) for a in e.args) + ")"

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


_ = (Load, Sigmoid)  # the printer dispatches on these class names
