"""The run directory: the lock dies with its holder, torn and damaged log lines, unusable paths."""
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from app.training.run_dir import RunLock, prepare_run_dir, repair_logs

HOLD = ("import sys, time; from pathlib import Path; from app.training.run_dir import RunLock; "
        "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")


def test_lock_is_refused_while_held_and_released_when_the_holder_is_killed(tmp_path):
    run_dir = tmp_path / "runs" / "x"  # the directory is created by the lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="used by another run") as refused:
            RunLock(run_dir)
        assert f"pid {holder.pid}," in str(refused.value)
        assert str(run_dir) in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock = RunLock(run_dir)  # no stale lock left by the killed holder
    assert f"pid {os.getpid()}," in (run_dir / ".lock").read_text()
    lock.release()
    lock.release()  # twice is harmless
    RunLock(run_dir).release()


def test_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(ValueError, match="used by another run"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()


@pytest.mark.parametrize("make_path,expect", [
    (lambda tmp: tmp / "file", "is a file"),
    (lambda tmp: tmp / "file" / "run", "cannot be used as the run directory"),
])
def test_unusable_run_dir_is_a_value_error_naming_it(tmp_path, make_path, expect):
    (tmp_path / "file").write_text("not a directory\n")
    path = make_path(tmp_path)
    with pytest.raises(ValueError, match=expect) as refused:
        RunLock(path)
    assert str(path) in str(refused.value)


def write_log(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps) + tail)


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    write_log(tmp_path / "metrics.jsonl", [1, 2, 3], tail='{"step": 9')
    write_log(tmp_path / "eval.jsonl", [3])
    with caplog.at_level(logging.WARNING):
        repair_logs(tmp_path, logging.getLogger("test_run_dir"))
    assert "metrics.jsonl: dropped 1 torn line" in caplog.text
    assert "eval.jsonl" not in caplog.text
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    prepare_run_dir(tmp_path, None, 2)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_damaged_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 "):
        repair_logs(tmp_path, logging.getLogger("test_run_dir"))
    assert path.read_text() == '{"step": 1}\ngarbage\n{"step": 3}\n'  # left for the user
