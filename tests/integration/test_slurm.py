"""The sbatch scripts on a real local Slurm cluster (scripts/local_slurm.sh): preparation with
srun, training with srun and mpirun, and a requeue on USR1 that resumes from the checkpoint.

The cluster is one node with the machine's cores; each job asks for 2 tasks, so jobs run one
after another. `sbatch --wait` blocks until the job has ended.
"""
import json
import math
import time

import pytest

from tests.integration.conftest import IMAGE_CLASSES, IMAGE_SIZE
from tests.integration.test_build_shards import shard_entries, skipped_rows
from tests.integration.test_train import assert_learned, train_split_as_val

TRAIN = ["configs/images.yaml", "--set", "train.batch_size=4", "--set", "train.eval_batch_size=8",
         "--set", "train.log_every=1"]


def wait_for(what, condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prepared(slurm_cluster, image_folder, tmp_path_factory):
    """The image folder converted by `sbatch --wait slurm/prep.sbatch` on 2 tasks (srun)."""
    work = tmp_path_factory.mktemp("slurm_prep")
    out, log = work / "dataset", work / "prep.log"
    proc = slurm_cluster("sbatch", "--wait", f"--output={log}", "--ntasks-per-node=2",
                         "slurm/prep.sbatch", "--input", str(image_folder), "--out", str(out),
                         "--image-size", str(IMAGE_SIZE), "--shard-size", "8", timeout=300)
    return out, log, proc


def test_prep_job_builds_the_same_dataset_as_one_process(prepared, image_dataset):
    out, log, proc = prepared
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-3000:]
    assert "2 task(s), launcher srun" in text and "build_shards (rank 0 of 2)" in text, text
    assert f"wrote {out}: images [{IMAGE_SIZE}, {IMAGE_SIZE}, 3] uint8" in text, text
    reference, _ = image_dataset
    assert shard_entries(out) == shard_entries(reference)
    assert len(skipped_rows(out)) == 1 + 3


def test_train_job_trains_on_the_prepared_shards(slurm_cluster, prepared, tmp_path):
    """Trains the 4 colour classes through sbatch (srun) from the prep job's shards: the final
    evaluation, on the training images, must be well above chance and the loss must fall
    (assert_learned: measured top-1 1.0 and loss ratio 0.00-0.11 at these settings; 0.0-0.47
    and 0.94-1.04 with lr 1e-9)."""
    data = train_split_as_val(prepared[0], tmp_path / "data")
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    proc = slurm_cluster("sbatch", "--wait", f"--output={log}", "slurm/train.sbatch", *TRAIN,
                         "--set", f"data.path={data}", "--set", f"out_dir={run_dir}",
                         "--set", "train.steps=40", "--set", "train.batch_size=8",
                         "--set", "train.checkpoint_every=20", "--set", "softmax.mode=full",
                         timeout=300)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + text[-3000:]
    assert "launcher srun" in text and "--resume" in text, text
    assert "no complete checkpoint" in text and "final top-1" in text, text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run_dir / "checkpoints/step-00000040/manifest.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 2
    assert summary["num_classes"] == IMAGE_CLASSES and summary["resumed_from"] is None
    assert_learned([r["loss"] for r in records], summary["top1"], summary["num_classes"])


def job_record(slurm_cluster, job):
    """`scontrol show job -o` as a dict of its Key=Value fields; None once Slurm has purged the
    job (MinJobAge=4 s after its end on the local cluster)."""
    proc = slurm_cluster("scontrol", "show", "job", "-o", job)
    if proc.returncode != 0:
        return None
    return dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)


def test_usr1_requeues_the_train_job_which_resumes_from_its_checkpoint(slurm_cluster, prepared,
                                                                       tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit) reaches
    the ranks, which checkpoint after their current step and stop; the job is requeued and the
    second run continues from that checkpoint, losing no step. Launched with mpirun.

    `sbatch --wait` is not used here: across a requeue it returned 1 in one try of five, having
    seen the job between its two runs. The job record is polled instead."""
    data, _, _ = prepared
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    steps = 150  # long enough (tens of seconds) for the signal to arrive mid-run
    submit = slurm_cluster(
        "sbatch", "--parsable", f"--output={log}", "slurm/train.sbatch", *TRAIN,
        "--set", f"data.path={data}", "--set", f"out_dir={run_dir}", "--set",
        f"train.steps={steps}", "--set", "train.checkpoint_every=4", "--set",
        "softmax.mode=sampled", env={"LAUNCHER": "mpirun"})
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    wait_for("the first checkpoint",
             lambda: any((run_dir / "checkpoints").glob("step-*/manifest.json")), 180)
    signal = slurm_cluster("scancel", "--signal=USR1", "--batch", job)
    assert signal.returncode == 0, signal.stderr
    # The local cluster holds a requeued job for its credential lifetime (cred_expire=10 s in
    # scripts/local_slurm.sh) before it starts again; the polling below covers that.
    final = {}

    def ended():
        record = job_record(slurm_cluster, job)
        assert record is not None, f"job {job} was purged before its end was seen"
        final.update(record)
        return record["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")

    wait_for("the requeued job to end", ended, 240)
    text = log.read_text()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        (final, text[-3000:])
    assert "restart 0" in text and "USR1: asking the ranks" in text, text
    assert "requeueing job" in text and "restart 1" in text and "stopping at step" in text, text
    assert "launcher mpirun" in text, text
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed_step = int(summary["resumed_from"].rsplit("-", 1)[1])
    # The checkpoint written on the signal, not the last periodic one.
    assert f"stopping at step {resumed_step} on SIGUSR1" in text, text
    assert 4 <= resumed_step < steps, summary["resumed_from"]
    assert f"resuming from {summary['resumed_from']}" in text, text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))


@pytest.mark.parametrize("target", ["--batch", "steps"])
def test_term_stops_the_train_job_with_a_slow_checkpoint_and_exit_3(slurm_cluster, prepared,
                                                                    tmp_path, target):
    """`scancel --signal=TERM --batch` (the batch script turns it into USR1 for srun) and
    `scancel --signal=TERM` (srun's tasks get it directly) end in a checkpoint that takes longer
    than the cluster's KillWait (2 s) and exit code 3, without a requeue."""
    data, _, _ = prepared
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    submit = slurm_cluster(
        "sbatch", "--parsable", f"--output={log}", "slurm/train.sbatch", *TRAIN,
        "--set", f"data.path={data}", "--set", f"out_dir={run_dir}", "--set", "train.steps=1000",
        "--set", "train.checkpoint_every=0", env={"HUNDREDM_FAULT_CHECKPOINT_DELAY_S": "4"})
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    metrics = run_dir / "metrics.jsonl"
    wait_for("3 steps", lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
             180)
    cmd = ["scancel", "--signal=TERM", *(["--batch"] if target == "--batch" else []), job]
    assert slurm_cluster(*cmd).returncode == 0
    final = {}

    def ended():
        record = job_record(slurm_cluster, job)
        assert record is not None, f"job {job} was purged before its end was seen"
        final.update(record)
        return record["JobState"] not in ("PENDING", "RUNNING", "COMPLETING")

    wait_for("the job to end", ended, 120)
    text = log.read_text()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("FAILED", "3:0", "0"), \
        (final, text[-3000:])
    assert "srun exited with code 3" in text and "requeueing" not in text, text[-3000:]
    stopped = [int(line.split("stopping at step ")[1].split()[0])
               for line in text.splitlines() if "stopping at step" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1] >= 3, text[-3000:]
    assert (run_dir / f"checkpoints/step-{stopped[0]:08d}/manifest.json").exists()
