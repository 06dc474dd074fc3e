"""HilbertA end to end, and 2-D neighbourhood attention in three token orders.

1. For each grid (64x64 and 128x128 tokens) and each mask, the cost model's table: kv tiles the
   kernel visits in row-major, Morton, Hilbert and tile-major order (64x64 tiles), how many are
   full or partial, tile efficiency (allowed pairs / visited tile area) and density. Masks:
   HilbertA (tiles of 4^3 = 64 tokens, i.e. aligned 8x8 squares in Hilbert order, the layer's
   slide of half a tile, a shared 8x8 central region) and NATTEN-style M12 7x7 and 13x13.
2. A stack of HilbertA layers on the 64x64 grid: tokens are put in Hilbert order once, every
   layer runs on the permuted layout (`permuted=True`; even layers slide by 0, odd layers by
   half a tile: `shift` is a runtime parameter, so one compiled kernel serves every layer), and
   the output is put back in grid order at the end. Each layer is checked against the fp64
   reference.

On a CPU the kernels run under Triton's interpreter: only the 64x64 stack runs, with one head.
Expected run time there: about 2.5 minutes on an idle core (measured: 150 s of CPU time, and
9.4 minutes of wall time on a 2-core x86 VM shared with other jobs; two thirds of it the cost
tables of the 128x128 grid, the two interpreted layers under a sixth). On a GPU the same code
runs compiled, on both grids. `--png DIR` also writes every tile map as an image (needs
matplotlib).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded

import attncc  # noqa: E402
from attncc.backends.reference.forward import attention_reference  # noqa: E402
from attncc.ir.reorder import inverse  # noqa: E402
from attncc.passes.choose_reorder import cost_table, order_costs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE_TOKENS = 64  # 4^3: an aligned 8x8 square of the grid in Hilbert order
CENTRE = 8


def masks_for(side: int, layer: int = 0) -> dict[str, attncc.Mask]:
    shift = TILE_TOKENS // 2 if layer % 2 else 0
    return {
        f"HilbertA layer {layer} (shift {shift})":
            attncc.hilberta(side, side, TILE_TOKENS, shift, CENTRE),
        "M12 7x7": attncc.neighbourhood_2d(side, side, 7, 7),
        "M12 13x13": attncc.neighbourhood_2d(side, side, 13, 13),
    }


def print_cost_tables(side: int, png_dir: str | None) -> None:
    for layer in (0, 1):
        for name, mask in masks_for(side, layer).items():
            if layer == 1 and not name.startswith("HilbertA"):
                continue
            spec = attncc.Attention(mask=mask)
            start = time.perf_counter()
            costs = order_costs(spec, (side, side))
            seconds = time.perf_counter() - start
            print(f"\n{side}x{side} grid, {name}: cost model ({seconds:.1f} s)")
            print(cost_table(costs))
            if png_dir:
                for cost in costs:
                    path = os.path.join(png_dir, f"{side}-{name.split(' (')[0]}-{cost.name}.png"
                                        .replace(" ", "_"))
                    attncc.explain(attncc.Attention(mask=mask, reorder=cost.reorder),
                                   shape=(side * side, side * side), png=path)


def run_layer_stack(side: int, layers: int, heads: int, dim: int) -> None:
    L = side * side
    order = attncc.Hilbert2D(side, side)
    spec = attncc.Attention(mask=attncc.hilberta(side, side, TILE_TOKENS, 0, CENTRE),
                            reorder=order)
    attn = attncc.compile(spec)
    torch.manual_seed(0)
    x = torch.randn(1, heads, L, dim, device=DEVICE)
    perm = order.permutation(L, device=DEVICE)
    h = x[:, :, perm]  # into Hilbert order once; every layer keeps it
    for layer in range(layers):
        shift = TILE_TOKENS // 2 if layer % 2 else 0
        start = time.perf_counter()
        out = attn(h, h, h, permuted=True, shift=shift)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        grid_order = h[:, :, inverse(perm)].double()  # the fp64 reference takes grid order
        params = {**{p.name: p.value for p in spec.params}, "shift": shift}
        ref, _ = attention_reference(spec, grid_order, grid_order, grid_order, params=params)
        err = (out.double() - ref[:, :, perm]).abs().max().item()
        print(f"layer {layer}: shift {shift:2d}, {seconds:6.2f} s, max |err| vs fp64 {err:.2e}")
        assert err < 1e-4, "kernel disagrees with the reference"
        h = h + out
    y = h[:, :, inverse(perm)]  # back to grid order
    print(f"stack of {layers} layers done: output {tuple(y.shape)} in grid order")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", metavar="DIR", help="write every tile map as a PNG into DIR")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if args.png:
        os.makedirs(args.png, exist_ok=True)
    for side in (64, 128):
        print_cost_tables(side, args.png)
    heads, dim = (8, 64) if DEVICE == "cuda" else (1, 16)
    print(f"\nHilbertA stack on the 64x64 grid ({DEVICE}, {heads} head(s), head dim {dim}):")
    run_layer_stack(64, args.layers, heads, dim)
    if DEVICE == "cuda":
        run_layer_stack(128, args.layers, heads, dim)


if __name__ == "__main__":
    main()
