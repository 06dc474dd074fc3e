"""Captured tensors that a call computes from another one before the launch.

A traced function that reduces a captured tensor over its trailing dimensions (`buf[b].sum()` of
a `[B, N]` buffer) reads one number per leading index: attncc captures `buf_sum = buf.sum(dim=1)`
instead and the kernel loads `buf_sum[b]`. The reduction runs in torch on every call (buf's values
may change between calls, or a call may pass `buf=new_buf`), so it is differentiable like any torch
op: a learnable `buf` gets its gradient through `buf_sum`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch


def _flat(t: torch.Tensor, keep: int) -> torch.Tensor:
    return t.flatten(keep)  # one trailing axis to reduce (keep < t.dim() always)


REDUCTIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "sum": lambda t, keep: _flat(t, keep).sum(-1),
    "mean": lambda t, keep: _flat(t, keep).mean(-1),
    "prod": lambda t, keep: _flat(t, keep).prod(-1),
    "amax": lambda t, keep: _flat(t, keep).amax(-1),
    "amin": lambda t, keep: _flat(t, keep).amin(-1),
    "any": lambda t, keep: _flat(t, keep).any(-1),
    "all": lambda t, keep: _flat(t, keep).all(-1),
}


@dataclass(frozen=True, slots=True)
class Reduction:
    """`op` (a key of REDUCTIONS) of the captured tensor `source` (a `source_ndim`-d tensor the
    user passes under that name) over its dimensions `keep`, `keep + 1`, ...: a `keep`-d result."""

    op: str
    source: str
    source_ndim: int
    keep: int

    def __post_init__(self) -> None:
        if self.op not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {sorted(REDUCTIONS)}, got {self.op!r}")
        if not 0 <= self.keep < self.source_ndim:
            raise ValueError(f"reduction of {self.source!r}: keep must be in [0, "
                             f"{self.source_ndim}), got {self.keep}")

    def apply(self, source: torch.Tensor) -> torch.Tensor:
        if not isinstance(source, torch.Tensor) or source.dim() != self.source_ndim:
            got = (f"a {source.dim()}-d tensor" if isinstance(source, torch.Tensor)
                   else type(source).__name__)
            raise TypeError(f"{self.source}: expected a {self.source_ndim}-d tensor (its "
                            f"{self.op} over dims {self.keep}.. is read by the kernel), got {got}")
        return REDUCTIONS[self.op](source, self.keep)

    def text(self) -> str:
        return f"{self.op}({self.source}, dims>={self.keep})"


def split_sources(captures: tuple, runtime: Mapping[str, Any], taken: set[str]
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(runtime without the sources of derived captures, {derived capture name: its value now}).

    A derived capture's value is its reduction of the tensor given in `runtime` under the
    source's name, else of the tensor captured at trace time (re-read: its values may have
    changed). `taken`: names of the spec's parameters and captures; a source that is also a
    plain capture (`buf[b, 0] + buf[b].sum()`) stays in `runtime` for it and feeds both."""
    sources = {c.reduction.source for c in captures if c.reduction is not None}
    rest = {k: v for k, v in runtime.items() if k in taken or k not in sources}
    values = {}
    for c in captures:
        if c.reduction is not None:
            given = runtime.get(c.reduction.source)
            if c.reduction.source in taken and not isinstance(given, torch.Tensor):
                given = None  # a parameter of the same name, not this tensor
            values[c.name] = c.reduction.apply(c.source if given is None else given)
    return rest, values


def held_tensors(captures: tuple) -> dict[str, torch.Tensor]:
    """{name: tensor} a module holds to call a kernel with these captures: each plain capture,
    and for a derived one its source (reduced again on every call), never the stale result."""
    out = {}
    for c in captures:
        if c.reduction is None:
            out[c.name] = c.tensor
        else:
            out.setdefault(c.reduction.source, c.source)
    return out
