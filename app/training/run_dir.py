"""The run directory `out_dir`: one run at a time (`RunLock`), a new run refuses a directory that
already holds one, and a resumed run drops the metrics lines written after its checkpoint (by the
run that crashed) and a last line torn by a kill in the middle of an append."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from common.files import write_text_atomic

LOGS = ("metrics.jsonl", "eval.jsonl")
LOCK = ".lock"


class RunLock:
    """Rank 0 only: an exclusive `flock` on `run_dir/.lock` (directory and file created if
    missing), held until `release()` or the end of the process, so a killed job never leaves a
    stale lock. The file names the holder (host, pid, start time) for the job it refuses.
    ValueError, one line: the directory is locked by another run, or cannot be created or
    written."""

    def __init__(self, run_dir: Path):
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"{run_dir}: is a file, not a directory; set out_dir to a "
                             f"directory")
        path = run_dir / LOCK
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"{run_dir}: cannot be used as the run directory "
                             f"({exc.strerror}); set out_dir to a writable directory") from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
            self.release()
            raise ValueError(f"{run_dir}: used by another run ({holder}); wait for it to end "
                             f"or use another out_dir") from None
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n"
                  .encode(), 0)

    def release(self) -> None:
        """Unlock (closing the file is the unlock); safe to call twice."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """ValueError if `run_dir` holds a run and `resume` is not set (no communication)."""
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise ValueError(f"{run_dir}: already holds a run; pass --resume to continue it "
                         f"or set out_dir to a new directory")


def _records(path: Path) -> tuple[list[tuple[str, int]], int]:
    """(line, step) of every JSON line of `path`, and how many torn lines at its end were
    dropped (0 or 1). ValueError naming the line for a damaged line before the last one."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = record.get("step") if isinstance(record, dict) else None
        except json.JSONDecodeError:
            step = None
        if not isinstance(step, int):
            if number == len(lines):  # a kill in the middle of the last append
                return kept, 1
            raise ValueError(f"{path}: line {number} is not a JSON record with a step; repair "
                             f"or remove the line, or use another out_dir")
        kept.append((line, step))
    return kept, 0


def _write_lines(path: Path, records: list[tuple[str, int]]) -> None:
    write_text_atomic(path, "".join(line + "\n" for line, _ in records))


def repair_logs(run_dir: Path, log) -> None:
    """Rank 0 only, before any collective: drop a torn last line of each log (with a warning);
    ValueError for damage elsewhere."""
    for name in LOGS:
        path = run_dir / name
        if not path.exists():
            continue
        kept, dropped = _records(path)
        if dropped:
            log.warning("%s: dropped %d torn line(s) at the end (a run killed while writing)",
                        path, dropped)
            _write_lines(path, kept)


def prepare_run_dir(run_dir: Path, config_yaml: str | None, start_step: int) -> None:
    """Rank 0 only: create the directory, write the resolved config of a new run
    (`config_yaml`; None when resuming) and trim the logs to the lines up to `start_step`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        write_text_atomic(run_dir / "config.yaml", config_yaml)
    for name in LOGS:
        path = run_dir / name
        if path.exists():
            _write_lines(path, [(line, step) for line, step in _records(path)[0]
                                if step <= start_step])
