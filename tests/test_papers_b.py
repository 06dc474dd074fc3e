"""Issue 19, examples 6-10 (SANA-Video, BASED, RAT, Titans, MiniCPM-SALA): each runs in a
subprocess under the interpreter and must pass its own check against the independent PyTorch
implementation written inside it; with `--perturb` (one input of that independent computation
changed) the same example must report the mismatch and exit 1, so the checks can fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["sana_video", "based", "rat", "titans", "minicpm_sala"]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    return subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_matches_its_independent_implementation(name):
    done = run_example(name)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = [s for s in done.stdout.splitlines() if s.startswith("check ")]
    assert checks and all(s.endswith(" ok") for s in checks), done.stdout
    assert "result: all checks passed" in done.stdout
    assert any(s.startswith("saved: ") for s in done.stdout.splitlines()), done.stdout


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_fails_when_its_reference_input_changes(name):
    done = run_example(name, "--perturb")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "result: MISMATCH" in done.stdout
    assert any(s.startswith("check ") and s.endswith(" FAIL") for s in done.stdout.splitlines())
