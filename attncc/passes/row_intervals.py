"""Row intervals: the mask as a union of per-row key intervals, for the device block-map builder.

Requires: a canonical spec (atoms read `kv_idx <= bound` / `kv_idx >= bound`).
Ensures: `RowIntervals(pieces, why)`. `pieces` is a tuple of at most `MAX_PIECES`
`RowInterval`s whose union is exactly the mask: row `q_idx` allows key `kv_idx` iff some piece
has `cond` true and `lo <= kv_idx <= hi`. It is None (and `why` says which atom or what broke
it) when the mask has no such form; the device builder then evaluates the mask at every
(q, kv) pair of every tile, the one case where it does.

The form exists when every conjunction of the mask's DNF holds only
- atoms free of `kv_idx` (they may read `q_idx`, `b`, `h`, parameters and captured tensors at
  any index): they go into the piece's `cond`;
- bounds `kv_idx <= e`, `kv_idx >= e` (`<` and `>` too) with `e` free of `kv_idx` and
  integer-valued (index arithmetic, integer or bool captures read at any index, `q_idx`
  included): the piece's interval is `[max of lower bounds, min of upper bounds]`.
Nothing needs to be monotone in `q_idx`: bounds are evaluated at every row (O(L) work) and a
tile is classified from the min / max of the bounds over its rows. It does not exist for an
atom that reads `kv_idx` any other way (`doc[q] == doc[kv]`, `is_global[kv]`, `kv % d == 0`),
for more than `MAX_PIECES` conjunctions, or when tokens are reordered (an interval of original
key positions is not an interval of kernel columns).
"""

from __future__ import annotations

import sympy

from attncc.ir.spec import AttentionSpec
from attncc.ir.symbols import KV_IDX, LK, Load
from attncc.ir.tiles import RowInterval, RowIntervals

# The device kernel counts a tile's allowed pairs by inclusion-exclusion over the pieces
# (2^P - 1 intersections per row), so the union must stay small.
MAX_PIECES = 3
_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "bool")


def _is_integer(bound: sympy.Basic, integer_captures: frozenset[str]) -> bool:
    """`bound` takes integer values: each `Load` of an integer capture stands for an integer."""
    loads = bound.atoms(Load)
    if any(ld.args[0].name not in integer_captures for ld in loads):
        return False
    dummies = {ld: sympy.Dummy(integer=True) for ld in loads}
    return bound.xreplace(dummies).is_integer is True


def _bound(atom: sympy.Basic, integers: frozenset[str]) -> tuple[str, sympy.Basic] | None:
    """("lo" | "hi", integer bound) for `kv_idx REL e`, either side; None for anything else."""
    if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return None
    lhs, rhs, rel = atom.lhs, atom.rhs, type(atom)
    if rhs == KV_IDX and lhs != KV_IDX:  # e REL kv  ->  kv REL' e
        lhs, rhs = rhs, lhs
        rel = {sympy.Le: sympy.Ge, sympy.Lt: sympy.Gt, sympy.Ge: sympy.Le, sympy.Gt: sympy.Lt}[rel]
    if lhs != KV_IDX or rhs.has(KV_IDX) or not _is_integer(rhs, integers):
        return None
    if rel is sympy.Le:
        return "hi", rhs
    if rel is sympy.Lt:
        return "hi", rhs - 1
    if rel is sympy.Ge:
        return "lo", rhs
    return "lo", rhs + 1


def _piece(conjunction: sympy.Basic, integers: frozenset[str]) -> RowInterval | str | None:
    """The conjunction as one row interval; None if it is never true; else the reason why not."""
    lows, highs, conds = [sympy.Integer(0)], [], []
    for atom in sympy.And.make_args(conjunction):
        if atom is sympy.true:
            continue
        if atom is sympy.false:
            return None
        if not atom.has(KV_IDX):
            conds.append(atom)
            continue
        bound = _bound(atom, integers)
        if bound is None:
            return f"the atom {sympy.sstr(atom)} reads kv_idx other than as an integer bound"
        (lows if bound[0] == "lo" else highs).append(bound[1])
    return RowInterval(sympy.Max(*lows), sympy.Min(*highs) if highs else LK - 1,
                       sympy.And(*conds))


def row_intervals(spec: AttentionSpec) -> RowIntervals:
    """The mask of `spec` as per-row key intervals, or why it has none (module docstring)."""
    if spec.mask is None:
        return RowIntervals(None, "no mask")
    if spec.reorder is not None:
        return RowIntervals(None, "tokens are reordered: a row's key interval in original "
                                  "positions is not an interval of kernel columns")
    expr = spec.mask.expr
    if not isinstance(expr, sympy.logic.boolalg.Boolean):
        return RowIntervals(None, "the mask is not a boolean of relations")
    integers = frozenset(c.name for c in spec.mask.captures if c.dtype in _INTEGER_DTYPES)
    pieces: list[RowInterval] = []
    # sorted: the same pieces in every process (an Or's arguments are in hash order)
    dnf = sympy.to_dnf(expr, simplify=False)
    for conjunction in sorted(sympy.Or.make_args(dnf), key=sympy.default_sort_key):
        piece = _piece(conjunction, integers)
        if isinstance(piece, str):
            return RowIntervals(None, piece)
        if piece is not None and piece not in pieces:
            pieces.append(piece)
    if len(pieces) > MAX_PIECES:
        return RowIntervals(None, f"{len(pieces)} disjuncts of key intervals, more than the "
                                  f"{MAX_PIECES} the tile count by inclusion-exclusion takes")
    if not pieces:  # never true: one empty interval
        pieces.append(RowInterval(sympy.Integer(0), sympy.Integer(-1)))
    return RowIntervals(tuple(pieces), f"{len(pieces)} interval(s) per row; bounds evaluated "
                                       "once per row, tiles classified from their min / max")

