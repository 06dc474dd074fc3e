"""Exact tile classes (empty / partial / full) of any mask, by interval refinement on boxes.

Requires: a mask expression over `q_idx`, `kv_idx` (ORIGINAL positions), `b`, `h`, the shape
  symbols, runtime parameters (bound by name from `params`) and `Load`s of `tensors`; optional
  reorders `q_pos[r]` / `kv_pos[r]` = original position of kernel row r.
Ensures: `classes[gb, gh, m, n]` is FULL iff every (row, col) pair of tile (m, n) is allowed,
  EMPTY iff none is, else PARTIAL. Exact unless the `max_boxes` cap is hit; then the undecided
  tiles are PARTIAL (the kernel evaluates the mask there: always correct) and `exact` is False.

Cost: O(tiles x a small constant) box evaluations (`interval_eval`) plus O(L log L) to tabulate
the mask's separable terms (`attncc.passes.tile_terms`); the mask is never evaluated on the
Lq x Lk grid. A box is (kernel row range, kernel column range) of one tile pair:
  level 0   the whole tile pair. Every maximal subterm of `q_idx` alone (`q_idx // W`, a clamped
            grid coordinate, `rank[q_idx] // t`, a boolean of the key alone ...) is bounded by its
            exact min / max over the box's own rows, not by rules on the hull of positions, so a
            tile of a curve order (a box of the grid) is decided here for the grid masks;
  bisect    undecided boxes split the longer side in half (in kernel order: the halves of an
            aligned curve tile are boxes again), until decided or single (row, col) points,
            which are exact; a pair is dropped as soon as it has both a true and a false box
            (PARTIAL), and 3 x 3 points of every undecided box (corners, edge middles, centre)
            are evaluated too, as cheap exact witnesses. A pair that already has a witness of
            one kind follows two of its boxes down first (the rest wait, and are dropped once
            the pair is PARTIAL): a NA3D tile pair that touches across a face needs one true
            point, which a full breadth-first frontier finds only after many more boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

import sympy
import torch
from torch import Tensor

from attncc.ir.eval import evaluate
from attncc.ir.intervals import interval_eval
from attncc.ir.symbols import KV_IDX, Q_IDX
from attncc.ir.tiles import EMPTY, FULL, PARTIAL
from attncc.passes.tile_terms import TermTables, separable_terms, tabulate

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockClasses", "allowed_pairs", "classify_blocks"]

_CHUNK = 1 << 18  # boxes per interval_eval call: bounds the temporaries of one evaluation
_PROBE_BOXES = 2  # boxes per pair followed first when the pair needs one more witness
_PROBE_ROUNDS = 64  # rounds that may defer boxes: past them, plain breadth-first bisection


@dataclass(frozen=True)
class BlockClasses:
    """classes: int8[Gb, Gh, nM, nN]; 0 empty, 1 partial, 2 full. Gb = B if the mask reads `b`
    else 1, Gh = Hq if it reads `h` else 1. exact: False only when the `max_boxes` cap was hit.
    boxes: number of box evaluations done (the cost)."""

    classes: Tensor
    exact: bool
    boxes: int


class _Boxes(NamedTuple):
    """A batch of boxes: the tile pair each refines (flat index) and closed ranges of kernel
    rows (q) and columns (k)."""

    pair: Tensor
    qlo: Tensor
    qhi: Tensor
    klo: Tensor
    khi: Tensor

    def take(self, keep: Tensor | slice) -> "_Boxes":
        return _Boxes(*(t[keep] for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.pair.numel()

    def split(self) -> "_Boxes":
        """Both halves of every box, cut across its longer side (the other side is kept)."""
        along_q = (self.qhi - self.qlo) >= (self.khi - self.klo)
        mq, mk = (self.qlo + self.qhi) // 2, (self.klo + self.khi) // 2
        first = _Boxes(self.pair, self.qlo, torch.where(along_q, mq, self.qhi),
                       self.klo, torch.where(along_q, self.khi, mk))
        second = _Boxes(self.pair, torch.where(along_q, mq + 1, self.qlo), self.qhi,
                        torch.where(along_q, self.klo, mk + 1), self.khi)
        return _cat(first, second)

    def corners(self) -> "_Boxes":
        """The corner, edge-middle and centre points of every box (3 x 3)."""
        mq, mk = (self.qlo + self.qhi) // 2, (self.klo + self.khi) // 2
        return _cat(*(_Boxes(self.pair, q, q, k, k) for q in (self.qlo, mq, self.qhi)
                      for k in (self.klo, mk, self.khi)))

    def points(self) -> Tensor:
        return (self.qlo == self.qhi) & (self.klo == self.khi)


@dataclass(frozen=True)
class _Problem:
    """One mask at one launch shape: evaluates boxes (interval) and points (torch_eval)."""

    expr: sympy.Basic
    scalars: dict[str, int | float]  # shape symbols and params, by name
    tensors: Mapping[str, Tensor]
    n_h: int  # Gh: the group index g of a pair is b * Gh + h
    n_tiles: int  # nM * nN: pair = g * n_tiles + m * nN + n
    reads_b: bool
    q_pos: Tensor  # int64[Lq]: original position of each kernel row
    kv_pos: Tensor
    q_terms: TermTables
    kv_terms: TermTables

    def decide(self, boxes: _Boxes) -> tuple[Tensor, Tensor]:
        """(true, false) bool per box: the mask holds on the whole box / nowhere on it."""
        if len(boxes) == 0:
            return boxes.points(), boxes.points()
        outs = [self._decide(boxes.take(slice(i, i + _CHUNK)))
                for i in range(0, len(boxes), _CHUNK)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _decide(self, boxes: _Boxes) -> tuple[Tensor, Tensor]:
        env = {k: _point(v) for k, v in self.scalars.items()}
        env["q_idx"] = self.q_terms.position.read_range(boxes.qlo, boxes.qhi)
        env["kv_idx"] = self.kv_terms.position.read_range(boxes.klo, boxes.khi)
        g = boxes.pair // self.n_tiles
        env["b"] = (g // self.n_h,) * 2
        env["h"] = (g % self.n_h,) * 2
        known = {**self.q_terms.bounds(boxes.qlo, boxes.qhi),
                 **self.kv_terms.bounds(boxes.klo, boxes.khi)}
        lo, hi = (torch.broadcast_to(t, boxes.pair.shape)
                  for t in interval_eval(self.expr, env, self.tensors, known))
        true, false = lo >= 1, hi <= 0
        # interval_eval is exact at points; a node without an interval rule (or a NaN) may still
        # leave a point undecided: torch_eval settles it.
        stuck = ~true & ~false & boxes.points()
        if bool(stuck.any()):
            value = self.allowed(self.q_pos[boxes.qlo[stuck]], self.kv_pos[boxes.klo[stuck]],
                                 g[stuck])
            true[stuck], false[stuck] = value, ~value
        return true, false

    def allowed(self, q: Tensor, kv: Tensor, g: Tensor) -> Tensor:
        """bool: the mask at original positions `q`, `kv` in group `g` (all broadcast)."""
        values = {**self.scalars, "q_idx": q, "kv_idx": kv, "b": g // self.n_h, "h": g % self.n_h}
        env = {s: values[s.name] for s in self.expr.free_symbols if s.name in values}
        shape = torch.broadcast_shapes(q.shape, kv.shape, g.shape)
        return torch.as_tensor(evaluate(self.expr, env, self.tensors)).bool().expand(shape)


def _point(value: int | float) -> tuple[Tensor, Tensor]:
    dtype = torch.float64 if isinstance(value, float) else torch.int64
    return (torch.tensor(value, dtype=dtype),) * 2


def _problem(mask_expr, Lq, Lk, Hq, Hkv, params, tensors, n_tiles, q_pos=None, kv_pos=None,
             terms: bool = False) -> _Problem:
    """The problem; `terms`: tabulate the separable terms (classification; a pointwise count
    needs none)."""
    expr = sympy.sympify(mask_expr)
    if not isinstance(expr, sympy.logic.boolalg.Boolean):  # a numeric mask: nonzero is allowed
        expr = sympy.Ne(expr, 0)
    names = {s.name for s in expr.free_symbols}
    scalars = {"Lq": Lq, "Lk": Lk, "Hq": Hq, "Hkv": Hkv, **params}
    qp, kp = _positions(q_pos, Lq, "q_pos"), _positions(kv_pos, Lk, "kv_pos")
    q_terms, kv_terms = separable_terms(expr) if terms else ([], [])
    return _Problem(expr, scalars, tensors, Hq if "h" in names else 1, n_tiles, "b" in names,
                    qp, kp, tabulate(q_terms, Q_IDX, qp, scalars, tensors),
                    tabulate(kv_terms, KV_IDX, kp, scalars, tensors))


def _positions(pos: Tensor | None, length: int, what: str) -> Tensor:
    if pos is None:
        return torch.arange(length)
    if pos.shape != (length,) or pos.is_floating_point():
        raise ValueError(f"classify_blocks: {what} must be an integer tensor of shape "
                         f"[{length}], got {pos.dtype} of shape {list(pos.shape)}")
    return pos.long().cpu()


def _level0(problem: _Problem, pairs: Tensor, n_n: int, block_m: int, block_n: int,
            Lq: int, Lk: int) -> _Boxes:
    """The whole tile pair of each flat pair index: its kernel rows and columns."""
    m, n = (pairs % problem.n_tiles) // n_n, pairs % n_n
    return _Boxes(pairs, m * block_m, torch.clamp(m * block_m + block_m, max=Lq) - 1,
                  n * block_n, torch.clamp(n * block_n + block_n, max=Lk) - 1)


class _Search:
    """Per tile pair: has some box been proven all true / all false? A pair with both is
    PARTIAL and needs no more work; the budget caps the box evaluations."""

    def __init__(self, problem: _Problem, n_pairs: int, max_boxes: int) -> None:
        self.problem, self.limit, self.used = problem, max_boxes, 0
        self.seen_true = torch.zeros(n_pairs, dtype=torch.bool)
        self.seen_false = torch.zeros(n_pairs, dtype=torch.bool)

    def spend(self, n: int) -> bool:
        """Spend n box evaluations; False (spending nothing) when that would pass the cap."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def open(self, boxes: _Boxes) -> _Boxes:
        """The boxes whose pair is not yet known to be PARTIAL."""
        return boxes.take(~(self.seen_true & self.seen_false)[boxes.pair])

    def evaluate(self, boxes: _Boxes) -> _Boxes | None:
        """Record the witnesses of `boxes`; the undecided ones of open pairs, None at the cap."""
        if not self.spend(len(boxes)):
            return None
        true, false = self.problem.decide(boxes)
        self.seen_true[boxes.pair[true]] = True
        self.seen_false[boxes.pair[false]] = True
        return self.open(boxes.take(~true & ~false))

    def _beyond_first(self, boxes: _Boxes, keep: int) -> Tensor:
        """bool per box: its pair has one kind of witness and `keep` earlier boxes."""
        order = torch.sort(boxes.pair, stable=True).indices
        pair = boxes.pair[order]
        start = torch.ones_like(pair, dtype=torch.bool)
        start[1:] = pair[1:] != pair[:-1]
        index = torch.arange(len(pair))
        first = torch.cummax(torch.where(start, index, 0), 0).values
        rank = torch.empty_like(index)
        rank[order] = index - first
        one_kind = self.seen_true[boxes.pair] ^ self.seen_false[boxes.pair]
        return one_kind & (rank >= keep)

    def refine(self, undecided: _Boxes) -> Tensor | None:
        """Bisect until every box is decided or its pair PARTIAL; `undecided` boxes are known
        undecided. Depth first over batches of at most `_CHUNK` boxes, so memory stays bounded
        however deep a pair must be refined. Returns None when done, else the pairs the cap
        left undecided."""
        stack, probes = [undecided], _PROBE_ROUNDS
        while stack:
            known = self.open(stack.pop())
            if len(known) > _CHUNK:
                half = len(known) // 2
                stack += [known.take(slice(half, None)), known.take(slice(0, half))]
                continue
            if probes and len(known):
                # A pair with a witness of one kind needs just one of the other: follow a few
                # boxes per pair down first and keep the rest for later (dropped if a witness
                # turns up), instead of splitting its whole undecided frontier at every level.
                probes -= 1
                later = self._beyond_first(known, _PROBE_BOXES)
                if bool(later.any()):
                    stack.append(known.take(later))
                    known = known.take(~later)
            # Points are exact: for a pair that is PARTIAL they usually show both a true and a
            # false pair long before the bisection gets down to boxes that small.
            if len(known) and self.evaluate(known.corners()) is None:
                return torch.cat([b.pair for b in (known, *stack)]).unique()
            fresh = self.open(known).split()
            undecided = self.evaluate(fresh) if len(fresh) else fresh
            if undecided is None:
                return torch.cat([b.pair for b in (fresh, *stack)]).unique()
            if len(undecided):
                stack.append(undecided)
        return None


