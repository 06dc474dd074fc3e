"""Exact tile classes by interval refinement: equal to brute force for every catalogue mask
family, tile shape, odd length and token reorder; O(tiles) work; a work cap stays sound.

The oracle evaluates the mask densely with torch_eval on ORIGINAL positions `q_pos[r]`,
`kv_pos[c]` and reduces each tile with all / any (no padding: a ragged tile has fewer pairs)."""

from __future__ import annotations

import time
from contextlib import nullcontext

import pytest
import sympy
import torch
from sympy.functions.elementary.piecewise import ExprCondPair

import attncc
from attncc.ir.eval import evaluate
from attncc.ir.intervals import interval_eval, range_table
from attncc.ir.symbols import KV_IDX, Q_IDX
from attncc.ir.tiles import EMPTY, FULL, PARTIAL
from attncc.ir.trace import trace_mask
from attncc.passes.classify_blocks import allowed_pairs, classify_blocks
from attncc.passes.tile_terms import separable_terms, tabulate

TILES = [(16, 16), (32, 16), (64, 64), (8, 32)]
HQ = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensor ops: intra-op threads only add spin-waiting on a shared 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- oracle -------------------------------------------------------------------------------------

def launch(mask: attncc.Mask, Lq: int, Lk: int, B: int = 1, **extra) -> dict:
    """The keyword arguments of classify_blocks / allowed_pairs for `mask`."""
    return dict(Lq=Lq, Lk=Lk, Hq=HQ, Hkv=HQ, B=B, params={p.name: p.value for p in mask.params},
                tensors={c.name: c.tensor for c in mask.captures}, **extra)


def dense(expr, kw: dict) -> torch.Tensor:
    """bool[Gb, Gh, Lq, Lk] of the mask at the kernel's rows and columns."""
    Lq, Lk, B = kw["Lq"], kw["Lk"], kw["B"]
    q = torch.arange(Lq) if kw.get("q_pos") is None else kw["q_pos"]
    kv = torch.arange(Lk) if kw.get("kv_pos") is None else kw["kv_pos"]
    values = {"q_idx": q.view(1, 1, -1, 1), "kv_idx": kv.view(1, 1, 1, -1),
              "b": torch.arange(B).view(-1, 1, 1, 1), "h": torch.arange(HQ).view(1, -1, 1, 1),
              "Lq": Lq, "Lk": Lk, "Hq": HQ, "Hkv": HQ, **kw["params"]}
    env = {s: values[s.name] for s in expr.free_symbols if s.name in values}
    out = torch.as_tensor(evaluate(expr, env, kw["tensors"])).bool().expand(B, HQ, Lq, Lk)
    names = {s.name for s in expr.free_symbols}
    return out[:B if "b" in names else 1, :HQ if "h" in names else 1]


