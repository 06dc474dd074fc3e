"""Host block-map build time: attncc's classifier vs FlexAttention's `create_block_mask`, on the
CPU, for the grid masks whose maps attncc builds on the host (HilbertA M15, 2-D and 3-D
neighbourhoods M12 / M13, all in their curve order), at L = 4096 and 16384.

Both build the same thing: per (query tile, kv tile) empty / partial / full at 128 x 128 tiles
(FlexAttention's default), as the lists a kernel reads. attncc: `classify_blocks` +
`kv_tile_lists` (what `BlockMaps` runs for the "analytic" source); FlexAttention: its
`create_block_mask` on the equivalent `mask_mod` (benchmarks/mods.py) permuted to the same order,
`device="cpu"`. The two maps are compared tile by tile: a run whose maps differ fails.

Timed with the default intra-op threads and with one thread (on a small shared machine the
threads of either side may only spin). Writes benchmarks/results/block_maps-<host>.json.

    .venv/bin/python -m benchmarks.block_maps [--sizes 4096 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

import attncc
from attncc.backends.triton.block_maps import kv_tile_lists
from attncc.ir.reorder import inverse
from attncc.ir.tiles import EMPTY, FULL, PARTIAL
from attncc.passes.classify_blocks import classify_blocks
from benchmarks import environment, mods

TILE = 128
RESULTS = Path(__file__).resolve().parent / "results"


def _grid_3d(L: int) -> tuple[int, int, int]:
    return {4096: (16, 16, 16), 16384: (16, 32, 32)}[L]


def cases(L: int) -> dict[str, tuple[attncc.Mask, mods.MaskMod, torch.Tensor]]:
    """name -> (attncc mask, equivalent mask_mod in original positions, curve order perm)."""
    side = int(L ** 0.5)
    hilbert2 = attncc.Hilbert2D(side, side).permutation(L)
    rank = inverse(hilbert2)
    frames, height, width = _grid_3d(L)
    hilbert3 = attncc.Hilbert3D(frames, height, width).permutation(L)
    return {
        "hilberta-t64-s0-c8": (attncc.hilberta(side, side, 64, 0, 8),
                               mods.hilberta(rank, side, side, 64, 0, 8), hilbert2),
        "hilberta-t64-s32-c8": (attncc.hilberta(side, side, 64, 32, 8),
                                mods.hilberta(rank, side, side, 64, 32, 8), hilbert2),
        "na2d-13x13": (attncc.neighbourhood_2d(side, side, 13, 13),
                       mods.neighbourhood_2d(side, side, 13, 13), hilbert2),
        "na3d-3x7x7": (attncc.neighbourhood_3d(frames, height, width, (3, 7, 7)),
                       _na3d(frames, height, width, (3, 7, 7)), hilbert3),
    }


def _na3d(frames: int, height: int, width: int, kernel: tuple[int, int, int]) -> mods.MaskMod:
    """M13: per axis, the query coordinate clamped into the grid, then within k // 2."""
    sizes, halves = (frames, height, width), [k // 2 for k in kernel]

    def mask_mod(b, h, q_idx, kv_idx):
        qc = (q_idx // (height * width), (q_idx // width) % height, q_idx % width)
        kc = (kv_idx // (height * width), (kv_idx // width) % height, kv_idx % width)
        out = None
        for a, c, n, r in zip(qc, kc, sizes, halves):
            near = (torch.clamp(a, r, n - 1 - r) - c).abs() <= r
            out = near if out is None else out & near
        return out
    return mask_mod


def attncc_classes(mask: attncc.Mask, perm: torch.Tensor, L: int) -> torch.Tensor:
    result = classify_blocks(mask.expr, Lq=L, Lk=L, Hq=1, Hkv=1, block_m=TILE, block_n=TILE,
                             params={p.name: p.value for p in mask.params},
                             tensors={c.name: c.tensor for c in mask.captures},
                             q_pos=perm, kv_pos=perm)
    assert result.exact
    kv_tile_lists(result.classes, L, TILE)  # the lists the kernel reads: part of the build
    return result.classes[0, 0]


def flex_classes(mask_mod: mods.MaskMod, perm: torch.Tensor, L: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask
    block = create_block_mask(mods.permuted(mask_mod, perm), None, None, L, L, device="cpu",
                              BLOCK_SIZE=TILE)
    n = L // TILE
    out = torch.full((n, n), EMPTY, dtype=torch.int8)
    for count, index, kind in ((block.kv_num_blocks, block.kv_indices, PARTIAL),
                               (block.full_kv_num_blocks, block.full_kv_indices, FULL)):
        for m in range(n):
            out[m, index[0, 0, m, :int(count[0, 0, m])].long()] = kind
    return out


def _time(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[list[float], torch.Tensor]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return times, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({torch.get_num_threads(), 1}, reverse=True))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    rows = []
    # first calls pay one-time costs (imports, vmap and sympy caches): not what is measured
    for _, (mask, mask_mod, perm) in cases(min(args.sizes)).items():
        attncc_classes(mask, perm, min(args.sizes))
        flex_classes(mask_mod, perm, min(args.sizes))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for L in args.sizes:
            for name, (mask, mask_mod, perm) in cases(L).items():
                ours, got = _time(lambda: attncc_classes(mask, perm, L), args.repeat)
                flex, want = _time(lambda: flex_classes(mask_mod, perm, L), args.repeat)
                if not torch.equal(got, want):
                    raise SystemExit(f"{name} L={L}: attncc and FlexAttention maps differ in "
                                     f"{int((got != want).sum())} tiles")
                row = {"mask": name, "L": L, "threads": threads, "tile": [TILE, TILE],
                       "attncc_s": ours, "flex_s": flex, "attncc_median_s":
                       statistics.median(ours), "flex_median_s": statistics.median(flex),
                       "speedup_median": statistics.median(flex) / statistics.median(ours),
                       "tiles": {k: int((got == v).sum()) for k, v in
                                 (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}}
                rows.append(row)
                print(f"threads={threads} L={L:6d} {name:22s} attncc "
                      f"{statistics.median(ours):8.3f} s  flex {statistics.median(flex):8.3f} s"
                      f"  x{row['speedup_median']:.1f}  {row['tiles']}", flush=True)
    info = {"benchmark": "block_maps", "what": __doc__.split("\n\n")[0], "date": environment.now(),
            "device": environment.device_info("cpu"), "versions": environment.versions(),
            "git": environment.git(), "repeat": args.repeat, "rows": rows}
    out = args.out or RESULTS / f"block_maps-{environment.slug(info['device']['name'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
