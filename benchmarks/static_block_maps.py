"""Static estimate of the device block-map builder: the pair form (the mask at every (q, kv)
pair of every tile, templates/block_map.py.j2) against the row-interval form (bounds once per
row, tiles classified from their min / max, templates/block_map_rows.py.j2), compiled for
sm_90 with no GPU and read from the SASS.

```bash
python -m benchmarks.static_block_maps            # -> benchmarks/results/static/block_maps_sm90.*
```

Both forms of each mask go through attncc's ahead-of-time path (`attncc.backends.triton.aot`,
ptxas included) at the launch's signature, tiles 128 x 64, 4 warps. Per kernel: the
instructions before the tile loop (once per program: per-row bounds in the row form), and one
iteration of the tile loop (`benchmarks.sass.paths`: shortest and longest path). The pair form
classifies one kv tile per iteration; the row form a chunk of them (`block_map_kv_tiles`: 32
for one interval per row), on the short path when the min / max decide every tile of the
chunk and on the long one (the exact count) otherwise. The estimate at Lq = Lk = 16384 sums, over the 128 programs of one (batch, head)
group, prologue + iterations x path, with the number of long-path chunks of each program
counted on the host from the mask's own row bounds (the same tests the kernel makes). A static
count of issued warp instructions, not a timing: memory traffic (one int8 store per tile in
both) and latency are not in it.

The masks: causal and a sliding window (their kernels use closed-form tile ranges, no block
map; their block-map kernels are compiled here as the simplest interval masks), and a document
mask written as FlexAttention writes it, `offsets[doc[q]] <= kv <= q` with captured tensors,
which attncc routes to the device builder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sympy
import torch

import attncc
from attncc.backends.triton.aot import compile_spec
from attncc.backends.triton.launch_spec import block_map_spec
from attncc.backends.triton.render import block_map_kernel_name, render_block_map
from attncc.ir.eval import evaluate
from attncc.ir.plan import KernelPlan
from attncc.passes.pipeline import run_spec_passes
from attncc.passes.row_intervals import row_intervals
from attncc.passes.select_tiles import block_map_kv_tiles
from benchmarks import sass

OUT = Path(__file__).resolve().parent / "results" / "static"
L, BLOCK_M, BLOCK_N, ARCH = 16384, 128, 64, 90


def _document_mask() -> Any:
    """FlexAttention's document mask from offsets: 8 documents of random lengths."""
    gen = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randint(1, L, (7,), generator=gen))[0]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts]).to(torch.int32)
    doc = (torch.searchsorted(offsets, torch.arange(L), right=True) - 1).to(torch.int32)

    def document(b, h, q_idx, kv_idx):
        return (kv_idx >= offsets[doc[q_idx]]) & (kv_idx <= q_idx)
    return document


def masks() -> dict[str, Any]:
    return {"causal": attncc.causal(), "sliding window 1024": attncc.sliding_window(1024),
            "document (offsets[doc[q]] <= kv <= q)": _document_mask()}


def compile_form(plan: KernelPlan, pairs: bool, folder: Path) -> dict[str, Any]:
    """Compile one form of `plan`'s block-map kernel for sm_90 and read its SASS."""
    path = folder / f"{block_map_kernel_name(plan)}_{'pairs' if pairs else 'rows'}.py"
    path.write_text(render_block_map(plan, pairs=pairs))
    holder = SimpleNamespace(plan=plan, entry=SimpleNamespace(files={"block_map.py": path}))
    spec = block_map_spec(holder, ARCH, (BLOCK_M, BLOCK_N))
    art = compile_spec(spec, ARCH, f"tiles {BLOCK_M}x{BLOCK_N}", dtype="float16",
                       head_dims=(128, 128))
    instrs = sass.parse_functions(sass.disassemble(art.cubin, sass.cuobjdump_path()))[art.name]
    spans = sass.loops(instrs)
    start, end = max(spans, key=lambda se: se[1] - se[0])  # the tile loop: the widest
    short, long = sass.paths(instrs[start:end + 1])
    return {"regs": art.n_regs, "stack_bytes": art.stack_bytes, "loops": len(spans),
            "prologue": sass.region(instrs[:start]).insts,
            "loop_path": [short, long], "total": sass.region(instrs).insts}


