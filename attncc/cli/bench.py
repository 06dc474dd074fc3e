"""`attncc bench MANIFEST`: benchmark the manifest's kernels with the benchmark harness.

Runs `python -m benchmarks.run --manifest MANIFEST` from the attncc source tree, where
`benchmarks/` lives (it is not part of the installed package): one workload per [[kernel]]
entry, at its `shapes`, `dtypes` and head dims, checked against the reference, then timed on a
CUDA GPU. Without a GPU it refuses (exit status 2): timings of the CPU interpreter say nothing
about a kernel. `--smoke` runs the entries on the CPU instead (B = H = 1, head dim 16, the entry's
smallest L), checking them and timing nothing. Results go to benchmarks/results/ (or --out) as JSON, Markdown and a PNG.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from attncc.cli.output import error
from attncc.manifest import ManifestError, load_manifest

NO_GPU = ("attncc bench: no CUDA GPU here; refusing to print meaningless numbers (--smoke "
          "checks the entries on the CPU without timing them)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a manifest's kernels (needs a CUDA GPU, or "
                                     "--smoke; and the attncc source tree)",
                       description=__doc__.split("\n\n", 1)[1].replace("\n", " "))
    p.add_argument("manifest", help="TOML manifest (see examples/manifest.toml)")
    p.add_argument("--smoke", action="store_true",
                   help="on the CPU: B = H = 1, head dim 16, each entry's smallest L, "
                        "checked against the reference, nothing timed")
    p.add_argument("--only", action="append", metavar="SUBSTRING",
                   help="only entries whose name contains SUBSTRING (repeatable)")
    p.add_argument("--out", metavar="DIR", help="results directory (default benchmarks/results)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:  # a file that is no manifest is one line here, before the harness starts
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        error("bench", str(e))
        return 2
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print(NO_GPU, file=sys.stderr)
            return 2
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "benchmarks" / "run.py").is_file():
        error("bench", f"bench needs the attncc source tree (benchmarks/); none beside {repo}")
        return 2
    argv = ["--manifest", str(manifest.path.resolve())]
    argv += ["--smoke"] * args.smoke
    argv += [a for s in args.only or () for a in ("--only", s)]
    if args.out:
        argv += ["--out", str(Path(args.out).resolve())]
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=repo,
                          check=False)
    return done.returncode or (1 if manifest.errors else 0)
