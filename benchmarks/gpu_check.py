"""The Python half of scripts/gpu_check.sh (the one command for a lent GPU).

    python -m benchmarks.gpu_check slug                        # the results folder's device name
    python -m benchmarks.gpu_check bench PART [PART ...] --out DIR [--dry-run]
    python -m benchmarks.gpu_check summary --out DIR [--dry-run]

`bench` runs parts of the benchmark slice and writes DIR/bench/PART.json for each: `forward` (dense
causal d128 bf16 at 4K and 16K; sliding window, document and softcap at 16K, through the
harness of benchmarks/run.py), `decode`, `linear` and `backward` (benchmarks/gpu_families.py).
Every attncc and peer output is checked against the reference before it is timed; a peer that
is missing is recorded with its reason. Exit status 1 when an attncc entry is not ok.
`--dry-run`: on a CPU, the same cases at toy shapes under TRITON_INTERPRET=1, nothing timed.

`summary` reads DIR/parts.tsv (the shell script's record of each part), DIR/tests/*.xml (the
GPU tier's junit files) and DIR/bench/*.json, and writes DIR/check.json and DIR/summary.md:
attncc against the fastest peer of each workload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SCHEMA = "attncc-gpu-check/1"
PARTS = ("forward", "decode", "linear", "backward")
# (workload of benchmarks/workloads.py, L) at D = 128 bf16, B x H by the harness's fill rule
FORWARD = (("dense-causal", 4096), ("dense-causal", 16384), ("flex-sliding-window", 16384),
           ("flex-document", 16384), ("flex-softcap", 16384))
LEFT_OUT = {"sdpa-math": "left out of the GPU check: it materialises the L x L scores (minutes "
                         "at 16K, outside the 8-minute budget); benchmarks.run times it"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("slug", help="print the device's name as a folder name")
    bench = sub.add_parser("bench", help="run parts of the benchmark slice")
    bench.add_argument("parts", nargs="+", choices=PARTS)
    summary = sub.add_parser("summary", help="write check.json and summary.md")
    for s in (bench, summary):
        s.add_argument("--out", type=Path, required=True, help="the results folder")
        s.add_argument("--dry-run", action="store_true", help="CPU, toy shapes, no timings")
    return p.parse_args(argv)


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _context(dry_run: bool) -> dict[str, Any]:
    from benchmarks import environment
    device = "cpu" if dry_run else "cuda"
    info = environment.device_info(device)
    info["name"] = _device_name() if device == "cuda" else info["name"]
    return {"dry_run": dry_run, "date": environment.now(), "device": info,
            "versions": environment.versions() | {"fla": environment._version("fla-core")},
            "git": environment.git()}


def _forward(dry_run: bool, timer: Any, results: list[dict], failed: list[dict]) -> None:
    from benchmarks import harness, peers, workloads
    impls = (peers.ATTNCC, *(p for p in peers.PEERS if p.name not in LEFT_OUT))
    device = "cpu" if dry_run else "cuda"
    for name, L in FORWARD:
        w = workloads.select([name])[0]
        if dry_run:
            if (name, L) != next(f for f in FORWARD if f[0] == name):
                continue  # one toy shape per workload
            shape = w.smoke_shapes[0]
        else:
            shape = workloads.fill(L, 128, "bfloat16")
        try:
            case = workloads.make_case(w, shape, device, dry_run)
            results.append(harness.run_case(case, impls, timer))
        except Exception as e:  # noqa: BLE001 - recorded in "failed"
            traceback.print_exc()
            failed.append({"workload": name, "shape": shape.as_dict(),
                           "reason": f"{type(e).__name__}: {e}"[:600]})
        case = None
        print(_line(results[-1]) if results else "", flush=True)


def bench(part: str, out: Path, dry_run: bool) -> int:
    if dry_run:  # before attncc loads: its kernels run under Triton's CPU interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    from benchmarks import gpu_families, harness
    if not dry_run and not torch.cuda.is_available():
        print("the benchmark slice needs a CUDA GPU; use --dry-run on a CPU", file=sys.stderr)
        return 2
    timer = None if dry_run else harness.cuda_timer
    results: list[dict] = []
    failed: list[dict] = []
    try:
        if part == "forward":
            _forward(dry_run, timer, results, failed)
        else:
            try:
                results += gpu_families.run_family(part, "cpu" if dry_run else "cuda",
                                                   dry_run, timer)
            except Exception as e:  # noqa: BLE001 - recorded in "failed"
                traceback.print_exc()
                failed.append({"workload": part, "shape": None,
                               "reason": f"{type(e).__name__}: {e}"[:600]})
    except KeyboardInterrupt:  # gpu_check.sh's time limit sends SIGINT: keep what ran
        failed.append({"workload": part, "shape": None, "reason": "interrupted at the part's "
                       "time limit (SIGINT); the results before it are kept"})
    if any(r.get("interrupted") for r in results):
        failed.append({"workload": part, "shape": None, "reason": "interrupted at the part's "
                       "time limit (SIGINT); the entries measured before it are kept"})
    obj = {"schema": SCHEMA + "/part", "part": part, **_context(dry_run),
           "peers_left_out": LEFT_OUT if part == "forward" else {},
           "results": results, "failed": failed}
    path = out / "bench" / f"{part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    bad = [r["workload"] for r in results if r["entries"]["attncc"]["status"] != "ok"]
    print(f"wrote {path}" + (f"; attncc not ok on {bad}" if bad else "")
          + (f"; {len(failed)} case(s) failed" if failed else ""))
    return 1 if bad or failed else 0


def _line(r: dict[str, Any]) -> str:
    shown = " ".join(f"{n}={e['ms']:.3f}ms" if e["ms"] is not None else f"{n}={e['status']}"
                     for n, e in r["entries"].items())
    return f"{r['workload']:<24} {_shape(r['shape'])}  {shown}"


def _shape(s: dict[str, Any]) -> str:
    return " ".join(f"{k}{v}" for k, v in s.items() if k not in ("dtype", "grid") and v) \
        + f" {s.get('dtype', '')}"


# ---- summary -----------------------------------------------------------------------------------

def _parts(out: Path) -> list[dict[str, Any]]:
    """parts.tsv: `name <TAB> status <TAB> rc <TAB> seconds <TAB> note` per part run."""
    rows = []
    path = out / "parts.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, seconds, *note = line.split("\t") + [""]
        rows.append({"part": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit()
                     else None, "seconds": float(seconds or 0), "note": note[0] or None})
    return rows


def _junit(path: Path) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        return {"junit": path.name, "error": f"unreadable: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
    return {"junit": path.name, **counts, "passed": counts["tests"] - counts["failures"]
            - counts["errors"] - counts["skipped"], "failing": failing[:50]}


def best_peer(r: dict[str, Any]) -> dict[str, Any]:
    """attncc's time against the fastest peer timed in the same run (None where not timed)."""
    timed = {n: e["ms"] for n, e in r["entries"].items() if n != "attncc" and e["ms"]}
    a = r["entries"]["attncc"]
    if not timed:
        return {"attncc_ms": a["ms"], "peer": None, "peer_ms": None, "ratio": None}
    peer = min(timed, key=timed.__getitem__)
    return {"attncc_ms": a["ms"], "peer": peer, "peer_ms": timed[peer],
            "ratio": timed[peer] / a["ms"] if a["ms"] else None}