def _cat(*batches: _Boxes) -> _Boxes:
    return _Boxes(*(torch.cat(ts) for ts in zip(*batches)))


def classify_blocks(mask_expr: sympy.Basic, *, Lq: int, Lk: int, Hq: int, Hkv: int, B: int = 1,
                    block_m: int, block_n: int, params: Mapping[str, int | float] = {},
                    tensors: Mapping[str, Tensor] = {}, q_pos: Tensor | None = None,
                    kv_pos: Tensor | None = None, max_boxes: int = 1 << 24) -> BlockClasses:
    """Classes of every (query tile, kv tile) of `mask_expr`; see the module docstring."""
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    problem = _problem(mask_expr, Lq, Lk, Hq, Hkv, params, tensors, n_m * n_n, q_pos, kv_pos,
                       terms=n_m * n_n > 0)
    groups_b = B if problem.reads_b else 1
    n_pairs = groups_b * problem.n_h * n_m * n_n
    shape = (groups_b, problem.n_h, n_m, n_n)
    classes = torch.full((n_pairs,), PARTIAL, dtype=torch.int8)
    search = _Search(problem, n_pairs, max_boxes)
    if n_pairs == 0 or not search.spend(n_pairs):
        return BlockClasses(classes.view(shape), n_pairs == 0, 0)
    tiles = _level0(problem, torch.arange(n_pairs), n_n, block_m, block_n, Lq, Lk)
    true, false = problem.decide(tiles)
    classes[true], classes[false] = FULL, EMPTY
    pending = torch.nonzero(~true & ~false).flatten()
    left = search.refine(tiles.take(pending))
    seen_true, seen_false = search.seen_true[pending], search.seen_false[pending]
    classes[pending] = torch.where(seen_true & seen_false, PARTIAL,
                                   torch.where(seen_true, FULL, EMPTY)).to(torch.int8)
    if left is not None:
        classes[left] = PARTIAL  # pairs the cap left undecided
    return BlockClasses(classes.view(shape), left is None, search.used)


