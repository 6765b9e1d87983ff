# Sourced by the sbatch scripts in slurm/: the environment of every job and the `launch` helper.
# Launcher flags and environment only; what runs is in the sbatch scripts, how it trains is in
# app/. Everything here can be overridden by exporting it before `sbatch` (sbatch passes the
# submitting shell's environment to the job):
#
#   HUNDREDM_ROOT  repository root (default: the directory sbatch was run from)
#   VENV           virtual environment (default: $HUNDREDM_ROOT/.venv, made by `make setup`)
#   LAUNCHER       srun (default) or mpirun: how the job's tasks become MPI ranks
#   SRUN_MPI       srun's --mpi plugin (default pmix; pmi2 fails with Debian's Open MPI)
#   MPIRUN_ARGS    extra mpirun arguments (default: --bind-to none, see below)
#   OMP_NUM_THREADS  threads of numpy/BLAS per rank (default: --cpus-per-task, else 1); torch's
#                  own threads are set by the World (cores of the node / ranks on it)

export HUNDREDM_ROOT="${HUNDREDM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$HUNDREDM_ROOT" || exit 2
VENV="${VENV:-$HUNDREDM_ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "error: $VENV/bin/python: not found; run 'make setup' in $HUNDREDM_ROOT (on a shared filesystem) or export VENV" >&2
    exit 2
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONPATH="$HUNDREDM_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Open MPI refuses root unless told; containers also refuse its single-copy (CMA) transport.
# On a cluster where CMA works, export OMPI_MCA_btl_vader_single_copy_mechanism=cma for faster
# large messages between ranks of one node.
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

LAUNCHER="${LAUNCHER:-srun}"
SRUN_MPI="${SRUN_MPI:-pmix}"
# mpirun binds ranks to cores by default, which would pin each rank's torch threads to one core.
MPIRUN_ARGS="${MPIRUN_ARGS:---bind-to none}"
# Open MPI's odls_base_sigkill_timeout stays at its default of 1 s, set explicitly (which also
# tells the trainer not to warn about it): mpirun sleeps twice that long whenever it ends a job
# early, also after ranks that exit 3 on their own, so a large value keeps a finished job alive;
# the stop signals below reach the ranks as USR1, which needs no timeout.
export OMPI_MCA_odls_base_sigkill_timeout="${OMPI_MCA_odls_base_sigkill_timeout:-1}"

# _launcher: the launcher's command line for one MPI rank per task of the job, in LAUNCH_CMD.
_launcher() {
    case "$LAUNCHER" in
        srun) LAUNCH_CMD=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1) ;;
        # Open MPI reads the Slurm allocation and starts its daemons on the other nodes with srun.
        # shellcheck disable=SC2206
        mpirun) LAUNCH_CMD=(mpirun -np "${SLURM_NTASKS:?not inside a Slurm job}" $MPIRUN_ARGS) ;;
        *) echo "error: LAUNCHER=$LAUNCHER: unknown launcher; use srun or mpirun" >&2; return 2 ;;
    esac
}

# launch CMD...: CMD as one MPI rank per task of the job (all nodes, all tasks).
launch() {
    _launcher || return 2
    "${LAUNCH_CMD[@]}" "$@"
}

# run_requeueable CMD...: like `launch CMD...`, in the background, waiting for it. On USR1 (sbatch
# --signal=B:USR1@SECONDS sends it that long before the time limit; `scancel --signal=USR1
# --batch JOB` sends it now) the signal is passed on to CMD (srun and mpirun forward it to every
# rank; the trainer then writes a checkpoint at the end of its current step and exits with 3),
# and once CMD has ended the job is requeued: Slurm starts this script again with the same
# arguments, appending to the same log, and the trainer resumes from that checkpoint.
# On TERM or INT (`scancel --signal=TERM --batch JOB`, `kill` of this script) the same stop is
# asked for, as USR1 to CMD (both launchers forward USR1 untouched, while mpirun answers TERM by
# killing the ranks and srun by cancelling the step), but the job is not requeued: it ends with
# exit code 3 and `sbatch` of the same command resumes it later.
run_requeueable() {
    _launcher || return 2
    _REQUEUE=0
    trap _on_usr1 USR1
    trap '_on_stop TERM' TERM
    trap '_on_stop INT' INT
    # The launcher itself is the background job, so USR1 reaches srun/mpirun, not a subshell.
    "${LAUNCH_CMD[@]}" "$@" &
    _CHILD=$!
    local rc
    while true; do
        wait "$_CHILD"
        rc=$?
        # `wait` also returns when a trapped signal arrives; keep waiting while CMD runs.
        kill -0 "$_CHILD" 2>/dev/null || break
    done
    echo "[slurm] $(date '+%F %T') $LAUNCHER exited with code $rc" >&2
    [ "$_REQUEUE" -eq 1 ] && _requeue_job
    return "$rc"
}

_on_stop() {
    echo "[slurm] $(date '+%F %T') $1: asking the ranks to checkpoint and stop (no requeue)" >&2
    kill -USR1 "$_CHILD" 2>/dev/null || true
}

_on_usr1() {
    _REQUEUE=1
    echo "[slurm] $(date '+%F %T') USR1: asking the ranks to checkpoint and stop" >&2
    kill -USR1 "$_CHILD" 2>/dev/null || true
}

_requeue_job() {
    echo "[slurm] $(date '+%F %T') requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))); it resumes from the newest checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID" \
        || echo "[slurm] scontrol requeue failed: submit the same command again to resume" >&2
}

echo "[slurm] job ${SLURM_JOB_ID:-?} '${SLURM_JOB_NAME:-?}' restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-?} task(s), launcher $LAUNCHER, root $HUNDREDM_ROOT" >&2
