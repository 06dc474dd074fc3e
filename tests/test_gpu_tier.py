"""The GPU tier's switch: without a GPU, `pytest -m gpu` skips cleanly and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_tier_skips_with_a_reason_without_a_gpu():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/test_tiles.py", "tests/test_reorder.py"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "needs a CUDA GPU (none here: GPU tier skipped)" in out
    assert " passed" not in out and "failed" not in out and " skipped" in out
