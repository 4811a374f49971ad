#!/usr/bin/env bash
# The one prepared GPU check (issue 18), under 10 minutes on an H200: the device-aware tests on CUDA, then the
# layer, model and PDE benchmarks against escnn on the GPU. Results (markdown + JSON, each headed with the GPU's
# name) and the log go to benchmarks/results/gpu_<gpu name>/; commit that folder.
#
#   benchmarks/gpu_check.sh             on a machine with CUDA
#   benchmarks/gpu_check.sh --dry-run   anywhere: the same steps on the CPU with tiny budgets, into a temp folder
#                                       (checks that every step parses and runs; numbers mean nothing)
#
# Every step has its own time limit (their sum is 9 min 55 s); a failed or timed-out step is reported and the
# next one runs; the exit status is 1 if any step failed. PY overrides the interpreter (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if [ "${1:-}" = "--dry-run" ]; then
  DRY=1; DEV=cpu; OUT=$(mktemp -d -t gpu_check_dry.XXXX); REP=2; THREADS=1
  GROUPS_=p4; PAIRS=gequiv_p4cnn:gequiv_escnn_c4cnn; TEST_K='device and p4 and not p4m'
elif [ -z "${1:-}" ]; then
  DRY=0; DEV=cuda; REP=10; THREADS=4
  GROUPS_=p4,p4m,c8,d8,c16; PAIRS=gequiv_p4cnn:gequiv_escnn_c4cnn,gequiv_p4mcnn:gequiv_escnn_d4cnn,gequiv_c8cnn:gequiv_escnn_c8cnn
  TEST_K='device or gpu or cuda'
  if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or use --dry-run"
    exit 2
  fi
  NAME=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name(0).lower()).strip('_'))")
  OUT=benchmarks/results/gpu_$NAME
else
  echo "usage: benchmarks/gpu_check.sh [--dry-run]"; exit 2
fi
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
FAILED=0

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  [ $rc = 0 ] || FAILED=1
}

has_device_arg() { $PY "$1" --help 2>/dev/null | grep -q -- '--device'; }

$PY -c "import torch; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" | tee -a "$LOG"

# 1. the tests that take the --device fixture (group layers, their gradients, equivariance, writes followed)
step tests 120 $PY -m pytest -q -x -p no:cacheprovider --device "$DEV" tests/layers tests/models -k "$TEST_K"
# 2. layers: every group against the floor and escnn R2Conv; gequiv_p4cnn against a planar CNN
step bench_gconv 110 $PY benchmarks/bench_gconv.py --part layers --groups "$GROUPS_" --device "$DEV" \
  --threads "$THREADS" --repeats "$REP" --out "$OUT/gconv.md"
step bench_gconv_model 30 $PY benchmarks/bench_gconv.py --part model --device "$DEV" --threads "$THREADS" \
  --repeats "$REP" --out "$OUT/gconv_model.md"
step bench_layers_escnn 45 $PY benchmarks/bench_layers_escnn.py --device "$DEV" --threads "$THREADS" \
  --repeats "$REP" --out "$OUT/escnn_layers.md"
step bench_cn_speed 35 $PY benchmarks/bench_cn.py --part speed --device "$DEV" --threads "$THREADS" --runs 1 \
  --repeats "$REP" --out "$OUT/cn_speed.md"
# 3. models: each G-CNN against its escnn equivalent (train step, batch-1 latency, memory)
step bench_models_escnn 140 $PY benchmarks/bench_models_escnn.py --pairs "$PAIRS" --device "$DEV" \
  --threads "$THREADS" --repeats "$REP" --out "$OUT/escnn_models.md"
# 4. PDE and stem benchmarks, where they take --device (owned by the pde / stem work; skipped with a note otherwise)
for b in bench_pde bench_stem; do
  if has_device_arg "benchmarks/$b.py"; then
    if [ "$b" = bench_pde ]; then
      step $b 70 $PY benchmarks/$b.py --section morph --device "$DEV" --threads "$THREADS" --out "$OUT/pde"
    else
      step $b 45 $PY benchmarks/$b.py --device "$DEV" --threads "$THREADS" --repeats "$REP" --out "$OUT/stem"
    fi
  else
    echo "== $b: skipped, it has no --device option yet" | tee -a "$LOG"
  fi
done

echo "results in $OUT (failed steps: $FAILED)" | tee -a "$LOG"
[ $DRY = 1 ] && echo "dry run: numbers are CPU numbers with $REP rounds, not results" | tee -a "$LOG"
exit $FAILED
