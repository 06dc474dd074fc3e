#!/usr/bin/env bash
# One command for the day a GPU is lent: the GPU test tier (a representative slice), a
# benchmark slice against SDPA / FlexAttention / fla, and a summary, all under one folder.
#
#   scripts/gpu_check.sh                     # on the GPU machine (< 8 minutes on an H100)
#   scripts/gpu_check.sh --out "$OUT"        # results somewhere else (default below)
#   scripts/gpu_check.sh --dry-run           # on a CPU: the same steps at toy shapes (< ~60 s)
#   GPU_CHECK_FULL_TIER=1 scripts/gpu_check.sh   # the whole `pytest -m gpu` (no 8-minute bound)
#
# Results: benchmarks/results/gpu/<device-name-slug>-<YYYY-MM-DD>[-N]/ (dry run: ...-dry-run)
#   check.json, summary.md     everything in one file; attncc vs the fastest peer per workload
#   parts.tsv                  each part: status (ok / failed / timeout / skipped), rc, seconds
#   install.log                the `pip install --no-deps -e .` if attncc was not importable
#   tests/<part>.xml, .log     the GPU tier's junit and output per part
#   bench/<part>.json, .log    the benchmark slice per part (forward, decode, linear, backward)
# Each part records its own failure and the script goes on; each part has a time limit, and
# the whole run a total budget (GPU_CHECK_BUDGET_S, default 450 s) that no part may overrun.
# Environment: PYTHON (default: python, else python3), GPU_CHECK_DRY_RUN=1 (= --dry-run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run) || DRY_FLAG=()
if [ "$DRY" = 1 ]; then  # a CPU rehearsal, also on a machine with a GPU
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-450}"   # 7 min 30 s (+ at most 15 s to kill a hung part): < 8 min
RESERVE=25                            # kept back for the summary
FULL_TIER="${GPU_CHECK_FULL_TIER:-0}"
[ "$FULL_TIER" = 1 ] && BUDGET="${GPU_CHECK_BUDGET_S:-7200}"

if [ -z "$OUT_DIR" ]; then
  if [ "$DRY" = 1 ]; then SLUG="cpu-dry-run"
  else SLUG="$(timeout 60 "$PY" -c 'import re, torch
n = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
print(re.sub(r"[^a-z0-9]+", "-", n.lower()).strip("-"))' 2>/dev/null || echo unknown-device)"
  fi
  BASE="$ROOT/benchmarks/results/gpu/$SLUG-$(date -u +%Y-%m-%d)"
  OUT_DIR="$BASE"; n=1
  while [ -e "$OUT_DIR" ]; do n=$((n + 1)); OUT_DIR="$BASE-$n"; done
