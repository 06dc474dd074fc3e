"""Text form of a spec after each pass, its tile classes, and (for a shape) what the kernel visits:
a character tile map, the cost of each candidate token order, and optionally a PNG."""

from __future__ import annotations

from typing import Iterable

import torch

from attncc.ir.plan import KernelPlan
from attncc.ir.spec import AttentionSpec
from attncc.ir.tiles import EMPTY, FULL, PARTIAL, tile_map
from attncc.passes.classify_blocks import classify_blocks
from attncc.passes.choose_reorder import cost_table, grid_of, order_costs
from attncc.passes.pipeline import run_spec_passes

_CELL = {EMPTY: ".", PARTIAL: "p", FULL: "F"}
MAX_TEXT_TILES = 64  # wider maps are summarised in text (use png= to see them)


def visited_tiles(plan: KernelPlan, Lq: int, Lk: int, block: tuple[int, int]) -> torch.Tensor:
    """int8 [nM, nN]: what the kernel visits for batch 0, head 0 with the spec's values, from
    the same classification the kernel uses (closed-form ranges or the block map)."""
    bm, bn = block
    params = {p.name: p.value for p in plan.spec.params}
    tensors = {c.name: c.tensor for c in plan.spec.captures}
    if plan.block_map is None:
        return tile_map(plan.tiles, Lq=Lq, Lk=Lk, Hq=1, Hkv=1, block_m=bm, block_n=bn,
                        params=params, tensors=tensors)
    reorder = plan.spec.reorder
    q_pos = reorder.permutation(Lq) if reorder is not None else None
    kv_pos = reorder.permutation(Lk) if reorder is not None else None
    return classify_blocks(plan.spec.mask.expr, Lq=Lq, Lk=Lk, Hq=1, Hkv=1, block_m=bm,
                           block_n=bn, params=params, tensors=tensors, q_pos=q_pos,
                           kv_pos=kv_pos).classes[0, 0]


def save_png(classes: torch.Tensor, path: str, title: str) -> None:
    """The tile map as an image: white skipped, orange partial (mask evaluated), blue full."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(classes.numpy(), cmap=ListedColormap(["#ffffff", "#f28e2b", "#4e79a7"]),
              vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("kv tile")
    ax.set_ylabel("query tile")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def explain_text(spec: AttentionSpec, shape: Iterable[int] | None, block: tuple[int, int],
                 png: str | None = None) -> str:
    trace: list[tuple[str, str]] = [("input", spec.text())]
    plan = run_spec_passes(spec, trace)
    out = [f"key {spec.key[:16]}"]
    for name, text in trace:
        out += [f"== {name}", text]
    grid = grid_of(spec) if spec.mask is not None else None
    if grid is not None:
        out += [f"== token orders on grid {'x'.join(map(str, grid))}, tiles {block[0]}x"
                f"{block[1]} (batch 0, head 0)", cost_table(order_costs(spec, grid, block))]
    if shape is None:
        if png is not None:
            raise ValueError("explain: png= needs shape=(Lq, Lk)")
        return "\n".join(out)
    lq, lk = shape
    m = visited_tiles(plan, lq, lk, block)
    head = (f"tile map Lq={lq} Lk={lk} tiles {block[0]}x{block[1]}: "
            f"{int((m > 0).sum())}/{m.numel()} visited, {int((m == FULL).sum())} full, "
            f"{int((m == PARTIAL).sum())} partial")
    out.append("== " + head)
    if m.shape[1] <= MAX_TEXT_TILES:
        out += ["".join(_CELL[int(c)] for c in row) for row in m]
    elif png is None:  # say so, rather than end at the counts as if that were the map
        out.append(f"(map not drawn: {m.shape[1]} kv tiles wide, more than {MAX_TEXT_TILES} "
                   f"fit in text; png=FILE draws it as an image (`--png FILE` on the command "
                   f"line), larger tiles (`--block`) narrow it)")
    if png is not None:
        save_png(m, png, f"{plan.spec.tag}: {head}")
        out.append(f"(tile map written to {png})")
    return "\n".join(out)
