"""Reorder axis (catalogue Section 4, R1-R6): golden orders, text forms and properties."""

import time

import pytest
import torch

from attncc.ir import curves
from attncc.ir.reorder import (
    Hilbert2D,
    Hilbert3D,
    Morton2D,
    SegmentSort,
    TileMajor,
    UserPermutation,
    check_permutation,
    inverse,
)

SIZES_2D = [(4, 4), (8, 8), (16, 16), (6, 10), (7, 5), (1, 9), (9, 1), (1, 1), (5, 4), (3, 17)]
SIZES_3D = [(4, 4, 4), (2, 6, 5), (1, 1, 1), (3, 5, 7), (8, 4, 4)]
Z_4X4 = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def _coords_2d(perm, width):
    return perm // width, perm % width


def _steps_2d(perm, width):
    y, x = _coords_2d(perm, width)
    return y.diff().abs() + x.diff().abs()


def _steps_3d(perm, height, width):
    t, y, x = perm // (height * width), (perm // width) % height, perm % width
    return t.diff().abs() + y.diff().abs() + x.diff().abs()


def _grid_nodes():
    nodes = []
    for h, w in SIZES_2D:
        nodes += [Hilbert2D(h, w), Morton2D(h, w), TileMajor((h, w), (min(h, 2), min(w, 3)))]
    for t, h, w in SIZES_3D:
        nodes += [Hilbert3D(t, h, w), TileMajor((t, h, w), (min(t, 2), min(h, 2), min(w, 4)))]
    return nodes


def _is_bijection(perm, length):
    return perm.dtype == torch.int64 and torch.equal(torch.sort(perm).values, torch.arange(length))


@pytest.mark.parametrize("node", _grid_nodes(), ids=lambda n: n.text())
def test_grid_order_is_bijection_and_inverts(node):
    n = node.length()
    perm = node.permutation(n)
    assert perm.shape == (n,) and _is_bijection(perm, n)
    x = torch.randn(2, n, 3, dtype=torch.float64)
    assert torch.equal(x[:, perm, :][:, inverse(perm), :], x)
    assert torch.equal(inverse(perm)[perm], torch.arange(n))
    assert torch.equal(perm[inverse(perm)], torch.arange(n))


@pytest.mark.parametrize("node", _grid_nodes()[:6], ids=lambda n: n.text())
def test_grid_order_rejects_wrong_length(node):
    n = node.length()
    with pytest.raises(ValueError, match=rf"length must equal the grid size .* = {n}, got {n + 1}"):
        node.permutation(n + 1)
    with pytest.raises(ValueError, match="takes no key_score"):
        node.permutation(node.length(), key_score=torch.zeros(node.length()))


def test_cached_order_is_not_corrupted_by_callers():
    node = Hilbert2D(8, 8)
    first = node.permutation(64)
    first[:] = 0
    assert _is_bijection(node.permutation(64), 64)


