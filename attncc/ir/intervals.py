"""Interval arithmetic on IR expressions, vectorised over a batch of boxes.

`interval_eval(expr, env, tensors)` bounds `expr` over boxes: `env` gives every symbol, by name,
a closed interval `(lo, hi)` of broadcastable tensors (one entry per box; 0-d for scalars).
The result `(lo, hi)` is SOUND (the true range over the box lies in `[lo, hi]`) for every node
and EXACT when every input is a single point, so refining boxes down to points always decides.
Booleans are three-valued `(lo, hi)` in {0, 1}: (0, 0) false on the whole box, (1, 1) true on
the whole box, (0, 1) unknown. Point semantics are `attncc.ir.eval`'s: floor division
and `Mod` floor, `Load` reads 0 outside the tensor, bool tensors read 0 / 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import sympy
import torch
from torch import Tensor

from attncc.ir.eval import evaluate
from attncc.value_cache import ValueCache, keep
from attncc.ir.symbols import Load, Sigmoid

Interval = tuple[Tensor, Tensor]
Eval = Callable[[sympy.Basic], Interval]
Rule = Callable[[sympy.Basic, Eval, Mapping[str, Tensor]], Interval]

INF = float("inf")


def interval_eval(expr: sympy.Basic, env: Mapping[str, tuple[Tensor, Tensor]],
                  tensors: Mapping[str, Tensor],
                  known: Mapping[sympy.Basic, Interval] | None = None) -> Interval:
    """`(lo, hi)` of `expr` over the boxes of `env` (symbol name -> (lo, hi) tensors, or Python
    numbers); `tensors` are the captured tensors `Load` reads, by name. `known`: bounds of whole
    subterms, used as given (they must be sound, and exact where the box is a point): a term of
    `q_idx` alone bounded by its true min / max over a box's rows is far tighter than the rules
    applied to the hull of `q_idx`."""
    memo: dict[sympy.Basic, Interval] = dict(known or {})  # shared subterms evaluate once

    def ev(e: sympy.Basic) -> Interval:
        out = memo.get(e)
        if out is None:
            out = memo[e] = _node(e, ev, env, tensors)
        return out
    return ev(expr)


def _node(e: sympy.Basic, ev: Eval, env: Mapping, tensors: Mapping[str, Tensor]) -> Interval:
    if e.is_Symbol:
        if e.name not in env:
            raise KeyError(f"interval_eval: no interval bound for symbol {e.name!r}")
        lo, hi = env[e.name]
        return _tensor(lo), _tensor(hi)
    if e.is_Integer:
        return _point(torch.tensor(int(e), dtype=torch.int64))
    if e.is_Number or e.is_NumberSymbol:
        return _point(torch.tensor(float(e), dtype=torch.float64))
    return _rule_for(type(e))(e, ev, tensors)


def _tensor(x: Tensor | int | float) -> Tensor:
    """Python numbers as int64 / float64 (torch would make a float32 of a float)."""
    if isinstance(x, Tensor):
        return x
    return torch.tensor(x, dtype=torch.float64 if isinstance(x, float) else torch.int64)


def _point(x: Tensor) -> Interval:
    return x, x


def _rule_for(cls: type) -> Rule:
    for base in cls.__mro__:  # Eq is `Equality`, Zero is an `Integer`...: match by base class
        rule = _RULES.get(base)
        if rule is not None:
            return rule
    return _pointwise


def _is_int(x: Tensor) -> bool:
    return not x.dtype.is_floating_point


def _points(*intervals: Interval) -> Tensor:
    """bool: where every interval is a single point (the exact path applies)."""
    out = torch.tensor(True)
    for lo, hi in intervals:
        out = out & (lo == hi)
    return out


def _fdiv(a: Tensor, c: Tensor) -> Tensor:
    """floor(a / c) with torch_eval's semantics: exact integer division on integer tensors."""
    if _is_int(a) and _is_int(c):
        return torch.div(a, c, rounding_mode="floor")
    return torch.floor(a / c)


def _hull(*values: Tensor) -> Interval:
    """(min, max) of corner values: bounds of a function monotone in each argument."""
    values = torch.broadcast_tensors(*values)
    return _reduce(torch.minimum, values), _reduce(torch.maximum, values)


