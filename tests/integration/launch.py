"""Helpers for tests that launch real jobs: the mpirun command line for this machine."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def mpirun_cmd(np_: int, *args: str) -> list[str]:
    """`mpirun -np N python ...` that works as root and with more ranks than cores."""
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: run 'make setup'"
    return [mpirun, "-np", str(np_), "--oversubscribe", "--allow-run-as-root",
            "--mca", "btl_vader_single_copy_mechanism", "none",
            sys.executable, *args]


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **kwargs.pop("env", {}))
    return subprocess.run(cmd, cwd=kwargs.pop("cwd", REPO), env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)
