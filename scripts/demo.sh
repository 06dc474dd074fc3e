#!/usr/bin/env bash
# Sets up .venv and runs the quickstart: several catalogue variants compiled, explained, run
# (GPU if present, else the Triton interpreter) and checked against the fp64 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
