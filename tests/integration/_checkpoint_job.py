"""Writes checkpoints in a loop with the product's `checkpoint.save`, until it is killed (used by
test_signals.py: a crash at a random moment of a checkpoint write).

Rows of step s are `s + class id / 10^6` (weight) and `-s` (momentum), trainer.pt holds the step
in a tensor, so a reader can tell a checkpoint's content belongs to its manifest's step.
`python -m tests.integration._checkpoint_job RUN_DIR NUM_CLASSES DIM FIRST_STEP` under mpirun.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from app import checkpoint
from mpi.partition import class_range
from mpi.world import init_world


def expected_rows(step: int, start: int, stop: int, dim: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, stop, dtype=np.float64)[:, None]
    weight = np.broadcast_to(step + ids / 1e6, (stop - start, dim)).astype(np.float32)
    return {"weight": weight, "momentum": np.full((stop - start, dim), -step, np.float32)}


class Rows:
    """The part of a classifier shard that `checkpoint.save` writes."""

    def __init__(self, world, num_classes, dim):
        self.num_classes, self.dim = num_classes, dim
        self.start, self.stop = class_range(num_classes, world.rank, world.size)
        self.weight_cD, self.step = torch.zeros(0), 0

    def state_arrays(self):
        return expected_rows(self.step, self.start, self.stop, self.dim)


def main():
    run_dir, num_classes, dim, first = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    world = init_world(use_horovod=False)
    rows = Rows(world, num_classes, dim)
    step = first
    while True:
        rows.step = step
        state = {"step": step, "marker": torch.full((1000,), float(step))}
        checkpoint.save(world, run_dir, step, rows, state, {"epoch": 0}, "hash", keep=2)
        if world.is_root:
            print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
