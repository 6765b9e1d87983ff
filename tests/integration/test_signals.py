"""Signals and crashes against real `mpirun` jobs: what README "Exit codes" promises.

A stop signal (SIGUSR1, SIGTERM, SIGINT) on any rank, at any time from start-up on, ends every
rank at the same step with a complete checkpoint; a killed rank or a failure inside Horovod ends
the job promptly; a crash at any moment of a checkpoint write never leaves a checkpoint that
loads wrong data. HUNDREDM_FAULT_CHECKPOINT_DELAY_S makes every checkpoint take that long, as a
big one would.
"""
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from app import checkpoint
from tests.integration._checkpoint_job import expected_rows
from tests.integration.launch import REPO, mpirun_cmd, run
from tests.integration.test_train import BASE

SLOW_CHECKPOINT = {"HUNDREDM_FAULT_CHECKPOINT_DELAY_S": "3"}
# mpirun's SIGCONT -> T s -> SIGTERM -> T s -> SIGKILL, with T = 5: a 6 s checkpoint fits only if
# the ranks start it on the SIGCONT (not on the SIGTERM, which leaves 5 s).
KILL_TIMEOUT = ("--mca", "odls_base_sigkill_timeout", "5")


def start(np_, data, out, *extra, steps=400, env=None, mca=()):
    """A training job under mpirun, in the background (no intermediate checkpoints unless
    asked for: the one a signal asks for is the one under test)."""
    args = ["-m", "app.train", "--config", "configs/demo.yaml"]
    for s in [f"data.path={data}", f"out_dir={out}", f"train.steps={steps}",
              "train.batch_size=24", "train.checkpoint_every=0", *BASE, *extra]:
        args += ["--set", s]
    cmd = mpirun_cmd(np_, *args)
    cmd[1:1] = list(mca)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def steps_logged(out) -> int:
    metrics = Path(out, "metrics.jsonl")
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def wait_for(what, condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}:\n"
                        f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rank_pids(proc, count) -> list[int]:
    """The rank processes: mpirun's children on this node."""
    def children():
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]
    wait_for(f"{count} rank processes", lambda: len(children()) >= count, proc, timeout=30)
    return children()


def alive(pid) -> bool:
    """Running (not a zombie waiting for an adoptive parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def stopped_steps(stderr) -> list[int]:
    """The step each rank's 'stopping at step N' warning names."""
    return [int(line.split("stopping at step ")[1].split()[0])
            for line in stderr.splitlines() if "stopping at step" in line]


def assert_complete_checkpoint(out, step, world_size):
    directory = checkpoint.step_dir(out, step)
    manifest = checkpoint.read_manifest(directory, required=checkpoint.RESUME_KEYS)
    assert manifest["step"] == step and manifest["world_size"] == world_size
    rows = checkpoint.read_rows(directory, manifest, 0, manifest["num_classes"],
                                names=("weight", "momentum"))
    assert all(np.isfinite(a).all() for a in rows.values())
    assert checkpoint.load_trainer_state(directory, manifest)["step"] == step


def stop_after_3_steps(proc, out, send, returncode, ranks) -> tuple[int, str]:
    """Waits for 3 logged steps, calls `send()`, and checks the job ended with `returncode`,
    every one of `ranks` ranks stopping at the same step (>= 3) with a complete checkpoint
    there. Returns (that step, the job's stderr)."""
    wait_for("3 steps", lambda: steps_logged(out) >= 3, proc)
    send()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == returncode, stderr[-3000:]
    steps = stopped_steps(stderr)
    assert len(steps) == ranks and len(set(steps)) == 1 and steps[0] >= 3, stderr[-3000:]
    assert_complete_checkpoint(out, steps[0], ranks)
    return steps[0], stderr


def test_usr1_during_set_up_stops_after_the_first_step(vectors_dataset, tmp_path):
    out = tmp_path / "run"
    proc = start(2, vectors_dataset, out)
    rank_pids(proc, 2)
    time.sleep(1.0)  # the ranks are importing torch / starting MPI: no step has run
    assert steps_logged(out) == 0
    proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank untouched
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]
    assert stopped_steps(stderr) == [1, 1], stderr[-3000:]
    assert_complete_checkpoint(out, 1, 2)


def test_usr1_to_mpirun_waits_for_a_slow_checkpoint_and_exits_3(vectors_dataset, tmp_path):
    out = tmp_path / "run"
    proc = start(2, vectors_dataset, out, env=SLOW_CHECKPOINT)
    _, stderr = stop_after_3_steps(proc, out, lambda: proc.send_signal(signal.SIGUSR1), 3, 2)
    # Started without the kill timeout: the user was told how to stop it without losing work.
    assert "kill -USR1 <mpirun pid>" in stderr and "odls_base_sigkill_timeout N" in stderr


