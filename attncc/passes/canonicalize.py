"""Canonicalize: put every mask atom in the form the tile classifier reads.

Requires: a verified spec.
Ensures: the mask means the same; `Abs` bounds are split into two relations, and every relation
that is linear in `kv_idx` (or in `floor(kv_idx / c)`, c > 0) reads `kv_idx <= bound` or
`kv_idx >= bound` with an integer bound free of `kv_idx`; every other relation faces one way
(`a >= b` reads `b <= a`, `a > b` reads `b < a`; `==` and `!=` put their sides in sympy's sort
order), so spellings of one mask get one canonical text and one key. Rules are a table run to a
fixed point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
from sympy.core.relational import Relational

from attncc.ir.nodes import Mask
from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import KV_IDX

Rule = Callable[[sympy.Basic], sympy.Basic | None]


def _split_abs(atom: sympy.Basic) -> sympy.Basic | None:
    """`|x| <= w` -> `x <= w & -x <= w` (and `<`)."""
    if isinstance(atom, (sympy.Le, sympy.Lt)) and isinstance(atom.lhs, sympy.Abs):
        x, rel = atom.lhs.args[0], type(atom)
        return sympy.And(rel(x, atom.rhs), rel(-x, atom.rhs))
    if isinstance(atom, (sympy.Ge, sympy.Gt)) and isinstance(atom.rhs, sympy.Abs):
        x, rel = atom.rhs.args[0], {sympy.Ge: sympy.Le, sympy.Gt: sympy.Lt}[type(atom)]
        return sympy.And(rel(x, atom.lhs), rel(-x, atom.lhs))
    return None


def _kv_term(expr: sympy.Basic) -> tuple[sympy.Basic, int] | None:
    """`(T, sign)` if `expr = sign * T + rest` with T = kv_idx or floor(kv_idx / c), rest free
    of kv_idx; None otherwise."""
    hits = [t for t in sympy.Add.make_args(expr) if t.has(KV_IDX)]
    if len(hits) != 1:
        return None
    coeff, term = hits[0].as_coeff_Mul()
    if coeff not in (1, -1):
        return None
    if term == KV_IDX:
        return term, int(coeff)
    if isinstance(term, sympy.floor):
        num, den = term.args[0].as_numer_denom()
        if num == KV_IDX and den.is_positive and den.is_integer and not den.has(KV_IDX):
            return term, int(coeff)
    return None


def _solve_for_kv(atom: sympy.Basic) -> sympy.Basic | None:
    """`f(q) REL g(kv)` -> `kv_idx <= bound` / `kv_idx >= bound` (both for `==`)."""
    if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt, sympy.Eq)):
        return None
    if not atom.has(KV_IDX) or (atom.lhs == KV_IDX and not atom.rhs.has(KV_IDX)
                                and isinstance(atom, (sympy.Le, sympy.Ge))):
        return None
    diff = sympy.expand(atom.lhs - atom.rhs)  # relation reads `diff REL 0`
    found = _kv_term(diff)
    if found is None:
        return None
    term, sign = found
    bound = -sign * (diff - sign * term)  # term REL' bound
    if not bound.is_integer:
        return None
    flip = sign < 0
    upper = {sympy.Le: not flip, sympy.Lt: not flip, sympy.Ge: flip, sympy.Gt: flip}
    strict = isinstance(atom, (sympy.Lt, sympy.Gt))
    if isinstance(atom, sympy.Eq):
        return sympy.And(_bound(term, bound, True, False), _bound(term, bound, False, False))
    return _bound(term, bound, upper[type(atom)], strict)


def _bound(term: sympy.Basic, bound: sympy.Basic, upper: bool, strict: bool) -> sympy.Basic:
    """`term <= bound` (upper) or `term >= bound`, rewritten on kv_idx itself."""
    if strict:
        bound = bound - 1 if upper else bound + 1
    if term != KV_IDX:  # floor(kv / c) <= B  <=>  kv <= c*B + c - 1 ; >= B <=> kv >= c*B
        c = term.args[0].as_numer_denom()[1]
        bound = c * bound + c - 1 if upper else c * bound
    return sympy.Le(KV_IDX, bound) if upper else sympy.Ge(KV_IDX, bound)


def _orient(atom: sympy.Basic) -> sympy.Basic | None:
    """`a >= b` -> `b <= a`, `a > b` -> `b < a`; `b == a` -> `a == b` (and `!=`) when `a` sorts
    first. sympy keeps the orientation it was given (`q_idx >= h` and `h <= q_idx` are
    different trees), so without this two spellings of one mask get two keys. The `kv_idx`
    bounds solve-for-kv makes (`kv_idx >= bound`) are the form the tile classifier reads: kept.
    """
    if atom.lhs == KV_IDX and isinstance(atom, sympy.Ge) and not atom.rhs.has(KV_IDX):
        return None
    if isinstance(atom, (sympy.Ge, sympy.Gt)):
        return {sympy.Ge: sympy.Le, sympy.Gt: sympy.Lt}[type(atom)](atom.rhs, atom.lhs)
    if isinstance(atom, (sympy.Eq, sympy.Ne)):
        lhs, rhs = sorted(atom.args, key=sympy.default_sort_key)
        if (lhs, rhs) != tuple(atom.args):
            return type(atom)(lhs, rhs, evaluate=False)
    return None


RULES: tuple[tuple[str, Rule], ...] = (
    ("split-abs", _split_abs),
    ("solve-for-kv", _solve_for_kv),
    ("orient", _orient),
)


def rewrite(expr: sympy.Basic, rules: tuple[tuple[str, Rule], ...] = RULES,
            limit: int = 32) -> sympy.Basic:
    """Apply `rules` bottom-up to every relational atom until nothing changes."""
    for _ in range(limit):
        changed = False

        def visit(e: sympy.Basic) -> sympy.Basic:
            nonlocal changed
            if isinstance(e, Relational):
                for _, rule in rules:
                    out = rule(e)
                    if out is not None and out != e:
                        changed = True
                        return out
                return e
            if isinstance(e, (sympy.And, sympy.Or, sympy.Not)):
                return e.func(*(visit(a) for a in e.args))
            return e

        expr = visit(expr)
        if not changed:
            return expr
    raise RuntimeError(f"canonicalize: rewrite rules did not reach a fixed point on {expr}")


@dataclass(frozen=True)
class Canonicalize:
    name: str = "canonicalize"

    def __call__(self, spec: AttentionSpec) -> AttentionSpec:
        if spec.mask is None:
            return spec
        m = spec.mask
        return spec.replace(mask=Mask(rewrite(m.expr), m.params, m.captures, m.tag))
