"""Step throughput of the softmax modes: samples/s, step time against the backbone alone and
peak memory per rank, at several class counts.

`python -m app.bench step` (`run`) starts one MPI job per class count, `mpirun python -m
app.bench.step` (`worker_main`, below), skipping full and sampled above `--max-dense` classes;
the job prints its measurements as one JSON line, `BENCH {...}`, and `run` writes them all with
the ratios between modes (`summary`).

The job measures in ONE set of processes, so ratios between modes and against the backbone alone
are free of machine-to-machine noise. Each repetition times, in turn, the backbone alone (same
batch, no classifier: forward, a feature-norm loss, backward, Horovod allreduce, update) and a
full training step per mode; the median over `--repeats` is reported. Inputs are random vectors
with random labels; KNN mode uses a synthetic graph computed on the fly (`OffsetGraph`), so the
per-step cost is that of the real lookup and routing without building a graph of 10^7 rows.

Legend: b = batch per rank, d = input dim.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

# Product code under measurement: app.training.data_parallel, app.backbones, app.classifier,
# app.config, app.runlog (imported nowhere else here).
from app.backbones import build_backbone
from app.bench import launch
from app.bench.results import bench_command, write_result
from app.classifier import ShardedClassifier
from app.config import ModelConfig, OptimConfig, SoftmaxConfig
from app.runlog import peak_rss_mb, rss_mb
from app.training import data_parallel
from mpi import collectives
from mpi.sync_batchnorm import convert_sync_batchnorm
from mpi.world import init_world

# -- `python -m app.bench step`: one job per class count --------------------------------------


def _job(args, classes: int) -> dict | None:
    """The measurements of the MPI job at `classes` classes, or None where it failed."""
    modes = [m for m in args.modes if not (m in ("full", "sampled") and classes > args.max_dense)]
    cmd = launch.mpirun(args.np, "-m", "app.bench.step", "--classes", str(classes),
                        "--modes", *modes, "--batch", str(args.batch), "--dim", str(args.dim),
                        "--k", str(args.k), "--random-negatives", str(args.random_negatives),
                        "--steps", str(args.steps), "--repeats", str(args.repeats),
                        "--sample-rate", str(args.sample_rate))
    proc = launch.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        print(f"error: benchmark at C={classes} failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("BENCH "):])


def run(args) -> int:
    runs = []
    for classes in args.classes:
        job = _job(args, classes)
        if job is None:
            return 1
        runs.append(job)
        for mode, m in job["modes"].items():
            print(f"C={classes:>10} {mode:>8}: {m['samples_per_s']:9.0f} samples/s, "
                  f"{m['overhead_vs_backbone']:6.2f}x backbone step", flush=True)
    summarised = summary(runs)
    write_result(args.results, args.name, bench_command(args.argv),
                 {"runs": runs, "summary": summarised}, plot)
    for line in summarised["lines"]:
        print(line)
    return 0


def summary(runs: list[dict]) -> dict:
    """knn's samples/s over full's at each class count, and knn's at the largest class count
    over its own at the smallest (`ratios`, keyed by the class counts, and as `lines` of text)."""
    lines, ratios = [], {}
    by_c = {r["classes"]: r["modes"] for r in runs}
    for c, modes in sorted(by_c.items()):
        if "knn" in modes and "full" in modes:
            ratio = modes["knn"]["samples_per_s"] / modes["full"]["samples_per_s"]
            ratios[f"knn_over_full_C{c}"] = ratio
            lines.append(f"C={c}: knn {ratio:.1f}x the samples/s of full")
    knn = {c: m["knn"]["samples_per_s"] for c, m in by_c.items() if "knn" in m}
    if len(knn) > 1:
        lo, hi = min(knn), max(knn)
        ratios[f"knn_C{hi}_over_C{lo}"] = knn[hi] / knn[lo]
        lines.append(f"knn at C={hi}: {knn[hi] / knn[lo]:.2f}x its speed at C={lo}")
    return {"ratios": ratios, "lines": lines}


def plot(plt, result):
    """samples/s and step time over the backbone's alone, against the class count, per mode."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = sorted({m for r in result["runs"] for m in r["modes"]})
    for mode in modes:
        pts = [(r["classes"], r["modes"][mode]) for r in result["runs"] if mode in r["modes"]]
        xs = [c for c, _ in pts]
        ax1.plot(xs, [m["samples_per_s"] for _, m in pts], "o-", label=mode)
        ax2.plot(xs, [m["overhead_vs_backbone"] for _, m in pts], "o-", label=mode)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.legend()
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("samples/s (global)")
    ax2.set_ylabel("step time / backbone-only step time")
    ax2.axhline(1.0, color="gray", lw=0.8)
    r0 = result["runs"][0]
    fig.suptitle(f"training step, {r0['ranks']} ranks, batch {r0['batch_per_rank']}/rank, "
                 f"D={r0['dim']}, knn K={r0['k']}+{r0['random_negatives']}")
    return fig


