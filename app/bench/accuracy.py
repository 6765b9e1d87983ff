"""`python -m app.bench accuracy`: top-1 over all classes of softmax configurations (full /
sampled / knn at several K and random negatives) on the structured synthetic data, at equal
steps. Each configuration (`--configs`, comma-separated `--set` overrides of `--config`) is one
training run of `app.train` under mpirun; the data are generated first where `--data` has none
(`data_prep.synthetic`). Records top-1/top-5 of each run's summary, its wall time, median
samples/s and total KNN graph build time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from app.bench import launch
from app.bench.results import bench_command, write_result



def _train(args, data: Path, spec: str) -> dict | None:
    """One training run with the overrides of `spec` (a fresh out_dir); its entry of the
    result, or None where it failed."""
    sets = [s for s in spec.split(",") if s]
    out = Path(args.runs) / spec.replace(",", "_").replace("=", "-").replace("softmax.", "")
    started = time.perf_counter()
    metrics = launch.train_job(args.np, args.config, out, [
        f"data.path={data}", f"train.steps={args.steps}", "train.checkpoint_every=0",
        f"train.eval_max_samples={args.eval_samples}", *sets])
    if metrics is None:
        return None
    summary = json.loads((out / "summary.json").read_text())
    return {"config": sets, "top1": summary["top1"], "top5": summary["top5"],
            "wall_s": time.perf_counter() - started,
            "median_samples_per_s": sorted(m["samples_per_s"] for m in metrics)[len(metrics) // 2],
            "knn_build_s": sum(m.get("knn_build_s", 0.0) for m in metrics)}


def run(args) -> int:
    data = Path(args.data)
    launch.synthetic_data(data, args.classes, args.per_class, 2)
    results = []
    for spec in args.configs:
        entry = _train(args, data, spec)
        if entry is None:
            return 1
        results.append(entry)
        print(f"{spec}: top-1 {entry['top1']:.4f} top-5 {entry['top5']:.4f} "
              f"({entry['wall_s']:.0f}s)", flush=True)
    write_result(args.results, args.name, bench_command(args.argv),
                 {"classes": args.classes, "steps": args.steps, "ranks": args.np,
                  "results": results}, plot)
    return 0


def plot(plt, result):
    """One bar per configuration: its top-1 over all classes."""
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(result["results"]) + 1.5))
    labels = [" ".join(r["config"]) or "default" for r in result["results"]]
    ax.barh(labels, [r["top1"] for r in result["results"]])
    for y, r in enumerate(result["results"]):
        ax.text(r["top1"], y, f" {r['top1']:.3f}", va="center")
    ax.set_xlabel("top-1 over all classes (val)")
    ax.invert_yaxis()
    ax.set_title(f"C={result['classes']}, {result['steps']} steps, {result['ranks']} ranks")
    return fig