def test_sigterm_to_mpirun_starts_the_checkpoint_on_its_sigcont(vectors_dataset, tmp_path):
    """Open MPI reserves SIGTERM: mpirun sends the ranks SIGCONT, SIGTERM after
    odls_base_sigkill_timeout, SIGKILL after as long again, and exits 1 whatever the ranks
    return (README "Exit codes")."""
    out = tmp_path / "run"
    proc = start(2, vectors_dataset, out, env={"HUNDREDM_FAULT_CHECKPOINT_DELAY_S": "6"},
                 mca=KILL_TIMEOUT)
    step, stderr = stop_after_3_steps(proc, out, lambda: proc.send_signal(signal.SIGTERM), 1, 2)
    assert "on SIGCONT from mpirun" in stderr
    assert "kill -USR1" not in stderr  # the timeout was set: no warning
    resumed = run(mpirun_cmd(2, "-m", "app.train", "--config", str(out / "config.yaml"),
                             "--set", f"train.steps={step + 2}", "--resume"), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint.step_dir(out, step)}" in resumed.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(vectors_dataset, tmp_path, sig):
    """What `scancel --signal=TERM` does to srun's tasks, or a node-local kill: one rank only."""
    out = tmp_path / "run"
    proc = start(3, vectors_dataset, out, env=SLOW_CHECKPOINT)
    pids = rank_pids(proc, 3)
    wait_for("3 steps", lambda: steps_logged(out) >= 3, proc)
    os.kill(pids[-1], sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]
    steps = stopped_steps(stderr)
    assert len(steps) == 3 and len(set(steps)) == 1, stderr[-3000:]
    assert f"on {signal.Signals(sig).name}" in stderr and "a signal on another rank" in stderr
    assert_complete_checkpoint(out, steps[0], 3)


def test_sigkill_of_one_rank_ends_the_job_and_resume_continues(vectors_dataset, tmp_path):
    out = tmp_path / "run"
    proc = start(2, vectors_dataset, out, "train.checkpoint_every=4")
    pids = rank_pids(proc, 2)
    wait_for("a checkpoint and 2 more steps",
             lambda: checkpoint.latest_checkpoint(out) is not None and steps_logged(out) >= 10,
             proc)
    killed = time.monotonic()
    os.kill(pids[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 30, "the job did not end promptly after a rank died"
    latest = checkpoint.latest_checkpoint(out)
    step = checkpoint.read_manifest(latest)["step"]
    assert_complete_checkpoint(out, step, 2)
    resumed = run(mpirun_cmd(2, "-m", "app.train", "--config", str(out / "config.yaml"),
                             "--set", f"train.steps={step + 3}", "--resume"), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {latest}" in resumed.stderr


def test_failure_on_one_rank_inside_horovod_ends_the_job():
    started = time.monotonic()
    proc = run(mpirun_cmd(3, "-m", "tests.integration._horovod_crash_job"), timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - started < 45
    assert "[rank 1]" in proc.stderr and "deliberate failure on rank 1" in proc.stderr
    assert "unreachable" not in proc.stdout


def test_crash_at_random_moments_of_checkpoint_writes_never_loads_wrong_data(tmp_path):
    """20 trials: a job saving checkpoints back to back (the product's `checkpoint.save`) is
    killed at a random moment (SIGKILL of mpirun or of one rank). Every checkpoint that looks
    complete afterwards must load, and hold exactly the rows and state of its own step."""
    num_classes, dim, rng = 3001, 64, random.Random(12)
    out, first, seen, waits = tmp_path / "run", 0, set(), []
    for trial in range(20):
        job = mpirun_cmd(2, "-m", "tests.integration._checkpoint_job", str(out), str(num_classes),
                         str(dim), str(first))
        proc = subprocess.Popen(job, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.stdout.readline().startswith("saved"), f"trial {trial}: the job did not start"
        time.sleep(rng.uniform(0.0, 0.6))
        ranks = rank_pids(proc, 2)
        os.kill(rng.choice([proc.pid, *ranks]), signal.SIGKILL)
        proc.communicate(timeout=60)
        # With mpirun killed, its ranks notice only at their next message: wait for them.
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in ranks):
            assert time.monotonic() < deadline, f"trial {trial}: ranks outlived the job by 60 s"
            time.sleep(0.05)
        waits.append(time.monotonic() - deadline + 60)
        complete = checkpoint.complete_checkpoints(out)
        assert complete, f"trial {trial}: no complete checkpoint left"
        for directory in complete:
            manifest = checkpoint.read_manifest(directory, required=checkpoint.RESUME_KEYS)
            step = manifest["step"]
            rows = checkpoint.read_rows(directory, manifest, 0, num_classes,
                                        names=("weight", "momentum"))
            want = expected_rows(step, 0, num_classes, dim)
            for name in want:
                np.testing.assert_array_equal(rows[name], want[name], err_msg=f"{directory}")
            state = checkpoint.load_trainer_state(directory, manifest)
            assert state["step"] == step and (state["marker"] == step).all()
            seen.add(step)
        first = checkpoint.read_manifest(complete[-1])["step"] + 1
    assert len(seen) >= 20  # every trial saved at least once more
    print("seconds the ranks outlived the job:", [round(w, 2) for w in waits])
