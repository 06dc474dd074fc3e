"""Tile classes: per query tile, which kv tiles are empty, partial or full.

A mask's classification is a short list of `KvRange` pieces (one per disjunct of its DNF). Each
piece gives, for the query rows `[q_first, q_last]` of a tile, the kv rows some row may attend
(`some_lo..some_hi`) and the kv rows every row attends (`all_lo..all_hi`), as closed-form sympy
expressions. Kernels turn them into tile loops with `tile_loops`; tests and `explain` evaluate
the same arithmetic here, so what the kernel visits can be checked against brute force.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import sympy
import torch

from attncc.ir.eval import evaluate
from attncc.ir.symbols import B_IDX, H_IDX, HKV, HQ, LK, LQ, Q_FIRST, Q_LAST

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class KvRange:
    """One disjunct of a mask, summarised at tile granularity.

    guard: condition on (b, h, params) under which the piece applies at all.
    exact: False when the piece has conditions beyond its interval (then no tile is full).
    """

    some_lo: sympy.Expr
    some_hi: sympy.Expr
    all_lo: sympy.Expr
    all_hi: sympy.Expr
    guard: sympy.Basic = sympy.true
    exact: bool = True

    def text(self) -> str:
        guard = "" if self.guard is sympy.true else f" if {sympy.sstr(self.guard)}"
        full = (f"full kv [{self.all_lo}, {self.all_hi}]" if self.exact else "never full")
        return f"visit kv [{self.some_lo}, {self.some_hi}], {full}{guard}"


@dataclass(frozen=True)
class TileClasses:
    """The classification of one mask: pieces whose tile ranges the kernel unions."""

    pieces: tuple[KvRange, ...]

    def text(self) -> str:
        return "\n".join(f"piece {i}: {p.text()}" for i, p in enumerate(self.pieces))

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.pieces)


BLOCK_MAP_SOURCES = {
    "analytic": "tile classes from interval reasoning on the symbolic mask, O(tiles), on the host",
    "device": "tile classes from a generated block-map kernel on the device",
    "topk": "the block top-k index tensor, turned into kv-tile lists on the device",
}


@dataclass(frozen=True)
class RowInterval:
    """One disjunct of a mask as a key interval per query row: row `q_idx` allows keys
    `lo <= kv_idx <= hi` when `cond` holds. `lo`, `hi` and `cond` may read `q_idx`, `b`, `h`,
    shape symbols, parameters and captured tensors, never `kv_idx`; `lo` and `hi` are
    integer-valued."""

    lo: sympy.Expr
    hi: sympy.Expr
    cond: sympy.Basic = sympy.true

    def text(self) -> str:
        cond = "" if self.cond is sympy.true else f" if {sympy.sstr(self.cond)}"
        return f"kv in [{sympy.sstr(self.lo)}, {sympy.sstr(self.hi)}]{cond}"


@dataclass(frozen=True)
class RowIntervals:
    """How the device builder classifies tiles (`attncc.passes.row_intervals`): `pieces` is the
    mask as a union of per-row key intervals, or None when it has no such form, and then the
    builder evaluates the mask at every pair; `why` says which and why."""

    pieces: tuple[RowInterval, ...] | None
    why: str

    def text(self) -> str:
        if self.pieces is None:
            return f"every (q, kv) pair of every tile: {self.why}"
        shown = " or ".join(p.text() for p in self.pieces)
        return f"per-row key intervals ({shown}): {self.why}"


@dataclass(frozen=True)
class BlockMapTiles:
    """The kernel reads, per query tile, lists of partial and full kv tiles (a kernel argument,
    so new values never recompile) instead of closed-form ranges. `source` says who builds them;
    `rows`, for the sources with a device kernel ("device", and "topk" which falls back to it),
    says how that kernel classifies tiles."""

    source: str  # a key of BLOCK_MAP_SOURCES
    why: str
    rows: RowIntervals | None = None

    def text(self) -> str:
        rows = f"; device kernel classifies from {self.rows.text()}" if self.rows else ""
        return f"block map ({self.source}: {BLOCK_MAP_SOURCES[self.source]}); {self.why}{rows}"


def tile_loops(piece_values: tuple[int, int, int, int], exact: bool, enabled: bool,
               block_n: int) -> tuple[int, int, int, int]:
    """`(n_begin, f_begin, f_end, n_end)`: partial tiles [n_begin, f_begin) and [f_end, n_end),
    full tiles [f_begin, f_end). The Triton template repeats exactly this arithmetic."""
    some_lo, some_hi, all_lo, all_hi = piece_values
    n_begin = some_lo // block_n
    n_end = some_hi // block_n + 1 if (some_hi >= some_lo and enabled) else n_begin
    f_begin = (all_lo + block_n - 1) // block_n
    f_end = max(all_hi + 1, 0) // block_n
    f_begin = min(max(f_begin, n_begin), n_end)
    f_end = max(min(f_end, n_end), f_begin)
    if not exact:
        f_begin = f_end = n_end
    return n_begin, f_begin, f_end, n_end


def tile_map(classes: TileClasses, *, Lq: int, Lk: int, Hq: int, Hkv: int, block_m: int,
             block_n: int, b: int = 0, h: int = 0, params: Mapping[str, int | float] = {},
             tensors: Mapping[str, torch.Tensor] = {}) -> torch.Tensor:
    """int8[nM, nN] map of what the kernel visits for batch `b`, head `h`: 0 skipped,
    1 partial (mask evaluated), 2 full (mask skipped). O(number of tiles) work."""
    n_m, n_n = -(-Lq // block_m), -(-Lk // block_n)
    out = torch.zeros(n_m, n_n, dtype=torch.int8)
    env = {LQ: Lq, LK: Lk, HQ: Hq, HKV: Hkv, B_IDX: b, H_IDX: h}
    env.update({sympy.Symbol(k, integer=isinstance(v, int)): v for k, v in params.items()})
    for m in range(n_m):
        env[Q_FIRST] = m * block_m
        env[Q_LAST] = min(m * block_m + block_m, Lq) - 1
        covered = torch.zeros(n_n, dtype=torch.bool)
        for piece in classes.pieces:
            values = tuple(int(evaluate(e, _env(env, e), tensors)) for e in
                           (piece.some_lo, piece.some_hi, piece.all_lo, piece.all_hi))
            enabled = bool(evaluate(piece.guard, _env(env, piece.guard), tensors))
            n_begin, f_begin, f_end, n_end = tile_loops(values, piece.exact, enabled, block_n)
            for n in range(n_begin, n_end):
                if covered[n]:
                    continue  # the kernel skips tiles an earlier piece already visited
                covered[n] = True
                out[m, n] = FULL if f_begin <= n < f_end else PARTIAL
    return out


def _env(env: dict, expr: sympy.Basic) -> dict:
    """Bind parameters by name: assumptions on a symbol must not hide its value."""
    by_name = {s.name: v for s, v in env.items()}
    return {s: by_name[s.name] for s in expr.free_symbols if s.name in by_name}
