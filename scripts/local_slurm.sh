#!/usr/bin/env bash
# A real one-node Slurm cluster in a directory, for tests and for trying the sbatch scripts on a
# workstation (docs/design.md, "Dependencies"). Nothing is written outside DIR.
#
#   scripts/local_slurm.sh start DIR    write DIR/slurm.conf + DIR/cgroup.conf, start slurmctld and
#                                       slurmd, wait until the node is idle; prints the line to
#                                       export: SLURM_CONF=DIR/slurm.conf
#   scripts/local_slurm.sh status DIR   daemons alive?, sinfo and squeue of this cluster
#   scripts/local_slurm.sh stop DIR     cancel this cluster's jobs, stop both daemons by their PID
#                                       files (TERM, then KILL after 10 s)
#
# Environment: SLURM_START_TIMEOUT (seconds to wait for an idle node, default 30), PYTHON
# (any python3, used to pick two free TCP ports).
#
# The cluster: controller and node are both named `localhost` (`slurmd -N localhost`), so nothing
# depends on the host name; one partition `local` (default); auth/none and cred/none (no munge);
# proctrack/linuxproc and task/none (no cgroup set-up needed); MpiDefault=none, jobs choose
# `srun --mpi=pmix` or mpirun. The ports are picked free at start, so several clusters (two
# engineers' test runs) can run side by side on one machine.
#
# Facts checked on Debian 12 with Slurm 22.05.8 (docs/design.md, "Dependencies"):
# - The node line must carry the hardware `slurmd -C` reports, RealMemory included; without
#   RealMemory every job that asks for --mem is refused.
# - slurmd loads a cgroup plugin even with proctrack/linuxproc and task/none; a cgroup.conf with
#   CgroupPlugin=autodetect beside slurm.conf works (also on a cgroup-v1 host inside a container).
# - SchedulerParameters=batch_sched_delay=0 and MinJobAge=4 make `sbatch --wait` return about
#   2 s after the job ends (a trivial job: 2-4 s; without them we saw 10 s, backing off further).
# - `srun --mpi=pmi2` fails with Debian's Open MPI; `srun --mpi=pmix` works. The pmix plugin
#   dlopens /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so, which is in libpmix-dev (pulled in
#   by libopenmpi-dev).
# - EnforcePartLimits=ALL: a job asking for more CPUs than the node has is refused at submission
#   ("More processors requested than permitted") instead of pending forever (PartitionConfig).
# - A requeued job (scontrol requeue) is held for the credential lifetime plus 1 s before it
#   may start again: 121 s by default (AuthInfo cred_expire). Releasing it earlier with
#   `scontrol update JobId=N StartTime=now` is unsafe: a start within that lifetime fails with
#   "Killing non-startable batch JobId=N: Job credential revoked" (seen here). So this test
#   cluster sets cred_expire=10: requeued jobs start again after 11 s.
# - `sbatch --wait` usually keeps waiting through a requeue, but in one try of five it returned 1
#   at the requeue (it polls, and saw the job between its two runs): to follow a requeued job,
#   poll `scontrol show job -o JOB` (JobState, ExitCode, Restarts) instead.
# - srun --mpi=pmix puts its per-step directory under TmpFS (default /tmp); TmpFS=DIR/tmp keeps
#   it in DIR. slurmd.log then shows "Failed to remove .../spmix_appdir_..." at each step's end:
#   harmless, the directory is already gone.
# - KillWait=2 (default 30): a cancelled or requeued job's processes get SIGKILL 2 s after
#   SIGTERM, which keeps the requeue test short.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

[ $# -eq 2 ] || usage
ACTION="$1"
mkdir -p "$2" 2>/dev/null || die "$2: cannot create the directory; pass a writable DIR"
DIR="$(cd "$2" && pwd)"
export SLURM_CONF="$DIR/slurm.conf"
TIMEOUT="${SLURM_START_TIMEOUT:-30}"

alive() {  # alive PIDFILE: the daemon of that PID file is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

logs_tail() {
    for log in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log; do
        [ -f "$log" ] && { echo "--- last lines of $log"; tail -n 15 "$log"; }
    done >&2
}

free_ports() {  # two free TCP ports on 127.0.0.1
    "${PYTHON:-python3}" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
    command -v slurmctld >/dev/null || die "slurmctld not found: run 'make setup' (Debian packages slurmctld slurmd slurm-client slurm-wlm-basic-plugins)"
    command -v slurmd >/dev/null || die "slurmd not found: run 'make setup'"
    local node user ctld_port node_port
    # First line of `slurmd -C`: "NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..".
    node="$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]*/NodeName=localhost/')"
    [[ "$node" == *RealMemory=* ]] || die "'slurmd -C' printed no RealMemory: $node"
    user="$(id -un)"
    read -r ctld_port node_port < <(free_ports) || die "could not pick free ports (set PYTHON to a python3)"
    mkdir -p "$DIR"/{state,spool,log,jobs,tmp}
    cat > "$DIR/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a one-node test cluster, everything under $DIR.
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/none
AuthInfo=cred_expire=10
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MinJobAge=4
EnforcePartLimits=ALL
KillWait=2
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
TmpFS=$DIR/tmp
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$node State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    echo "CgroupPlugin=autodetect" > "$DIR/cgroup.conf"
}

start() {
    if alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; then
        die "a cluster already runs in $DIR; '$0 stop $DIR' first"
    fi
    write_config
    # -c: start from an empty state (no jobs of an earlier cluster in this DIR).
    slurmctld -c || { logs_tail; die "slurmctld did not start"; }
    slurmd -N localhost || { logs_tail; die "slurmd did not start"; }
    local waited=0 state=""
    while [ "$waited" -lt $((TIMEOUT * 10)) ]; do
        state="$(sinfo -h -n localhost -o %t 2>/dev/null || true)"
        [ "$state" = idle ] && break
        sleep 0.1; waited=$((waited + 1))
    done
    if [ "$state" != idle ]; then
        logs_tail
        stop_daemons
        die "node 'localhost' not idle after ${TIMEOUT}s (state: '${state:-no answer}'); daemon logs above"
    fi
    echo "local Slurm cluster up in $DIR; use it with:"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_daemons() {
    local name pids=()
    for name in slurmd slurmctld; do
        alive "$DIR/$name.pid" && { pids+=("$(cat "$DIR/$name.pid")"); kill -TERM "${pids[-1]}"; }
    done
    local waited=0
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$waited" -ge 100 ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
            sleep 0.1; waited=$((waited + 1))
        done
    done
    rm -f "$DIR/slurmd.pid" "$DIR/slurmctld.pid"
}

stop() {
    if alive "$DIR/slurmctld.pid"; then
        # This cluster's jobs only (SLURM_CONF points at it); give slurmd KillWait to end them.
        scancel --user "$(id -un)" 2>/dev/null || true
        local waited=0
        while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ "$waited" -lt 50 ]; do
            sleep 0.1; waited=$((waited + 1))
        done
    fi
    stop_daemons
    echo "local Slurm cluster in $DIR stopped"
}

status() {
    local running=0
    for name in slurmctld slurmd; do
        if alive "$DIR/$name.pid"; then
            echo "$name: running (pid $(cat "$DIR/$name.pid"))"
        else
            echo "$name: not running"; running=1
        fi
    done
    if [ $running -eq 0 ]; then
        sinfo
        squeue
    fi
    return $running
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
