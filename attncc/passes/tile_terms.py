"""Separable terms of a mask: the maximal subterms that read the query position alone (or the key
position alone), tabulated over the kernel's rows so that their exact min / max over any range
of rows costs O(1).

Why: a tile of a curve order is a compact set of the grid (a Hilbert tile of 64 tokens is an
aligned 8 x 8 square) whose position hull spans whole grid rows. Interval rules applied to that
hull bound `q_idx // W` well but `q_idx % W` not at all, and a `Load` of a permutation's ranks
by the whole table. The true min / max of each term over the tile's own rows is the tightest
interval there is; a mask that compares a query term with a key term (`abs(cy - ky) <= r`,
`rank[q] // t == rank[kv] // t`) is then decided on the tile pair directly, and exactly when the
tile is a box of the grid (its coordinates vary independently). Used by `classify_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import sympy
import torch
from torch import Tensor

from attncc.ir.eval import evaluate
from attncc.ir.intervals import Interval, RangeTable
from attncc.ir.symbols import B_IDX, H_IDX, KV_IDX, Q_IDX

__all__ = ["TermTables", "separable_terms", "tabulate"]

_INDEX = {B_IDX.name, H_IDX.name, Q_IDX.name, KV_IDX.name}


def separable_terms(expr: sympy.Basic) -> tuple[list[sympy.Basic], list[sympy.Basic]]:
    """(query terms, key terms): the maximal subterms of `expr` whose only index symbol is
    `q_idx` (respectively `kv_idx`); parameters and shape symbols may appear in them."""
    q_terms: dict[sympy.Basic, None] = {}
    kv_terms: dict[sympy.Basic, None] = {}

    def visit(e: sympy.Basic) -> None:
        if isinstance(e, (sympy.Expr, sympy.logic.boolalg.Boolean)):
            reads = {s.name for s in e.free_symbols} & _INDEX
            if reads == {Q_IDX.name}:
                q_terms[e] = None
                return
            if reads == {KV_IDX.name}:
                kv_terms[e] = None
                return
        for a in e.args:  # mixed terms, Piecewise pairs and Tuples: look inside
            visit(a)

    visit(expr)
    return list(q_terms), list(kv_terms)


@dataclass(frozen=True)
class TermTables:
    """Range tables of the terms of one side over kernel rows (row r: original position
    `pos[r]`), and of the position itself (`q_idx` / `kv_idx` bounds for any other term)."""

    position: RangeTable
    terms: tuple[tuple[sympy.Basic, RangeTable], ...]

    def bounds(self, lo: Tensor, hi: Tensor) -> dict[sympy.Basic, Interval]:
        """Exact (min, max) of every term over kernel rows [lo, hi] (closed, per box)."""
        return {term: table.read_range(lo, hi) for term, table in self.terms}


def tabulate(terms: list[sympy.Basic], symbol: sympy.Symbol, pos: Tensor,
             scalars: Mapping[str, int | float], tensors: Mapping[str, Tensor]) -> TermTables:
    """Each term evaluated at every row's original position `pos` (int64[L]), then tabulated.
    A float term holding a NaN is left out: a NaN has no place in an interval, so the interval
    rules bound that term from the position's range instead (sound, only looser)."""
    values = {**scalars, symbol.name: pos}
    tables = []
    for term in terms:
        env = {s: values[s.name] for s in term.free_symbols if s.name in values}
        value = torch.broadcast_to(torch.as_tensor(evaluate(term, env, tensors)), pos.shape)
        if value.is_floating_point():
            if bool(value.isnan().any()):
                continue
            value = value.double()
        else:
            value = value.long()  # bool terms read 0 / 1, as the interval rules' booleans
        tables.append((term, RangeTable.build(value)))
    return TermTables(RangeTable.build(pos), tuple(tables))
