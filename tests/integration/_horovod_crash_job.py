"""A job in which rank 1 raises while the other ranks wait inside Horovod: in the gradient
allreduce of a DistributedOptimizer step (used by test_signals.py)."""
import time

import horovod.torch as hvd
import torch

from mpi.world import init_world


def main():
    world = init_world(use_horovod=True)
    model = torch.nn.Linear(64, 64)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters())
    for step in range(3):  # everyone trains together first
        optimizer.zero_grad()
        model(torch.ones(4, 64)).sum().backward()
        optimizer.step()
    if world.rank == 1:
        time.sleep(0.5)
        raise RuntimeError("deliberate failure on rank 1 inside a Horovod step")
    optimizer.zero_grad()
    model(torch.ones(4, 64)).sum().backward()
    optimizer.step()  # waits for rank 1's gradients, which never come
    print("unreachable", flush=True)


if __name__ == "__main__":
    main()
