"""Benchmark worker (run under mpirun by `python -m app.bench step`): the training step's
throughput for several softmax modes at one class count, measured in ONE process so ratios
between modes and against the backbone alone are free of machine-to-machine noise.

Each repetition times, in turn, the backbone alone (same batch, no classifier: forward, a
feature-norm loss, backward, Horovod allreduce, update) and a full training step per mode.
Inputs are random vectors with random labels; KNN mode uses a synthetic graph computed on the
fly (row c = c, then K-1 distinct classes at fixed offsets), so the per-step cost is that of the
real lookup and routing without building a graph of 10^7 rows. Prints one JSON line (rank 0).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m app.bench_step", description=__doc__)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    from app.training import data_parallel  # noqa: PLC0415
    from app.backbones import build_backbone  # noqa: PLC0415
    from app.classifier import ShardedClassifier  # noqa: PLC0415
    from app.config import ModelConfig, OptimConfig, SoftmaxConfig  # noqa: PLC0415
    from app.runlog import peak_rss_mb, rss_mb  # noqa: PLC0415
    from mpi import collectives  # noqa: PLC0415
    from mpi.sync_batchnorm import convert_sync_batchnorm  # noqa: PLC0415
    from mpi.world import init_world  # noqa: PLC0415

    world = init_world()
    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone="mlp", embedding_dim=args.dim)
    backbone = convert_sync_batchnorm(build_backbone(model_cfg, (args.input_dim,)), world)
    optimizer = data_parallel.build_backbone_optimizer(world, backbone, OptimConfig())
    gen = torch.Generator().manual_seed(1 + world.rank)
    x_bd = torch.randn(args.batch, args.input_dim, generator=gen)
    rss_before = rss_mb()
    classifiers = {}
    for mode in args.modes:
        cfg = SoftmaxConfig(mode=mode, k=args.k, random_negatives=args.random_negatives,
                            sample_rate=args.sample_rate, margin=0.1)
        clf = ShardedClassifier(world, args.classes, args.dim, cfg, OptimConfig(), seed=0)
        if mode == "knn":
            clf.set_graph(OffsetGraph(args.classes, min(args.k, args.classes)))
        classifiers[mode] = clf
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

    def timed(fn, *fn_args):
        for s in range(args.warmup):
            fn(*fn_args, s)
        world.barrier()
        start = time.perf_counter()
        for s in range(args.steps):
            fn(*fn_args, args.warmup + s)
        world.barrier()
        return (time.perf_counter() - start) / args.steps

    times = {"backbone": []} | {m: [] for m in args.modes}
    for _ in range(args.repeats):
        times["backbone"].append(timed(backbone_step))
        for mode, clf in classifiers.items():
            times[mode].append(timed(train_step, clf))
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
    if world.is_root:
        print("BENCH " + json.dumps(result), flush=True)
    world.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