def test_text_forms_and_keys():
    nodes = [Hilbert2D(64, 64), Morton2D(6, 10), TileMajor((8, 8), (4, 4)),
             TileMajor([2, 6, 5], [1, 2, 2]), Hilbert3D(2, 6, 5), SegmentSort(128),
             UserPermutation()]
    texts = [n.text() for n in nodes]
    assert texts == [
        "hilbert2d(64x64)", "morton2d(6x10)", "tile_major(grid=8x8, tile=4x4)",
        "tile_major(grid=2x6x5, tile=1x2x2)", "hilbert3d(2x6x5)", "segment_sort(g=128)",
        "user_permutation(perm)",
    ]
    assert UserPermutation("cluster_order").text() == "user_permutation(cluster_order)"
    keys = [n.key for n in nodes]
    assert len(set(keys)) == len(keys) and all(len(k) == 64 for k in keys)
    assert Hilbert2D(64, 64).key == Hilbert2D(64, 64).key and Hilbert2D(64, 64) == Hilbert2D(64, 64)
    assert Hilbert2D(4, 4) != Morton2D(4, 4)
    assert TileMajor([2, 6, 5], [1, 2, 2]) == TileMajor((2, 6, 5), (1, 2, 2))
    assert [n.length() for n in nodes] == [4096, 60, 64, 60, 60, None, None]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Hilbert2D(0, 4), r"Hilbert2D: height must be a positive int, got 0"),
        (lambda: Hilbert2D(4, 2.0), r"Hilbert2D: width must be a positive int, got 2.0"),
        (lambda: Morton2D(True, 4), r"Morton2D: height must be a positive int, got True"),
        (lambda: Hilbert3D(4, -1, 4), r"Hilbert3D: height must be a positive int, got -1"),
        (lambda: TileMajor((8, 8), (4, 4, 4)), r"tile must have as many dims as grid \(2\)"),
        (lambda: TileMajor((8,), (4,)), r"grid must be a tuple of 2 or 3 ints, got \(8,\)"),
        (lambda: TileMajor((8, 8), (0, 4)), r"tile\[0\] must be a positive int, got 0"),
        (lambda: TileMajor((8, 8), (4, 9)), r"tile\[1\] must be <= grid\[1\] = 8, got 9"),
        (lambda: SegmentSort(0), r"SegmentSort: segment must be a positive int, got 0"),
        (lambda: UserPermutation("not a name"), r"name must be an identifier"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- R1 Hilbert 2-D -----------------------------------------------------------------------


@pytest.mark.parametrize("k", range(0, 7))
def test_hilbert_2k_square_is_classical_curve(k):
    n = 2**k
    perm = Hilbert2D(n, n).permutation(n * n)
    steps = _steps_2d(perm, n)
    assert bool((steps == 1).all())
    y, x = _coords_2d(perm, n)
    assert (int(y[0]), int(x[0])) == (0, 0)
    assert (int(y[-1]), int(x[-1])) in {(0, n - 1), (n - 1, 0), (n - 1, n - 1)}
    # Same order as the textbook Hilbert index (Skilling) with x as the major axis.
    xy = torch.stack([x, y], dim=1)
    if k > 0:
        assert bool((curves.hilbert_index(xy, k).diff() == 1).all())


def _diagonal_expected(h, w):
    # Forced: even cell count but both end corners share a chessboard colour.
    return max(h, w) % 2 == 1 and min(h, w) % 2 == 0 and min(h, w) >= 4


def test_hilbert_generalised_steps_on_all_small_rectangles():
    for h in range(1, 25):
        for w in range(1, 25):
            perm = Hilbert2D(h, w).permutation(h * w)
            assert _is_bijection(perm, h * w)
            assert int(perm[0]) == 0
            steps = _steps_2d(perm, w)
            n_diag = int((steps == 2).sum())
            assert bool(((steps == 1) | (steps == 2)).all()), (h, w)
            if n_diag:  # a distance-2 step must be diagonal, not a skip along a line
                i = int(torch.nonzero(steps == 2)[0])
                (y0, y1), (x0, x1) = _coords_2d(perm[i : i + 2], w)
                assert y0 != y1 and x0 != x1, (h, w)
            assert n_diag == int(_diagonal_expected(h, w)), (h, w)


@pytest.mark.parametrize("h, w", [(6, 10), (7, 5), (1, 9), (5, 6), (16, 24), (12, 7)])
def test_hilbert_rectangles_have_unit_steps(h, w):
    assert bool((_steps_2d(Hilbert2D(h, w).permutation(h * w), w) == 1).all())


def test_hilbert_is_more_local_than_row_major():
    n, block = 64, 64

    def mean_block_distance(perm):
        y, x = _coords_2d(perm.reshape(-1, block), n)
        d = (y[:, :, None] - y[:, None, :]).abs() + (x[:, :, None] - x[:, None, :]).abs()
        return d.double().mean().item()

    hilbert = mean_block_distance(Hilbert2D(n, n).permutation(n * n))
    row_major = mean_block_distance(torch.arange(n * n))
    assert hilbert < row_major / 3  # 8x8 squares (~5.25) against rows (~21.3)


def test_large_grids_are_fast():
    start = time.perf_counter()
    Hilbert2D(256, 256).permutation(256 * 256)
    Hilbert3D(32, 64, 64).permutation(32 * 64 * 64)
    Morton2D(256, 256).permutation(256 * 256)
    TileMajor((32, 64, 64), (4, 8, 8)).permutation(32 * 64 * 64)
    assert time.perf_counter() - start < 10.0  # generous: CI shares 2 cores with other work


# --- R2 Morton, R3 tile-major ---------------------------------------------------------------


def test_morton_4x4_is_z_sequence():
    assert Morton2D(4, 4).permutation(16).tolist() == Z_4X4


def test_morton_non_power_of_two_keeps_z_order_of_the_padded_grid():
    full = Morton2D(8, 8).permutation(64)
    y, x = _coords_2d(full, 8)
    keep = (y < 6) & (x < 5)
    expected = y[keep] * 5 + x[keep]
    assert torch.equal(Morton2D(6, 5).permutation(30), expected)


def test_tile_major_2x2_tiles_of_4x4():
    assert TileMajor((4, 4), (2, 2)).permutation(16).tolist() == Z_4X4


def test_tile_major_ragged_edges():
    # 5x5 grid, 2x3 tiles: tile columns [0,3) and [3,5); tile rows [0,2), [2,4), [4,5).
    assert TileMajor((5, 5), (2, 3)).permutation(25).tolist() == [
        0, 1, 2, 5, 6, 7, 3, 4, 8, 9,
        10, 11, 12, 15, 16, 17, 13, 14, 18, 19,
        20, 21, 22, 23, 24,
    ]


def test_tile_major_3d():
    # 2x2x4 grid, 1x2x2 tiles: frame by frame, two 2x2 tiles per frame.
    assert TileMajor((2, 2, 4), (1, 2, 2)).permutation(16).tolist() == [
        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
    ]
    perm = TileMajor((4, 6, 6), (2, 3, 3)).permutation(144)
    t, y, x = perm // 36, (perm // 6) % 6, perm % 6
    tile_of = (t // 2) * 4 + (y // 3) * 2 + x // 3
    assert torch.equal(tile_of, torch.arange(144) // 18)


# --- R4 Hilbert 3-D -------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [(2, 2, 2), (4, 4, 4), (8, 8, 8), (4, 8, 8), (32, 64, 64)])
def test_hilbert3d_unit_steps(dims):
    t, h, w = dims
    perm = Hilbert3D(t, h, w).permutation(t * h * w)
    assert _is_bijection(perm, t * h * w) and int(perm[0]) == 0
    assert bool((_steps_3d(perm, h, w) == 1).all())


def test_hilbert3d_padded_restriction_keeps_cube_order():
    cube = Hilbert3D(8, 8, 8).permutation(512)
    t, y, x = cube // 64, (cube // 8) % 8, cube % 8
    keep = (t < 2) & (y < 6) & (x < 5)
    expected = (t[keep] * 6 + y[keep]) * 5 + x[keep]
    assert torch.equal(Hilbert3D(2, 6, 5).permutation(60), expected)


# --- R5 segment sort ------------------------------------------------------------------------


@pytest.mark.parametrize("length, g", [(16, 4), (10, 4), (1, 3), (7, 7), (257, 64), (0, 5)])
def test_segment_sort(length, g):
    gen = torch.Generator().manual_seed(length)
    score = torch.randint(0, 4, (length,), generator=gen).float()  # many ties
    perm = SegmentSort(g).permutation(length, key_score=score)
    assert _is_bijection(perm, length)
    assert torch.equal(perm // g, torch.arange(length) // g)  # every token stays in its segment
    for s in range(0, length, g):
        seg = perm[s : s + g]
        assert bool((score[seg].diff() <= 0).all())  # descending
        ties = score[seg][1:] == score[seg][:-1]
        assert bool((seg.diff()[ties] > 0).all())  # stable
    assert torch.equal(inverse(perm)[perm], torch.arange(length))


def test_segment_sort_golden_and_validation():
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 2.0, -1.0, 2.0])
    assert SegmentSort(3).permutation(7, key_score=score).tolist() == [1, 2, 0, 4, 3, 5, 6]
    with pytest.raises(ValueError, match=r"key_score must be a tensor of shape \[7\], got NoneTy"):
        SegmentSort(3).permutation(7)
    with pytest.raises(ValueError, match=r"shape \[8\], got torch.float32 of shape \[7\]"):
        SegmentSort(3).permutation(8, key_score=score)
    with pytest.raises(ValueError, match="must not contain NaN"):
        SegmentSort(3).permutation(2, key_score=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="length must be a non-negative int, got -1"):
        SegmentSort(3).permutation(-1, key_score=score)


# --- R6 user permutation ---------------------------------------------------------------------


def test_user_permutation_accepts_a_permutation():
    p = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    out = UserPermutation().permutation(4, perm=p)
    assert out.dtype == torch.int64 and out.tolist() == [2, 0, 3, 1]
    assert inverse(out).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize(
    "perm, match",
    [
        (None, r"perm must be a 1-D integer tensor of length 4, got NoneType"),
        ([0, 1, 2, 3], r"perm must be a 1-D integer tensor of length 4, got list"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"got torch.float32 of shape \[4\]"),
        (torch.tensor([[0, 1], [2, 3]]), r"got torch.int64 of shape \[2, 2\]"),
        (torch.tensor([0, 1, 2]), r"perm must have length 4, got length 3"),
        (torch.tensor([0, 1, 2, 4]), r"indices in \[0, 4\), got min 0, max 4"),
        (torch.tensor([0, 1, 1, 3]), r"exactly once, got index 1 2 times and index 2 missing"),
    ],
)
def test_user_permutation_rejects_non_permutations(perm, match):
    with pytest.raises(ValueError, match=r"UserPermutation\(.perm.\)\.permutation: .*" + match):
        UserPermutation().permutation(4, perm=perm)


def test_check_permutation_names_the_argument():
    with pytest.raises(ValueError, match=r"^order must have length 3"):
        check_permutation(torch.tensor([0, 1]), 3, "order")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_permutation_on_device():
    perm = Hilbert2D(16, 16).permutation(256, device="cuda")
    assert perm.is_cuda and torch.equal(perm.cpu(), Hilbert2D(16, 16).permutation(256))
    score = torch.randn(100, device="cuda")
    assert SegmentSort(8).permutation(100, key_score=score).is_cuda
