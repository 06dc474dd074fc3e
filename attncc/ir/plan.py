"""`KernelPlan`: what the passes hand the backend: the canonical spec, its tile classes, and the
launch schedule for one call signature (dtype, head dims, target)."""

from __future__ import annotations

from dataclasses import dataclass

from attncc.ir.nodes import Schedule
from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import BlockMapTiles, TileClasses


@dataclass(frozen=True)
class Signature:
    """What a call fixes beyond the spec. `target` is "interpreter", "sm80", "sm90", ..."""

    dtype: str  # "float16" | "bfloat16" | "float32"
    head_dim_qk: int
    head_dim_v: int
    target: str

    def text(self) -> str:
        return f"{self.dtype} d{self.head_dim_qk}/{self.head_dim_v} {self.target}"


@dataclass(frozen=True)
class KernelPlan:
    spec: AttentionSpec  # canonical
    tiles: TileClasses  # closed-form ranges (always derived: explain and tests show them)
    block_map: BlockMapTiles | None = None  # set when the kernel reads a run-time block map
    signature: Signature | None = None
    schedule: Schedule | None = None  # every field filled once `signature` is set