def _reduce(op: Callable[[Tensor, Tensor], Tensor], values) -> Tensor:
    values = list(values)
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


# --- arithmetic ---------------------------------------------------------------------------------

def _add(e, ev, tensors) -> Interval:
    parts = [ev(a) for a in e.args]
    return _reduce(torch.add, (p[0] for p in parts)), _reduce(torch.add, (p[1] for p in parts))


def _mul2(a: Interval, b: Interval) -> Interval:
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    if not all(_is_int(c) for c in corners):  # 0 * inf = nan from an unbounded factor: true 0
        corners = [torch.nan_to_num(c, nan=0.0, posinf=INF, neginf=-INF) for c in corners]
    return _hull(*corners)


def _mul(e, ev, tensors) -> Interval:
    return _reduce(_mul2, (ev(a) for a in e.args))


def _abs_interval(lo: Tensor, hi: Tensor) -> Interval:
    low = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
    return low, torch.maximum(lo.abs(), hi.abs())


def _abs(e, ev, tensors) -> Interval:
    return _abs_interval(*ev(e.args[0]))


def _reciprocal(lo: Tensor, hi: Tensor) -> Interval:
    lo, hi = lo.double(), hi.double()
    safe = (lo > 0) | (hi < 0)  # an interval holding 0 has an unbounded reciprocal
    return torch.where(safe, 1.0 / hi, -INF), torch.where(safe, 1.0 / lo, INF)


def _pow(e, ev, tensors) -> Interval:
    base, exp = e.args
    if not exp.is_Integer:
        return _pointwise(e, ev, tensors)
    n = int(exp)
    lo, hi = ev(base)
    if n == 0:
        return _point(torch.ones((), dtype=lo.dtype))
    if abs(n) % 2 == 0:  # even powers fold the sign: bound |x| first
        lo, hi = _abs_interval(lo, hi)
    if n > 0:
        return lo ** n, hi ** n
    return _reciprocal(lo.double() ** -n, hi.double() ** -n)


def _floor_division(num: Interval, den: Interval) -> Interval | None:
    """floor(num / den) for a positive divisor: monotone in each argument, so corners bound it;
    None when the divisor may be <= 0."""
    if not bool((den[0] > 0).all()):
        return None
    return _hull(*(_fdiv(n, d) for n in num for d in den))


def _floor(e, ev, tensors) -> Interval:
    num, den = e.args[0].as_numer_denom()  # floor(q/W) is stored as floor(q * W**-1)
    if den != 1:
        out = _floor_division(ev(num), ev(den))
        if out is not None:
            return out
    lo, hi = ev(e.args[0])
    return (lo, hi) if _is_int(lo) and _is_int(hi) else (torch.floor(lo), torch.floor(hi))


def _ceiling(e, ev, tensors) -> Interval:
    num, den = e.args[0].as_numer_denom()
    if den != 1:  # ceil(n / d) = -floor(-n / d)
        lo, hi = ev(num)
        out = _floor_division((-hi, -lo), ev(den))
        if out is not None:
            return -out[1], -out[0]
    lo, hi = ev(e.args[0])
    return (lo, hi) if _is_int(lo) and _is_int(hi) else (torch.ceil(lo), torch.ceil(hi))


def _mod(e, ev, tensors) -> Interval:
    (alo, ahi), (clo, chi) = ev(e.args[0]), ev(e.args[1])
    alo, ahi, clo, chi = torch.broadcast_tensors(alo, ahi, clo, chi)
    by_point = (clo == chi) & (clo > 0)
    c = torch.where(by_point, clo, torch.ones_like(clo))  # never divide by 0 on other boxes
    qlo, qhi = _fdiv(alo, c), _fdiv(ahi, c)
    # Inside one period the map is a shift: exact. Across a period boundary the residues wrap
    # around, and [0, c - 1] bounds them ([0, c] for a non-integer `a`).
    same = qlo == qhi
    top = c - 1 if _is_int(alo) and _is_int(c) else c
    rem_lo = alo - qlo * c
    lo = torch.where(same, rem_lo, torch.zeros_like(rem_lo))
    hi = torch.where(same, ahi - qhi * c, top.to(rem_lo.dtype))
    # Any other divisor: |a mod c| < |c|, with the sign of c; exact when both are points.
    m = torch.maximum(clo.abs(), chi.abs())
    other_lo = torch.where(clo > 0, torch.zeros_like(m), -m)
    other_hi = torch.where(chi < 0, torch.zeros_like(m), m)
    exact = _points((alo, ahi), (clo, chi)) & (clo != 0)
    value = torch.remainder(alo, torch.where(exact, clo, torch.ones_like(clo)))
    other_lo, other_hi = torch.where(exact, value, other_lo), torch.where(exact, value, other_hi)
    return torch.where(by_point, lo, other_lo), torch.where(by_point, hi, other_hi)


