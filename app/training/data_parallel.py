"""Horovod in one place: the data-parallel backbone's optimizer and its initial broadcast.
Nothing else in app/ calls Horovod.

Gradient convention: the trainer's loss is the mean over the GLOBAL batch, and each rank's backward
only covers its own samples' share of it, so the backbone gradients of the ranks are SUMMED
(`op=hvd.Sum`), not averaged. The classifier shard is not given to Horovod: it has its own
row-sparse optimizer (app/classifier/sharded.py).

`comm.gradients: sparse` replaces Horovod's allreduce by our own exchange with the same
convention (app/training/sparse_grad.py, mpi/sparse.py): the optimizer is then not wrapped, and
`step` writes the summed gradients into `.grad` before it steps.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from app.training import optimizers
from app.training.sparse_grad import SparseGradients
from mpi import collectives
from mpi.world import Traffic


def build_backbone_optimizer(world, model: torch.nn.Module, optim_cfg,
                             comm_cfg=None) -> torch.optim.Optimizer:
    """The backbone's optimizer (`optim.name`: SGD with momentum, AdamW, LARS or LAMB;
    app/training/optimizers.py), wrapped in Horovod's DistributedOptimizer (summed gradients)
    when Horovod runs and the gradients are dense: LARS and LAMB then compute their trust
    ratios from the summed gradient, the gradient of one process with the same global batch.
    Sparse gradients: the plain optimizer; with comm.momentum_correction plain SGD without
    momentum or weight decay (both act on each rank's gradient before the exchange)."""
    sparse = comm_cfg is not None and comm_cfg.gradients == "sparse"
    if sparse and comm_cfg.momentum_correction:
        optim_cfg = dataclasses.replace(optim_cfg, momentum=0.0, weight_decay=0.0)
    opt = optimizers.build(list(model.parameters()), optim_cfg)
    if world.hvd is None or sparse:
        return opt
    return world.hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                          op=world.hvd.Sum)


def build_sparse_exchange(world, model: torch.nn.Module, comm_cfg, optim_cfg,
                          seed: int) -> SparseGradients | None:
    """The per-rank state of the sparse exchange (comm.gradients=sparse), else None."""
    if comm_cfg.gradients != "sparse":
        return None
    return SparseGradients(world, model.named_parameters(), comm_cfg, optim_cfg, seed)


def broadcast_initial_state(world, model: torch.nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers.

    The optimizer state is deliberately not broadcast: Horovod's broadcast_optimizer_state
    initialises an empty state by taking one optimizer step with zero gradients, which applies
    weight decay once and seeds the momentum, so a P-rank run would no longer match a 1-rank
    run. A fresh run has no state; a resumed run loads the same state file on every rank."""
    if world.hvd is None or world.size == 1:
        return
    world.hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def gradient_bytes(world, optimizer) -> int:
    """Bytes this rank sends per step in the dense allreduce of the gradients of the
    parameters `optimizer` updates (ring: 2 (P-1)/P of them; Horovod's cost model)."""
    total = sum(p.numel() * p.element_size() for group in optimizer.param_groups
                for p in group["params"] if p.requires_grad)
    return collectives.ring_allreduce_bytes(world, total)


def step(world, optimizer, sparse: SparseGradients | None = None, step_index: int = 0) -> float:
    """Sum the backbone's gradients over ranks, then apply the update. Returns the seconds
    spent waiting for Horovod (the part of its allreduce not hidden behind backward); the
    sparse exchange times itself in `world.traffic`. Either way the bytes sent count in
    `world.traffic` under Traffic.GRADIENTS (Horovod's as the ring allreduce would send)."""
    if sparse is not None:
        sparse.exchange(step_index)
        optimizer.step()
        return 0.0
    if world.hvd is None:
        optimizer.step()
        return 0.0
    world.traffic.count(gradient_bytes(world, optimizer), Traffic.GRADIENTS)
    start = time.perf_counter()
    optimizer.synchronize()
    waited = time.perf_counter() - start
    with optimizer.skip_synchronize():
        optimizer.step()
    return waited
