"""IR nodes: one frozen dataclass per axis of an attention spec (docs/architecture.md).

Masks and score mods hold a sympy expression plus the runtime scalars (`Param`) and captured
tensors (`Capture`) it refers to. Parameter VALUES and tensor CONTENTS are runtime data: they are
kernel arguments, so they appear in `text()` but not in `kernel_text()`, which keys the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from attncc.ir.derived import Reduction
from attncc.ir.symbols import RESERVED_NAMES, SCORE, buffer_symbol, param_symbol


@dataclass(frozen=True, slots=True)
class Param:
    """A runtime scalar (window size, soft-cap, offset): a kernel argument, never a constant."""

    name: str
    kind: str  # "int" | "float"
    value: int | float
    positive: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name in RESERVED_NAMES:
            raise ValueError(f"parameter name: expected an identifier other than "
                             f"{sorted(RESERVED_NAMES)}, got {self.name!r}")
        if self.kind not in ("int", "float"):
            raise ValueError(f"parameter {self.name!r} kind: expected 'int' or 'float', "
                             f"got {self.kind!r}")
        if self.kind == "int" and not isinstance(self.value, int):
            raise TypeError(f"parameter {self.name!r}: expected an int value, "
                            f"got {type(self.value).__name__} {self.value!r}")
        if self.positive and not self.value > 0:
            raise ValueError(f"parameter {self.name!r}: expected a positive value, "
                             f"got {self.value!r}")

    @property
    def symbol(self) -> sympy.Symbol:
        return param_symbol(self.name, self.kind, self.positive)

    def text(self) -> str:
        return f"{self.name}:{self.kind}{'+' if self.positive else ''}={self.value!r}"

    def kernel_text(self) -> str:
        return f"{self.name}:{self.kind}{'+' if self.positive else ''}"


@dataclass(frozen=True, slots=True)
class Capture:
    """A tensor a mask or score reads (`doc`, `bias`, `slopes`); its contents are runtime data.

    Only the name, dtype, rank and `nondecreasing` shape the kernel; a new tensor of the same kind
    never recompiles. `nondecreasing` (1-d only) promises `t[i] <= t[i + 1]` for every i: tile
    classification may then bound kv tiles by the tensor's values at a tile's first and last
    query row, so it changes the kernel's loops and is part of the key. Nothing checks the
    promise on the fast path (that needs a device sync); `ATTNCC_DEBUG=1` checks it per call.
    `static` says the tensor is a function of the spec's shape parameters (a curve's ranks), not
    per-batch data: its tile classes may then come from the host interval classifier, O(tiles),
    instead of a device kernel that evaluates every pair.
    `reduction` (with the trace-time `source` tensor) says each call computes this tensor from
    another one (`attncc.ir.derived`); `tensor` then holds its trace-time value.
    """

    name: str
    dtype: str
    ndim: int
    tensor: torch.Tensor | None = field(default=None, compare=False, repr=False)
    nondecreasing: bool = False
    static: bool = False
    reduction: Reduction | None = None
    source: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name in RESERVED_NAMES:
            raise ValueError(f"captured tensor name: expected an identifier other than "
                             f"{sorted(RESERVED_NAMES)}, got {self.name!r}")
        if self.nondecreasing and self.ndim != 1:
            raise ValueError(f"captured {self.name!r}: nondecreasing applies to 1-d tensors, "
                             f"got {self.ndim}-d")

    @staticmethod
    def of(name: str, tensor: torch.Tensor, nondecreasing: bool = False,
           static: bool = False, reduction: Reduction | None = None,
           source: torch.Tensor | None = None) -> "Capture":
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"captured {name!r}: expected a torch.Tensor, "
                            f"got {type(tensor).__name__}")
        return Capture(name, str(tensor.dtype).removeprefix("torch."), tensor.dim(), tensor,
                       nondecreasing, static, reduction, source)

    @property
    def symbol(self) -> sympy.Symbol:
        return buffer_symbol(self.name)

    def text(self) -> str:
        flags = (", nondecreasing" if self.nondecreasing else "") + (", static" if self.static
                                                                      else "")
        derived = f" = {self.reduction.text()}" if self.reduction is not None else ""
        return f"{self.name}:{self.dtype}[{self.ndim}d{flags}]{derived}"


def _merge(first: tuple, second: tuple, what: str) -> tuple[tuple, dict]:
    """Union of two Param/Capture tuples; a clash of names with different contents renames."""
    merged = {x.name: x for x in first}
    renames: dict[sympy.Symbol, sympy.Symbol] = {}
    for item in second:
        same = merged.get(item.name)
        if same is None:
            merged[item.name] = item
            continue
        if same == item and (what == "param" or same.tensor is item.tensor):
            continue
        n = 1
        while f"{item.name}_{n}" in merged:
            n += 1
        renamed = dataclasses.replace(item, name=f"{item.name}_{n}")
        merged[renamed.name] = renamed
        renames[item.symbol] = renamed.symbol
    return tuple(merged.values()), renames


@dataclass(frozen=True)
class _Expression:
    """Shared shape of masks and score mods: an expression plus what it reads."""

    expr: sympy.Basic
    params: tuple[Param, ...] = ()
    captures: tuple[Capture, ...] = ()
    tag: str = "custom"  # short readable name used in kernel names: "causal", "sw", "softcap"

    def _combine(self, other: "_Expression") -> tuple[sympy.Basic, tuple, tuple]:
        params, renames = _merge(self.params, other.params, "param")
        captures, cap_renames = _merge(self.captures, other.captures, "capture")
        renames.update(cap_renames)
        return other.expr.xreplace(renames), params, captures

    def with_values(self, **values: Any) -> "_Expression":
        known = {p.name: p for p in self.params}
        for name in values:
            if name not in known:
                raise ValueError(f"{name!r}: not a parameter of this {self.tag}; "
                                 f"its parameters are {sorted(known)}")
        params = tuple(dataclasses.replace(p, value=values.get(p.name, p.value))
                       for p in self.params)
        return dataclasses.replace(self, params=params)


@dataclass(frozen=True)
class Mask(_Expression):
    """Which (q, kv) pairs are allowed: a boolean sympy expression over b, h, q_idx, kv_idx.

    `&`, `|`, `~` combine masks; `bool(mask)` raises so `and`/`or` cannot silently misbehave.
    """

    def __and__(self, other: "Mask") -> "Mask":
        expr, params, captures = self._combine(_as_mask(other, "&"))
        return Mask(sympy.And(self.expr, expr), params, captures, f"{self.tag}_{other.tag}")

    def __or__(self, other: "Mask") -> "Mask":
        expr, params, captures = self._combine(_as_mask(other, "|"))
        return Mask(sympy.Or(self.expr, expr), params, captures, f"{self.tag}_or_{other.tag}")

    def __invert__(self) -> "Mask":
        return Mask(sympy.Not(self.expr), self.params, self.captures, f"not_{self.tag}")

    def __bool__(self) -> bool:
        raise TypeError("a Mask has no truth value: combine masks with &, |, ~ "
                        "(not `and`, `or`, `not`)")

    def text(self) -> str:
        return _expr_text(self)


@dataclass(frozen=True)
class ScoreMod(_Expression):
    """How a score is modified before normalisation: a real expression over `score` and indices."""

    def then(self, other: "ScoreMod") -> "ScoreMod":
        """Apply `self` first, then `other` to its result."""
        expr, params, captures = self._combine(other)
        return ScoreMod(expr.xreplace({SCORE: self.expr}), params, captures,
                        f"{self.tag}_{other.tag}")

    def text(self) -> str:
        return _expr_text(self)


def _as_mask(other: object, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(f"mask {op}: expected a Mask on both sides, got {type(other).__name__}")
    return other


def _expr_text(node: _Expression) -> str:
    extras = [p.text() for p in node.params] + [c.text() for c in node.captures]
    return sympy.sstr(node.expr) + (f"  [{', '.join(extras)}]" if extras else "")


@dataclass(frozen=True, slots=True)
class Normaliser:
    """N1 softmax, N2 softmax with a per-head sink logit (`sink[h]`), N3 none (linear)."""

    kind: str = "softmax"  # "softmax" | "softmax_sink" | "none"
    sink: Capture | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("softmax", "softmax_sink", "none"):
            raise ValueError(f"normaliser: expected 'softmax', 'softmax_sink' or 'none', "
                             f"got {self.kind!r}")
        if (self.kind == "softmax_sink") != (self.sink is not None):
            raise ValueError("normaliser: a sink tensor goes with kind 'softmax_sink' only")

    def text(self) -> str:
        return f"softmax_sink({self.sink.text()})" if self.sink else self.kind


@dataclass(frozen=True, slots=True)
class DenseMemory:
    """K1: K/V are dense [B, Hkv, Lk, D] (or BSHD) tensors."""

    def text(self) -> str:
        return "dense"


@dataclass(frozen=True, slots=True)
class Schedule:
    """Tile sizes and launch shape; None means 'chosen by the select-tiles pass'."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    allow_tf32: bool = False  # fp32 inputs multiply in full fp32 unless the user opts in

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"schedule {name}: expected a power of two >= 16, got {value}")

    def text(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) not in (None, False)]
        return "auto" if not fields else ", ".join(fields)