def _min(e, ev, tensors) -> Interval:
    parts = [ev(a) for a in e.args]
    return (_reduce(torch.minimum, (p[0] for p in parts)),
            _reduce(torch.minimum, (p[1] for p in parts)))


def _max(e, ev, tensors) -> Interval:
    parts = [ev(a) for a in e.args]
    return (_reduce(torch.maximum, (p[0] for p in parts)),
            _reduce(torch.maximum, (p[1] for p in parts)))


def _monotone(fn: Callable[[Tensor], Tensor]) -> Rule:
    """An increasing function maps interval ends to interval ends."""
    def rule(e, ev, tensors) -> Interval:
        lo, hi = ev(e.args[0])
        return fn(lo.double()), fn(hi.double())
    return rule


# --- booleans -----------------------------------------------------------------------------------

def _truth(always: Tensor, never: Tensor) -> Interval:
    """Three-valued result: (1, 1) where provably true, (0, 0) where provably false."""
    return always.long(), (~never).long()


def _relation(true_if: Callable, false_if: Callable) -> Rule:
    """A comparison is decided on the box when it holds (or fails) between the extreme ends."""
    def rule(e, ev, tensors) -> Interval:
        (alo, ahi), (blo, bhi) = ev(e.lhs), ev(e.rhs)
        return _truth(true_if(alo, ahi, blo, bhi), false_if(alo, ahi, blo, bhi))
    return rule


def _eq_true(alo, ahi, blo, bhi) -> Tensor:
    return (alo == ahi) & (blo == bhi) & (alo == blo)


def _eq_false(alo, ahi, blo, bhi) -> Tensor:
    return (ahi < blo) | (alo > bhi)


def _and(e, ev, tensors) -> Interval:
    return _min(e, ev, tensors)


def _or(e, ev, tensors) -> Interval:
    return _max(e, ev, tensors)


def _not(e, ev, tensors) -> Interval:
    lo, hi = ev(e.args[0])
    return 1 - hi, 1 - lo


def _xor(e, ev, tensors) -> Interval:
    parts = [ev(a) for a in e.args]
    parity = _reduce(torch.bitwise_xor, (p[0].long() for p in parts))
    known = _points(*parts)  # one unknown operand makes the parity unknown
    return torch.where(known, parity, 0), torch.where(known, parity, 1)


def _ite(e, ev, tensors) -> Interval:
    """ITE(c, a, b): a boolean Piecewise; an unknown condition joins both sides."""
    (clo, chi), (alo, ahi), (blo, bhi) = (ev(x) for x in e.args)
    lo = torch.where(clo == 1, alo, torch.where(chi == 0, blo, torch.minimum(alo, blo)))
    hi = torch.where(clo == 1, ahi, torch.where(chi == 0, bhi, torch.maximum(ahi, bhi)))
    return lo, hi


def _equivalent(e, ev, tensors) -> Interval:
    """All operands equal: Not(Xor) for two; known only where every operand is known."""
    parts = [ev(a) for a in e.args]
    first = parts[0][0].long()
    same = _reduce(torch.logical_and, (p[0].long() == first for p in parts[1:])).long()
    known = _points(*parts)
    return torch.where(known, same, 0), torch.where(known, same, 1)


def _piecewise(e, ev, tensors) -> Interval:
    """First true condition wins (torch_eval's order); an unknown condition joins both sides."""
    lo, hi = ev(e.args[-1].expr)
    for value, cond in reversed(e.args[:-1]):
        (clo, chi), (vlo, vhi) = ev(cond), ev(value)
        lo = torch.where(clo == 1, vlo, torch.where(chi == 0, lo, torch.minimum(vlo, lo)))
        hi = torch.where(clo == 1, vhi, torch.where(chi == 0, hi, torch.maximum(vhi, hi)))
    return lo, hi


