"""Text form of a spec after each pass, its tile classes and (for a shape) its tile map."""

from __future__ import annotations

from typing import Iterable

from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import tile_map
from attncc.passes.pipeline import run_spec_passes

_CELL = {0: ".", 1: "p", 2: "F"}


def explain_text(spec: AttentionSpec, shape: Iterable[int] | None,
                 block: tuple[int, int]) -> str:
    trace: list[tuple[str, str]] = [("input", spec.text())]
    plan = run_spec_passes(spec, trace)
    out = [f"key {spec.key[:16]}"]
    for name, text in trace:
        out += [f"== {name}", text]
    if shape is not None:
        lq, lk = shape
        bm, bn = block
        tensors = {c.name: c.tensor for c in plan.spec.captures}
        m = tile_map(plan.tiles, Lq=lq, Lk=lk, Hq=1, Hkv=1, block_m=bm, block_n=bn,
                     params={p.name: p.value for p in plan.spec.params}, tensors=tensors)
        visited = int((m > 0).sum())
        out.append(f"== tile map Lq={lq} Lk={lk} tiles {bm}x{bn}: {visited}/{m.numel()} visited, "
                   f"{int((m == 2).sum())} full, {int((m == 1).sum())} partial")
        out += ["".join(_CELL[int(c)] for c in row) for row in m]
    return "\n".join(out)
