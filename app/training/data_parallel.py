"""Horovod in one place: the data-parallel backbone's optimizer and its initial broadcast.
Nothing else in app/ calls Horovod.

Gradient convention: the trainer's loss is the mean over the GLOBAL batch, and each rank's backward
only covers its own samples' share of it, so the backbone gradients of the ranks are SUMMED
(`op=hvd.Sum`), not averaged. The classifier shard is not given to Horovod: it has its own
row-sparse optimizer (app/classifier/sharded.py).
"""
from __future__ import annotations

import time

import torch

from app.training import optimizers
from mpi import collectives


def build_backbone_optimizer(world, model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """The backbone's optimizer (`optim.name`: SGD with momentum, AdamW, LARS or LAMB;
    app/training/optimizers.py), wrapped in Horovod's DistributedOptimizer (summed gradients)
    when Horovod runs: LARS and LAMB then compute their trust ratios from the summed gradient,
    the gradient of one process with the same global batch."""
    opt = optimizers.build(list(model.parameters()), optim_cfg)
    if world.hvd is None:
        return opt
    return world.hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                          op=world.hvd.Sum)


def broadcast_initial_state(world, model: torch.nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers.

    The optimizer state is deliberately not broadcast: Horovod's broadcast_optimizer_state
    initialises an empty state by taking one optimizer step with zero gradients, which applies
    weight decay once and seeds the momentum, so a P-rank run would no longer match a 1-rank
    run. A fresh run has no state; a resumed run loads the same state file on every rank."""
    if world.hvd is None or world.size == 1:
        return
    world.hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def gradient_bytes(world, model: torch.nn.Module) -> int:
    """Bytes this rank sends per step for the dense backbone allreduce (ring: 2 (P-1)/P)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return collectives.ring_allreduce_bytes(world, total)


def step(world, optimizer) -> float:
    """Wait for the backbone's gradient allreduces, then apply the update. Returns the seconds
    spent waiting for communication (the part of the allreduce not hidden behind backward)."""
    if world.hvd is None:
        optimizer.step()
        return 0.0
    start = time.perf_counter()
    optimizer.synchronize()
    waited = time.perf_counter() - start
    with optimizer.skip_synchronize():
        optimizer.step()
    return waited
