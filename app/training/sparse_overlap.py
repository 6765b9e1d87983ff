"""The sparse backbone-gradient exchange started from backward (`comm.gradients: sparse` with
`comm.overlap: true`): the same arithmetic as `SparseGradients.exchange`, per tensor, begun as
soon as the tensor's gradient is ready, so it travels while backward goes on.

A post-accumulate-grad hook on every backbone parameter marks it ready. Exchanges start in one
fixed order, the reverse of the parameters' order (about the order backward produces them): a
tensor whose gradient is ready early waits for those before it in that order, so every rank
starts the same collectives in the same order whatever its timing (MPI's rule for non-blocking
collectives). The pairs' second stage (the data, started once a rank sees the counts, so at a
time that differs between ranks) runs on a communicator of its own, and the exchanges advance
in start order, so those stages too start in the same order everywhere. A sparse tensor (at least `comm.dense_below` entries) is compressed
(`SparseGradients.compress_tensor`: residual, momentum correction, sampled top-k) and its pairs
exchanged with `mpi.nonblocking.isparse_allreduce`; a dense one sends its local contribution
with `iallreduce`. `finish()` (after backward) starts what is left (parameters that got no
gradient contribute zeros, as in the blocking exchange), waits for everything and writes the
sums into `.grad`.

Results: per entry the same sum in the same rank order as the blocking exchange (the sparse
pairs; the selection draws from one generator per tensor), so the weights are those of the
non-overlapped sparse step; the dense tensors' sums go through one allreduce per tensor instead
of one over their concatenation, which MPI may add in another order (float rounding at 3+
ranks). More, smaller messages: a count header per sparse tensor instead of one per step.
"""
from __future__ import annotations

import torch

from app.training.sparse_grad import SparseGradients
from mpi import nonblocking
from mpi.world import Traffic


class OverlappedSparseExchange:
    """Hooks `sparse`'s parameters; `arm(step)` before backward, `finish()` after it."""

    def __init__(self, sparse: SparseGradients):
        self.sparse, self.world = sparse, sparse.world
        # (is_sparse, index in sparse.sparse or sparse.dense, parameter), in start order.
        items = [(True, i, p) for i, (_, p) in enumerate(sparse.sparse)]
        items += [(False, i, p) for i, (_, p) in enumerate(sparse.dense)]
        position = {id(p): k for k, (_, _, p) in enumerate(items)}
        self.order = sorted(items, key=lambda item: -position[id(item[2])])
        self._ready: set[int] = set()
        self._pending: list[tuple[torch.Tensor, nonblocking.Pending]] = []
        self._step: int | None = None
        self._data_comm = None  # the pairs' own communicator (made at the first step)
        for _, _, p in self.order:
            p.register_post_accumulate_grad_hook(self._on_ready)

    def arm(self, step: int) -> None:
        """The next backward is step `step`'s: its gradients are exchanged as they come."""
        if self._data_comm is None and self.world.size > 1:
            self._data_comm = self.world.comm.Dup()  # collective: every rank arms each step
        self._step, self._ready, self._pending = step, set(), []

    def _on_ready(self, p: torch.Tensor) -> None:
        if self._step is None:  # a backward outside a training step (e.g. a test's)
            return
        self._ready.add(id(p))
        for _, pending in self._pending:  # MPI progresses what is in flight inside its calls;
            if not pending.test():  # in start order: the pairs' second stages start in order
                break
        while len(self._pending) < len(self.order) and \
                id(self.order[len(self._pending)][2]) in self._ready:
            self._start(*self.order[len(self._pending)])

    @torch.no_grad()
    def _start(self, is_sparse: bool, index: int, p: torch.Tensor) -> None:
        if is_sparse:
            values = self.sparse.compress_tensor(index, self._step)
            pending = nonblocking.isparse_allreduce(self.world, *values, p.numel(),
                                                    Traffic.GRADIENTS, self._data_comm)
        else:
            name, _ = self.sparse.dense[index]
            local = self.sparse._local(name, p).reshape(-1)
            pending = nonblocking.iallreduce(self.world, local, kind=Traffic.GRADIENTS)
        self._pending.append((p, pending))

    @torch.no_grad()
    def finish(self) -> None:
        """Collective: start what backward did not, wait for every exchange, and set every
        parameter's `.grad` to the sum over ranks."""
        assert self._step is not None, "finish() without arm()"
        while len(self._pending) < len(self.order):
            self._start(*self.order[len(self._pending)])
        for p, pending in self._pending:
            p.grad = pending.wait().view_as(p).to(p.dtype)
        self._step, self._pending = None, []