def brute_force(allowed: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """int8[Gb, Gh, nM, nN] from a dense mask: FULL if all pairs of a tile, PARTIAL if some."""
    gb, gh, Lq, Lk = allowed.shape
    n_m, n_n = -(-Lq // bm), -(-Lk // bn)
    pad = (0, n_n * bn - Lk, 0, n_m * bm - Lq)
    tiles = lambda value: torch.nn.functional.pad(allowed, pad, value=value).view(  # noqa: E731
        gb, gh, n_m, bm, n_n, bn)
    every, some = tiles(True).all(5).all(3), tiles(False).any(5).any(3)
    return torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)


def check(mask: attncc.Mask, Lq: int, Lk: int, tiles=TILES, B: int = 1, q_pos=None, kv_pos=None,
          count: bool = False) -> None:
    kw = launch(mask, Lq, Lk, B, q_pos=q_pos, kv_pos=kv_pos)
    allowed = dense(mask.expr, kw)
    for bm, bn in tiles:
        got = classify_blocks(mask.expr, block_m=bm, block_n=bn, **kw)
        want = brute_force(allowed, bm, bn)
        assert got.exact
        assert torch.equal(got.classes, want), f"tiles {bm}x{bn}\n{want}\n{got.classes}"
        if count:
            pairs = allowed_pairs(mask.expr, got, block_m=bm, block_n=bn, **kw)
            assert torch.equal(pairs, allowed.sum((2, 3))), f"tiles {bm}x{bn}"


def order(name: str, dims: tuple[int, ...], seed: int = 0) -> torch.Tensor | None:
    """q_pos = kv_pos of a reorder of a grid of `dims` (None: identity)."""
    n = 1
    for d in dims:
        n *= d
    if name == "row-major":
        return None
    if name == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if name == "hilbert":
        node = attncc.Hilbert2D(*dims) if len(dims) == 2 else attncc.Hilbert3D(*dims)
    elif name == "morton":
        node = attncc.Morton2D(*dims)
    else:
        node = attncc.TileMajor(dims, tuple(min(d, 4) for d in dims[:-1]) + (4,))
    return node.permutation(n)


# --- interval_eval ------------------------------------------------------------------------------

def _traced(b, h, q_idx, kv_idx):
    same_doc = DOC[q_idx] == DOC[kv_idx]
    local = torch.where(h == 0, (q_idx - kv_idx) % 5 == 0, q_idx // 8 >= kv_idx // 8)
    return (same_doc & local) | (kv_idx < 3) ^ (PER_BATCH[b, q_idx] == PER_BATCH[b, kv_idx])


DOC = torch.sort(torch.randint(0, 6, (100,), generator=torch.Generator().manual_seed(1)))[0]
PER_BATCH = torch.randint(0, 3, (2, 90), generator=torch.Generator().manual_seed(2))


def interval_masks(L: int) -> dict[str, attncc.Mask]:
    g = torch.Generator().manual_seed(3)
    return {
        "M9": attncc.strided_heads(10, 2, 3, 1),
        "M10": attncc.global_tokens(5, torch.rand(L, generator=g) < 0.1),
        "M12": attncc.neighbourhood_2d(12, 10, 5, 7),
        "M13-tile": attncc.neighbourhood_3d(3, 6, 7, (1, 3, 3), tile=(2, 4, 4)),
        "M15": attncc.hilberta(16, 16, 16, 8, 4),
        "M17": attncc.bigbird(12, 1, torch.rand(20, generator=g) < 0.2,
                              attncc.bigbird_random_blocks(20, 2)),
        "traced": trace_mask(_traced),
    }


@pytest.mark.parametrize("name", list(interval_masks(256)))
def test_interval_eval_is_sound_and_exact_at_points(name):
    """Every node's bounds hold the true values over the box; single points are exact."""
    mask, L, n, w = interval_masks(256)[name], 256, 400, 4
    g = torch.Generator().manual_seed(4)
    qlo, klo = torch.randint(-2, L, (n,), generator=g), torch.randint(-2, L, (n,), generator=g)
    qw, kw_ = torch.randint(0, w, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    qw[: n // 4] = kw_[: n // 4] = 0  # a quarter of the boxes are single points
    h, b = torch.randint(0, HQ, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    kw = launch(mask, L, L, B=2)
    env = {k: (torch.tensor(v), torch.tensor(v)) for k, v in
           {"Lq": L, "Lk": L, "Hq": HQ, "Hkv": HQ, **kw["params"]}.items()}
    env.update(q_idx=(qlo, qlo + qw), kv_idx=(klo, klo + kw_), h=(h, h), b=(b, b))
    subterms = [e for e in sympy.preorder_traversal(mask.expr)
                if not e.is_Atom and not isinstance(e, (sympy.Tuple, ExprCondPair))]
    offsets = torch.arange(w)
    q = (qlo[:, None, None] + offsets[None, :, None]).clamp(max=(qlo + qw)[:, None, None])
    kv = (klo[:, None, None] + offsets[None, None, :]).clamp(max=(klo + kw_)[:, None, None])
    values = {"q_idx": q, "kv_idx": kv, "h": h[:, None, None], "b": b[:, None, None],
              "Lq": L, "Lk": L, "Hq": HQ, "Hkv": HQ, **kw["params"]}
    for e in subterms:
        lo, hi = (torch.broadcast_to(t, (n,)) for t in interval_eval(e, env, kw["tensors"]))
        point_env = {s: values[s.name] for s in e.free_symbols if s.name in values}
        true = torch.as_tensor(evaluate(e, point_env, kw["tensors"])).expand(n, w, w)
        true = true.double().flatten(1)
        assert torch.all(lo.double() <= true.min(1).values), f"{e}"
        assert torch.all(hi.double() >= true.max(1).values), f"{e}"
        point = (qw == 0) & (kw_ == 0)
        assert torch.equal(lo[point].double(), true[point, 0]), f"{e}"
        assert torch.equal(hi[point].double(), true[point, 0]), f"{e}"


def test_range_table_reads_min_max_of_any_range():
    g = torch.Generator().manual_seed(5)
    values = torch.randint(-50, 50, (37,), generator=g)
    lo = torch.randint(-5, 42, (500,), generator=g)
    hi = lo + torch.randint(0, 20, (500,), generator=g)
    got_lo, got_hi = range_table(values).read_range(lo, hi)
    padded = torch.cat([torch.zeros(5, dtype=values.dtype), values, torch.zeros(25,
                                                                             dtype=values.dtype)])
    for i in range(500):
        window = padded[lo[i] + 5:hi[i] + 6]  # reads outside the tensor give 0
        assert (got_lo[i], got_hi[i]) == (window.min(), window.max())


# --- exact classes: 1-D masks -------------------------------------------------------------------

def masks_1d(L: int) -> dict[str, attncc.Mask]:
    g = torch.Generator().manual_seed(0)
    n_blocks = -(-L // 12)
    return {
        "M1": attncc.causal(),
        "M2": attncc.sliding_window(37),
        "M7": attncc.chunked(24),
        "M9": attncc.strided_heads(10, 2, 3, 1),
        "M10": attncc.global_tokens(9, torch.rand(L, generator=g) < 0.1),
        "M17": attncc.bigbird(12, 1, torch.rand(n_blocks, generator=g) < 0.2,
                              attncc.bigbird_random_blocks(n_blocks, 2, seed=0)),
        "M18": attncc.per_head_classes(torch.arange(HQ) % 2, 4, 30),
        "traced": trace_mask(_traced),
    }


SHAPES_1D = [(63, 63), (100, 100), (100, 63), (37, 100), (1, 100)]
CASES_1D = [(m, Lq, Lk, r) for m in masks_1d(1) for Lq, Lk in SHAPES_1D
            for r in ("row-major", "random")]


@pytest.mark.parametrize("name,Lq,Lk,reorder", CASES_1D,
                         ids=[f"{m}-Lq{a}-Lk{b}-{r}" for m, a, b, r in CASES_1D])
def test_1d_masks_exact(name, Lq, Lk, reorder):
    mask = masks_1d(max(Lq, Lk))[name]
    q_pos = order(reorder, (Lq,), seed=1)
    kv_pos = order(reorder, (Lk,), seed=2)
    check(mask, Lq, Lk, B=2, q_pos=q_pos, kv_pos=kv_pos, count=(Lq == 100))


# --- exact classes: grid masks ------------------------------------------------------------------

GRIDS = [(7, 9), (12, 10), (16, 16)]
ORDERS_2D = ["row-major", "hilbert", "morton", "tile-major", "random"]
CASES_M12 = [(g, k, r) for g in GRIDS for k in [(3, 3), (5, 7), (7, 7)] for r in ORDERS_2D]


@pytest.mark.parametrize("grid,kernel,reorder", CASES_M12,
                         ids=[f"{g[0]}x{g[1]}-k{k[0]}x{k[1]}-{r}" for g, k, r in CASES_M12])
def test_m12_neighbourhood_2d_exact(grid, kernel, reorder):
    pos = order(reorder, grid)
    L = grid[0] * grid[1]
    check(attncc.neighbourhood_2d(*grid, *kernel), L, L, q_pos=pos, kv_pos=pos,
          count=kernel == (5, 7))


CASES_M14 = [(g, r) for g in GRIDS for r in ORDERS_2D]


@pytest.mark.parametrize("grid,reorder", CASES_M14,
                         ids=[f"{g[0]}x{g[1]}-{r}" for g, r in CASES_M14])
def test_m14_criss_cross_exact(grid, reorder):
    pos = order(reorder, grid)
    L = grid[0] * grid[1]
    check(attncc.criss_cross(*grid), L, L, q_pos=pos, kv_pos=pos, count=True)


@pytest.mark.parametrize("shift", [0, 8])
@pytest.mark.parametrize("reorder", ["hilbert", "row-major", "random"])
def test_m15_hilberta_exact(shift, reorder):
    pos = order(reorder, (16, 16))
    check(attncc.hilberta(16, 16, 16, shift, 4), 256, 256, q_pos=pos, kv_pos=pos, count=True)


CASES_M13 = [((4, 6, 6), (3, 3, 3), None), ((5, 6, 7), (3, 5, 3), None),
             ((6, 12, 12), (1, 3, 1), (2, 4, 4)), ((5, 10, 9), (1, 3, 3), (2, 4, 4))]


@pytest.mark.parametrize("grid,kernel,tile", CASES_M13,
                         ids=[f"{'x'.join(map(str, g))}-k{''.join(map(str, k))}-tile{t}"
                              for g, k, t in CASES_M13])
@pytest.mark.parametrize("reorder", ["row-major", "hilbert", "tile-major", "random"])
def test_m13_neighbourhood_3d_exact(grid, kernel, tile, reorder):
    pos = order(reorder, grid)
    L = grid[0] * grid[1] * grid[2]
    check(attncc.neighbourhood_3d(*grid, kernel, tile=tile), L, L, q_pos=pos, kv_pos=pos,
          tiles=[(16, 16), (64, 64), (8, 32)])


def test_classes_have_a_group_per_batch_and_head_only_when_read():
    causal = classify_blocks(attncc.causal().expr, block_m=16, block_n=16,
                             **launch(attncc.causal(), 50, 50, B=3))
    per_head = attncc.strided_heads(10, 2, 3, 1)
    heads = classify_blocks(per_head.expr, block_m=16, block_n=16, **launch(per_head, 50, 50, B=3))
    batch = trace_mask(_traced)
    both = classify_blocks(batch.expr, block_m=16, block_n=16, **launch(batch, 50, 50, B=2))
    assert causal.classes.shape == (1, 1, 4, 4) and causal.classes.dtype == torch.int8
    assert heads.classes.shape == (1, HQ, 4, 4)
    assert both.classes.shape == (2, HQ, 4, 4)


# --- cost and cap -------------------------------------------------------------------------------

@pytest.mark.parametrize("reorder", ["hilbert", "row-major"])
def test_work_is_proportional_to_tiles(reorder):
    """M12 7x7 on a 64x64 grid with 64x64 tiles: far fewer box evaluations than pairs/16, fast,
    and still exact."""
    pos = order(reorder, (64, 64))
    mask = attncc.neighbourhood_2d(64, 64, 7, 7)
    kw = launch(mask, 4096, 4096, q_pos=pos, kv_pos=pos)
    start = time.perf_counter()
    got = classify_blocks(mask.expr, block_m=64, block_n=64, **kw)
    seconds = time.perf_counter() - start
    assert got.exact and got.boxes < 4096 * 4096 // 16 // 4, got.boxes
    assert seconds < 3.0, f"{seconds:.2f} s"
    assert torch.equal(got.classes, brute_force(dense(mask.expr, kw), 64, 64))


def test_work_cap_gives_sound_inexact_classes():
    pos = order("hilbert", (16, 16))
    mask = attncc.neighbourhood_2d(16, 16, 5, 5)
    kw = launch(mask, 256, 256, q_pos=pos, kv_pos=pos)
    want = brute_force(dense(mask.expr, kw), 16, 16)
    full_run = classify_blocks(mask.expr, block_m=16, block_n=16, **kw)
    assert full_run.exact and torch.equal(full_run.classes, want)
    for cap in (10, 256, 400, full_run.boxes // 2, full_run.boxes - 1):
        got = classify_blocks(mask.expr, block_m=16, block_n=16, max_boxes=cap, **kw)
        assert not got.exact and got.boxes <= cap
        assert torch.all((got.classes == want) | (got.classes == PARTIAL)), f"cap {cap}"
    assert bool((got.classes == EMPTY).any())  # the hulls alone decide most tiles


def test_allowed_pairs_counts_only_inside_partial_tiles():
    """Counts equal brute force, and a mask whose only decided tiles are FULL / EMPTY needs no
    pointwise work at all."""
    mask = attncc.block_causal(16)
    kw = launch(mask, 128, 128)
    got = classify_blocks(mask.expr, block_m=16, block_n=16, **kw)
    assert not bool((got.classes == PARTIAL).any())
    assert allowed_pairs(mask.expr, got, block_m=16, block_n=16, **kw).item() == 36 * 256
    pos = order("hilbert", (12, 10))
    check(attncc.neighbourhood_2d(12, 10, 3, 5), 120, 120, q_pos=pos, kv_pos=pos, count=True)


def test_runs_never_cover_positions_outside_the_tile():
    """Evens first, then odds: a tile of evens is FULL for `kv even` although every gap of its
    hull holds an odd position of another tile (so no box may span two of its runs)."""
    L = 96
    pos = torch.cat([torch.arange(0, L, 2), torch.arange(1, L, 2)])
    mask = attncc.Mask(sympy.And(sympy.Eq(sympy.Mod(KV_IDX, 2), 0),
                                 sympy.Ne(sympy.Mod(Q_IDX, 2), 0)))
    check(mask, L, L, q_pos=pos, kv_pos=pos, count=True)
    got = classify_blocks(mask.expr, block_m=16, block_n=16, **launch(mask, L, L, q_pos=pos,
                                                                        kv_pos=pos))
    assert torch.equal(got.classes[0, 0], torch.tensor([[0] * 6] * 3 + [[2] * 3 + [0] * 3] * 3,
                                                      dtype=torch.int8))



@pytest.mark.parametrize("expr,warns", [(sympy.sqrt(Q_IDX + KV_IDX) <= 6, True),
                                        (sympy.sqrt(Q_IDX) <= KV_IDX / 4, False),
                                        (sympy.log(Q_IDX - KV_IDX) > 1, False)],
                         ids=["sqrt", "sqrt-of-q", "log-nan"])
def test_nodes_without_interval_rules_still_classify_exactly(expr, warns):
    """sqrt has no interval rule (refined to points, with a warning), unless it reads q_idx alone:
    then it is a separable term, tabulated by value per row (no rule needed); log of a negative
    is NaN, undecidable even at a point, so torch_eval settles those points."""
    with pytest.warns(UserWarning, match="no interval rule") if warns else nullcontext():
        check(attncc.Mask(expr), 40, 33, tiles=[(16, 16), (8, 32)], count=True)


# --- grid masks in curve order: decided from the separable terms' exact bounds ------------------

CASES_CURVE = [("M15", (7, 9), 4, 2), ("M15", (12, 10), 16, 8), ("M15", (9, 16), 16, 0),
               ("M12", (13, 11), 5, 3), ("M13", (3, 5, 7), (3, 3, 1), None)]


def _curve_mask(name: str, grid: tuple[int, ...], a, b) -> attncc.Mask:
    if name == "M15":
        return attncc.hilberta(*grid, a, b, 3)
    if name == "M12":
        return attncc.neighbourhood_2d(*grid, a, b)
    return attncc.neighbourhood_3d(*grid, a)


@pytest.mark.parametrize("name,grid,a,b", CASES_CURVE,
                         ids=[f"{n}-{'x'.join(map(str, g))}" for n, g, _, _ in CASES_CURVE])
@pytest.mark.parametrize("tiles", [(16, 16), (8, 32), (32, 16)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_curve_order_grid_masks_equal_brute_force(name, grid, a, b, tiles):
    """Odd grids (generalised curves, ragged last tiles) in Hilbert order, with the brute-force
    classes checked to hold all three kinds somewhere across the cases."""
    pos = order("hilbert", grid)
    L = pos.numel()
    check(_curve_mask(name, grid, a, b), L, L, tiles=[tiles], q_pos=pos, kv_pos=pos,
          count=tiles == (16, 16))


def test_curve_order_brute_force_cases_hold_every_class():
    seen = set()
    for name, grid, a, b in CASES_CURVE:
        pos = order("hilbert", grid)
        mask = _curve_mask(name, grid, a, b)
        kw = launch(mask, pos.numel(), pos.numel(), q_pos=pos, kv_pos=pos)
        seen |= set(brute_force(dense(mask.expr, kw), 8, 8).unique().tolist())
    assert seen == {EMPTY, PARTIAL, FULL}


@pytest.mark.parametrize("name", ["M15", "M12", "M13"])
def test_curve_tiles_are_decided_at_tile_level(name):
    """L = 4096 in Hilbert order at 64 x 64 tiles (boxes of the grid): a few box evaluations per
    tile pair. Interval rules on position hulls alone took 41 (M12) to 192 (M13) per pair."""
    if name == "M13":
        mask, pos = attncc.neighbourhood_3d(16, 16, 16, (3, 7, 7)), order("hilbert", (16, 16, 16))
    elif name == "M12":
        mask, pos = attncc.neighbourhood_2d(64, 64, 13, 13), order("hilbert", (64, 64))
    else:
        mask, pos = attncc.hilberta(64, 64, 64, 32, 8), order("hilbert", (64, 64))
    kw = launch(mask, 4096, 4096, q_pos=pos, kv_pos=pos)
    got = classify_blocks(mask.expr, block_m=64, block_n=64, **kw)
    assert got.exact and got.boxes < 20 * 64 * 64, got.boxes
    assert torch.equal(got.classes, brute_force(dense(mask.expr, kw), 64, 64))


def test_separable_terms_are_tabulated_exactly():
    """The maximal q-only / kv-only subterms of M12, and their exact min / max over row ranges
    of a reordered axis."""
    mask = attncc.neighbourhood_2d(6, 5, 3, 3)
    q_terms, kv_terms = separable_terms(mask.expr)
    assert q_terms and kv_terms
    assert all({s.name for s in t.free_symbols} & {"q_idx", "kv_idx", "b", "h"} == {"q_idx"}
               for t in q_terms)
    assert all({s.name for s in t.free_symbols} & {"q_idx", "kv_idx", "b", "h"} == {"kv_idx"}
               for t in kv_terms)
    pos = order("hilbert", (6, 5))
    scalars = {p.name: p.value for p in mask.params}
    tables = tabulate(q_terms, Q_IDX, pos, scalars, {})
    lo, hi = torch.tensor([0, 3, 7, 29]), torch.tensor([29, 3, 20, 29])
    for term, (tlo, thi) in tables.bounds(lo, hi).items():
        value = torch.as_tensor(evaluate(term, {s: pos if s.name == "q_idx" else scalars[s.name]
                                                for s in term.free_symbols}, {}))
        for i in range(4):
            window = value.expand(30)[lo[i]:hi[i] + 1]
            assert (tlo[i], thi[i]) == (window.min(), window.max()), term
