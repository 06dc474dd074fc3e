"""The reorder axis of the IR: token permutations (R1-R6, docs/catalog.md).

Convention: `perm: int64[L]` with `perm[new_position] = original_position`, so
`x_reordered = x[..., perm, :]` and `x = x_reordered[..., inverse(perm), :]`.
Grid tokens are numbered row-major: `y * W + x` in 2-D, `(t * H + y) * W + x` in 3-D.
Masks and position-dependent scores always see ORIGINAL positions (`perm[new_position]`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from attncc.ir import curves


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _dims_text(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims)


def _device(device: torch.device | str | None, default: torch.device) -> torch.device:
    return default if device is None else torch.device(device)


class Reorder:
    """Base of the reorder nodes: a canonical `text()` and its sha256 `key`."""

    __slots__ = ()

    def text(self) -> str:
        raise NotImplementedError

    def length(self) -> int | None:
        """Number of tokens the order covers; None when it fits any length."""
        return None

    @property
    def key(self) -> str:
        """sha256 hex digest of `text()`: the content key for caches (never Python `hash()`)."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    def permutation(
        self,
        length: int,
        *,
        key_score: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


@functools.lru_cache(maxsize=32)
def _cpu_order(node: _GridReorder) -> torch.Tensor:
    return node._order()


@functools.lru_cache(maxsize=32)
def _device_order(node: _GridReorder, device: torch.device) -> torch.Tensor:
    return _cpu_order(node).to(device)