fi
mkdir -p "$OUT_DIR/tests" "$OUT_DIR/bench"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
# a rerun into the same folder replaces the earlier run's files (the summary reads all of them)
rm -f "$OUT_DIR"/tests/*.xml "$OUT_DIR"/tests/*.log "$OUT_DIR"/bench/*.json "$OUT_DIR"/bench/*.log \
  "$OUT_DIR"/check.json "$OUT_DIR"/summary.md "$OUT_DIR"/summary.log "$OUT_DIR"/install.log
: > "$OUT_DIR/parts.tsv"
echo "gpu_check: results in $OUT_DIR (python: $PY, dry run: $DRY, budget ${BUDGET}s)"

# run_part NAME LIMIT LOG CMD...: runs CMD under `timeout` (its own limit, cut to what is left
# of the budget), records "NAME status rc seconds note" in parts.tsv, never stops the script.
run_part() {
  local name="$1" limit="$2" log="$3"; shift 3
  local left=$((BUDGET - RESERVE - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t\t0\ttotal budget spent before it started\n' "$name" \
      >> "$OUT_DIR/parts.tsv"
    echo "gpu_check: $name skipped (budget spent)"
    return 0
  fi
  echo "gpu_check: $name (limit ${limit}s) ..."
  local t0 rc status note=""
  t0=$(date +%s)
  set +e
  # SIGINT first: pytest then still writes its junit, the benchmark its results so far
  timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1
  rc=$?
  set -e
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout; note="stopped at its ${limit}s limit" ;;
    *) status=failed; note="exit status $rc; see $(basename "$log")" ;;
  esac
  if [ "$rc" = 5 ] && [ "${name#tests-}" != "$name" ] && [ "$DRY" = 1 ]; then
    status=ok; note="no GPU test selected without a GPU (pytest exit 5)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$note" \
    >> "$OUT_DIR/parts.tsv"
  echo "gpu_check: $name $status ($(($(date +%s) - t0))s)"
  tail -n 3 "$log" | sed 's/^/    /'
}

# 0. attncc importable from this checkout (never touching torch / triton: --no-deps; offline:
#    no build isolation, the image's setuptools builds it)
#    (checked from / : every later command runs from the repo root, where `import attncc`
#    would find the folder even uninstalled)
install_attncc() {
  if (cd / && "$PY" -c 'import attncc, sys; from pathlib import Path
sys.exit(0 if Path(attncc.__file__).resolve().is_relative_to(Path(sys.argv[1])) else 1)' "$ROOT")
  then echo "attncc already installed from $ROOT"
  else "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT"
  fi
}
export -f install_attncc  # `timeout` runs programs: the function goes through bash -c
export PY ROOT
run_part install 60 "$OUT_DIR/install.log" bash -c install_attncc

# 1. the GPU test tier: a representative slice per part (GPU-only tests, forward, backward,
#    serving, linear), or the whole tier with GPU_CHECK_FULL_TIER=1
run_tests() {
  local name="$1" limit="$2"; shift 2
  run_part "tests-$name" "$limit" "$OUT_DIR/tests/$name.log" "$PY" -m pytest -m gpu -q -rfEs \
    -p no:cacheprovider --maxfail=25 --junitxml="$OUT_DIR/tests/$name.xml" "$@"
}
GPU_ONLY=(tests/test_tiles.py tests/test_direct_launch.py tests/test_reorder.py)
FORWARD=(tests/test_triton_forward.py tests/test_document_cu_seqlens.py)
BACKWARD=(tests/test_backward.py)
SERVING=(tests/test_serving_paged.py tests/test_serving_plan.py)
LINEAR=(tests/test_triton_linear_varlen.py tests/test_linear_api.py
        tests/test_triton_linear_hybrid.py)
if [ "$FULL_TIER" = 1 ]; then
  run_tests all 6000 tests
elif [ "$DRY" = 1 ]; then  # no GPU: the tier only skips; one process collects the whole slice
  run_tests slice 60 "${GPU_ONLY[@]}" "${FORWARD[@]}" "${BACKWARD[@]}" "${SERVING[@]}" \
    "${LINEAR[@]}"
else
  run_tests gpu-only 30 "${GPU_ONLY[@]}"
  run_tests forward 40 "${FORWARD[@]}"
  run_tests backward 35 "${BACKWARD[@]}"
  run_tests serving 25 "${SERVING[@]}"
  run_tests linear 25 "${LINEAR[@]}"
fi

# 2. the benchmark slice, one process per part on a GPU (a hang or a crash costs that part
#    only); the dry run does them in one process (imports once)
bench() {
  run_part "bench-$1" "$2" "$OUT_DIR/bench/$1.log" \
    "$PY" -m benchmarks.gpu_check bench "${@:3}" --out "$OUT_DIR" "${DRY_FLAG[@]}"
}
if [ "$DRY" = 1 ]; then
  bench all 120 forward decode linear backward
else
  bench forward 130 forward
  bench decode 30 decode
  bench linear 45 linear
  bench backward 60 backward
fi

# 3. the summary (its own reserve of the budget)
set +e
timeout -k 5 "$RESERVE" "$PY" -m benchmarks.gpu_check summary --out "$OUT_DIR" "${DRY_FLAG[@]}" \
  > "$OUT_DIR/summary.log" 2>&1
rc=$?
set -e
[ "$rc" = 0 ] || echo "gpu_check: summary failed (exit status $rc; see summary.log)"
[ -f "$OUT_DIR/summary.md" ] && cat "$OUT_DIR/summary.md"
echo "gpu_check: done in $(($(date +%s) - START))s; results in $OUT_DIR"
# exit status 1 when any part did not end ok (the results are written either way)
if cut -f2 "$OUT_DIR/parts.tsv" | grep -qv '^ok$' || [ "$rc" != 0 ]; then exit 1; fi
