"""How the benchmarks start their jobs: this Python under mpirun (more ranks than cores allowed,
as root allowed) or in a subprocess, with the repository on PYTHONPATH and its root as cwd."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from app.bench.results import ROOT


def mpirun(num_ranks: int, *args: str) -> list[str]:
    """The command line of `python ARGS` on `num_ranks` ranks."""
    return ["mpirun", "-np", str(num_ranks), "--oversubscribe", sys.executable, *args]


def run_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def run(cmd: list[str], echo: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, **kwargs)` in the repository root with `run_env()`; `echo` prints
    the command first."""
    if echo:
        print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), **kwargs)


def synthetic_data(data, classes: int, per_class: int, val_per_class: int,
                   extra: Sequence[str] = ()) -> None:
    """The structured synthetic data set (data_prep.synthetic, D = 128, seed 0) at `data`, unless
    one is there already; `extra`: more of its arguments (e.g. `--kind images`)."""
    if (Path(data) / "dataset.json").exists():
        return
    run([sys.executable, "-m", "data_prep.synthetic", "--out", str(data), "--num-classes",
         str(classes), "--per-class", str(per_class), "--val-per-class", str(val_per_class),
         "--dim", "128", "--seed", "0", *extra], check=True)


def train_job(ranks: int, config: str, out: Path, sets: Sequence[str]) -> list[dict] | None:
    """`app.train --config CONFIG --set out_dir=OUT --set S ...` on `ranks` ranks in a fresh
    `out`: the step records of its metrics.jsonl (those with a loss; not the skip or lr-decision
    records), or None, with the tail of its stderr printed, where it failed."""
    if out.exists():
        shutil.rmtree(out)
    cmd = mpirun(ranks, "-m", "app.train", "--config", config,
                 *[x for s in [f"out_dir={out}", *sets] for x in ("--set", s)])
    proc = run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in records if "loss" in m]