# -- `mpirun python -m app.bench.step`: the job at one class count -----------------------------


class OffsetGraph:
    """Row c: c, then (c + offset_j) mod C for K-1 distinct offsets in [1, C)."""

    def __init__(self, num_classes: int, k: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_classes = num_classes
        self.offsets = np.concatenate([[0], rng.choice(np.arange(1, num_classes), k - 1,
                                                       replace=False)])

    def rows(self, class_ids):
        ids = np.asarray(class_ids, dtype=np.int64)
        return ((ids[:, None] + self.offsets[None, :]) % self.num_classes).astype(np.int32)


def parse_worker_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.bench.step",
                                description="The step throughput of the softmax modes at one "
                                            "class count, run under mpirun by `python -m "
                                            "app.bench step`; prints one line BENCH {json} "
                                            "(rank 0).")
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--modes", nargs="+", default=["full", "sampled", "knn"])
    p.add_argument("--batch", type=int, default=256, help="per rank")
    p.add_argument("--dim", type=int, default=128, help="embedding dim D")
    p.add_argument("--input-dim", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--random-negatives", type=int, default=64)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode per repetition")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def worker_main(argv=None) -> int:
    args = parse_worker_args(argv)
    world = init_world()
    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone="mlp", embedding_dim=args.dim)
    backbone = convert_sync_batchnorm(build_backbone(model_cfg, (args.input_dim,)), world)
    optimizer = data_parallel.build_backbone_optimizer(world, backbone, OptimConfig())
    gen = torch.Generator().manual_seed(1 + world.rank)
    x_bd = torch.randn(args.batch, args.input_dim, generator=gen)
    rss_before = rss_mb()
    classifiers = {mode: _classifier(args, world, mode) for mode in args.modes}
    shard_mb = (rss_mb() - rss_before) / max(len(classifiers), 1)

    def backbone_step(step):
        optimizer.zero_grad()
        feat = backbone(x_bd)
        feat.pow(2).mean().backward()
        data_parallel.step(world, optimizer)

    def train_step(clf, step):
        labels_b = torch.randint(0, args.classes, (args.batch,), generator=gen)
        optimizer.zero_grad()
        loss, _ = clf.loss(backbone(x_bd), labels_b, step)
        loss.backward()
        data_parallel.step(world, optimizer)
        clf.step(0.01)

    times = {"backbone": []} | {m: [] for m in args.modes}
    for _ in range(args.repeats):
        times["backbone"].append(_timed(args, world, backbone_step))
        for mode, clf in classifiers.items():
            times[mode].append(_timed(args, world, train_step, clf))
    result = _worker_result(args, world, times, shard_mb)
    if world.is_root:
        print("BENCH " + json.dumps(result), flush=True)
    world.shutdown()
    return 0


def _classifier(args, world, mode: str) -> ShardedClassifier:
    cfg = SoftmaxConfig(mode=mode, k=args.k, random_negatives=args.random_negatives,
                        sample_rate=args.sample_rate, margin=0.1)
    clf = ShardedClassifier(world, args.classes, args.dim, cfg, OptimConfig(), seed=0)
    if mode == "knn":
        clf.set_graph(OffsetGraph(args.classes, min(args.k, args.classes)))
    return clf


def _timed(args, world, fn, *fn_args) -> float:
    """Seconds per step of `fn(*fn_args, step)` over --steps steps after --warmup untimed ones,
    between barriers (so the slowest rank sets the time)."""
    for s in range(args.warmup):
        fn(*fn_args, s)
    world.barrier()
    start = time.perf_counter()
    for s in range(args.steps):
        fn(*fn_args, args.warmup + s)
    world.barrier()
    return (time.perf_counter() - start) / args.steps


def _worker_result(args, world, times: dict, shard_mb: float) -> dict:
    """The job's measurements: median step time per mode, samples/s and overhead over the
    backbone's step, peak RSS of every rank (a collective: all ranks call it)."""
    global_batch = args.batch * world.size
    result = {"classes": args.classes, "ranks": world.size, "batch_per_rank": args.batch,
              "dim": args.dim, "k": args.k, "random_negatives": args.random_negatives,
              "sample_rate": args.sample_rate, "steps": args.steps, "repeats": args.repeats,
              "shard_rss_mb_per_mode": shard_mb, "modes": {}}
    backbone_s = float(np.median(times["backbone"]))
    result["backbone_step_s"] = backbone_s
    peaks = collectives.allgather_object(world, peak_rss_mb())
    for mode in args.modes:
        step_s = float(np.median(times[mode]))
        result["modes"][mode] = {"step_s": step_s, "step_s_all": times[mode],
                                 "samples_per_s": global_batch / step_s,
                                 "overhead_vs_backbone": step_s / backbone_s}
    result["peak_rss_mb_per_rank"] = peaks
    return result


if __name__ == "__main__":
    sys.exit(worker_main())
