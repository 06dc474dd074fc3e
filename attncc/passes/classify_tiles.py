"""Classify tiles: derive, from the symbolic mask, each query tile's empty/partial/full kv tiles.

Requires: a canonical spec (atoms read `kv_idx <= bound` / `kv_idx >= bound`).
Ensures: `TileClasses` whose pieces are sound: a tile reported empty has no allowed pair and a
tile reported full has only allowed pairs. For a conjunction of monotone bounds (M1–M3, M5–M8,
M11 from cu_seqlens, and their combinations) the classification is also exact. Nothing is
evaluated on an Lq x Lk grid: bounds are taken at the tile's first and last query row (interval
reasoning, since every bound is non-decreasing in q_idx). A bound may read a captured tensor
marked `nondecreasing` at `q_idx` (M11's `doc_start[q_idx]`): the kernel then loads two values
per query tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import KV_IDX, LK, Q_FIRST, Q_IDX, Q_LAST, Load
from attncc.ir.tiles import KvRange, TileClasses

MAX_PIECES = 8  # beyond this the union loop costs more than it saves: merge into a hull


def is_nondecreasing(expr: sympy.Basic, x: sympy.Symbol = Q_IDX,
                     monotone: frozenset[str] = frozenset()) -> bool:
    """Structural proof that `expr` never decreases as `x` grows (False means 'not proven').

    `monotone`: names of 1-d captures whose values never decrease along their dimension."""
    if not expr.has(x):
        return True
    if expr == x:
        return True
    if isinstance(expr, (sympy.Add, sympy.Min, sympy.Max)):
        return all(is_nondecreasing(a, x, monotone) for a in expr.args)
    if isinstance(expr, sympy.Mul):
        varying = [a for a in expr.args if a.has(x)]
        constant = sympy.Mul(*(a for a in expr.args if not a.has(x)))
        return (len(varying) == 1 and constant.is_nonnegative is True
                and is_nondecreasing(varying[0], x, monotone))
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        return is_nondecreasing(expr.args[0], x, monotone)
    if isinstance(expr, Load):
        # Only at q_idx itself: `check_captures` then guarantees len >= Lq, so no read falls
        # outside the tensor, where Load gives 0 and the order would break.
        return expr.args[0].name in monotone and expr.args[1:] == (Q_IDX,) and x == Q_IDX
    return False


def _piece(conjunction: sympy.Basic, monotone: frozenset[str] = frozenset()) -> KvRange | None:
    lows, highs, guards, exact = [sympy.Integer(0)], [LK - 1], [], True
    for atom in sympy.And.make_args(conjunction):
        if atom is sympy.true:
            continue
        if atom is sympy.false:
            return None
        if not atom.has(KV_IDX, Q_IDX):
            guards.append(atom)  # depends on b, h, params or per-head loads only
            continue
        bound = _kv_bound(atom, monotone)
        if bound is None:
            exact = False  # an extra condition: tiles can be partial, never full
            continue
        (highs if bound[0] == "upper" else lows).append(bound[1])
    lo, hi = sympy.Max(*lows), sympy.Min(*highs)
    return KvRange(some_lo=lo.xreplace({Q_IDX: Q_FIRST}), some_hi=hi.xreplace({Q_IDX: Q_LAST}),
                   all_lo=lo.xreplace({Q_IDX: Q_LAST}), all_hi=hi.xreplace({Q_IDX: Q_FIRST}),
                   guard=sympy.And(*guards), exact=exact)


def _kv_bound(atom: sympy.Basic, monotone: frozenset[str] = frozenset()
              ) -> tuple[str, sympy.Basic] | None:
    if not isinstance(atom, (sympy.Le, sympy.Ge)) or atom.lhs != KV_IDX:
        return None
    bound = atom.rhs
    if bound.has(KV_IDX) or any(ld.args[0].name not in monotone for ld in bound.atoms(Load)):
        return None
    if not is_nondecreasing(bound, Q_IDX, monotone):
        return None
    return ("upper" if isinstance(atom, sympy.Le) else "lower", bound)


def _hull(pieces: list[KvRange]) -> KvRange:
    return KvRange(sympy.Min(*(p.some_lo for p in pieces)), sympy.Max(*(p.some_hi for p in pieces)),
                   sympy.Integer(0), sympy.Integer(-1), sympy.Or(*(p.guard for p in pieces)),
                   exact=False)


def classify(spec: AttentionSpec) -> TileClasses:
    """Tile classes of `spec.mask` (all pairs allowed when there is no mask)."""
    if spec.mask is None:
        return TileClasses((_piece(sympy.true),))
    monotone = frozenset(c.name for c in spec.captures if c.nondecreasing)
    dnf = sympy.to_dnf(spec.mask.expr, simplify=False)
    pieces: list[KvRange] = []
    # sympy keeps an Or's arguments in hash order, which PYTHONHASHSEED changes: sorted,
    # the pieces (and so the rendered source and its tile order) are the same in every
    # process
    for conjunction in sorted(sympy.Or.make_args(dnf), key=sympy.default_sort_key):
        piece = _piece(conjunction, monotone)
        if piece is not None and piece not in pieces:
            pieces.append(piece)
    if len(pieces) > MAX_PIECES:
        pieces = [_hull(pieces)]
    return TileClasses(tuple(pieces))


@dataclass(frozen=True)
class ClassifyTiles:
    name: str = "classify-tiles"

    def __call__(self, spec: AttentionSpec) -> TileClasses:
        return classify(spec)
