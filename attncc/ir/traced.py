"""The values a traced function computes with: `Traced` (a symbolic int, float or bool), the
partially indexed captured tensor `_Partial`, and the table of torch functions they support.

`attncc.ir.trace` runs a function on these; every refusal here raises `TraceError` through the
active `_Context`, which names the function, the line and the construct.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from types import CodeType
from typing import Any, Callable

import sympy
import torch

from attncc.ir.derived import REDUCTIONS, Reduction
from attncc.ir.nodes import Capture, Param
from attncc.ir.symbols import RESERVED_NAMES, Load, Sigmoid, buffer_symbol


class TraceError(TypeError):
    """A mask or score function did something attncc cannot turn into an expression."""


@dataclass
class _Context:
    fn: Callable
    captures: dict[Any, Capture] = field(default_factory=dict)  # by id(tensor) / reduction
    params: dict[str, Param] = field(default_factory=dict)

    def fail(self, construct: str, hint: str, where: str | None = None) -> TraceError:
        where = where or _user_line(self.fn.__code__)
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return TraceError(f"cannot trace {name} ({where}): {construct}; {hint}")

    def capture(self, tensor: torch.Tensor) -> Capture:
        found = self.captures.get(id(tensor))
        if found is None:
            found = Capture.of(self._fresh(_closure_name(self.fn, tensor) or "t"), tensor)
            self.captures[id(tensor)] = found
        return found

    def derive(self, source: torch.Tensor, op: str, keep: int) -> Capture:
        """The captured tensor `op` of `source` over every dimension from `keep` on."""
        key = (id(source), op, keep)
        found = self.captures.get(key)
        if found is None:
            src = _closure_name(self.fn, source) or "t"
            reduction = Reduction(op, src, source.dim(), keep)
            try:
                value = reduction.apply(source)
            except RuntimeError as e:
                raise self.fail(f"`.{op}()` of a {source.dtype} captured tensor",
                                f"torch refuses it: {e}") from None
            found = Capture.of(self._fresh(f"{src}_{op}"), value, reduction=reduction,
                               source=source)
            self.captures[key] = found
        return found

    def _fresh(self, name: str) -> str:
        taken = {c.name for c in self.captures.values()}
        if name not in taken and name != "t":
            return name
        n = 0 if name == "t" else 1
        while f"{name}{n}" in taken or f"{name}_{n}" in taken:
            n += 1
        return f"{name}{n}" if name == "t" else f"{name}_{n}"


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

    def __hash__(self) -> int:
        raise _ctx().fail("a traced value used as a dict key or set member",
                          "index a captured tensor instead (torch.tensor(list)[q_idx])")

    def __len__(self) -> int:
        raise _ctx().fail("len() of a traced value", "a traced value is one scalar")

    # --- casts: int/bool -> float is exact; float -> int has no single meaning ---------------
    @property
    def dtype(self) -> torch.dtype:
        return {"int": torch.int64, "float": torch.float32, "bool": torch.bool}[self.kind]

    def float(self) -> "Traced": return self._cast("float", "float()")
    def double(self) -> "Traced": return self._cast("float", "double()")
    def long(self) -> "Traced": return self._cast("int", "long()")
    def int(self) -> "Traced": return self._cast("int", "int()")
    def bool(self) -> "Traced": return self._cast("bool", "bool()")

    def to(self, *args, **kwargs) -> "Traced":
        target = kwargs.get("dtype", args[0] if args else None)
        kind = _CASTS.get(target) if isinstance(target, (type, torch.dtype)) else None
        if kind is None or len(args) + len(kwargs) != 1:
            raise _ctx().fail(f"`.to({', '.join(map(repr, [*args, *kwargs.values()]))})` on a "
                              "traced value", "supported: .to(dtype) with dtype one of "
                              "float, int, bool, torch.float32/float64/int32/int64/bool")
        return self._cast(kind, f"to({target!r})")

    def type_as(self, other: Any) -> "Traced":
        return self._cast(_lift(other).kind, "type_as()")

    def _cast(self, kind: str, what: str) -> "Traced":
        if kind == self.kind or (kind == "float" and self.kind == "int"):
            return Traced(self.expr, kind)
        if kind == "float":  # bool -> 0.0 / 1.0
            return Traced(sympy.Piecewise((sympy.Integer(1), self.expr), (0, True)), "float")
        if kind == "bool":
            return Traced(sympy.Ne(self.expr, 0), "bool")
        if self.kind == "bool":  # bool -> 0 / 1
            return Traced(sympy.Piecewise((sympy.Integer(1), self.expr), (0, True)), "int")
        raise _ctx().fail(f"`.{what}` of a float value", "a float -> int cast rounds in a way the "
                          "kernel need not match; use torch.floor/torch.ceil (or torch.trunc) "
                          "and keep the value float")

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
    def __truediv__(self, o): return self._div(o, lambda a, b: a / b, "/", "float")
    def __rtruediv__(self, o): return self._div(o, lambda a, b: a / b, "/", "float", rev=True)
    def __floordiv__(self, o): return self._div(o, _floordiv, "//")
    def __rfloordiv__(self, o): return self._div(o, _floordiv, "//", rev=True)
    def __mod__(self, o): return self._div(o, sympy.Mod, "%")
    def __rmod__(self, o): return self._div(o, sympy.Mod, "%", rev=True)

    def _div(self, other: Any, op: Callable, sign: str, kind: str | None = None,
             rev: bool = False) -> "Traced":
        divisor = self if rev else _lift(other)
        if divisor.expr.is_zero:  # sympy would make it zoo or raise; no kernel computes that
            raise _ctx().fail(f"`{sign}` by zero (`{divisor.expr}`)",
                              "the divisor is always 0: guard it with torch.where or drop it")
        numerator = _lift(other) if rev else self
        if op is _floordiv and divisor.expr == 1 and numerator.kind != "float":
            return numerator._cast("int", "//")  # `int // 1` is itself (see `_same_kind`)
        return self._bin(other, op, kind, rev)
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
    def __eq__(self, o): return self._bin(o, _eq, "bool")  # type: ignore[override]
    def __ne__(self, o): return self._bin(o, _ne, "bool")  # type: ignore[override]

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

    # --- tensor-style methods people write on scores (the unary ones are added below) ------
    def abs(self): return abs(self)
    def clamp(self, min=None, max=None): return _call(torch.clamp, self, min, max)
    def pow(self, exponent): return self ** exponent
    def where(self, cond, other): return _where(cond, self, other)

    def __getitem__(self, item):
        raise _ctx().fail("indexing a traced value", "only captured tensors can be indexed")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _call(func, *args, **(kwargs or {}))

    def __repr__(self) -> str:
        return f"Traced({self.kind}: {self.expr})"


# `.to(dtype)` targets: kernels compute in fp32/int32-or-wider, so these casts are exact or no-ops;
# a cast to fp16/bf16 would round, which the kernel does not model: refused
_CASTS: dict[Any, str] = {float: "float", int: "int", bool: "bool", torch.float32: "float",
                          torch.float64: "float", torch.int32: "int", torch.int64: "int",
                          torch.bool: "bool"}


def _is_condition(expr: sympy.Basic) -> bool:
    return isinstance(expr, sympy.logic.boolalg.Boolean) and not expr.is_Symbol


def _eq(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    # two conditions compare as truth values (sympy.Eq of two relations would subtract them)
    if _is_condition(a) and _is_condition(b):
        return sympy.Equivalent(_as_bool(a), _as_bool(b))
    return sympy.Eq(_as_number(a), _as_number(b))


def _ne(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    if _is_condition(a) and _is_condition(b):
        return sympy.Xor(_as_bool(a), _as_bool(b))
    return sympy.Ne(_as_number(a), _as_number(b))


def _as_number(expr: sympy.Basic) -> sympy.Basic:
    """A condition compared with a number counts as 0 / 1, as torch's bool -> int does."""
    if _is_condition(expr):
        return sympy.Piecewise((sympy.Integer(1), expr), (0, True))
    return expr


