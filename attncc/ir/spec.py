"""`AttentionSpec`: the whole IR of one attention variant, its canonical text and content key."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import sympy

from attncc.ir.nodes import Capture, DenseMemory, Mask, Normaliser, Param, Schedule, ScoreMod


@dataclass(frozen=True)
class AttentionSpec:
    """What attention computes (its five axes plus the schedule: docs/architecture.md).

    mask: allowed pairs (None: all pairs). score: score mod (None: the scaled dot product).
    scale: default softmax scale (None: 1/sqrt(Dqk)); a runtime scalar, never compiled in.
    """

    mask: Mask | None = None
    score: ScoreMod | None = None
    normaliser: Normaliser = field(default_factory=Normaliser)
    memory: Any = field(default_factory=DenseMemory)
    reorder: Any = None
    schedule: Schedule = field(default_factory=Schedule)
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.mask is not None and self.score is not None:
            renames = _clashes(self.mask, self.score)
            if renames:  # one namespace of runtime scalars per kernel: rename the score's
                object.__setattr__(self, "score", _renamed(self.score, renames))

    @property
    def params(self) -> tuple[Param, ...]:
        nodes = [n for n in (self.mask, self.score) if n is not None]
        return tuple(p for node in nodes for p in node.params)

    @property
    def captures(self) -> tuple[Capture, ...]:
        seen: dict[str, Capture] = {}
        for node in (self.mask, self.score):
            for c in node.captures if node is not None else ():
                seen.setdefault(c.name, c)
        if self.normaliser.sink is not None:
            seen.setdefault(self.normaliser.sink.name, self.normaliser.sink)
        return tuple(seen.values())

    def replace(self, **changes: Any) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)

    def text(self) -> str:
        """Readable canonical form, parameter values included (what `explain` prints)."""
        return "\n".join([
            "attention",
            f"  mask:       {self.mask.text() if self.mask is not None else 'all'}",
            f"  score:      {self.score.text() if self.score is not None else 'score'}",
            f"  normaliser: {self.normaliser.text()}",
            f"  memory:     {self.memory.text()}",
            f"  reorder:    {self.reorder.text() if self.reorder else 'none'}",
            f"  schedule:   {self.schedule.text()}",
            f"  scale:      {'1/sqrt(Dqk)' if self.scale is None else self.scale}",
        ])

    def kernel_text(self) -> str:
        """Structural form: what shapes the kernel. Parameter values and tensor data are out."""
        def expr(node: Mask | ScoreMod | None) -> str:
            if node is None:
                return "none"
            return " ".join([sympy.srepr(node.expr), *(p.kernel_text() for p in node.params),
                             *(c.text() for c in node.captures)])
        return "\n".join([expr(self.mask), expr(self.score), self.normaliser.text(),
                          self.memory.text(), self.reorder.text() if self.reorder else "none",
                          self.schedule.text()])

    @property
    def key(self) -> str:
        """sha256 of `kernel_text()`: equal for specs that compile to the same kernel."""
        return hashlib.sha256(self.kernel_text().encode()).hexdigest()

    @property
    def tag(self) -> str:
        """Readable part of kernel names, e.g. `causal_sw_softcap`."""
        parts = [n.tag for n in (self.mask, self.score) if n is not None]
        if self.normaliser.kind == "softmax_sink":
            parts.append("sink")
        return "_".join(parts) or "dense"


def _clashes(mask: Mask, score: ScoreMod) -> dict[str, str]:
    """Score names that collide with a different mask param/capture, mapped to fresh names."""
    mask_items = {x.name: x for x in (*mask.params, *mask.captures)}
    mapping = {}
    for item in (*score.params, *score.captures):
        twin = mask_items.get(item.name)
        if twin is not None and not (twin == item and getattr(twin, "tensor", None)
                                     is getattr(item, "tensor", None)):
            mapping[item.name] = f"{item.name}_s"
    return mapping


def _renamed(score: ScoreMod, renames: dict[str, str]) -> ScoreMod:
    subs, params, captures = {}, [], []
    for p in score.params:
        new = dataclasses.replace(p, name=renames.get(p.name, p.name))
        subs[p.symbol] = new.symbol
        params.append(new)
    for c in score.captures:
        new = dataclasses.replace(c, name=renames.get(c.name, c.name))
        subs[c.symbol] = new.symbol
        captures.append(new)
    return ScoreMod(score.expr.xreplace(subs), tuple(params), tuple(captures), score.tag)
