"""Collectives that carry gradients, as torch.autograd.Functions (Megatron `mappings.py` style).

Each Function states its forward and backward contract in one line. Convention here: backward
SUMS the contributions of all ranks (never averages); whoever needs a mean divides explicitly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mpi import collectives


class _GatherRows(torch.autograd.Function):
    """forward: concatenate every rank's rows (rank order); backward: each rank receives the
    SUM over ranks of the gradient rows that belong to its input (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, world, first_dims, kinds):
        ctx.world, ctx.first_dims, ctx.kinds = world, list(first_dims), kinds
        return collectives.allgather(world, x, first_dims, kinds[0])

    @staticmethod
    def backward(ctx, grad):
        back = collectives.reduce_scatter(ctx.world, grad.contiguous(), ctx.first_dims,
                                          ctx.kinds[1])
        return back, None, None, None


class _ExchangeRows(torch.autograd.Function):
    """forward: alltoallv of rows with known counts; backward: the gradient rows travel back
    along the same route (the reverse alltoallv). Nothing is summed: each row has one owner."""

    @staticmethod
    def forward(ctx, x, world, send_counts, recv_counts, kinds):
        ctx.world, ctx.send_counts, ctx.recv_counts = world, list(send_counts), list(recv_counts)
        ctx.kinds = kinds
        return collectives.alltoallv_known(world, x, send_counts, recv_counts, kinds[0])

    @staticmethod
    def backward(ctx, grad):
        back = collectives.alltoallv_known(ctx.world, grad.contiguous(), ctx.recv_counts,
                                           ctx.send_counts, ctx.kinds[1])
        return back, None, None, None, None


def gather_rows(world, x: torch.Tensor, first_dims: Sequence[int],
                kinds: tuple[str, str] = ("other", "other")) -> torch.Tensor:
    """Differentiable allgather along dim 0; see `_GatherRows` (backward sums over ranks).
    `kinds`: the traffic kinds of the forward and the backward exchange."""
    if world.size == 1:
        return x
    return _GatherRows.apply(x, world, first_dims, tuple(kinds))


def exchange_rows(world, x: torch.Tensor, send_counts: Sequence[int],
                  recv_counts: Sequence[int],
                  kinds: tuple[str, str] = ("other", "other")) -> torch.Tensor:
    """Differentiable alltoallv along dim 0; see `_ExchangeRows` (backward routes back).
    `kinds`: the traffic kinds of the forward and the backward exchange."""
    if world.size == 1:
        return x
    return _ExchangeRows.apply(x, world, send_counts, recv_counts, tuple(kinds))
