"""What the paper examples share: the interpreter set-up, `--perturb`, their check lines and the
tile count from `attncc.explain`. Each example keeps its own PyTorch implementation of its paper
(the independent oracle); nothing of that lives here.

Import it before attncc (`from paper_check import ...`; an example runs as a script, so its
folder is on sys.path): without a GPU it selects the Triton interpreter before any kernel module
is loaded.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is loaded
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import attncc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_ON = f"fp32 on {DEVICE} ({'interpreter' if DEVICE == 'cpu' else 'GPU'})"


def perturbed(doc: str) -> bool:
    """Parse the command line: `--perturb` (for the tests) makes the example's oracle wrong on
    purpose, so its check must fail."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--perturb", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args().perturb


def check_abs(what: str, err: float, tol: float, *, over: str = "", indent: str = "",
              also: bool = True) -> bool:
    """Print `check: max |what| = err over (tol) -> OK` (MISMATCH when err >= tol or `also`
    fails); the verdict."""
    ok = err < tol and also
    print(f"{indent}check: max |{what}| = {err:.2e}{over} (tol {tol:.0e}) -> "
          f"{'OK' if ok else 'MISMATCH'}")
    return ok


def report(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Print `check name: ... ok` (FAIL beyond `tol`): the max error of `got` against the fp64
    `want`, relative to max(|want|, 1); the verdict."""
    err = (got.double().cpu() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
    ok = err <= tol
    print(f"check {name}: max error {err:.2e} (of max |expected|; tolerance {tol:.0e}) "
          f"{'ok' if ok else 'FAIL'}")
    return ok


def result(ok: bool) -> int:
    """Print the summary line; the exit status."""
    print("result: " + ("all checks passed" if ok else "MISMATCH"))
    return 0 if ok else 1


def visited(spec: attncc.AttentionSpec, lq: int, lk: int, tile: int) -> tuple[int, int]:
    """(tiles the softmax kernel visits, for head 0, and tiles in the grid) from attncc.explain's
    tile map."""
    line = next(s for s in attncc.explain(spec, shape=(lq, lk), block=(tile, tile)).splitlines()
                if " visited" in s)
    seen, total = line.split(": ", 1)[1].split(" visited")[0].split("/")
    return int(seen), int(total)
