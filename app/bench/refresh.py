"""`python -m app.bench refresh`: the step time the training loop sees with a synchronous KNN graph
refresh against one built in the background (`knn.refresh_mode`), at --classes classes.

Each mode is one training run of `app.train` under mpirun with metrics every step; a step's time
is its `step_time_s` plus its `graph_wait_s` (the refresh at its boundary: a sync build stops
the loop for all of it, a background one only for what outlasts `knn.refresh_lag` steps).
Records, per mode, mean, median and p99 of those step times over the steps after the first
(warm-up), the refresh builds' total seconds (`knn_build_s` after step 1: the initial graph is
left out) and the total wait; the targets of issue 10 are p99 <= 1.5 x median and wait <= 10%
of the build time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.bench import launch
from app.bench.results import bench_command, host_load, write_result



def _train(args, data: Path, mode: str, lag: int) -> dict | None:
    """One run in `mode` with `lag`; its entry of the result, or None where it failed."""
    out = Path(args.runs) / mode
    sets = [f"data.path={data}", f"train.steps={args.steps}",
            "train.log_every=1", "train.checkpoint_every=0", "train.eval_max_samples=1000",
            f"train.batch_size={args.batch}", "softmax.mode=knn", f"softmax.k={args.k}",
            f"softmax.random_negatives={args.k}", "model.classifier_init=random",
            "knn.init=random", f"knn.refresh_every={args.refresh_every}",
            f"knn.index={args.index}", f"knn.refresh_mode={mode}", f"knn.refresh_lag={lag}"]
    lines = launch.train_job(args.np, args.config, out, sets)
    if lines is None:
        return None
    lines = lines[1:]  # the first step warms up
    step_s = np.array([m["step_time_s"] + m["graph_wait_s"] for m in lines])
    median = float(np.median(step_s))
    build = sum(m["knn_build_s"] for m in lines)
    wait = sum(m["graph_wait_s"] for m in lines)
    return {"mode": mode, "refresh_lag": lag, "steps_timed": len(lines),
            "mean_step_s": float(step_s.mean()), "median_step_s": median,
            "p99_step_s": float(np.percentile(step_s, 99)), "max_step_s": float(step_s.max()),
            "p99_over_median": float(np.percentile(step_s, 99)) / median,
            "refresh_build_s": build, "graph_wait_s": wait,
            "wait_over_build": wait / build if build else None,
            "final_loss": lines[-1]["loss"], "step_s": step_s.round(4).tolist()}


def run(args) -> int:
    data = Path(args.data)
    launch.synthetic_data(data, args.classes, args.per_class, 1)
    results = []
    for mode, lag in (("sync", 0), ("background", args.lag)):
        entry = _train(args, data, mode, lag)
        if entry is None:
            return 1
        results.append(entry)
        print(f"{mode}: mean {entry['mean_step_s']:.3f}s median {entry['median_step_s']:.3f}s "
              f"p99 {entry['p99_step_s']:.3f}s, builds {entry['refresh_build_s']:.1f}s, "
              f"waited {entry['graph_wait_s']:.2f}s", flush=True)
    write_result(args.results, args.name, bench_command(args.argv),
                 {"classes": args.classes, "steps": args.steps, "ranks": args.np,
                  "batch_per_rank": args.batch, "k": args.k, "index": args.index,
                  "refresh_every": args.refresh_every, "host": host_load(),
                  "results": results}, plot)
    return 0


def plot(plt, result):
    """The step times of both runs, step by step: the sync refreshes stand out."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in result["results"]:
        ax.plot(range(2, 2 + len(r["step_s"])), r["step_s"],
                label=f"{r['mode']} (lag {r['refresh_lag']}): median {r['median_step_s']:.3f}s, "
                      f"p99 {r['p99_step_s']:.3f}s")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("step time + graph wait (s)")
    ax.set_title(f"KNN refresh every {result['refresh_every']} steps, C={result['classes']}, "
                 f"{result['ranks']} ranks")
    ax.legend()
    return fig
