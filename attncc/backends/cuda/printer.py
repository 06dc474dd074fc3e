"""Print IR expressions as CUDA C++, and a spec's mask, score and kv ranges as device functions.

`CudaPrinter(names).doprint(expr)` gives a C++ expression with the Triton printer's semantics:
integer `floor(a / c)` and `Mod(a, c)` print as `attncc_floordiv` / `attncc_mod` (floor
semantics; C's `/` and `%` truncate), `Load` as a bounds-checked `attncc_load` that reads 0
outside the tensor, score math in fp32 (`expf`, `logf`, literals with `f`), -inf as
`-INFINITY`, conditions as C++ bool operators, Piecewise as nested `?:`. The helpers live in
`templates/attncc_expr.cuh`, which every source that holds printed code includes first.
The dispatch and the rules the Triton printer spells alike live in `attncc.backends.expr_printer`.

`render_functions(plan)` lays a plan's mask, score mod, sink read, tile classes and per-row key
intervals out as `__host__ __device__` functions with one fixed signature per kind (see
`PrintedFunctions`), so templates call them and the host test compiles them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sympy

from attncc.backends.expr_printer import ExprPrinter
from attncc.backends.keys import capture_arg_names, param_arg
from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import (B_IDX, H_IDX, HKV, HQ, KV_IDX, LK, LQ, Q_FIRST, Q_IDX, Q_LAST,
                               SCORE, Load, Sigmoid, buffer_symbol)
from attncc.passes.row_intervals import row_intervals

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


class CudaPrinter(ExprPrinter):
    BACKEND, VARIABLE = "cuda", "C++ variable"
    TRUE, FALSE = "true", "false"
    AND, OR, NOT = "&&", "||", "(!{})"
    SELECT = "({} ? {} : {})"
    ONE, TO_FLOAT = "1.0f", "static_cast<float>({})"
    SQRT, EXP2, LOG2, FLOOR, CEIL = "sqrtf", "exp2f", "log2f", "floorf", "ceilf"
    FLOORDIV, MOD, MIN, MAX, ABS = ("attncc_floordiv", "attncc_mod", "attncc_min", "attncc_max",
                                    "attncc_abs")
    FUNCTIONS = {"exp": "expf", "log": "logf", "sin": "sinf", "cos": "cosf", "tan": "tanf",
                 "sinh": "sinhf", "cosh": "coshf", "tanh": "tanhf", "erf": "erff",
                 "Sigmoid": "attncc_sigmoid"}
    NAN, INF, NEG_INF = "NAN", "INFINITY", "(-INFINITY)"

    def _integer(self, value):
        # beyond int32 a literal must say so (the arithmetic around it is then 64-bit)
        return str(value) if -2 ** 31 < value < 2 ** 31 else f"{value}LL"

    def _finite(self, value):  # fp32: a double literal would promote the score math to double
        text = repr(value)
        return f"({text}f)" if value < 0 else f"{text}f"

    def _print_sign(self, e):
        return f"attncc_sign({self._p(e.args[0])})"

    def _print_Heaviside(self, e):  # the derivative of Max/Min: H(0) is sympy's 1/2
        at_zero = e.args[1] if len(e.args) > 1 else sympy.Rational(1, 2)
        return f"attncc_heaviside({self._p(e.args[0])}, {self._float(at_zero)})"

    def _bool(self, e) -> str:
        """A condition operand as a C++ bool (a Load of a bool tensor reads an unsigned char)."""
        text = self._p(e)
        return text if isinstance(e, sympy.logic.boolalg.Boolean) else f"static_cast<bool>({text})"

    def _print_Xor(self, e):
        out = self._bool(e.args[0])
        for a in e.args[1:]:
            out = f"({out} != {self._bool(a)})"
        return out

    # captured tensors ---------------------------------------------------------------------
    def _print_Load(self, e):
        name, index = e.args[0].name, e.args[1:]
        ptr, strides, sizes = capture_arg_names(name, len(index))
        dims = "".join(f", {self._p(i)}, {s}, {n}" for i, s, n in zip(index, strides, sizes))
        return f"attncc_load({ptr}{dims})"


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
      attncc_row_interval attncc_row<i>(int b, int h, int q_idx, int Lq, int Lk, int Hq,
                                        int Hkv, ...)                    i < n_rows
    attncc_mask is `true` without a mask, attncc_score returns `score` without a score mod.
    The kv ranges are the plan's tile classes (`plan.tiles`, closed form per query tile); the
    rows are the mask as per-row key intervals (`attncc.passes.row_intervals`; n_rows is 0
    when the mask has no such form, and a block-map builder then evaluates attncc_mask).
    """

    source: str
    arguments: tuple[tuple[str, str], ...]  # (C++ type, name) of the extra arguments
    has_mask: bool
    has_score: bool
    has_sink: bool
    n_ranges: int
    n_rows: int

    @property
    def extra_params(self) -> str:
        return _declared(self.arguments)

    @property
    def extra_args(self) -> str:
        return "".join(f", {n}" for _, n in self.arguments)


DEVICE_FN = "__host__ __device__ __forceinline__"


def render_functions(plan: KernelPlan) -> PrintedFunctions:
    """The mask, score mod, sink read, kv ranges and row intervals of `plan` as C++ functions
    (the source that holds them includes `EXPR_HEADER` first)."""
    spec = plan.spec
    printer = CudaPrinter(printer_names(spec))
    arguments = tuple(extra_arguments(spec))
    extra = _declared(arguments)
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
    rows = row_intervals(spec).pieces if spec.mask is not None else ()
    for i, row in enumerate(rows or ()):
        lines += [_comment(f"row {i}: {row.text()}"),
                  f"{DEVICE_FN} attncc_row_interval attncc_row{i}(int b, int h, int q_idx, "
                  f"{SHAPE_PARAMS}{extra}) {{",
                  f"  return attncc_row_interval{{{_cast('int', row.lo, printer)}, "
                  f"{_cast('int', row.hi, printer)}, {_cast('bool', row.cond, printer)}}};", "}"]
    return PrintedFunctions("\n".join(lines) + "\n", arguments, spec.mask is not None,
                            spec.score is not None, sink is not None, len(plan.tiles.pieces),
                            len(rows or ()))


def _declared(arguments) -> str:
    """`, int p_w, const float* cap_x_ptr, ...`: extra arguments as C++ parameters."""
    return "".join(f", {t} {n}" for t, n in arguments)


def _cast(ctype: str, e: sympy.Basic, printer: CudaPrinter) -> str:
    """`e` as `ctype`; a bound may read an int64 tensor, and brace initialisation refuses an
    implicit narrowing."""
    text = printer.doprint(e)
    literal = e.is_Integer or e in (sympy.true, sympy.false)
    return text if literal else f"static_cast<{ctype}>({text})"


def _comment(text: str) -> str:
    """`// text` on one line: a trailing backslash would continue the comment onto the code."""
    return "// " + text.replace("\n", " ").rstrip("\\ ")


def expr_header() -> str:
    """The text of the helpers' header (a dependency of every source: part of its key)."""
    return (TEMPLATES_DIR / EXPR_HEADER).read_text()
