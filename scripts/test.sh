#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (GPU-only tests skip, with a reason, without one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n auto --durations=25 "$@"