class _GridReorder(Reorder):
    """A fixed order of a grid: computed once per (node, device), then copied out."""

    __slots__ = ()

    def _dims(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _order(self) -> torch.Tensor:
        raise NotImplementedError

    def length(self) -> int:
        n = 1
        for d in self._dims():
            n *= d
        return n

    def permutation(self, length, *, key_score=None, perm=None, device=None) -> torch.Tensor:
        """int64[length] on `device` (default CPU); `length` must equal the grid size."""
        name = type(self).__name__
        if key_score is not None or perm is not None:
            raise ValueError(f"{name}.permutation: takes no key_score or perm (a fixed order)")
        if isinstance(length, bool) or not isinstance(length, int) or length != self.length():
            raise ValueError(
                f"{name}.permutation: length must equal the grid size "
                f"{_dims_text(self._dims())} = {self.length()}, got {length!r}"
            )
        # A copy: callers may write into it without corrupting the cache.
        return _device_order(self, _device(device, torch.device("cpu"))).clone()


@dataclass(frozen=True, slots=True)
class Hilbert2D(_GridReorder):
    """R1: Hilbert order of an `height x width` grid.

    `2^k x 2^k`: the classical Hilbert curve from `(0, 0)` to the corner `(W-1, 0)`. Other sizes:
    the generalised "gilbert" curve (`curves.gilbert2d_order`), no padding; all steps are unit
    steps except exactly one diagonal step when the longer side is odd and the shorter side even
    and >= 4 (e.g. 4 x 5), where no unit-step curve between those corners exists.
    """

    height: int
    width: int

    def __post_init__(self) -> None:
        _positive_int("Hilbert2D", "height", self.height)
        _positive_int("Hilbert2D", "width", self.width)

    def text(self) -> str:
        return f"hilbert2d({self.height}x{self.width})"

    def _dims(self) -> tuple[int, ...]:
        return (self.height, self.width)

    def _order(self) -> torch.Tensor:
        return curves.gilbert2d_order(self.height, self.width)


@dataclass(frozen=True, slots=True)
class Morton2D(_GridReorder):
    """R2: Z-order of an `height x width` grid: cells sorted by the interleaved bits
    `... y1 x1 y0 x0` of `(y, x)`. Non-power-of-two grids: the same sort over the real cells."""

    height: int
    width: int

    def __post_init__(self) -> None:
        _positive_int("Morton2D", "height", self.height)
        _positive_int("Morton2D", "width", self.width)

    def text(self) -> str:
        return f"morton2d({self.height}x{self.width})"

    def _dims(self) -> tuple[int, ...]:
        return (self.height, self.width)

    def _order(self) -> torch.Tensor:
        return curves.morton2d_order(self.height, self.width)


@dataclass(frozen=True, slots=True)
class TileMajor(_GridReorder):
    """R3: `grid` (H, W) or (T, H, W) cut into `tile` (th, tw) or (tt, th, tw) tiles; tiles in
    row-major order, row-major inside a tile. Edge tiles are smaller when a dim does not divide."""

    grid: tuple[int, ...]
    tile: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("grid", "tile"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
                raise ValueError(f"TileMajor: {name} must be a tuple of 2 or 3 ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))  # lists become tuples: hashable
            for i, d in enumerate(value):
                _positive_int("TileMajor", f"{name}[{i}]", d)
        if len(self.tile) != len(self.grid):
            raise ValueError(
                f"TileMajor: tile must have as many dims as grid ({len(self.grid)}), "
                f"got tile={self.tile!r}"
            )
        for i, (n, t) in enumerate(zip(self.grid, self.tile)):
            if t > n:
                raise ValueError(f"TileMajor: tile[{i}] must be <= grid[{i}] = {n}, got {t}")

    def text(self) -> str:
        return f"tile_major(grid={_dims_text(self.grid)}, tile={_dims_text(self.tile)})"

    def _dims(self) -> tuple[int, ...]:
        return self.grid

    def _order(self) -> torch.Tensor:
        return curves.tile_major_order(self.grid, self.tile)


@dataclass(frozen=True, slots=True)
class Hilbert3D(_GridReorder):
    """R4: 3-D Hilbert order of a `frames x height x width` grid: the Hilbert curve of the
    smallest `2^k` cube holding the grid, restricted to the real cells (padding skipped).
    Unit steps for `2^k` cubes and for `2^(k-1) x 2^k x 2^k`; other sizes may jump."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            _positive_int("Hilbert3D", name, getattr(self, name))

    def text(self) -> str:
        return f"hilbert3d({self.frames}x{self.height}x{self.width})"

    def _dims(self) -> tuple[int, ...]:
        return (self.frames, self.height, self.width)

    def _order(self) -> torch.Tensor:
        return curves.hilbert3d_order(self.frames, self.height, self.width)


@dataclass(frozen=True, slots=True)
class SegmentSort(Reorder):
    """R5: tokens move only inside consecutive segments of `segment` tokens (the last may be
    shorter); each segment is ordered by `key_score: float[length]`, descending, ties stable."""

    segment: int

    def __post_init__(self) -> None:
        _positive_int("SegmentSort", "segment", self.segment)

    def text(self) -> str:
        return f"segment_sort(g={self.segment})"

    def permutation(self, length, *, key_score=None, perm=None, device=None) -> torch.Tensor:
        """int64[length] on `device` (default: key_score's device)."""
        _check_length("SegmentSort", length)
        if perm is not None:
            raise ValueError("SegmentSort.permutation: takes key_score, not perm")
        if not isinstance(key_score, torch.Tensor):
            raise ValueError(
                f"SegmentSort.permutation: key_score must be a tensor of shape [{length}], "
                f"got {type(key_score).__name__}"
            )
        real = not key_score.is_complex() and key_score.dtype != torch.bool
        if tuple(key_score.shape) != (length,) or not real:
            raise ValueError(
                f"SegmentSort.permutation: key_score must be a real tensor of shape [{length}], "
                f"got {key_score.dtype} of shape {list(key_score.shape)}"
            )
        if key_score.is_floating_point() and bool(torch.isnan(key_score).any()):
            raise ValueError("SegmentSort.permutation: key_score must not contain NaN")
        by_score = torch.sort(key_score, descending=True, stable=True).indices
        segment_of = by_score // self.segment
        # Stable sort by segment keeps the descending score order inside each segment.
        out = by_score[torch.sort(segment_of, stable=True).indices]
        return out.to(device=_device(device, key_score.device))


@dataclass(frozen=True, slots=True)
class UserPermutation(Reorder):
    """R6: a captured index tensor, passed as `perm: int[length]` at permutation time; `name`
    is the name of the captured argument (it appears in the text form)."""

    name: str = "perm"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"UserPermutation: name must be an identifier, got {self.name!r}")

    def text(self) -> str:
        return f"user_permutation({self.name})"

    def permutation(self, length, *, key_score=None, perm=None, device=None) -> torch.Tensor:
        """`perm` checked to be a permutation of range(length), as int64 on `device`
        (default: perm's device)."""
        owner = f"UserPermutation({self.name!r}).permutation"
        _check_length(owner, length)
        if key_score is not None:
            raise ValueError(f"{owner}: takes perm, not key_score")
        check_permutation(perm, length, f"{owner}: perm")
        return perm.to(dtype=torch.int64, device=_device(device, perm.device))


@dataclass(frozen=True, slots=True)
class AutoReorder(Reorder):
    """`reorder="auto"`: the choose-reorder pass replaces it with the candidate order (row-major,
    Morton, Hilbert, tile-major) that visits the fewest tiles. `grid` (H, W) or (T, H, W) names
    the token grid when the mask has no grid_h/grid_w parameters to read it from."""

    grid: tuple[int, ...] | None = None

    def text(self) -> str:
        return "auto" if self.grid is None else f"auto(grid={_dims_text(self.grid)})"

    def permutation(self, length, *, key_score=None, perm=None, device=None) -> torch.Tensor:
        raise ValueError("reorder 'auto' has no permutation until the choose-reorder pass "
                         "picks one (attncc.compile runs it)")


def _check_length(owner: str, length: object) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"{owner}: length must be a non-negative int, got {length!r}")


def check_permutation(perm: object, length: int, what: str = "perm") -> None:
    """Raise ValueError unless `perm` is a 1-D integer tensor holding each of range(length) once."""
    if not isinstance(perm, torch.Tensor):
        raise ValueError(f"{what} must be a 1-D integer tensor of length {length}, "
                         f"got {type(perm).__name__}")
    if perm.dim() != 1 or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D integer tensor of length {length}, "
                         f"got {perm.dtype} of shape {list(perm.shape)}")
    if perm.numel() != length:
        raise ValueError(f"{what} must have length {length}, got length {perm.numel()}")
    if length == 0:
        return
    lo, hi = int(perm.min()), int(perm.max())
    if lo < 0 or hi >= length:
        raise ValueError(f"{what} must hold indices in [0, {length}), got min {lo}, max {hi}")
    counts = torch.bincount(perm.to(torch.int64), minlength=length)
    if bool((counts != 1).any()):
        twice = int(torch.nonzero(counts > 1)[0])
        missing = int(torch.nonzero(counts == 0)[0])
        raise ValueError(
            f"{what} must hold each index in [0, {length}) exactly once, "
            f"got index {twice} {int(counts[twice])} times and index {missing} missing"
        )


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: `inverse(perm)[perm] == arange(L)`, i.e. `inverse(perm)[i]` is the
    new position of original token `i`. Same device, int64."""
    if perm.dim() != 1:
        raise ValueError(f"inverse: perm must be 1-D, got shape {list(perm.shape)}")
    perm = perm.to(torch.int64)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=torch.int64, device=perm.device)
    return inv


positions = inverse  # `positions(perm)[original_position] = new_position`
