"""Logs, metrics and the progress bar: rank-tagged log lines (INFO from rank 0, warnings from
every rank), JSON-lines metrics written by rank 0, a tqdm bar with speed and ETA on rank 0."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import psutil


def init_logging(world, level: int = logging.INFO) -> logging.Logger:
    """The `hundredm` logger: lines tagged with the rank; rank 0 logs INFO, other ranks only
    WARNING and above, so an 8-rank job prints one plan line, not eight."""
    logger = logging.getLogger("hundredm")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank {world.rank}/{world.size}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if world.is_root else logging.WARNING)
    logger.propagate = False
    return logger


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux)."""
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class JsonLines:
    """Append-only JSON-lines file written by rank 0 (other ranks hold a no-op writer)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def progress_bar(world, total: int, initial: int, desc: str, unit: str = "step"):
    """tqdm on rank 0 (speed, ETA, postfix with loss); a disabled bar elsewhere."""
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not world.is_root, file=sys.stderr, mininterval=1.0)