def _constant(value: int) -> Rule:
    return lambda e, ev, tensors: _point(torch.tensor(value, dtype=torch.int64))


# --- loads --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RangeTable:
    """A captured tensor prepared for interval reads: values as int64 (bool, int) or float64,
    global min / max, and for 1-D tensors a sparse table `mins[k, i] = min(v[i : i + 2^k])`
    (O(n log n) once) so the min / max over any index range costs O(1)."""

    values: Tensor
    low: Tensor
    high: Tensor
    mins: Tensor | None = None
    maxs: Tensor | None = None
    log2: Tensor | None = None  # log2[n] = floor(log2(n)), exact (no float log)

    @staticmethod
    def build(tensor: Tensor) -> "RangeTable":
        values = tensor.double() if tensor.is_floating_point() else tensor.long()
        if values.numel() == 0:
            zero = torch.zeros((), dtype=values.dtype, device=values.device)
            return RangeTable(values, zero, zero)
        low, high = values.min(), values.max()
        if values.dim() != 1:
            return RangeTable(values, low, high)
        n = values.numel()
        mins, maxs = [values], [values]
        span = 1
        while 2 * span <= n:
            lo, hi = mins[-1], maxs[-1]  # the last `span` entries pad: no query reads them
            mins.append(torch.cat([torch.minimum(lo[:-span], lo[span:]), lo[-span:]]))
            maxs.append(torch.cat([torch.maximum(hi[:-span], hi[span:]), hi[-span:]]))
            span *= 2
        log2 = torch.zeros(n + 1, dtype=torch.int64, device=values.device)
        for k in range(1, len(mins)):
            log2[1 << k:] += 1
        return RangeTable(values, low, high, torch.stack(mins), torch.stack(maxs), log2)

    def read_range(self, lo: Tensor, hi: Tensor) -> Interval:
        """Bounds of `v[i]` for i in [lo, hi] of a 1-D tensor; reads outside give 0."""
        n = self.values.numel()
        lo, hi = torch.broadcast_tensors(_index(lo, n), _index(hi, n))
        zero = torch.zeros((), dtype=self.values.dtype, device=lo.device)
        if n == 0:
            return zero.expand(lo.shape), zero.expand(lo.shape)
        left, right = lo.clamp(0, n - 1), hi.clamp(0, n - 1)
        k = _gather(self.log2.to(lo.device), (right - left + 1).clamp(min=1))
        mins, maxs = self.mins.to(lo.device).view(-1), self.maxs.to(lo.device).view(-1)
        near, far = k * n + left, k * n + (right - (1 << k) + 1).clamp(min=0)
        low = torch.minimum(_gather(mins, near), _gather(mins, far))
        high = torch.maximum(_gather(maxs, near), _gather(maxs, far))
        inside = (hi >= 0) & (lo <= n - 1)
        outside = (lo < 0) | (hi > n - 1)
        low, high = torch.where(inside, low, zero), torch.where(inside, high, zero)
        return (torch.where(outside, torch.minimum(low, zero), low),
                torch.where(outside, torch.maximum(high, zero), high))

    def read(self, index: list[Interval]) -> Interval:
        """Bounds of `v[i0, i1, ...]`: exact where every index is a point, else the global
        [min, max] (and 0 where an index may leave the tensor)."""
        shape = self.values.shape
        ends = torch.broadcast_tensors(*(_index(x, n) for pair, n in zip(index, shape)
                                         for x in pair))
        los, his = ends[0::2], ends[1::2]
        inside = torch.ones_like(los[0], dtype=torch.bool)
        maybe_out = torch.zeros_like(inside)
        for lo, hi, n in zip(los, his, shape):
            inside &= (lo >= 0) & (lo < n)
            maybe_out |= (lo < 0) | (hi >= n)
        values = self.values.to(inside.device)
        zero = torch.zeros((), dtype=values.dtype, device=inside.device)
        safe = tuple(torch.where(inside, lo, 0) for lo in los)
        exact = torch.where(inside, values[safe], zero) if values.numel() else zero
        low = torch.where(maybe_out, torch.minimum(self.low, zero), self.low.to(inside.device))
        high = torch.where(maybe_out, torch.maximum(self.high, zero), self.high.to(inside.device))
        point = _points(*zip(los, his))
        return torch.where(point, exact, low), torch.where(point, exact, high)


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """`values[index]` for 1-D `values`: `gather` stays fast where advanced indexing, with more
    than one intra-op thread on a busy machine, costs milliseconds per call."""
    return values.gather(0, index.reshape(-1)).view(index.shape)


