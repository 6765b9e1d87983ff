#!/usr/bin/env bash
# `make test`: unit and integration tests in one process, then the MPI tests under mpirun with
# 2, 3 and 4 ranks. Runs every tier even after a failure, then exits non-zero if any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
export PYTHONPATH="$ROOT"
# Open MPI as root and with more ranks than cores; single-copy (CMA) is refused in containers.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN=(mpirun --oversubscribe --mca btl_vader_single_copy_mechanism none)

failed=()
echo "== unit and integration tests (one process; integration tests launch real jobs)"
"$PY" -m pytest tests/unit tests/integration "$@" || failed+=("unit/integration")
for np in 2 3 4; do
    echo "== MPI tests: mpirun -np $np"
    # timeout: a rank stuck outside pytest's own per-test timeout cannot hang CI.
    timeout 900 "${MPIRUN[@]}" -np "$np" "$PY" -m pytest tests/mpi --color=no --timeout 120 "$@" \
        || failed+=("mpi-np$np")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED tiers: ${failed[*]}"
    exit 1
fi
echo "all test tiers passed"