def allowed_pairs(mask_expr: sympy.Basic, result: BlockClasses, *, Lq: int, Lk: int, Hq: int,
                  Hkv: int, B: int = 1, block_m: int, block_n: int,
                  params: Mapping[str, int | float] = {}, tensors: Mapping[str, Tensor] = {},
                  q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
                  max_boxes: int = 1 << 24) -> Tensor:
    """int64[Gb, Gh]: the exact number of allowed (q, kv) pairs. FULL tiles count their area;
    the mask is evaluated pointwise only inside PARTIAL tiles, a chunk of tiles at a time (so the
    count is exact even for classes from a capped, inexact run)."""
    groups_b, groups_h, n_m, n_n = result.classes.shape
    problem = _problem(mask_expr, Lq, Lk, Hq, Hkv, params, tensors, n_m * n_n, q_pos, kv_pos)
    if problem.n_h != groups_h or (groups_b != 1 and not problem.reads_b):
        raise ValueError(f"allowed_pairs: classes of shape {list(result.classes.shape)} do not "
                         "belong to this mask")
    classes = result.classes.reshape(groups_b * groups_h, n_m, n_n)
    rows = (torch.clamp(torch.arange(1, n_m + 1) * block_m, max=Lq)
            - torch.arange(n_m) * block_m)
    cols = (torch.clamp(torch.arange(1, n_n + 1) * block_n, max=Lk)
            - torch.arange(n_n) * block_n)
    counts = ((classes == FULL) * (rows[:, None] * cols[None, :])).sum((1, 2))
    qp, kp = problem.q_pos, problem.kv_pos
    g, m, n = torch.nonzero(classes == PARTIAL, as_tuple=True)
    step = max(1, (1 << 22) // (block_m * block_n))
    for i in range(0, g.numel(), step):
        gi, mi, ni = g[i:i + step], m[i:i + step], n[i:i + step]
        qr = mi[:, None] * block_m + torch.arange(block_m)  # kernel rows of each tile
        kr = ni[:, None] * block_n + torch.arange(block_n)
        inside = (qr < Lq)[:, :, None] & (kr < Lk)[:, None, :]  # ragged last tiles
        allowed = problem.allowed(qp[qr.clamp(max=Lq - 1)][:, :, None],
                                  kp[kr.clamp(max=Lk - 1)][:, None, :], gi[:, None, None])
        counts.index_add_(0, gi, (allowed & inside).sum((1, 2)))
    return counts.view(groups_b, groups_h)
