#!/usr/bin/env bash
# Creates .venv (if missing) and installs attncc into it with its test tools. Idempotent.
# torch: the CPU wheel pinned here is the one this project's machines carry; a machine that
# already has a torch (a GPU image) keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test]"
# the CUDA backend's tests read the CUTLASS/CuTe headers of nvidia-cutlass and nothing else of
# it: installed without its Python dependencies (cuda-python, scipy, ...), which they never load
.venv/bin/pip install -q --no-deps "nvidia-cutlass>=4.2"
