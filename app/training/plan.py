"""Numbers derived once from the config, the dataset and the world, and logged in one line."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mpi.partition import class_counts


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    mode: str
    global_batch: int
    num_classes: int
    classes_per_rank: tuple[int, int]
    rows_per_step: int          # classes scored per sample: per shard (full, sampled), or in all (knn)
    steps: int
    steps_per_epoch: int
    feature_bytes_per_step: int  # gathered features + labels sent by one rank per step

    def describe(self) -> str:
        lo, hi = self.classes_per_rank
        return (f"plan: {self.world_size} ranks, global batch {self.global_batch}, "
                f"{self.num_classes} classes ({lo}-{hi} per rank), {self.rows_per_step} scored "
                f"per sample{' per shard' if self.mode != 'knn' else ''}, {self.steps} steps = "
                f"{self.steps / self.steps_per_epoch:.2f} epochs, "
                f"~{self.feature_bytes_per_step / 2**20:.2f} MiB features out per rank per step")


def make_run_plan(world, cfg, num_classes: int, steps_per_epoch: int) -> RunPlan:
    counts = class_counts(num_classes, world.size)
    local = counts[world.rank]
    if cfg.softmax.mode == "knn":  # a sample's active classes, over all shards
        rows = min(cfg.softmax.k, num_classes) + cfg.softmax.random_negatives
    elif cfg.softmax.mode == "sampled":
        rows = math.ceil(cfg.softmax.sample_rate * local)
    else:
        rows = local
    itemsize = 8 if cfg.train.dtype == "float64" else 4
    feat_bytes = cfg.train.batch_size * (cfg.model.embedding_dim * itemsize + 8) * (world.size - 1)
    return RunPlan(world.size, cfg.softmax.mode, world.size * cfg.train.batch_size, num_classes,
                   (min(counts), max(counts)), rows, cfg.train.steps, steps_per_epoch, feat_bytes)
