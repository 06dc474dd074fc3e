"""`attncc build MANIFEST`: compile every kernel a manifest names for GPU targets, no GPU needed.

Each (entry, arch, dtype, head dims) gives the targets of `build.build_targets` (forward,
block map, a reordered spec's permuted forward, with `backward = true` the gradient kernels); each
target is one `prebuilt.load_or_compile_target` call, the function `precompile` and GPU launches
use at run time, run `--jobs` at a time (each compile is a child process). Progress
goes to stderr, one line per kernel; a bad entry or a failed kernel is one line there too and the
others still build. The summary goes to stdout. Exit status 0 iff everything built or loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attncc.backends.base import Unsupported
from attncc.backends.keys import triton_type
from attncc.cli.output import dims, error, one_line, size
from attncc import config
from attncc.backends import cache
from attncc.manifest import ManifestError, load_manifest, parse_archs
from attncc.ops.softmax.compiled import CompiledAttention

DEFAULT_ARCHS = "sm_80,sm_90"
BUILD_BACKENDS = ("triton", "cuda")  # the backends with ahead-of-time binaries


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="compile every kernel of a manifest for GPU targets (no GPU needed)",
        description="Compile every kernel a manifest names for GPU targets, without a GPU, into "
                    "the kernel cache, where `precompile` (and ATTNCC_OFFLINE=1 processes) load "
                    "them. A bad entry or a failed kernel is reported in one line; the others "
                    "still build. Exit status 0 iff every kernel built or was already cached.")
    p.add_argument("manifest", help="TOML manifest (see examples/manifest.toml)")
    p.add_argument("--arch", default=DEFAULT_ARCHS,
                   help=f"comma-separated targets for entries without `archs` "
                        f"(default {DEFAULT_ARCHS}; sm_80, sm_86, sm_89, sm_90)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                   help="kernels compiled at once (default: the CPU count)")
    p.add_argument("--out", metavar="DIR",
                   help="cache directory to build into (sets ATTNCC_CACHE_DIR, and "
                        "TRITON_CACHE_DIR to DIR/triton, for this run)")
    p.add_argument("--backend", default="triton", choices=BUILD_BACKENDS,
                   help="whose kernels to build: triton (default) or cuda (CUDA C++ cubins "
                        "made with nvcc; needs nvcc and the nvidia-cutlass headers)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print a failed kernel's whole compiler error, not one line")
    p.set_defaults(run=run)


@dataclass(frozen=True)
class Job:
    entry: str  # the manifest entry's name
    target: Any  # one binary of `backend` (`Backend.targets`): kind, arch, dtype, head dims
    backend: Any  # the `attncc.backends.base.Backend` that builds it

    def label(self) -> str:
        t = self.target
        kind = "" if t.kind == "forward" else f"/{t.kind}"
        return (f"{self.entry}{kind}{t.variant.suffix()}{t.tiles_suffix()} sm{t.arch} "
                f"{triton_type(t.dtype)} {dims(t.head_dim_qk, t.head_dim_v)}")


def run(args: argparse.Namespace) -> int:
    os.environ["ATTNCC_OFFLINE"] = "0"  # building is what ATTNCC_OFFLINE=1 defers to
    if args.out:  # everything this run writes, Triton's own compile cache too, goes there
        out = Path(args.out).resolve()
        os.environ["ATTNCC_CACHE_DIR"] = str(out)
        os.environ["TRITON_CACHE_DIR"] = str(out / "triton")

    if args.jobs < 1:
        error("build", f"--jobs: expected >= 1, got {args.jobs}")
        return 2
    try:
        archs = parse_archs(args.arch)
        manifest = load_manifest(args.manifest)
    except ManifestError as e:
        error("build", str(e))
        return 2
    start = time.perf_counter()
    for line in manifest.errors:
        error("build", line)
    jobs, bad, unsupported = _jobs(manifest, archs, args.backend)
    bad += len(manifest.errors)
    counts = _run_jobs(jobs, args.jobs, args.verbose)
    root = config.cache_dir()
    n_entries = len(cache.inspect_all(root))
    print(f"attncc build: {counts['built']} built, {counts['cached']} cached, "
          f"{counts['failed']} failed, {bad} bad entries"
          f"{f', {unsupported} not supported by {args.backend}' if unsupported else ''} "
          f"({len(jobs)} kernels) in "
          f"{time.perf_counter() - start:.1f}s; cache {root}: {n_entries} entries, "
          f"{size(cache.dir_size(root))}")
    return 0 if counts["failed"] == 0 and bad == 0 else 1


def _jobs(manifest, archs: tuple[int, ...], backend_name: str = "triton"
          ) -> tuple[list[Job], int, int]:
    """Every kernel to build, once per key, the number of entries that could not be compiled
    at all, and the number of (entry, signature)s `backend_name` has no kernel for (one line
    each on stderr: a CUDA build of a manifest written for Triton skips what CUDA lacks, such
    as head dim 256, and still succeeds). Plans are made here, in one thread: the worker
    threads only look them up."""
    jobs: dict[str, Job] = {}  # by target key: two spellings of one spec share their binaries
    bad = unsupported = 0
    for entry in manifest.kernels:
        try:
            kernels = CompiledAttention(entry.spec).families.get(backend_name)
            if kernels is None and backend_name == "triton":
                raise ValueError(f"memory {entry.spec.memory.text()!r} has no kernel yet")
            if isinstance(kernels, Unsupported):
                if backend_name == "triton":
                    raise kernels
                print(f"attncc build: kernel {entry.name!r}: not supported: {kernels}",
                      file=sys.stderr)
                unsupported += 1
                continue
            backend = kernels.backend
            targets = []
            for arch in entry.archs or archs:
                for dtype in entry.dtypes:
                    for dqk, dv in entry.head_dims:
                        try:
                            targets += backend.targets(kernels, dtype, dqk, dv, arch,
                                                       backward=entry.backward)
                        except Unsupported as e:
                            if backend_name == "triton":
                                raise
                            print(f"attncc build: kernel {entry.name!r} sm{arch} {dtype} "
                                  f"{dims(dqk, dv)}: not supported: {e}", file=sys.stderr)
                            unsupported += 1
        except Exception as e:  # one bad spec must not stop the others
            error("build", f"{manifest.path}: kernel {entry.name!r}: {one_line(e)}")
            bad += 1
            continue
        shared = sorted({jobs[t.key()].entry for t in targets if t.key() in jobs})
        for target in targets:
            jobs.setdefault(target.key(), Job(entry.name, target, backend))
        if shared:
            print(f"attncc build: kernel {entry.name!r} shares kernels with "
                  f"{', '.join(map(repr, shared))} (same canonical spec): built once",
                  file=sys.stderr)
    return list(jobs.values()), bad, unsupported


def _run_jobs(jobs: list[Job], n_threads: int, verbose: bool) -> dict[str, int]:
    counts = {"built": 0, "cached": 0, "failed": 0}

    def one(job: Job) -> tuple[str, float, str]:
        start = time.perf_counter()
        try:
            result = job.backend.build(job.target)
        except Exception as e:
            detail = f"{type(e).__name__}: {e}" if verbose else one_line(e)
            return "failed", time.perf_counter() - start, detail
        return ("built" if result.built else "cached"), result.seconds, ""

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        futures = {pool.submit(one, job): job for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            status, seconds, detail = future.result()
            counts[status] += 1
            tail = f": {detail}" if detail else ""
            word = "FAILED" if status == "failed" else status
            print(f"[{done}/{len(jobs)}] {futures[future].label()} {word} {seconds:.1f}s{tail}",
                  file=sys.stderr, flush=True)
    return counts
