"""The pass pipeline: spec passes run once at `attncc.compile`, signature passes per call shape."""

from __future__ import annotations

import dataclasses

from attncc.ir.plan import KernelPlan, Signature
from attncc.ir.spec import AttentionSpec
from attncc.ir.verify import verify
from attncc.passes.canonicalize import Canonicalize
from attncc.passes.choose_tile_source import ChooseTileSource
from attncc.passes.choose_reorder import ChooseReorder
from attncc.passes.classify_tiles import ClassifyTiles
from attncc.passes.select_tiles import SelectTiles

SPEC_PASSES = (
    ChooseReorder(),  # reorder="auto": the token order whose tiles are fewest and densest
    Canonicalize(),   # atoms as kv bounds, so tiles can be classified
)
PLAN_PASSES = (
    SelectTiles(),    # block sizes, warps, stages for the signature's dtype, head dim and target
)


def run_spec_passes(spec: AttentionSpec, trace: list | None = None) -> KernelPlan:
    """Canonical spec + tile classes. `trace` collects (pass name, text) for `explain`."""
    spec = verify(spec)
    for p in SPEC_PASSES:
        spec = verify(p(spec))
        if trace is not None:
            trace.append((p.name, spec.text()))
    tiles = ClassifyTiles()(spec)  # the kernel's loop structure, from the symbolic mask
    if trace is not None:
        trace.append(("classify-tiles", tiles.text()))
    source = ChooseTileSource()(spec, tiles)  # closed form where exact, else a block map
    if trace is not None:
        trace.append(("choose-tile-source", source.text() if source else "closed-form ranges"))
    return KernelPlan(spec=spec, tiles=tiles, block_map=source)


def run_plan_passes(plan: KernelPlan, signature: Signature) -> KernelPlan:
    plan = dataclasses.replace(plan, signature=signature)
    for p in PLAN_PASSES:
        plan = p(plan)
    return plan