def _cell(r: dict[str, Any], b: dict[str, Any]) -> list[str]:
    a = r["entries"]["attncc"]
    if b["attncc_ms"] is None:
        peers = ", ".join(f"{n}: {e['status']}" for n, e in r["entries"].items() if n != "attncc")
        return [a["status"], "-", "-", peers]
    if b["peer"] is None:
        return [f"{b['attncc_ms']:.3f} ms", "none timed", "-", ""]
    return [f"{b['attncc_ms']:.3f} ms", f"{b['peer']} {b['peer_ms']:.3f} ms",
            f"{b['ratio']:.2f}x" if b["ratio"] else "-", ""]


def summary(out: Path, dry_run: bool) -> int:
    parts = _parts(out)
    tests = {p.stem: _junit(p) for p in sorted((out / "tests").glob("*.xml"))}
    bench_files = {p.stem: json.loads(p.read_text())
                   for p in sorted((out / "bench").glob("*.json"))}
    results = [r for part in PARTS if part in bench_files for r in bench_files[part]["results"]]
    failed = [f for part in PARTS if part in bench_files for f in bench_files[part]["failed"]]
    first = next(iter(bench_files.values()), None)
    ctx = ({k: first[k] for k in ("device", "versions", "git")} if first
           else {k: v for k, v in _context(dry_run).items() if k in ("device", "versions", "git")})
    from benchmarks import environment
    obj = {"schema": SCHEMA, "dry_run": dry_run, "date": environment.now(), **ctx,
           "parts": parts, "tests": tests,
           "peers_left_out": LEFT_OUT,
           "results": [r | {"best": best_peer(r)} for r in results], "failed": failed}
    (out / "check.json").write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    (out / "summary.md").write_text(_markdown(obj))
    print(f"wrote {out / 'check.json'} and {out / 'summary.md'}")
    return 0


