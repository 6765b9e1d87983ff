"""A job in which rank 1 raises while the other ranks wait in an allreduce (used by
test_abort.py). Without the abort hook the other ranks would wait forever."""
import time

import torch

from mpi import collectives
from mpi.world import init_world


def main():
    world = init_world(use_horovod=False)
    collectives.allreduce(world, torch.ones(1))  # everyone is up
    if world.rank == 1:
        time.sleep(0.5)
        raise RuntimeError("deliberate failure on rank 1")
    collectives.allreduce(world, torch.ones(1))  # never completes: rank 1 is gone
    print("unreachable", flush=True)


if __name__ == "__main__":
    main()
