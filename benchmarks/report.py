"""Results JSON -> Markdown summary and PNG plot, next to the JSON (same stem).

    python -m benchmarks.report benchmarks/results/nvidia-h100-80gb-hbm3-2026-05-01.json

The Markdown is a pure function of the JSON (`render_markdown`), so it can always be
regenerated; the plot shows TFLOP/s per implementation (smoke runs: the check's max |o - ref|).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks.schema import validate_results

SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _shape(s: dict[str, Any]) -> str:
    grid = f" grid {s['grid'][0]}x{s['grid'][1]}" if s.get("grid") else ""
    return f"B{s['B']} H{s['H']} L{s['L']} D{s['D']} {SHORT[s['dtype']]}{grid}"


def _params(p: dict[str, Any]) -> str:
    shown = [f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in p.items()
             if not (isinstance(v, list) and len(v) > 3)]
    return f" ({', '.join(shown)})" if shown else ""


def _cell(e: dict[str, Any], speedup: float | None, notes: list[str], name: str,
          is_base: bool) -> str:
    status = e["status"]
    if status == "ok":
        if e["ms"] is None:
            return f"ok (err {e['max_err']:.1e})"
        if is_base:
            return f"{e['ms']:.3f} ms, {e['tflops']:.0f} TFLOP/s"
        return f"{e['ms']:.3f} ms ({speedup:.2f}x)" if speedup else f"{e['ms']:.3f} ms"
    note = f"{name}: {status}: {e['reason']}"
    if note not in notes:
        notes.append(note)
    mark = f"[{notes.index(note) + 1}]"
    if status == "wrong":
        err = "non-finite" if e["max_err"] is None else f"err {e['max_err']:.1e}"
        return f"**wrong** ({err}) {mark}"
    return f"{'n/a' if status == 'unavailable' else '**error**'} {mark}"


def _table(results: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [n for n in r["entries"] if n not in names]
    lines = ["| workload | shape | tile eff | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---|" * len(names)]
    notes: list[str] = []
    for r in results:
        cells = [_cell(r["entries"][n], r["speedup"].get(n), notes, n, n == "attncc")
                 if n in r["entries"] else "" for n in names]
        lines.append(f"| {r['workload']}{_params(r['params'])} | {_shape(r['shape'])} | "
                     f"{r['tile_efficiency']:.3f} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    return lines


def render_markdown(obj: dict[str, Any]) -> str:
    d, v, g, p = obj["device"], obj["versions"], obj["git"], obj["protocol"]
    lines = [f"# attncc benchmarks: {d['name']}, {obj['date']}", ""]
    if obj["smoke"]:
        lines += [("**smoke run: no timings.** Tiny shapes on the CPU (attncc under Triton's "
                   "interpreter): this checks the harness (correctness checks, JSON schema, "
                   "report), not speed."), ""]
    extra = ", ".join(f"{k} {d[k]}" for k in ("capability", "sm_count", "memory_gib")
                      if d.get(k) is not None)
    commit = (g["commit"] or "unknown")[:12] + (" (dirty)" if g.get("dirty") else "")
    tol = ", ".join(f"{SHORT[k]} atol {a} rtol {r}" for k, (a, r) in p["tolerances"].items())
    lines += [(f"- device: {d['name']} ({d['kind']}{', ' + extra if extra else ''}), "
               f"driver {d['driver']}, CUDA {d['cuda']}"),
              "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())
              + f"; commit {commit}",
              f"- timer: {p['timer']}",
              f"- check: {p['reference']}; on {p['checked_on']}; {tol}",
              f"- FLOPs: {p['flops']}",
              f"- shapes: {p['fill_rule']}",
              ("- cells: attncc ms and TFLOP/s on useful FLOPs; a peer's ms and (peer ms / "
               "attncc ms: above 1 means attncc is faster); tile eff = allowed pairs / visited "
               "64x64 tiles' area")]
    pending = obj["pending"]
    if pending["families"] or pending["peers"]:
        lines.append("- not benchmarked yet: " + "; ".join(
            f"{k} ({why})" for k, why in {**pending["families"], **pending["peers"]}.items()))
    families: dict[str, list[dict[str, Any]]] = {}
    for r in obj["results"]:
        families.setdefault(r["family"], []).append(r)
    for family, results in families.items():
        lines += ["", f"## {family}", ""] + _table(results)
    if obj["failed"]:
        lines += ["", "## failed in the harness (no entries)", ""]
        lines += [f"- {f['workload']} {_shape(f['shape'])}: {f['reason']}" for f in obj["failed"]]
    return "\n".join(lines) + "\n"


def plot(obj: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[dict[str, Any]]] = {}
    for r in obj["results"]:
        families.setdefault(r["family"], []).append(r)
    smoke = obj["smoke"]
    widest = max((len(rs) for rs in families.values()), default=1)
    fig, axes = plt.subplots(max(len(families), 1), 1, squeeze=False,
                             figsize=(max(8.0, 0.45 * widest + 3), 4.2 * max(len(families), 1)))
    if not families:
        axes[0, 0].set_title("no results (every case failed in the harness)")
    for ax, (family, results) in zip(axes[:, 0], families.items()):
        key = "max_err" if smoke else "tflops"
        values: dict[str, list[float]] = {}
        for r in results:
            for name in r["entries"]:
                values.setdefault(name, [])
        for name in values:  # the value of each result, NaN (no bar) where there is none
            values[name] = [(r["entries"].get(name) or {}).get(key) or float("nan")
                            for r in results]
        shown = {n: ys for n, ys in values.items() if not all(math.isnan(y) for y in ys)} or values
        width = 0.8 / len(shown)
        for i, (name, ys) in enumerate(shown.items()):
            xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(results))]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([f"{r['workload']}\nL{r['shape']['L']} D{r['shape']['D']} "
                            f"{SHORT[r['shape']['dtype']]}" for r in results],
                           rotation=90, fontsize=7)
        if smoke:
            ax.set_yscale("log")
            ax.set_ylabel("max |o - ref| (smoke: no timings)")
        else:
            ax.set_ylabel("TFLOP/s (useful FLOPs)")
        ax.set_title(f"{family}: {obj['device']['name']}, {obj['date'][:10]}")
        ax.legend(fontsize=7, ncol=min(len(shown), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(json_path: Path) -> tuple[Path, Path]:
    """Regenerate `<stem>.md` and `<stem>.png` from `<stem>.json`."""
    obj = json.loads(Path(json_path).read_text())
    validate_results(obj)
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md.write_text(render_markdown(obj))
    plot(obj, png)
    return md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the Markdown summary and the PNG "
                                     "plot of a results JSON")
    parser.add_argument("json", nargs="+", type=Path)
    for path in parser.parse_args(argv).json:
        md, png = write_report(path)
        print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
