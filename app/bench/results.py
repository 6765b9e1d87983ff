"""Benchmark results: NAME.json, which records the exact command that produced it and the date
before the numbers, and NAME.png drawn from the same dictionary. Every benchmark writes through
`write_result`; `load_result` reads one back (the KNN targets judge the newest results).

Both files are written atomically (common.files), so a reader never sees half a result.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common.files import atomic_path, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"  # the default --results folder
BENCH = "python -m app.bench"


def bench_command(argv: Sequence[str], prefix: str = BENCH) -> str:
    """The command line `PREFIX ARGV` as a shell would take it back."""
    return " ".join([prefix, *map(shlex.quote, argv)])


def host_load() -> dict:
    """Cores and load average of this machine, for timings on a possibly shared host: where
    other processes ran, wall time exceeds CPU time by what they took."""
    return {"cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}


def write_result(results: Path, name: str, command: str, result: dict,
                 plot: Callable) -> Path:
    """RESULTS/NAME.json, `{"command": command, "date": now, **result}`, and RESULTS/NAME.png,
    the figure `plot(plt, that dictionary)` returns. Returns the JSON's path."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result}
    path = results / f"{name}.json"
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    import matplotlib  # noqa: PLC0415 - heavy; only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = plot(plt, result)
    with atomic_path(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


def load_result(results: Path, name: str) -> dict | None:
    """RESULTS/NAME.json, or None where that benchmark has not been run."""
    path = Path(results) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
