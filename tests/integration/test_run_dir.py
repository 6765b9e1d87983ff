"""The run directory through the CLI: one run at a time, unusable paths, a torn metrics line on
resume, softmax.k larger than the dataset. One rank (plain `python -m app.train`, so the pid of
the process is the pid the lock names)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.launch import REPO, run
from tests.integration.test_train import BASE


def train_cmd(data, out, steps, *extra, resume=False):
    args = [sys.executable, "-m", "app.train", "--config", "configs/demo.yaml"]
    for s in [f"data.path={data}", f"out_dir={out}", f"train.steps={steps}",
              "train.batch_size=24", *BASE, *extra]:
        args += ["--set", s]
    return args + (["--resume"] if resume else [])


def steps_of(out, name="metrics.jsonl"):
    return [json.loads(line)["step"] for line in Path(out, name).read_text().splitlines()]


def one_error_line(proc):
    """The stderr of a refused job: exactly one line, and it is the `error:` line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def test_second_job_on_a_locked_run_dir_is_refused_at_once(vectors_dataset, tmp_path):
    out = tmp_path / "runs" / "x"
    first = subprocess.Popen(train_cmd(vectors_dataset, out, 2500, "train.checkpoint_every=500"),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first job ended before the second one started"
    second = run(train_cmd(vectors_dataset, out, 2500, resume=True), timeout=120)
    line = one_error_line(second)
    assert "used by another run" in line and f"pid {first.pid}," in line, line
    assert str(out) in line
    assert first.poll() is None, "refused only after the first job ended"
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert steps_of(out) == list(range(1, 2501))  # no duplicated or lost steps


def test_unusable_out_dir_is_one_line_exit_2(vectors_dataset, tmp_path):
    (tmp_path / "somefile").write_text("not a directory\n")
    for out in (tmp_path / "somefile", tmp_path / "somefile" / "run"):
        line = one_error_line(run(train_cmd(vectors_dataset, out, 4), timeout=120))
        assert str(out) in line, line


def test_torn_metrics_line_is_dropped_on_resume(vectors_dataset, tmp_path):
    out = tmp_path / "run"
    done = run(train_cmd(vectors_dataset, out, 8, "train.checkpoint_every=4"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9')  # killed in the middle of an append
    resumed = run(train_cmd(vectors_dataset, out, 12, "train.checkpoint_every=4", resume=True),
                  timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "metrics.jsonl: dropped 1 torn line" in resumed.stderr
    assert steps_of(out) == list(range(1, 13))
    # Damage before the last line is not guessed at: one line naming file and line, exit 2.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = "garbage"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    line = one_error_line(run(train_cmd(vectors_dataset, out, 16, resume=True), timeout=120))
    assert "metrics.jsonl: line 3 " in line, line


def test_softmax_k_larger_than_the_classes_is_refused(vectors_dataset, tmp_path):
    proc = run(train_cmd(vectors_dataset, tmp_path / "run", 4, "softmax.mode=knn",
                         "softmax.k=500"), timeout=120)
    line = one_error_line(proc)
    assert line == ("error: softmax.k: 500 is larger than the dataset's 60 classes; "
                    "set softmax.k <= 60"), line
    assert not (tmp_path / "run").exists()
