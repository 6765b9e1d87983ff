"""The run directory `out_dir`: a new run refuses a directory that already holds one; a resumed
run drops the metrics lines written after its checkpoint (by the run that crashed)."""
from __future__ import annotations

import json
from pathlib import Path

from common.files import write_text_atomic

LOGS = ("metrics.jsonl", "eval.jsonl")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """ValueError if `run_dir` holds a run and `resume` is not set (no communication)."""
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise ValueError(f"{run_dir}: already holds a run; pass --resume to continue it "
                         f"or set out_dir to a new directory")


def prepare_run_dir(run_dir: Path, config_yaml: str | None, start_step: int) -> None:
    """Rank 0 only: create the directory, write the resolved config of a new run
    (`config_yaml`; None when resuming) and trim the logs to the lines up to `start_step`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        write_text_atomic(run_dir / "config.yaml", config_yaml)
    for name in LOGS:
        path = run_dir / name
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= start_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
