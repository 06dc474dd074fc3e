"""The paper examples 1-5 of examples/README.md, each run as a script in its own process (under
TRITON_INTERPRET=1 without a GPU): exit status 0, an OK comparison line against the example's
own dense PyTorch implementation and the line of what attncc saved. `--perturb` makes an
example's oracle wrong on purpose; the example must then say MISMATCH and exit 1 (so the
comparison can fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAPERS = ["s2_attention", "duo_attention", "moba", "routing_transformer", "pbs_attention"]


def _run(name: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *flags], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", PAPERS)
def test_example_matches_its_dense_pytorch_version(name):
    run = _run(name)
    assert run.returncode == 0, run.stdout + run.stderr
    checks = [line for line in run.stdout.splitlines() if "check: max |" in line]
    assert checks and all(line.endswith("-> OK") for line in checks), run.stdout
    assert "attncc saved: " in run.stdout, run.stdout


@pytest.mark.parametrize("name", ["s2_attention", "duo_attention"])
def test_a_wrong_oracle_is_a_mismatch(name):
    run = _run(name, "--perturb")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "-> MISMATCH" in run.stdout, run.stdout
