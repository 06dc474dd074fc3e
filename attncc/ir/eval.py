"""Evaluate IR expressions with PyTorch tensors (the reference backend's interpreter).

`evaluate(expr, env, loads)` maps each sympy node to the torch op with the same meaning:
`floor(a/c)` and `Mod` use floor semantics (Python's), `Load` reads 0 outside the tensor
(the defined semantics, see `attncc.ir.symbols.Load`), and everything broadcasts.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.ir.symbols import Load, Sigmoid

Value = torch.Tensor | int | float | bool


def _t(x: Value, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    device = like.device if like is not None else None
    return torch.tensor(x, device=device)


def _is_int(x: Value) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.dtype.is_floating_point and x.dtype != torch.bool
    return isinstance(x, int) and not isinstance(x, bool)


def _floor_div(a: Value, c: Value) -> Value:
    if _is_int(a) and _is_int(c):
        if isinstance(a, int) and isinstance(c, int):
            return a // c
        return torch.div(_t(a), _t(c), rounding_mode="floor")
    return torch.floor(_t(a) / _t(c))


def _mod(a: Value, c: Value) -> Value:
    if isinstance(a, int) and isinstance(c, int):
        return a % c
    return torch.remainder(_t(a), _t(c))


def _load(args: list[Value], tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    tensor = tensors[name]
    if not args:
        return tensor
    index = [_t(i).long() for i in args]
    index = torch.broadcast_tensors(*index)
    inside = torch.ones_like(index[0], dtype=torch.bool)
    for i, size in zip(index, tensor.shape):
        inside &= (i >= 0) & (i < size)
    safe = [torch.where(inside, i, 0).to(tensor.device) for i in index]
    values = tensor[tuple(safe)]
    return torch.where(inside.to(tensor.device), values, torch.zeros((), dtype=tensor.dtype,
                                                                     device=tensor.device))


def _piecewise(pairs: list[tuple[Value, Value]]) -> Value:
    value, _ = pairs[-1]
    for v, cond in reversed(pairs[:-1]):
        value = torch.where(_t(cond).bool(), _t(v), _t(value))
    return value


def _reduce(op: Callable, values: list[Value]) -> Value:
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _min(a: Value, b: Value) -> Value:
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return min(a, b)
    return torch.minimum(_t(a), _t(b))


def _max(a: Value, b: Value) -> Value:
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return max(a, b)
    return torch.maximum(_t(a), _t(b))


def _pow(base: Value, exp: Value) -> Value:
    if isinstance(exp, int) and exp == -1:
        return 1.0 / (_t(base).double() if _is_int(base) or not isinstance(base, torch.Tensor)
                      else base)
    if isinstance(base, torch.Tensor) or isinstance(exp, torch.Tensor):
        return torch.pow(_t(base).double() if _is_int(base) else _t(base), _t(exp))
    return torch.tensor(float(base) ** float(exp), dtype=torch.float64)


def evaluate(expr: sympy.Basic, env: Mapping[sympy.Symbol, Value],
             tensors: Mapping[str, torch.Tensor]) -> Value:
    """Value of `expr` with symbols from `env` and captured tensors from `tensors` (by name)."""
    def ev(e: sympy.Basic) -> Value:
        if e.is_Symbol:
            if e not in env:
                raise KeyError(f"no value bound for symbol {e}")
            return env[e]
        if e is sympy.true or e is sympy.false:
            return bool(e)
        if e.is_Integer:
            return int(e)
        if e is sympy.zoo:
            raise NotImplementedError("reference evaluator: complex infinity (a division by "
                                      "zero) has no value")
        if e.is_number:  # fp64, so `0.1 * kv_idx` on int64 indices is not computed in fp32;
            # -oo, nan and pi (erf's derivative) included
            return torch.tensor(float(e), dtype=torch.float64)
        if isinstance(e, Load):
            return _load([ev(a) for a in e.args[1:]], tensors, e.args[0].name)
        if isinstance(e, sympy.floor):
            inner = e.args[0]
            num, den = inner.as_numer_denom()
            if den != 1 and num.is_integer and den.is_integer:
                return _floor_div(ev(num), ev(den))
            return torch.floor(_t(ev(inner)))
        if isinstance(e, sympy.ceiling):  # ceil(x) = -floor(-x)
            return -ev(sympy.floor(-e.args[0]))
        if isinstance(e, sympy.Piecewise):
            return _piecewise([(ev(v), ev(c)) for v, c in e.args])
        args = [ev(a) for a in e.args]
        op = _OPS.get(type(e))
        if op is None:
            for base, fn in _OPS.items():
                if isinstance(e, base):
                    op = fn
                    break
        if op is None:
            raise NotImplementedError(f"reference evaluator: no rule for {type(e).__name__}")
        return op(args)
    return ev(expr)


def _fl(x: Value) -> torch.Tensor:
    """`x` as a float tensor: integer indices (`torch.sin(b)`) compute in fp64, like numbers."""
    t = _t(x)
    return t.double() if not t.dtype.is_floating_point else t


def _heaviside(x: torch.Tensor, at_zero: Value) -> torch.Tensor:
    return torch.heaviside(x, _fl(at_zero).to(x.dtype))


def _and(a: list[Value]) -> Value:
    return _reduce(lambda x, y: _t(x).bool() & _t(y).bool(), a)


def _or(a: list[Value]) -> Value:
    return _reduce(lambda x, y: _t(x).bool() | _t(y).bool(), a)


_OPS: dict[type, Callable[[list[Value]], Value]] = {
    sympy.Add: lambda a: _reduce(lambda x, y: x + y, a),
    sympy.Mul: lambda a: _reduce(lambda x, y: x * y, a),
    sympy.Pow: lambda a: _pow(a[0], a[1]),
    sympy.Mod: lambda a: _mod(a[0], a[1]),
    sympy.Min: lambda a: _reduce(_min, a),
    sympy.Max: lambda a: _reduce(_max, a),
    sympy.Abs: lambda a: abs(a[0]),
    sympy.exp: lambda a: torch.exp(_fl(a[0])),
    sympy.log: lambda a: torch.log(_fl(a[0])),
    sympy.tanh: lambda a: torch.tanh(_fl(a[0])),
    Sigmoid: lambda a: torch.sigmoid(_fl(a[0])),
    sympy.sin: lambda a: torch.sin(_fl(a[0])),
    sympy.cos: lambda a: torch.cos(_fl(a[0])),
    sympy.tan: lambda a: torch.tan(_fl(a[0])),
    sympy.sinh: lambda a: torch.sinh(_fl(a[0])),
    sympy.cosh: lambda a: torch.cosh(_fl(a[0])),
    sympy.erf: lambda a: torch.erf(_fl(a[0])),
    sympy.sign: lambda a: torch.sign(_t(a[0])),
    sympy.Heaviside: lambda a: _heaviside(_fl(a[0]), a[1] if len(a) > 1 else 0.5),
    sympy.Eq: lambda a: _t(a[0]) == _t(a[1]),
    sympy.Ne: lambda a: _t(a[0]) != _t(a[1]),
    sympy.Lt: lambda a: _t(a[0]) < _t(a[1]),
    sympy.Le: lambda a: _t(a[0]) <= _t(a[1]),
    sympy.Gt: lambda a: _t(a[0]) > _t(a[1]),
    sympy.Ge: lambda a: _t(a[0]) >= _t(a[1]),
    sympy.And: _and,
    sympy.Or: _or,
    sympy.Not: lambda a: ~_t(a[0]).bool(),
    sympy.Xor: lambda a: _reduce(lambda x, y: _t(x).bool() ^ _t(y).bool(), a),
    # sympy folds a boolean-valued Piecewise (a torch.where compared inside a condition) into
    # ITE(c, a, b), and `==` of two conditions into Equivalent
    sympy.ITE: lambda a: torch.where(_t(a[0]).bool(), _t(a[1]).bool(), _t(a[2]).bool()),
    sympy.Equivalent: lambda a: _reduce(lambda x, y: _t(x).bool() == _t(y).bool(), a),
}


def feature_map(x: Tensor, name: str) -> Tensor:
    """The linear family's feature map phi (`LinearState.feature_map`) applied on the last axis: identity, elu1 (elu(x) + 1), taylor2 ([1, x, x(x)x/sqrt 2])."""
    if name == "identity":
        return x
    if name == "elu1":
        return F.elu(x) + 1
    if name == "taylor2":
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)
    raise ValueError(f"feature_map: expected one of identity, elu1, taylor2, got {name!r}")
