"""`mpirun -np 2 python -m app.bench graph [options]`: KNN graph build time and recall_at_k on
synthetic clustered classifier weights, per index setting; JSON and PNG to docs/results/.

`python -m app.bench knn` starts it as `mpirun python -m app.bench.graph`; it is an MPI program
either way (every rank runs `main`, rank 0 writes the result).

The weights imitate a trained classifier of confusable products: classes come in families of
`--family` whose rows are a shared random family centre plus a small per-class offset,
`row = centre + spread * N(0, I/D)`, normalised (cosine between two classes of a family about
1 / (1 + spread^2), between unrelated classes about N(0, 1/D)). Which classes form a family is
a random permutation, so families straddle ranks, as products of one kind would in a real
catalogue. Every rank generates only its own rows, the same for any number of ranks
(`data_prep.clustered_rows`).

Timing: `seconds` is the wall time of `build_graph` on the slowest rank, `cpu_seconds` the CPU
time of that rank's process over the build (the machine may be shared: on a loaded machine
wall time exceeds CPU time by the share other processes took). Recall is measured on
`--samples` sampled classes by distributed exact search (`recall_at_k`). The result records
whether the `auto` build at C = 1M meets its target (`app/bench/knn.py`, GRAPH_TARGET_*);
what was measured is in docs/results/README.md.

Legend: c = this rank's classes, D = embedding dim.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Product code under measurement: app.knn, app.runlog (imported nowhere else here).
from app.bench.knn import GRAPH_TARGET_CLASSES, GRAPH_TARGET_RECALL, GRAPH_TARGET_SECONDS
from app.bench.results import RESULTS, bench_command, host_load, write_result
from app.knn import build_graph, recall_at_k
from app.runlog import init_logging
from data_prep.clustered_rows import clustered_weights, drifted
from mpi import collectives
from mpi.partition import class_range
from mpi.world import init_world


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.bench graph",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="class counts, each a separate set of builds (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="embedding dim (default: 128)")
    p.add_argument("--k", type=int, default=64, help="neighbours per class (default: 64)")
    p.add_argument("--family", type=int, default=16, help="classes per family (default: 16)")
    p.add_argument("--spread", type=float, default=0.75,
                   help="per-class offset from the family centre (default: 0.75)")
    p.add_argument("--settings", nargs="+",
                   default=["auto", "auto:refresh", "flat", "ivf", "ivf:nprobe=4", "hnsw"],
                   help="index settings: INDEX[:nprobe=N][:refine=R][:refresh] (default: "
                        "%%(default)s); `refresh` times the refinement of an INDEX graph after "
                        "the weights drifted (--drift), as knn.rebuild_every does in training")
    p.add_argument("--max-slow-classes", type=int, default=100_000,
                   help="run settings other than auto only up to this many classes "
                        "(default: %(default)s)")
    p.add_argument("--target-seconds", type=float, default=GRAPH_TARGET_SECONDS,
                   help="target wall seconds at C = 1M for auto (default: %(default)g)")
    p.add_argument("--target-recall", type=float, default=GRAPH_TARGET_RECALL,
                   help="target recall_at_k at C = 1M for auto (default: %(default)g)")
    p.add_argument("--drift", type=float, default=0.1,
                   help="refresh settings: rows move by drift * N(0, I/D), renormalised "
                        "(default: 0.1, a cosine of about 0.995 to where they were)")
    p.add_argument("--samples", type=int, default=1000, help="classes sampled for recall")
    p.add_argument("--repeats", type=int, default=1,
                   help="builds per setting; the run with the median wall time is reported, "
                        "all wall times in seconds_all (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and sampling")
    p.add_argument("--name", default="knn_graph", help="RESULTS/NAME.json and .png")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="folder of the result files (default: docs/results)")
    return p.parse_args(argv)


def _setting(text: str) -> dict:
    index, *opts = text.split(":")
    out = {"index": index, "nprobe": 16, "refine": None, "refresh": "refresh" in opts}
    if index not in ("flat", "ivf", "hnsw", "torch", "auto"):
        raise ValueError(f"--settings {text!r}: unknown index {index!r}")
    for opt in (o for o in opts if o != "refresh"):
        key, _, value = opt.partition("=")
        if key not in ("nprobe", "refine") or not value.isdigit():
            raise ValueError(f"--settings {text!r}: expected nprobe=N or refine=R, got {opt!r}")
        out[key] = int(value)
    return out


def main(argv=None) -> int:
    """Every rank: the builds of every class count and setting; rank 0 prints each and writes
    the result. `argv` without the program name (default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        settings = [_setting(s) for s in args.settings]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    world = init_world(use_horovod=False)
    init_logging(world)
    runs = []
    for num_classes in args.classes:
        start, stop = class_range(num_classes, world.rank, world.size)
        rows_cD = clustered_weights(num_classes, args.dim, start, stop, args.family, args.spread,
                                    args.seed)
        for text, setting in zip(args.settings, settings):
            if setting["index"] != "auto" and num_classes > args.max_slow_classes:
                continue
            run = {"classes": num_classes, "setting": text,
                   **_measure(args, world, rows_cD, start, num_classes, setting)}
            runs.append(run)
            if world.is_root:
                print(f"C={num_classes:>9} {text:>16}: {run['seconds']:7.1f}s wall "
                      f"{run['cpu_seconds']:7.1f}s cpu  recall@{min(10, args.k)} "
                      f"{run['recall_at_k']:.3f}  "
                      f"({run['detail']})", flush=True)
    if world.is_root:
        _write(args, argv, world, runs)
    return 0


def _measure(args, world, rows_cD, start: int, num_classes: int, setting: dict) -> dict:
    """--repeats builds of one setting (collective: every rank calls it): the build with the
    median wall time of the slowest rank, and all wall times."""
    rows_now, init = rows_cD, None
    if setting["refresh"]:  # the graph before the drift is built untimed
        init = build_graph(world, rows_cD, start, num_classes, args.k, setting["index"],
                           setting["nprobe"], args.seed)
        rows_now = drifted(rows_cD, start, args.drift, args.seed)
    trials = []
    for _ in range(args.repeats):
        world.barrier()
        cpu0 = time.process_time()
        graph = build_graph(world, rows_now, start, num_classes, args.k, setting["index"],
                            setting["nprobe"], args.seed, refine=setting["refine"], init=init)
        cpu = time.process_time() - cpu0
        recall = recall_at_k(world, rows_now, start, num_classes, graph, args.samples, args.seed)
        times = collectives.allgather_object(world, (graph.seconds, cpu))
        trials.append((max(t for t, _ in times), max(c for _, c in times), recall))
    median = sorted(trials)[len(trials) // 2]  # by wall time
    return {"index": graph.index, "detail": graph.detail, "seconds": median[0],
            "cpu_seconds": median[1], "recall_at_k": median[2],
            "seconds_all": [t[0] for t in trials]}


def _write(args, argv: list[str], world, runs: list) -> None:
    target = [r for r in runs if r["classes"] == GRAPH_TARGET_CLASSES and r["setting"] == "auto"]
    command = bench_command(argv, f"mpirun -np {world.size} python -m app.bench graph")
    write_result(args.results, args.name, command, {
        "ranks": world.size, "threads_per_rank": world.threads,
        # The host may be shared: wall time exceeds CPU time by what other processes took.
        **host_load(),
        "data": {"dim": args.dim, "family": args.family, "spread": args.spread, "k": args.k,
                 "seed": args.seed},
        "target": {"classes": GRAPH_TARGET_CLASSES, "seconds": args.target_seconds,
                   "recall_at_k": args.target_recall,
                   "met": bool(target) and all(r["seconds"] <= args.target_seconds
                                               and r["recall_at_k"] >= args.target_recall
                                               for r in target)},
        "runs": runs,
    }, plot)


def plot(plt, result: dict):
    """Recall against build time, one colour per setting: filled = wall seconds, hollow = CPU
    seconds of the slowest rank (they differ by what other processes took on a shared host)."""
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    runs, data, target = result["runs"], result["data"], result["target"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, setting in enumerate(dict.fromkeys(r["setting"] for r in runs)):
        pts = [r for r in runs if r["setting"] == setting]
        colour = f"C{i}"
        ax.scatter([r["seconds"] for r in pts], [r["recall_at_k"] for r in pts], color=colour,
                   label=f"{setting} (wall)")
        ax.scatter([r["cpu_seconds"] for r in pts], [r["recall_at_k"] for r in pts],
                   facecolors="none", edgecolors=colour, label=f"{setting} (CPU)")
        for r in pts:
            ax.annotate(f"C={r['classes']:,}", (r["seconds"], r["recall_at_k"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    ax.axhline(target["recall_at_k"], color="grey", lw=0.8, ls="--")
    ax.axvline(target["seconds"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"build seconds ({result['ranks']} ranks x {result['threads_per_rank']} "
                  f"thread; load average {result['load_average_at_end'][1]:.1f} on "
                  f"{result['cpu_count']} cores)")
    ax.set_ylabel(f"recall@{min(10, data['k'])}")
    ax.set_title(f"KNN graph, K={data['k']}, D={data['dim']}, families of {data['family']} "
                 f"(spread {data['spread']})")
    ax.legend(fontsize=7, ncol=2)
    return fig


if __name__ == "__main__":
    sys.exit(main())
