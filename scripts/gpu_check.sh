#!/usr/bin/env bash
# scripts/gpu_check.sh OUT_DIR: the GPU checks of one machine in one command (at most 8 minutes).
#
#   1. python -m tests.gpu_checks: softmax parity on the GPU (fp32 and bf16 features) against the
#      float64 CPU reference, bf16 autocast of the backbones, the `torch` graph index on the GPU
#      against the CPU (a plain program: pytest is not needed);
#   2. python -m app.bench gpu: one-GPU throughput of full and knn at 10^6..10^8 classes, peak
#      memory, the most classes that fit, an exact graph build's time.
# Needs only torch, numpy and h5py: no Horovod, faiss, mpi4py or MPI launcher. Writes
# OUT_DIR/env.txt, gpu_checks.json, gpu_checks.log, gpu_capacity.json (+ .png with matplotlib),
# bench.log and summary.txt. Exit 0 when every check passed and the benchmark ran.
#
# Environment: DEVICE (default cuda; DEVICE=cpu runs the same steps on the CPU with small sizes,
# as tests/unit/test_gpu_check_script.py does), PYTHON (default .venv/bin/python where it
# imports torch, else python3), BENCH_ARGS (replaces the benchmark's size arguments).
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEVICE="${DEVICE:-cuda}"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
if [ "$DEVICE" = cpu ]; then
    GRAPH_CLASSES=3000
    BENCH_ARGS="${BENCH_ARGS:---classes 2e3 5e3 --dim 16 --batch 32 --k 8 --random-negatives 8 --steps 2 --warmup 1}"
else
    GRAPH_CLASSES=20000
    BENCH_ARGS="${BENCH_ARGS:---time-limit-s 240 --build-budget-s 60}"
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "device: $DEVICE"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    "$PYTHON" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: not installed (not needed)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
echo "== checks (python -m tests.gpu_checks --device $DEVICE)"
timeout 180 "$PYTHON" -m tests.gpu_checks --device "$DEVICE" --out "$OUT" \
    --graph-classes "$GRAPH_CLASSES" 2>&1 | tee "$OUT/gpu_checks.log"
checks=${PIPESTATUS[0]}
[ "$checks" -eq 0 ] || status=1

echo "== benchmark (python -m app.bench gpu --device $DEVICE $BENCH_ARGS)"
# shellcheck disable=SC2086 - BENCH_ARGS is a list of arguments
timeout 290 "$PYTHON" -m app.bench gpu --device "$DEVICE" --name gpu_capacity --results "$OUT" \
    $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
[ "$bench" -eq 0 ] || status=1

{
    echo "checks: exit $checks ($(tail -n 1 "$OUT/gpu_checks.log"))"
    echo "benchmark: exit $bench"
    grep -E "^(knn|full|exact)" "$OUT/bench.log"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
