"""Print IR expressions as CUDA C++, and a spec's mask, score and kv ranges as device functions.

`CudaPrinter(names).doprint(expr)` gives a C++ expression with the Triton printer's semantics:
integer `floor(a / c)` and `Mod(a, c)` print as `attncc_floordiv` / `attncc_mod` (floor
semantics; C's `/` and `%` truncate), `Load` as a bounds-checked `attncc_load` that reads 0
outside the tensor, score math in fp32 (`expf`, `logf`, literals with `f`), -inf as
`-INFINITY`, conditions as C++ bool operators, Piecewise as nested `?:`. The helpers live in
`templates/attncc_expr.cuh`, which every source that holds printed code includes first.

`render_functions(plan)` lays a plan's expressions out as `__host__ __device__` functions with
one fixed signature per kind (see `PrintedFunctions`), so templates call them and the host
test compiles them as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import sympy

from attncc.backends.keys import capture_arg_names, param_arg
from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import (B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_FIRST, Q_IDX, Q_LAST,
                               SCORE, Load, Sigmoid, buffer_symbol)

# part of every cache key that holds code this module printed: bump it when a rule prints
# differently, so entries printed by the old rules are never loaded again
PRINTER_VERSION = 1

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
EXPR_HEADER = "attncc_expr.cuh"  # the helpers printed code calls

# captured tensor dtype -> C++ element type of its pointer; bool tensors travel as uint8 views,
# as on the Triton path. fp16/bf16 need cuda_fp16.h / cuda_bf16.h in the including source.
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float",
              "float64": "double", "int64": "long long", "int32": "int", "int16": "short",
              "int8": "signed char", "uint8": "unsigned char", "bool": "unsigned char"}


class CudaPrinter:
    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names  # symbol name -> C++ variable name

    def doprint(self, expr: sympy.Basic) -> str:
        return self._p(expr)

    def _p(self, e: sympy.Basic) -> str:
        if e.is_Symbol:
            if e.name not in self.names:
                raise KeyError(f"cuda printer: no C++ variable for symbol {e.name}")
            return self.names[e.name]
        if e is sympy.true:
            return "true"
        if e is sympy.false:
            return "false"
        if e.is_Integer:
            return _int_literal(int(e))
        if e is sympy.zoo:
            raise NotImplementedError("cuda printer: complex infinity (a division by zero) "
                                      "has no kernel value")
        if e.is_number:  # 1/3, -oo, nan, pi, 2/sqrt(pi) (erf's derivative): one fp32 literal
            return _float_literal(e)
        method = getattr(self, "_print_" + type(e).__name__, None)
        if method is None:
            raise NotImplementedError(f"cuda printer: no rule for {type(e).__name__} ({e})")
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
            return f"(1.0f / {self._p(base)})"
        if exp == sympy.Rational(1, 2):
            return f"sqrtf({self._float(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"(1.0f / sqrtf({self._float(base)}))"
        if exp.is_Integer and 2 <= abs(exp) <= 8:  # exact for negative bases too
            product = "(" + " * ".join([self._p(base)] * abs(int(exp))) + ")"
            return product if exp > 0 else f"(1.0f / {product})"
        if base == 2:
            return f"exp2f({self._float(exp)})"
        return f"exp2f({self._float(exp)} * log2f({self._float(base)}))"

    def _float(self, e):
        text = self._p(e)
        return text if not e.is_integer else f"static_cast<float>({text})"

    def _int_division(self, e):
        num, den = e.args[0].as_numer_denom()
        if den != 1 and num.is_integer and den.is_integer:
            return num, den
        return None

    def _print_floor(self, e):
        nd = self._int_division(e)
        if nd:
            return f"attncc_floordiv({self._p(nd[0])}, {self._p(nd[1])})"
        return f"floorf({self._float(e.args[0])})"

    def _print_ceiling(self, e):
        nd = self._int_division(e)
        if nd:
            return f"(-attncc_floordiv({self._p(-nd[0])}, {self._p(nd[1])}))"
        return f"ceilf({self._float(e.args[0])})"

    def _print_Mod(self, e):
        return f"attncc_mod({self._p(e.args[0])}, {self._p(e.args[1])})"

    def _nest(self, fn: str, args) -> str:
        out = self._p(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._p(a)})"
        return out

    def _print_Min(self, e):
        return self._nest("attncc_min", e.args)

    def _print_Max(self, e):
        return self._nest("attncc_max", e.args)

    def _print_Abs(self, e):
        return f"attncc_abs({self._p(e.args[0])})"

    def _call(self, fn: str, e) -> str:
        return f"{fn}({self._float(e.args[0])})"

    def _print_exp(self, e): return self._call("expf", e)
    def _print_log(self, e): return self._call("logf", e)
    def _print_sin(self, e): return self._call("sinf", e)
    def _print_cos(self, e): return self._call("cosf", e)
    def _print_tan(self, e): return self._call("tanf", e)
    def _print_sinh(self, e): return self._call("sinhf", e)
    def _print_cosh(self, e): return self._call("coshf", e)
    def _print_tanh(self, e): return self._call("tanhf", e)
    def _print_erf(self, e): return self._call("erff", e)
    def _print_Sigmoid(self, e): return self._call("attncc_sigmoid", e)

    def _print_sign(self, e):
        return f"attncc_sign({self._p(e.args[0])})"

    def _print_Heaviside(self, e):  # the derivative of Max/Min: H(0) is sympy's 1/2
        at_zero = e.args[1] if len(e.args) > 1 else sympy.Rational(1, 2)
        return f"attncc_heaviside({self._p(e.args[0])}, {self._float(at_zero)})"

    def _print_Piecewise(self, e):
        *pairs, (last, cond) = e.args  # the last condition is True (sympy's canonical form)
        out = self._p(last)
        for value, c in reversed(pairs):
            out = f"({self._p(c)} ? {self._p(value)} : {out})"
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

    def _bool(self, e) -> str:
        """A condition operand as a C++ bool (a Load of a bool tensor reads an unsigned char)."""
        text = self._p(e)
        return text if isinstance(e, sympy.logic.boolalg.Boolean) else f"static_cast<bool>({text})"

    def _print_And(self, e):
        return "(" + " && ".join(self._bool(a) for a in e.args) + ")"

    def _print_Or(self, e):
        return "(" + " || ".join(self._bool(a) for a in e.args) + ")"

    def _print_Xor(self, e):
        out = self._bool(e.args[0])
        for a in e.args[1:]:
            out = f"({out} != {self._bool(a)})"
        return out

    def _print_ITE(self, e):  # a boolean-valued Piecewise, as sympy folds it inside conditions
        c, a, b = (self._bool(x) for x in e.args)
        return f"({c} ? {a} : {b})"

    def _print_Equivalent(self, e):  # `==` of two conditions
        first, *rest = (self._bool(a) for a in e.args)
        return "(" + " && ".join(f"({first} == {r})" for r in rest) + ")"

    def _print_Not(self, e):
        return f"(!{self._bool(e.args[0])})"

    # captured tensors ---------------------------------------------------------------------
    def _print_Load(self, e):
        name, index = e.args[0].name, e.args[1:]
        ptr, strides, sizes = capture_arg_names(name, len(index))
        dims = "".join(f", {self._p(i)}, {s}, {n}" for i, s, n in zip(index, strides, sizes))
        return f"attncc_load({ptr}{dims})"


def _int_literal(value: int) -> str:
    # beyond int32 a literal must say so (the arithmetic around it is then 64-bit)
    return str(value) if -2 ** 31 < value < 2 ** 31 else f"{value}LL"


def _float_literal(e: sympy.Basic) -> str:
    value = float(e)  # raises TypeError on zoo: no kernel value (the tracer refuses x / 0)
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INFINITY" if value > 0 else "(-INFINITY)"
    text = repr(value)
    return f"({text}f)" if value < 0 else f"{text}f"


_ = (Load, Sigmoid)  # the printer dispatches on these class names


# ---- the functions a kernel calls ---------------------------------------------------------------

INDEX_NAMES = {B_IDX.name: "b", H_IDX.name: "h", Q_IDX.name: "q_idx", KV_IDX.name: "kv_idx",
               LQ.name: "Lq", LK.name: "Lk", HQ.name: "Hq", HKV.name: "Hkv",
               SCORE.name: "score", Q_FIRST.name: "q_first", Q_LAST.name: "q_last"}
SHAPE_PARAMS = "int Lq, int Lk, int Hq, int Hkv"


def printer_names(spec: AttentionSpec) -> dict[str, str]:
    """IR symbol name -> C++ name: the functions' parameters below, `p_<name>` for params."""
    return {**INDEX_NAMES, **{p.name: param_arg(p.name) for p in spec.params}}


