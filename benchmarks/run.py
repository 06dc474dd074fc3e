"""One command for the whole benchmark grid.

    python -m benchmarks.run                 # every landed workload x shape x peer (CUDA)
    python -m benchmarks.run --smoke         # CPU, tiny shapes, nothing timed (CI)
    python -m benchmarks.run --only flex-doc --only sparse --out /tmp/bench
    python -m benchmarks.run --only dense --L 4096 --L 16384 --D 128 --dtype bfloat16
    python -m benchmarks.run --list
    python -m benchmarks.run --manifest examples/manifest.toml   # its entries (attncc bench)

Writes `<out>/<device>-<date>[-smoke].json` (schema in benchmarks/README.md) with a Markdown
summary and a PNG plot of the same stem. Exit status 1 when an attncc entry is not "ok"
(wrong or error) or a case failed in the harness itself (listed under "failed"); a peer that is
wrong or unavailable is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shapes, correctness checks only, no timings")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--only", action="append", metavar="SUBSTRING",
                        help="run workloads whose name contains SUBSTRING (repeatable)")
    parser.add_argument("--L", type=int, action="append", metavar="N",
                        help="only shapes with this sequence length (repeatable)")
    parser.add_argument("--D", type=int, action="append", metavar="N",
                        help="only shapes with this head dim (repeatable)")
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float16"),
                        help="only shapes of this dtype (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the workloads and exit")
    parser.add_argument("--manifest", type=Path, metavar="FILE",
                        help="benchmark this attncc manifest's [[kernel]] entries instead of "
                             "the built-in grid (--only then narrows among them)")
    return parser.parse_args(argv)


def _shapes(w: Any, args: argparse.Namespace) -> list[Any]:
    """The workload's grid (smoke or full), narrowed by --L / --D / --dtype."""
    return [s for s in (w.smoke_shapes if args.smoke else w.shapes)
            if (not args.L or s.L in args.L) and (not args.D or s.D in args.D)
            and (not args.dtype or s.dtype in args.dtype)]


def _protocol(smoke: bool) -> dict[str, Any]:
    from benchmarks import flops, harness, workloads
    return {
        "timer": ("none (smoke run: no timings)" if smoke else
                  f"triton.testing.do_bench, median of >= {harness.MIN_REPS} runs after warm-up,"
                  " L2 cleared between runs; peers in the same process on the same inputs"),
        "reference": ("attncc.backends.reference.forward.attention_reference in "
                      + ("fp64" if smoke else "fp32 (fp64 too slow at 32K; TF32 off)")),
        "checked_on": harness.CHECKED_ON,
        "tolerances": {k: list(v) for k, v in harness.TOLERANCES.items()},
        "flops": ("4 * B * H * allowed_pairs * D, allowed pairs exact from attncc's mask "
                  f"(classify_blocks + allowed_pairs at {flops.TILE[0]}x{flops.TILE[1]} tiles)"),
        "fill_rule": ("smoke: B = H = 1" if smoke else
                      f"B * H * L = {workloads.TOKEN_HEADS} (H = 16 up to L = 16K, then fewer "
                      "heads at B = 1)"),
    }


def _out_path(out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path, n = out / f"{stem}.json", 1
    while path.exists():  # never overwrite an earlier run of the same day
        n += 1
        path = out / f"{stem}-{n}.json"
    return path


def _line(result: dict[str, Any]) -> str:
    parts = []
    for name, e in result["entries"].items():
        shown = (f"{e['ms']:.3f}ms" if e["ms"] is not None else e["status"])
        parts.append(f"{name}={shown}")
    s = result["shape"]
    return (f"{result['workload']:<26} B{s['B']} H{s['H']} L{s['L']} D{s['D']} {s['dtype']:<8} "
            + " ".join(parts))


def _workloads(args: argparse.Namespace) -> list[Any]:
    """The built-in grid, or the manifest's entries; narrowed by --only (ValueError: none)."""
    from benchmarks import workloads
    if args.manifest is None:
        return workloads.select(args.only)
    from benchmarks.manifest_workloads import from_manifest
    found = from_manifest(args.manifest)
    chosen = [w for w in found if not args.only or any(s in w.name for s in args.only)]
    if not chosen:
        raise ValueError(f"{args.manifest}: no entry to benchmark"
                         + (f" matches --only {args.only}; the entries are "
                            f"{[w.name for w in found]}" if args.only and found else ""))
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:  # before attncc loads: its kernels run under Triton's CPU interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from benchmarks import workloads

    try:
        chosen = _workloads(args)
    except ValueError as e:  # ManifestError too: one line
        print(e, file=sys.stderr)
        return 2
    grid = {w.name: _shapes(w, args) for w in chosen}
    chosen = [w for w in chosen if grid[w.name]]
    if not chosen:
        print("no shape to run: --L / --D / --dtype leave none"
              + (", or the manifest's entries list no shapes" if args.manifest else ""),
              file=sys.stderr)
        return 2
    if args.list:
        for w in chosen:
            print(f"{w.name:<26} {w.family:<7} {len(grid[w.name]):>3} shapes  {w.about}")
        if args.manifest is None:
            for family, why in workloads.PENDING.items():
                print(f"(not benchmarked yet) {family}: {why}")
        return 0

    import torch

    from benchmarks import environment, harness, peers, report
    from benchmarks.schema import SCHEMA, validate_results
    if not args.smoke and not torch.cuda.is_available():
        print("the benchmark grid needs a CUDA GPU; use --smoke for the CPU check of the "
              "harness", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    timer = None if args.smoke else harness.cuda_timer
    impls = (peers.ATTNCC, *peers.PEERS)
    results, failed = [], []
    for w in chosen:
        for shape in grid[w.name]:
            try:  # implementations record their own failures; this is the harness's (setup,
                # reference): the case is listed as failed and the run goes on
                case = workloads.make_case(w, shape, device, args.smoke)
                results.append(harness.run_case(case, impls, timer))
                print(_line(results[-1]), flush=True)
            except Exception as e:  # noqa: BLE001 - recorded in "failed", exit status 1
                traceback.print_exc()
                failed.append({"workload": w.name, "shape": shape.as_dict(),
                               "reason": f"{type(e).__name__}: {e}"[:600]})
            case = None
            if device == "cuda":
                torch.cuda.empty_cache()
    dev = environment.device_info(device)
    obj = {"schema": SCHEMA, "smoke": args.smoke, "date": environment.now(), "device": dev,
           "versions": environment.versions(), "git": environment.git(),
           "protocol": _protocol(args.smoke),
           "pending": {"families": dict(workloads.PENDING), "peers": dict(peers.PENDING_PEERS)},
           "results": results, "failed": failed}
    validate_results(obj)
    stem = f"{environment.slug(dev['name'] if device == 'cuda' else 'cpu')}-{obj['date'][:10]}"
    path = _out_path(args.out, stem + ("-smoke" if args.smoke else ""))
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    md, png = report.write_report(path)
    print(f"wrote {path}, {md.name}, {png.name}")
    bad = [f"{r['workload']} {r['shape']}" for r in results
           if r["entries"]["attncc"]["status"] not in ("ok", "unavailable")]
    if bad:
        print(f"attncc is not ok on {len(bad)} case(s): {bad}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} case(s) failed in the harness: {failed}", file=sys.stderr)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
