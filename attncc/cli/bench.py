"""`attncc bench MANIFEST`: time the manifest's kernels with the benchmark harness (CUDA only).

Runs `python -m benchmarks.run --only NAME ...` (one `--only` per manifest entry: the harness
runs workloads whose name contains it) from the attncc source tree, where `benchmarks/` lives;
it is not part of the installed package. Without a CUDA GPU it refuses (exit status 2): timings
of the CPU interpreter say nothing about a kernel.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from attncc.cli.output import error

NO_GPU = "attncc bench: no CUDA GPU here; refusing to print meaningless numbers"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a manifest's kernels (needs a CUDA GPU and the "
                                     "attncc source tree)",
                       description=__doc__.split("\n\n", 1)[1].replace("\n", " "))
    p.add_argument("manifest", help="TOML manifest (see examples/manifest.toml)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    from attncc.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        error("bench", str(e))
        return 2
    for line in manifest.errors:
        error("bench", line)
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "benchmarks" / "run.py").is_file():
        error("bench", f"bench needs the attncc source tree (benchmarks/); none beside {repo}")
        return 2
    only = [arg for entry in manifest.kernels for arg in ("--only", entry.name)]
    if not only:
        return 1
    run_ = subprocess.run([sys.executable, "-m", "benchmarks.run", *only], cwd=repo,
                          check=False)
    return run_.returncode or (1 if manifest.errors else 0)