def cuda_type(dtype: str) -> str:
    """"float32" -> "float": the element type of a captured tensor's pointer."""
    if dtype not in CUDA_TYPES:
        raise ValueError(f"captured tensor dtype {dtype!r}: the CUDA backend reads "
                         f"{sorted(CUDA_TYPES)}")
    return CUDA_TYPES[dtype]


def extra_arguments(spec: AttentionSpec) -> list[tuple[str, str]]:
    """(C++ type, name) of the runtime arguments every printed function takes after its fixed
    ones: params (`int`/`float p_<name>`), then per captured tensor its pointer, strides and
    sizes (`cap_<name>_ptr`, `_stride<i>`, `_size<i>`): the order of the Triton kernel's
    arguments, with the same names."""
    args = [("int" if p.kind == "int" else "float", param_arg(p.name)) for p in spec.params]
    for cap in spec.captures:
        ptr, strides, sizes = capture_arg_names(cap.name, cap.ndim)
        args.append((f"const {cuda_type(cap.dtype)}*", ptr))
        args += [("int", s) for s in strides] + [("int", n) for n in sizes]
    return args


@dataclass(frozen=True)
class PrintedFunctions:
    """A plan's expressions as C++ functions (`source`) and how to call them.

    Every function is `__host__ __device__ __forceinline__` and ends with the spec's extra
    arguments (`extra_params` to declare them, `extra_args` to pass them on):
      bool  attncc_mask(int b, int h, int q_idx, int kv_idx, int Lq, int Lk, int Hq, int Hkv, ...)
      float attncc_score(float score, int b, int h, int q_idx, int kv_idx, int Lq, int Lk,
                         int Hq, int Hkv, ...)
      float attncc_sink(int h, ...)                      (only when `has_sink`)
      attncc_kv_range attncc_kv_range<i>(int b, int h, int q_first, int q_last, int Lq,
                                         int Lk, int Hq, int Hkv, ...)   i < n_ranges
    attncc_mask is `true` without a mask, attncc_score returns `score` without a score mod.
    """

    source: str
    arguments: tuple[tuple[str, str], ...]  # (C++ type, name) of the extra arguments
    has_mask: bool
    has_score: bool
    has_sink: bool
    n_ranges: int

    @property
    def extra_params(self) -> str:
        return "".join(f", {t} {n}" for t, n in self.arguments)

    @property
    def extra_args(self) -> str:
        return "".join(f", {n}" for _, n in self.arguments)


