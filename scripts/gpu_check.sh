#!/usr/bin/env bash
# The prepared GPU check (issue 17), ~8 minutes on one GPU: CUDA parity of every layer, the bench's
# CUDA rows, a short GPU sweep stacked and unstacked; everything into reports/bench/gpu/.
# On a machine without CUDA it says so and exits 0 (tests/test_stack.py runs that case;
# tests/test_gpu_check_scripts.py runs the parity and stack scripts on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-reports/bench/gpu}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing checked"
    exit 0
fi
mkdir -p "$OUT"
status=0
echo "gpu-check: 1/3 CUDA parity of every layer -> $OUT/parity.md"
timeout 180 "$PY" scripts/gpu_parity.py > "$OUT/parity.md" || status=1
tail -1 "$OUT/parity.md"
echo "gpu-check: 2/3 the bench's CUDA rows -> $OUT/bench"
timeout 150 "$PY" -m normzoo.bench --device cuda --quick --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
echo "gpu-check: 3/3 a short GPU sweep, stacked and unstacked -> $OUT/stacked.md"
timeout 240 "$PY" scripts/stack_speed.py --device cuda --repeats 2 --steps 200 --out "$OUT/stacked.md" || status=1
echo "gpu-check: done (status $status); results in $OUT"
exit "$status"
