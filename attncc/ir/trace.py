"""Tracing FlexAttention-style `mask_mod(b, h, q_idx, kv_idx)` and `score_mod(score, ...)`.

The function runs once with `Traced` stand-ins: Python operators and the torch calls listed in
`_TORCH_FUNCTIONS` build a sympy expression; indexing a captured tensor with traced indices
becomes a `Load`. Anything that needs a concrete value (`if`, `and`, `.item()`, `int()`, an
unsupported torch call) raises `TraceError` naming the function, the line and the construct.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from types import CodeType
from typing import Any, Callable

import sympy
import torch

from attncc.ir.nodes import Capture, Mask, Param, ScoreMod
from attncc.ir.symbols import (B_IDX, H_IDX, KV_IDX, Q_IDX, RESERVED_NAMES, SCORE, Load,
                               Sigmoid, buffer_symbol)


class TraceError(TypeError):
    """A mask or score function did something attncc cannot turn into an expression."""


@dataclass
class _Context:
    fn: Callable
    captures: dict[int, Capture] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)

    def fail(self, construct: str, hint: str) -> TraceError:
        where = _user_line(self.fn.__code__)
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return TraceError(f"cannot trace {name} ({where}): {construct}; {hint}")

    def capture(self, tensor: torch.Tensor) -> Capture:
        found = self.captures.get(id(tensor))
        if found is None:
            name = _closure_name(self.fn, tensor) or f"t{len(self.captures)}"
            found = Capture.of(name, tensor)
            self.captures[id(tensor)] = found
        return found


_active: list[_Context] = []


def _ctx() -> _Context:
    return _active[-1]


def _user_line(code: CodeType) -> str:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return f"{code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return f"{code.co_filename}:{code.co_firstlineno}"


def _closure_name(fn: Callable, tensor: torch.Tensor) -> str | None:
    cells = dict(zip(fn.__code__.co_freevars, [c.cell_contents for c in fn.__closure__ or ()]))
    for name, value in (*cells.items(), *fn.__globals__.items()):
        if value is tensor and name.isidentifier() and name not in RESERVED_NAMES:
            return name
    return None


class Traced:
    """A symbolic int, float or bool flowing through a traced function."""

    __slots__ = ("expr", "kind")

    def __init__(self, expr: sympy.Basic, kind: str) -> None:
        self.expr, self.kind = expr, kind

    # --- conversions that need a concrete value -------------------------------------------
    def __bool__(self) -> bool:
        raise _ctx().fail("Python control flow (`if`, `and`, `or`, `not`) on a traced value",
                          "use `&`, `|`, `~` or torch.where")

    def __index__(self) -> int:
        raise _ctx().fail("a traced value used as a Python integer",
                          "index captured tensors with traced values directly")

    def __int__(self) -> int:
        raise _ctx().fail("int() of a traced value", "keep the value symbolic")

    def __float__(self) -> float:
        raise _ctx().fail("float() or a math.* call on a traced value",
                          "use the torch function instead (torch.tanh, torch.exp, ...)")

    def item(self) -> Any:
        raise _ctx().fail(".item() on a traced value", "keep the value symbolic")

    # --- arithmetic -----------------------------------------------------------------------
    def _bin(self, other: Any, op: Callable, kind: str | None = None, rev: bool = False):
        o = _lift(other)
        a, b = (o, self) if rev else (self, o)
        out_kind = kind or ("int" if a.kind in ("int", "bool") and b.kind in ("int", "bool")
                            else "float")
        return Traced(op(a.expr, b.expr), out_kind)

    def __add__(self, o): return self._bin(o, lambda a, b: a + b)
    def __radd__(self, o): return self._bin(o, lambda a, b: a + b, rev=True)
    def __sub__(self, o): return self._bin(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._bin(o, lambda a, b: a - b, rev=True)
    def __mul__(self, o): return self._bin(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._bin(o, lambda a, b: a * b, rev=True)
    def __truediv__(self, o): return self._bin(o, lambda a, b: a / b, "float")
    def __rtruediv__(self, o): return self._bin(o, lambda a, b: a / b, "float", rev=True)
    def __floordiv__(self, o): return self._bin(o, _floordiv)
    def __rfloordiv__(self, o): return self._bin(o, _floordiv, rev=True)
    def __mod__(self, o): return self._bin(o, sympy.Mod)
    def __rmod__(self, o): return self._bin(o, sympy.Mod, rev=True)
    def __pow__(self, o): return self._bin(o, lambda a, b: a ** b, "float")
    def __rpow__(self, o): return self._bin(o, lambda a, b: a ** b, "float", rev=True)
    def __neg__(self): return Traced(-self.expr, self.kind)
    def __pos__(self): return self
    def __abs__(self): return Traced(sympy.Abs(self.expr), self.kind)

    # --- comparisons and logic ------------------------------------------------------------
    def __lt__(self, o): return self._bin(o, sympy.Lt, "bool")
    def __le__(self, o): return self._bin(o, sympy.Le, "bool")
    def __gt__(self, o): return self._bin(o, sympy.Gt, "bool")
    def __ge__(self, o): return self._bin(o, sympy.Ge, "bool")
    def __eq__(self, o): return self._bin(o, sympy.Eq, "bool")  # type: ignore[override]
    def __ne__(self, o): return self._bin(o, sympy.Ne, "bool")  # type: ignore[override]
    __hash__ = None  # type: ignore[assignment]

    def _logic(self, o: Any, op: Callable, rev: bool = False) -> "Traced":
        a, b = (_lift(o), self) if rev else (self, _lift(o))
        for side in (a, b):
            if side.kind != "bool":
                raise _ctx().fail(f"`&`, `|` or `^` on a {side.kind} value",
                                  "these combine boolean conditions only")
        return Traced(op(_as_bool(a.expr), _as_bool(b.expr)), "bool")

    def __and__(self, o): return self._logic(o, sympy.And)
    def __rand__(self, o): return self._logic(o, sympy.And, rev=True)
    def __or__(self, o): return self._logic(o, sympy.Or)
    def __ror__(self, o): return self._logic(o, sympy.Or, rev=True)
    def __xor__(self, o): return self._logic(o, sympy.Xor)
    def __rxor__(self, o): return self._logic(o, sympy.Xor, rev=True)

    def __invert__(self) -> "Traced":
        if self.kind != "bool":
            raise _ctx().fail("`~` on a non-boolean value", "bitwise not is not supported")
        return Traced(sympy.Not(_as_bool(self.expr)), "bool")

    # --- tensor-style methods people write on scores --------------------------------------
    def tanh(self): return _call(torch.tanh, self)
    def exp(self): return _call(torch.exp, self)
    def log(self): return _call(torch.log, self)
    def abs(self): return abs(self)
    def sigmoid(self): return _call(torch.sigmoid, self)
    def sqrt(self): return _call(torch.sqrt, self)
    def clamp(self, min=None, max=None): return _call(torch.clamp, self, min, max)

    def __getitem__(self, item):
        raise _ctx().fail("indexing a traced value", "only captured tensors can be indexed")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _call(func, *args, **(kwargs or {}))

    def __repr__(self) -> str:
        return f"Traced({self.kind}: {self.expr})"


def _floordiv(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return sympy.floor(a / b)


def _as_bool(expr: sympy.Basic) -> sympy.Basic:
    return expr if isinstance(expr, sympy.logic.boolalg.Boolean) else sympy.Ne(expr, 0)


def _lift(value: Any) -> Traced:
    if isinstance(value, Traced):
        return value
    if isinstance(value, bool):
        return Traced(sympy.true if value else sympy.false, "bool")
    if isinstance(value, int):
        return Traced(sympy.Integer(value), "int")
    if isinstance(value, float):
        return Traced(sympy.Float(value), "float")
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return _load(value, ())  # a captured scalar: runtime data, never a constant
    raise _ctx().fail(f"a {type(value).__name__} operand",
                      "operands must be traced values, Python numbers or 0-d tensors")


def _load(tensor: torch.Tensor, index: tuple) -> Traced:
    ctx = _ctx()
    if tensor.dim() != len(index):
        raise ctx.fail(f"a {tensor.dim()}-d captured tensor indexed with {len(index)} indices",
                       "index every dimension with one scalar index (no slices)")
    idx = []
    for i in index:
        t = _lift(i)
        if t.kind != "int":
            raise ctx.fail(f"a captured tensor indexed with a {t.kind} value",
                           "indices must be integer expressions")
        idx.append(t.expr)
    cap = ctx.capture(tensor)
    expr = Load(buffer_symbol(cap.name), *idx)
    if tensor.dtype == torch.bool:
        return Traced(sympy.Ne(expr, 0), "bool")
    return Traced(expr, "float" if tensor.dtype.is_floating_point else "int")


def _unary(op: Callable) -> Callable:
    return lambda x: Traced(op(_lift(x).expr), "float")


def _where(cond, a, b) -> Traced:
    c, x, y = _lift(cond), _lift(a), _lift(b)
    kind = "float" if "float" in (x.kind, y.kind) else x.kind
    return Traced(sympy.Piecewise((x.expr, _as_bool(c.expr)), (y.expr, True)), kind)


def _minmax(op: Callable) -> Callable:
    def apply(a, b) -> Traced:
        x, y = _lift(a), _lift(b)
        return Traced(op(x.expr, y.expr), "int" if x.kind == y.kind == "int" else "float")
    return apply


def _clamp(x, min=None, max=None) -> Traced:
    out = _lift(x)
    if min is not None:
        out = _minmax(sympy.Max)(out, min)
    if max is not None:
        out = _minmax(sympy.Min)(out, max)
    return out


_TORCH_FUNCTIONS: dict[Any, Callable] = {
    torch.tanh: _unary(sympy.tanh), torch.exp: _unary(sympy.exp), torch.log: _unary(sympy.log),
    torch.sqrt: _unary(sympy.sqrt), torch.sigmoid: _unary(Sigmoid),
    torch.exp2: _unary(lambda x: 2 ** x), torch.log2: _unary(lambda x: sympy.log(x) / sympy.log(2)),
    torch.rsqrt: _unary(lambda x: 1 / sympy.sqrt(x)),
    torch.abs: lambda x: abs(_lift(x)), torch.where: _where,
    torch.minimum: _minmax(sympy.Min), torch.maximum: _minmax(sympy.Max),
    torch.clamp: _clamp, torch.clip: _clamp,
    torch.floor_divide: lambda a, b: _lift(a) // b, torch.remainder: lambda a, b: _lift(a) % b,
    torch.logical_and: lambda a, b: _lift(a) & b, torch.logical_or: lambda a, b: _lift(a) | b,
    torch.logical_not: lambda a: ~_lift(a),
    torch.Tensor.__getitem__: lambda t, i: _load(t, i if isinstance(i, tuple) else (i,)),
}


def _call(func, *args, **kwargs) -> Traced:
    handler = _TORCH_FUNCTIONS.get(func)
    if handler is None:
        name = getattr(func, "__name__", repr(func))
        raise _ctx().fail(f"unsupported torch call `{name}`",
                          f"supported: {sorted(_supported_names())}")
    return handler(*args, **kwargs)


def _supported_names() -> set[str]:
    return {getattr(f, "__name__", str(f)) for f in _TORCH_FUNCTIONS}


def _run(fn: Callable, args: tuple[Traced, ...]) -> tuple[Traced, _Context]:
    ctx = _Context(fn)
    _active.append(ctx)
    try:
        result = fn(*args)
        return _lift(result) if not isinstance(result, Traced) else result, ctx
    finally:
        _active.pop()


def _index_args() -> tuple[Traced, ...]:
    return tuple(Traced(s, "int") for s in (B_IDX, H_IDX, Q_IDX, KV_IDX))


def _check_arity(fn: Callable, expected: int, kind: str) -> None:
    try:
        n = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return
    if n != expected:
        names = "(b, h, q_idx, kv_idx)" if expected == 4 else "(score, b, h, q_idx, kv_idx)"
        raise TypeError(f"{kind} {getattr(fn, '__qualname__', fn)}: expected a function of "
                        f"{names}, got one taking {n} arguments")


def trace_mask(fn: Callable) -> Mask:
    """Trace `fn(b, h, q_idx, kv_idx) -> bool` into a Mask."""
    _check_arity(fn, 4, "mask_mod")
    result, ctx = _run(fn, _index_args())
    if result.kind != "bool":
        raise TypeError(f"mask_mod {fn.__qualname__}: expected a boolean expression, got "
                        f"a value of kind {result.kind!r}: `{result.expr}`")
    return Mask(result.expr, tuple(ctx.params.values()), tuple(ctx.captures.values()),
                _tag(fn))


def trace_score(fn: Callable) -> ScoreMod:
    """Trace `fn(score, b, h, q_idx, kv_idx) -> float` into a ScoreMod."""
    _check_arity(fn, 5, "score_mod")
    result, ctx = _run(fn, (Traced(SCORE, "float"), *_index_args()))
    if result.kind == "bool":
        raise TypeError(f"score_mod {fn.__qualname__}: expected a numeric expression, got a "
                        f"boolean `{result.expr}` (did you mean a mask_mod?)")
    return ScoreMod(result.expr, tuple(ctx.params.values()), tuple(ctx.captures.values()),
                    _tag(fn))


def _tag(fn: Callable) -> str:
    name = getattr(fn, "__name__", "custom")
    return name if name.isidentifier() and name != "<lambda>" else "custom"
