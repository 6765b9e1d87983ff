#!/usr/bin/env bash
# `make demo`: generate the synthetic demo dataset (once), train configs/demo.yaml on 2 ranks with
# mpirun, evaluate over all classes, print the final top-1 and the run directory.
# Override with environment variables: NP (ranks), CLASSES, PER_CLASS, RUN_DIR, EXTRA (--set ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
NP="${NP:-2}"
CLASSES="${CLASSES:-20000}"
PER_CLASS="${PER_CLASS:-12}"
DATA="${DATA:-data/demo}"
RUN_DIR="${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
export PYTHONPATH="$ROOT" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if [ ! -f "$DATA/dataset.json" ]; then
    echo "[demo] generating $CLASSES synthetic classes x $PER_CLASS samples in $DATA"
    "$PY" -m data_prep.synthetic --out "$DATA" --num-classes "$CLASSES" --per-class "$PER_CLASS" \
        --val-per-class 2 --dim 128 --seed 0
else
    echo "[demo] using the existing dataset $DATA (delete it to regenerate)"
fi
echo "[demo] training on $NP ranks: mpirun -np $NP $PY -m app.train --config configs/demo.yaml --set data.path=$DATA --set out_dir=$RUN_DIR ${EXTRA:-}"
# shellcheck disable=SC2086  # EXTRA is a list of --set flags
mpirun -np "$NP" --oversubscribe "$PY" -m app.train --config configs/demo.yaml \
    --set "data.path=$DATA" --set "out_dir=$RUN_DIR" ${EXTRA:-}
echo "[demo] metrics: $RUN_DIR/metrics.jsonl  evaluation: $RUN_DIR/eval.jsonl  summary: $RUN_DIR/summary.json"