def _floordiv(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return sympy.floor(a / b)


def _as_bool(expr: sympy.Basic) -> sympy.Basic:
    is_bool = isinstance(expr, sympy.logic.boolalg.Boolean) and not expr.is_Symbol
    return expr if is_bool else sympy.Ne(expr, 0)  # a Symbol is a sympy Boolean, ours are numbers


def _lift(value: Any) -> Traced:
    if isinstance(value, Traced):
        return value
    if isinstance(value, bool):
        return Traced(sympy.true if value else sympy.false, "bool")
    if isinstance(value, int):
        return Traced(sympy.Integer(value), "int")
    if isinstance(value, float):  # sympy.Float(-inf) is -oo: printed as float("-inf")
        return Traced(sympy.nan if math.isnan(value) else sympy.Float(value), "float")
    if isinstance(value, _Partial):
        raise _ctx().fail(f"a {value.tensor.dim()}-d captured tensor indexed with "
                          f"{len(value.index)} indices, used as a value",
                          "index every dimension, or reduce the rest (.sum(), .mean(), .amax(), "
                          "...)")
    if value is None:
        raise _ctx().fail("a None operand (a missing `return`?)",
                          "every path must return a value")
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return _load(value, ())  # a captured scalar: runtime data, never a constant
    raise _ctx().fail(f"a {type(value).__name__} operand",
                      "operands must be traced values, Python numbers or 0-d tensors")


def _getitem(tensor: torch.Tensor, item: Any) -> "Traced | _Partial":
    index = item if isinstance(item, tuple) else (item,)
    while index and isinstance(index[-1], slice) and index[-1] == slice(None):
        index = index[:-1]  # `buf[b, :]` is `buf[b]`
    if len(index) < tensor.dim():
        return _Partial(tensor, index)
    return _load(tensor, index)


class _Partial:
    """A captured tensor indexed in its leading dimensions only: `buf[b]` of a 2-d `buf`.

    Indexing on or reducing the remaining dimensions are the only uses; a reduction becomes a
    derived captured tensor (`attncc.ir.derived`) read at the same leading index."""

    __slots__ = ("tensor", "index")

    def __init__(self, tensor: torch.Tensor, index: tuple) -> None:
        self.tensor, self.index = tensor, index

    def __getitem__(self, item: Any) -> "Traced | _Partial":
        more = item if isinstance(item, tuple) else (item,)
        return _getitem(self.tensor, (*self.index, *more))

    def _reduce(self, op: str, dim: Any = None, keepdim: bool = False) -> Traced:
        rest = tuple(range(self.tensor.dim() - len(self.index)))
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else rest
        if sorted(d % len(rest) for d in dims) != list(rest) or keepdim:
            raise _ctx().fail(f"`.{op}(dim={dim!r}{', keepdim=True' if keepdim else ''})` of a "
                              f"captured tensor indexed in {len(self.index)} of its "
                              f"{self.tensor.dim()} dimensions",
                              "reduce every remaining dimension (no dim=), then it is one number")
        cap = _ctx().derive(self.tensor, op, len(self.index))
        return _load(cap.tensor, self.index, cap)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _call(func, *args, **(kwargs or {}))


def _reduction_method(op: str) -> Callable:
    def method(self: _Partial, dim: Any = None, keepdim: bool = False) -> Traced:
        return self._reduce(op, dim, keepdim)
    method.__name__ = op
    return method


for _op in REDUCTIONS:
    setattr(_Partial, _op, _reduction_method(_op))
_Partial.max, _Partial.min = _Partial.amax, _Partial.amin  # no dim: plain values, no indices


def _load(tensor: torch.Tensor, index: tuple, cap: Capture | None = None) -> Traced:
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
    cap = cap or ctx.capture(tensor)
    expr = Load(buffer_symbol(cap.name), *idx)
    if tensor.dtype == torch.bool:
        return Traced(sympy.Ne(expr, 0), "bool")
    return Traced(expr, "float" if tensor.dtype.is_floating_point else "int")


def _unary(op: Callable) -> Callable:
    return lambda x: Traced(op(_lift(x).expr), "float")


def _same_kind(op: Callable) -> Callable:  # floor, ceil, trunc, sign, neg keep int as int
    def apply(x: Any) -> Traced:
        x = _lift(x)
        if x.kind == "int" and op in _ROUNDING:
            # rounding an integer is the identity; sympy cannot see that a Load of an int
            # tensor is an integer, and would leave floor(Load) for the printer to call tl.floor
            # on an int64 value (no such op)
            return x
        return Traced(op(x.expr), x.kind if x.kind != "bool" else "int")
    return apply


def _trunc(x: sympy.Basic) -> sympy.Basic:
    return sympy.Piecewise((sympy.floor(x), x >= 0), (sympy.ceiling(x), True))


def _pow(a, b) -> Traced:
    return _lift(a) ** b


def _binary(method: str) -> Callable:
    return lambda a, b, **kw: getattr(_lift(a), method)(b)


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


# elementwise functions: each prints with Triton functions present in triton 3.6 and 3.9 (tl.*,
# never a libdevice name that moved) and differentiates with sympy for the backward
_UNARY: dict[str, Callable] = {
    "tanh": sympy.tanh, "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt,
    "sigmoid": Sigmoid, "exp2": lambda x: 2 ** x, "log2": lambda x: sympy.log(x) / sympy.log(2),
    "log10": lambda x: sympy.log(x) / sympy.log(10), "rsqrt": lambda x: 1 / sympy.sqrt(x),
    "log1p": lambda x: sympy.log(1 + x), "expm1": lambda x: sympy.exp(x) - 1,
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sinh": sympy.sinh,
    "cosh": sympy.cosh, "erf": sympy.erf, "reciprocal": lambda x: 1 / x,
    "square": lambda x: x ** 2, "relu": lambda x: sympy.Max(x, 0),
}
_ROUNDING = (sympy.floor, sympy.ceiling, _trunc)
_SAME_KIND: dict[str, Callable] = {
    "floor": sympy.floor, "ceil": sympy.ceiling, "trunc": _trunc, "fix": _trunc,
    "sign": sympy.sign, "neg": lambda x: -x, "negative": lambda x: -x,
}
_BINARY = {"add": "__add__", "sub": "__sub__", "subtract": "__sub__", "mul": "__mul__",
           "multiply": "__mul__", "div": "__truediv__", "divide": "__truediv__",
           "true_divide": "__truediv__", "eq": "__eq__", "ne": "__ne__", "lt": "__lt__",
           "le": "__le__", "gt": "__gt__", "ge": "__ge__"}

_TORCH_FUNCTIONS: dict[Any, Callable] = {
    **{getattr(torch, n): _unary(f) for n, f in _UNARY.items()},
    **{getattr(torch, n): _same_kind(f) for n, f in _SAME_KIND.items()},
    **{getattr(torch, n): _binary(m) for n, m in _BINARY.items() if hasattr(torch, n)},
    torch.pow: _pow, torch.float_power: _pow,
    torch.abs: lambda x: abs(_lift(x)), torch.where: _where,
    torch.minimum: _minmax(sympy.Min), torch.maximum: _minmax(sympy.Max),
    torch.clamp: _clamp, torch.clip: _clamp,
    torch.floor_divide: lambda a, b: _lift(a) // b, torch.remainder: lambda a, b: _lift(a) % b,
    torch.logical_and: lambda a, b: _lift(a) & b, torch.logical_or: lambda a, b: _lift(a) | b,
    torch.logical_not: lambda a: ~_lift(a),
    torch.Tensor.__getitem__: _getitem,
    torch.sum: lambda x, *a, **k: _as_partial(x, "sum").sum(*a, **k),
    torch.mean: lambda x, *a, **k: _as_partial(x, "mean").mean(*a, **k),
    torch.prod: lambda x, *a, **k: _as_partial(x, "prod").prod(*a, **k),
    torch.amax: lambda x, *a, **k: _as_partial(x, "amax").amax(*a, **k),
    torch.amin: lambda x, *a, **k: _as_partial(x, "amin").amin(*a, **k),
    torch.any: lambda x, *a, **k: _as_partial(x, "any").any(*a, **k),
    torch.all: lambda x, *a, **k: _as_partial(x, "all").all(*a, **k),
}

for _name, _f in [*_UNARY.items(), *_SAME_KIND.items()]:  # score.sin(), h.floor(), ...
    if not hasattr(Traced, _name):
        setattr(Traced, _name, (lambda fn: lambda self: _call(fn, self))(getattr(torch, _name)))


def _as_partial(x: Any, op: str) -> _Partial:
    if not isinstance(x, _Partial):
        raise _ctx().fail(f"torch.{op} of a {type(x).__name__}",
                          f"reduce a captured tensor indexed in its leading dimensions "
                          f"(`buf[b].{op}()`); a traced value is already one number")
    return x


def _call(func, *args, **kwargs) -> Traced:
    handler = _TORCH_FUNCTIONS.get(func)
    if handler is None:
        name = getattr(func, "__name__", repr(func))
        raise _ctx().fail(f"unsupported torch call `{name}`",
                          f"supported: {sorted(_supported_names())}")
    return handler(*args, **kwargs)


def _supported_names() -> set[str]:
    return {getattr(f, "__name__", str(f)) for f in _TORCH_FUNCTIONS}
