"""Non-blocking torch-tensor collectives over mpi4py (MPI-3 Iallgatherv, Ialltoallv, Iallreduce,
Ireduce_scatter): each starts an exchange and returns a `Pending`, whose `wait()` returns the
result. The overlapping step pipeline (app/training/pipeline.py) computes while they travel.

Same conventions as mpi/collectives.py (CPU tensors, numpy views, no copies beyond MPI's, the
same byte counts under the same kinds) and the same results: each function gives exactly what
its blocking twin gives. On a one-rank World the Pending is complete at once. No header round:
every count is known to both ends (the callers derive them from the batch plan), and the
arguments are not re-checked across ranks.

Timing (`world.traffic`): the bytes count when the exchange starts; `seconds` gets its time in
flight, from its start until a `test()` or `wait()` sees it complete (an upper bound: an
exchange that finished while the caller computed is seen at the next test or wait), `exposed`
the time this thread spent inside the start and the wait. Collectives must be started in the
same order on every rank (MPI's rule for non-blocking collectives on one communicator); the
callers start them in an order that depends only on the step, never on timing.

An exchange in flight owns its buffers: the input must not be written until it is complete.
MPI progresses non-blocking collectives mostly inside MPI calls (Open MPI has no progress
thread for shared memory): callers `test()` the exchanges in flight between pieces of work.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mpi.collectives import (
    _DTYPES,
    _REDUCE_DTYPES,
    _check_dtype,
    _host,
    _mpi_op,
    _np,
    _row_elems,
    ring_allreduce_bytes,
)


class Pending:
    """An exchange in flight: `test()` (True once complete, progressing it), `wait()` (the
    result). `stages` are callables started one after the other, each returning its MPI
    request or a list of them (the sparse exchange needs its counts before its data); `finish`
    builds the result. `keep` holds the buffers until the exchange is complete."""

    def __init__(self, world, stages: Sequence[Callable], finish: Callable, keep: tuple = ()):
        self.world, self.finish, self.keep = world, finish, list(keep)
        self.stages = list(stages)
        self.started = time.perf_counter()
        self.requests, self.done, self.result = [], not self.stages, None
        if self.stages:  # else complete already (one rank): nothing was sent or waited for
            self._blocked(self._next)

    def _blocked(self, work: Callable) -> None:
        """Run `work` (MPI calls of this exchange) as exposed time; once the exchange is seen
        complete, its time in flight ends here (so exposed <= in flight, exactly)."""
        was_done = self.done
        t0 = time.perf_counter()
        work()
        t1 = time.perf_counter()
        traffic = self.world.traffic
        traffic.exposed += t1 - t0
        if self.done and not was_done:
            traffic.seconds += t1 - self.started

    def _next(self) -> None:
        """Start the next stage, or mark the exchange complete."""
        if self.stages:
            started = self.stages.pop(0)()
            self.requests = started if isinstance(started, list) else [started]
        else:
            self.requests, self.done = [], True

    def test(self) -> bool:
        if not self.done:
            from mpi4py import MPI  # noqa: PLC0415 - only reached with a real communicator

            def progress():
                while not self.done and MPI.Request.Testall(self.requests):
                    self._next()
            self._blocked(progress)
        return self.done

    def wait(self):
        if self.result is None:
            if not self.done:
                from mpi4py import MPI  # noqa: PLC0415

                def complete():
                    while not self.done:
                        MPI.Request.Waitall(self.requests)
                        self._next()
                self._blocked(complete)
            self.result = self.finish()
            self.keep = []
        return self.result


def completed(world, value) -> Pending:
    """A Pending that is already complete (one rank: nothing to exchange)."""
    return Pending(world, (), lambda: value)


def iallgather(world, t: torch.Tensor, first_dims: Sequence[int], kind: str = "other") -> Pending:
    """`collectives.allgather` with known `first_dims` (each rank's dim 0), started."""
    _check_dtype(t, "iallgather")
    if world.size == 1:
        return completed(world, t)
    src = _host(t)
    counts = np.asarray(first_dims, dtype=np.int64) * _row_elems(src)
    out = torch.empty((int(sum(first_dims)),) + tuple(src.shape[1:]), dtype=src.dtype)
    world.traffic.count(src.nbytes * (world.size - 1), kind)
    start = lambda: world.comm.Iallgatherv(_np(src).reshape(-1), [_np(out).reshape(-1), counts])  # noqa: E731
    return Pending(world, [start], lambda: out, (src, counts))


def ialltoallv(world, t: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
               kind: str = "other") -> Pending:
    """`collectives.alltoallv_known` (rows to each rank, counts known on both ends), started."""
    _check_dtype(t, "ialltoallv")
    if world.size == 1:
        return completed(world, t)
    src = _host(t)
    row = _row_elems(src)
    out = torch.empty((int(sum(recv_counts)),) + tuple(src.shape[1:]), dtype=src.dtype)
    send = np.asarray(send_counts, dtype=np.int64) * row
    recv = np.asarray(recv_counts, dtype=np.int64) * row
    world.traffic.count(int(send.sum() - send[world.rank]) * src.element_size(), kind)
    start = lambda: world.comm.Ialltoallv([_np(src).reshape(-1), send],  # noqa: E731
                                          [_np(out).reshape(-1), recv])
    return Pending(world, [start], lambda: out, (src, send, recv))


def iallreduce(world, t: torch.Tensor, op: str = "sum", kind: str = "other") -> Pending:
    """`collectives.allreduce` (a new tensor; the input is not modified), started."""
    _check_dtype(t, "iallreduce", _REDUCE_DTYPES)
    mpi_op = _mpi_op(op) if world.size > 1 else None
    if world.size == 1:
        return completed(world, t.clone())
    src = _host(t).clone()  # the caller may reuse its tensor while the exchange travels
    out = torch.empty_like(src)
    world.traffic.count(ring_allreduce_bytes(world, src.nbytes), kind)
    start = lambda: world.comm.Iallreduce(_np(src), _np(out), op=mpi_op)  # noqa: E731
    return Pending(world, [start], lambda: out, (src,))


def ireduce_scatter(world, t: torch.Tensor, counts: Sequence[int], kind: str = "other") -> Pending:
    """`collectives.reduce_scatter` with explicit `counts` (rows per rank), started."""
    _check_dtype(t, "ireduce_scatter", _REDUCE_DTYPES)
    if world.size == 1:
        return completed(world, t.clone())
    src = _host(t)
    row = _row_elems(src)
    out = torch.empty((counts[world.rank],) + tuple(src.shape[1:]), dtype=src.dtype)
    world.traffic.count(src.nbytes * (world.size - 1) // world.size, kind)
    mpi_op = _mpi_op("sum")
    start = lambda: world.comm.Ireduce_scatter(  # noqa: E731
        _np(src).reshape(-1), _np(out).reshape(-1), recvcounts=[c * row for c in counts],
        op=mpi_op)
    return Pending(world, [start], lambda: out, (src,))


def isparse_allreduce(world, index_n: torch.Tensor, value_n: torch.Tensor, length: int,
                      kind: str = "other", data_comm=None) -> Pending:
    """`mpi.sparse.sparse_allreduce` (the dense sum over ranks of every rank's (int32 index,
    value) pairs, added in rank order), started: an Iallgather of the counts on `world.comm`,
    then, once a `test()` or `wait()` sees the counts, one Iallgatherv each for the indices and
    the values on `data_comm` (default `world.comm`). That second start depends on timing: when
    other collectives may start meanwhile, give the data a communicator of its own, and advance
    several such exchanges in the order they were started (mpi/ rule: the same order on every
    rank). The same bytes as the blocking version."""
    from mpi.sparse import _check_pairs  # noqa: PLC0415 - mpi.sparse imports collectives

    _check_pairs(index_n, value_n, length)
    if world.size == 1:
        out = torch.zeros(length, dtype=value_n.dtype)
        return completed(world, out.index_add_(0, index_n.long(), value_n))
    idx, val = index_n.detach().contiguous(), value_n.detach().contiguous()
    header = np.array([idx.shape[0], _DTYPES[val.dtype]], dtype=np.int64)
    headers = np.empty((world.size, 2), dtype=np.int64)
    world.traffic.count((header.nbytes + idx.shape[0] * (idx.element_size()
                                                         + val.element_size()))
                        * (world.size - 1), kind)
    gathered, comm = {}, data_comm if data_comm is not None else world.comm

    def data():
        if np.any(headers[:, 1] != header[1]):
            raise ValueError(f"sparse exchange: value dtypes differ across ranks "
                             f"(codes {headers[:, 1].tolist()})")
        counts = headers[:, 0].copy()
        gathered["index"] = torch.empty(int(counts.sum()), dtype=idx.dtype)
        gathered["value"] = torch.empty(int(counts.sum()), dtype=val.dtype)
        gathered["counts"] = counts
        return [comm.Iallgatherv(_np(idx), [_np(gathered["index"]), counts]),
                comm.Iallgatherv(_np(val), [_np(gathered["value"]), counts])]

    def finish():
        out = torch.zeros(length, dtype=val.dtype)
        return out.index_add_(0, gathered["index"].long(), gathered["value"])

    return Pending(world, [lambda: world.comm.Iallgather(header, headers), data],
                   finish, (idx, val, header, headers))