def long_chunks(plan: KernelPlan, params: dict, tensors: dict) -> list[int]:
    """Per query tile: how many chunks of kv tiles take the exact-count path, by the kernel's
    own tests on the mask's row bounds (attncc.passes.row_intervals), evaluated on the host."""
    pieces = row_intervals(plan.spec).pieces
    q = torch.arange(L)
    env_values = {"q_idx": q, "Lq": L, "Lk": L, "b": 0, "h": 0, "Hq": 1, "Hkv": 1, **params}

    def value(expr: sympy.Basic) -> torch.Tensor:
        env = {s: env_values[s.name] for s in expr.free_symbols if s.name in env_values}
        return torch.broadcast_to(torch.as_tensor(evaluate(expr, env, tensors)), (L,)).long()

    n_m, n_n = L // BLOCK_M, L // BLOCK_N
    c0 = torch.arange(n_n) * BLOCK_N
    c1 = c0 + BLOCK_N - 1
    full = torch.zeros(n_m, n_n, dtype=torch.bool)
    empty = torch.ones(n_m, n_n, dtype=torch.bool)
    for p in pieces:
        lo, hi = value(p.lo).clamp(min=0), value(p.hi).clamp(max=L - 1)
        on = (lo <= hi) & value(p.cond).bool()
        lo, hi = torch.where(on, lo, L).view(n_m, -1), torch.where(on, hi, -1).view(n_m, -1)
        full |= (lo.amax(1, keepdim=True) <= c0) & (hi.amin(1, keepdim=True) >= c1)
        empty &= (c1 < lo.amin(1, keepdim=True)) | (c0 > hi.amax(1, keepdim=True))
    undecided = (~full & ~empty).view(n_m, -1, block_map_kv_tiles(len(pieces)))
    return undecided.any(2).sum(1).tolist()


def estimate(old: dict, new: dict, chunks: list[int], kv_tiles: int) -> dict[str, Any]:
    """Instructions per program (one warp's stream) summed over one group's programs."""
    n_m, n_n = L // BLOCK_M, L // BLOCK_N
    n_c = -(-n_n // kv_tiles)
    pairs = n_m * (old["prologue"] + n_n * old["loop_path"][1])
    short, long = new["loop_path"]
    rows = sum(new["prologue"] + n_c * short + u * (long - short) for u in chunks)
    return {"pairs_insts": pairs, "rows_insts": rows, "speedup": round(pairs / rows, 1),
            "pairs_per_tile": old["loop_path"][1],
            "rows_per_tile": round(rows / (n_m * n_n), 2),
            "long_chunks": sum(chunks), "chunks": n_m * n_c}


def run(out: Path) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, mask in masks().items():
            spec = attncc.Attention(mask=mask)
            plan = run_spec_passes(spec)
            old = compile_form(plan, True, Path(folder))
            new = compile_form(plan, False, Path(folder))
            params = {p.name: p.value for p in plan.spec.mask.params}
            tensors = {c.name: c.tensor for c in plan.spec.mask.captures}
            source = plan.block_map.source if plan.block_map else "closed form (no block map)"
            kv_tiles = block_map_kv_tiles(len(row_intervals(plan.spec).pieces))
            rows.append({"mask": name, "tile_source": source, "pairs": old, "rows": new,
                         "kv_tiles_per_chunk": kv_tiles,
                         **estimate(old, new, long_chunks(plan, params, tensors), kv_tiles)})
    record = {"arch": f"sm_{ARCH}", "L": L, "tiles": [BLOCK_M, BLOCK_N], "num_warps": 4,
              "toolchain": sass.toolchain(sass.cuobjdump_path()), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"block_maps_sm{ARCH}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"block_maps_sm{ARCH}.md").write_text(markdown(record))
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = [f"# Device block-map kernel, {record['arch']}, L = {record['L']}, tiles "
             f"{record['tiles'][0]}x{record['tiles'][1]}, {record['num_warps']} warps "
             f"({record['toolchain']})", "",
             "SASS instructions of one warp. Pair form: the mask at every pair, one kv tile "
             "per loop iteration. Row form: bounds once per row, a chunk of kv tiles "
             "(`block_map_kv_tiles`: 32 for one interval per row) per iteration (short path: "
             "min / max decide every tile; long path: exact count). Estimate: summed over the "
             f"{record['L'] // record['tiles'][0]} programs of one (batch, head).", "",
             "| mask | tile source | pairs: regs, prologue, per tile | rows: regs, prologue, "
             "per chunk (short / long) | long chunks | insts pairs -> rows | per tile | "
             "static speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        p, n = r["pairs"], r["rows"]
        lines.append(f"| {r['mask']} | {r['tile_source']} | {p['regs']}, {p['prologue']}, "
                     f"{p['loop_path'][1]} | {n['regs']}, {n['prologue']}, "
                     f"{n['loop_path'][0]} / {n['loop_path'][1]} | "
                     f"{r['long_chunks']} of {r['chunks']} | "
                     f"{r['pairs_insts']:,} -> {r['rows_insts']:,} | "
                     f"{r['pairs_per_tile']} -> {r['rows_per_tile']} | {r['speedup']}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for row in run(args.out):
        print(f"{row['mask']}: {row['pairs_insts']:,} -> {row['rows_insts']:,} instructions "
              f"per group ({row['speedup']}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
