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