DEVICE_FN = "__host__ __device__ __forceinline__"


def render_functions(plan: KernelPlan) -> PrintedFunctions:
    """The mask, score mod, sink read and kv ranges of `plan` as C++ functions (needs the
    helpers of `EXPR_HEADER` declared before it)."""
    spec = plan.spec
    printer = CudaPrinter(printer_names(spec))
    arguments = tuple(extra_arguments(spec))
    extra = "".join(f", {t} {n}" for t, n in arguments)
    mask = printer.doprint(spec.mask.expr) if spec.mask is not None else "true"
    score = printer.doprint(spec.score.expr) if spec.score is not None else "score"
    lines = [f"// printed by attncc's CudaPrinter (version {PRINTER_VERSION})",
             *(_comment(line) for line in spec.text().splitlines()),
             f"{DEVICE_FN} bool attncc_mask(int b, int h, int q_idx, int kv_idx, "
             f"{SHAPE_PARAMS}{extra}) {{",
             f"  return {mask};", "}",
             f"{DEVICE_FN} float attncc_score(float score, int b, int h, int q_idx, int kv_idx, "
             f"{SHAPE_PARAMS}{extra}) {{",
             f"  return {score};", "}"]
    sink = spec.normaliser.sink
    if sink is not None:
        read = printer.doprint(Load(buffer_symbol(sink.name), H_IDX))
        lines += [f"{DEVICE_FN} float attncc_sink(int h{extra}) {{",
                  f"  return static_cast<float>({read});", "}"]
    for i, piece in enumerate(plan.tiles.pieces):
        bounds = ", ".join(_cast("int", x, printer) for x in (
            piece.some_lo, piece.some_hi, piece.all_lo, piece.all_hi))
        lines += [_comment(f"piece {i}: {piece.text()}"),
                  f"{DEVICE_FN} attncc_kv_range attncc_kv_range{i}(int b, int h, int q_first, "
                  f"int q_last, {SHAPE_PARAMS}{extra}) {{",
                  f"  return attncc_kv_range{{{bounds}, "
                  f"{_cast('bool', piece.guard, printer)}, "
                  f"{'true' if piece.exact else 'false'}}};", "}"]
    return PrintedFunctions("\n".join(lines) + "\n", arguments, spec.mask is not None,
                            spec.score is not None, sink is not None, len(plan.tiles.pieces))


def _cast(ctype: str, e: sympy.Basic, printer: CudaPrinter) -> str:
    """`e` as `ctype`; a bound may read an int64 tensor, and brace initialisation refuses an
    implicit narrowing."""
    text = printer.doprint(e)
    return text if e.is_Integer or e in (sympy.true, sympy.false) else f"static_cast<{ctype}>({text})"


def _comment(text: str) -> str:
    """`// text` on one line: a trailing backslash would continue the comment onto the code."""
    return "// " + text.replace("\n", " ").rstrip("\\ ")


def expr_header() -> str:
    """The text of the helpers' header (a dependency of every source: part of its key)."""
    return (TEMPLATES_DIR / EXPR_HEADER).read_text()