def _index(x: Tensor, n: int) -> Tensor:
    """An index end as int64 in [-1, n]: any read outside the tensor gives 0, so clamping keeps
    the meaning; float ends truncate as torch_eval's `.long()` does (monotone, so still sound)."""
    if x.dtype.is_floating_point:
        return x.clamp(-1, n).long()
    return x.long().clamp(-1, n)


_TABLES: ValueCache[RangeTable] = ValueCache(64)


def range_table(tensor: Tensor) -> RangeTable:
    """The table of `tensor`'s values, reused for an equal tensor (compared by value: writes
    through `.data` or a numpy view never move the in-place version counter)."""
    key = (tuple(tensor.shape), tensor.dtype)
    table = _TABLES.get(key, (tensor,))
    if table is None:
        kept = keep((tensor,))
        table = RangeTable.build(kept[0])  # built from the copy: the table never aliases
        _TABLES.put(key, kept, table)
    return table


def _load(e, ev, tensors) -> Interval:
    table = range_table(tensors[e.args[0].name])
    index = [ev(a) for a in e.args[1:]]
    if not index:  # a captured 0-d scalar
        return _point(table.values)
    if table.values.dim() == 1:
        return table.read_range(*index[0])
    return table.read(index)


# --- anything else ------------------------------------------------------------------------------

def _pointwise(e, ev, tensors) -> Interval:
    """No interval rule: exact at points via torch_eval, unbounded elsewhere (refinement then
    goes down to points, so it is slow but still exact)."""
    warnings.warn(f"interval_eval: no interval rule for {type(e).__name__}; boxes that hold it "
                  "are refined down to single points", stacklevel=2)
    parts = [ev(a) for a in e.args]
    dummies = [sympy.Dummy() for _ in parts]
    value = torch.as_tensor(evaluate(e.func(*dummies), {d: p[0] for d, p in zip(dummies, parts)},
                                     tensors))
    known = _points(*parts)
    if isinstance(e, sympy.logic.boolalg.Boolean):
        value = value.long()
        return torch.where(known, value, 0), torch.where(known, value, 1)
    value = value.double() if value.dtype.is_floating_point else value
    return torch.where(known, value, -INF), torch.where(known, value, INF)


_RULES: dict[type, Rule] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.Pow: _pow,
    sympy.Abs: _abs,
    sympy.Min: _min,
    sympy.Max: _max,
    sympy.floor: _floor,
    sympy.ceiling: _ceiling,
    sympy.Mod: _mod,
    sympy.exp: _monotone(torch.exp),
    sympy.log: _monotone(torch.log),
    sympy.tanh: _monotone(torch.tanh),
    Sigmoid: _monotone(torch.sigmoid),
    Load: _load,
    sympy.Piecewise: _piecewise,
    sympy.Lt: _relation(lambda alo, ahi, blo, bhi: ahi < blo,
                        lambda alo, ahi, blo, bhi: alo >= bhi),
    sympy.Le: _relation(lambda alo, ahi, blo, bhi: ahi <= blo,
                        lambda alo, ahi, blo, bhi: alo > bhi),
    sympy.Gt: _relation(lambda alo, ahi, blo, bhi: alo > bhi,
                        lambda alo, ahi, blo, bhi: ahi <= blo),
    sympy.Ge: _relation(lambda alo, ahi, blo, bhi: alo >= bhi,
                        lambda alo, ahi, blo, bhi: ahi < blo),
    sympy.Eq: _relation(_eq_true, _eq_false),
    sympy.Ne: _relation(_eq_false, _eq_true),
    sympy.And: _and,
    sympy.Or: _or,
    sympy.Not: _not,
    sympy.Xor: _xor,
    sympy.ITE: _ite,
    sympy.Equivalent: _equivalent,
    type(sympy.true): _constant(1),
    type(sympy.false): _constant(0),
}