def _markdown(obj: dict[str, Any]) -> str:
    d, v = obj["device"], obj["versions"]
    lines = [f"# GPU check: {d['name']}" + (" (DRY RUN: CPU, toy shapes, nothing timed)"
                                              if obj["dry_run"] else ""), "",
             f"{obj['date']}; torch {v['torch']}, triton {v['triton']}, attncc {v['attncc']}, "
             f"fla {v.get('fla')}; commit {obj['git']['commit']}"
             + (" (dirty)" if obj["git"]["dirty"] else ""), "",
             "## Parts", "", "| part | status | rc | seconds | note |", "|---|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['rc']} | {p['seconds']:.0f} | "
              f"{p['note'] or ''} |" for p in obj["parts"]]
    lines += ["", "## GPU test tier", "", "| part | passed | failed | errors | skipped |",
              "|---|---|---|---|---|"]
    for name, t in obj["tests"].items():
        if "error" in t:
            lines.append(f"| {name} | {t['error']} | | | |")
            continue
        lines.append(f"| {name} | {t['passed']} | {t['failures']} | {t['errors']} | "
                     f"{t['skipped']} |")
        lines += [f"  - failing: `{f}`" for f in t["failing"]]
    lines += ["", "## attncc vs the fastest peer (median ms; ratio = peer ms / attncc ms, "
              "> 1: attncc faster)", "",
              "| workload | shape | attncc | fastest peer | ratio | peers (untimed) |",
              "|---|---|---|---|---|---|"]
    for r in obj["results"]:
        lines.append(f"| {r['workload']} | {_shape(r['shape'])} | "
                     + " | ".join(_cell(r, r["best"])) + " |")
    reasons = {(n, e["status"], e["reason"]) for r in obj["results"]
               for n, e in r["entries"].items() if e["status"] != "ok"}
    if reasons:
        lines += ["", "Not timed:", ""] + [f"- {n} ({s}): {why}" for n, s, why in sorted(reasons)]
    lines += [f"- {n}: {why}" for n, why in obj["peers_left_out"].items()]
    if obj["failed"]:
        lines += ["", "Failed in the harness:", ""]
        lines += [f"- {f['workload']}: {f['reason']}" for f in obj["failed"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.cmd == "slug":
        from benchmarks import environment
        print(environment.slug(_device_name()))
        return 0
    if args.cmd == "bench":
        # every part runs even when one is not ok; exit status: the worst
        return max(bench(part, args.out, args.dry_run) for part in args.parts)
    return summary(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
