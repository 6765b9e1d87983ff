"""Typed torch-tensor collectives over mpi4py.

Every function takes the World and CPU tensors (GPU tensors are staged through host memory: our
MPI is not CUDA-aware), and passes numpy views of the tensors' storage to mpi4py's buffer
interface, so the only copies are those MPI itself needs. On a one-rank World every function
returns its input (or a view of it) without touching MPI.

Every exchange adds the bytes this rank sends (as a ring or direct algorithm would) and its wall
time to `world.traffic`, the source of the `bytes_sent` and `comm_time_s` metrics; the bytes
count under the call's `kind` (mpi.world.KINDS; "other" by default), the source of
`bytes_by_kind`.

Shapes: the first dimension is the one that is gathered, split or exchanged; trailing dimensions
must agree across ranks. Functions that exchange a small header anyway (allgather without known
sizes, alltoallv) check dtype and trailing shape on every rank and raise the same ValueError on
all ranks, so a mismatch never turns into a hang or garbage.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# torch dtype -> (code for headers, numpy dtype). MPI datatypes are derived from the numpy views.
_DTYPES = {
    torch.float32: 1, torch.float64: 2, torch.int32: 3, torch.int64: 4, torch.uint8: 5,
    torch.int8: 6, torch.int16: 7, torch.bool: 8,
}
_CODE_TO_DTYPE = {code: dtype for dtype, code in _DTYPES.items()}
_REDUCE_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def _check_dtype(t: torch.Tensor, what: str, allowed=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    allowed = allowed or _DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{what}: dtype {t.dtype} not supported (use one of {names})")


def _host(t: torch.Tensor) -> torch.Tensor:
    """Contiguous CPU tensor (a no-op for contiguous CPU tensors). Detached: collectives that
    carry gradients are wrapped in autograd Functions elsewhere."""
    return t.detach().to("cpu").contiguous()


def _np(t: torch.Tensor) -> np.ndarray:
    # bool has no MPI reduce semantics we use; exchange it as bytes.
    return t.view(torch.uint8).numpy() if t.dtype == torch.bool else t.numpy()


def _like(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.to(t.device) if t.device.type != "cpu" else out


def ring_allreduce_bytes(world, nbytes: int) -> int:
    """Bytes one rank sends in a ring allreduce of `nbytes` (reduce-scatter + allgather:
    2 (P-1)/P of the buffer); also the cost model of Horovod's dense gradient allreduce."""
    return 2 * nbytes * (world.size - 1) // world.size


def _row_elems(t: torch.Tensor) -> int:
    return int(np.prod(t.shape[1:], dtype=np.int64)) if t.dim() > 1 else 1


def allgather(world, t: torch.Tensor, first_dims: Sequence[int] | None = None,
              kind: str = "other") -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0, in rank order; equal or unequal first dims.

    With `first_dims` (each rank's dim-0 size, known to every rank, e.g. from the batch plan) no
    header is exchanged; without it one small Allgather of (dim 0, dtype, trailing shape) precedes
    the data and validates that dtype and trailing shape agree on all ranks.
    """
    _check_dtype(t, "allgather")
    if t.dim() == 0:
        raise ValueError("allgather: tensor must have at least one dimension")
    if world.size == 1:
        return t
    src = _host(t)
    if first_dims is None:
        first_dims = _exchange_headers(world, src, "allgather")
    elif len(first_dims) != world.size or first_dims[world.rank] != src.shape[0]:
        raise ValueError(f"allgather: first_dims={list(first_dims)} does not match world size "
                         f"{world.size} and this rank's dim 0 = {src.shape[0]}")
    counts = np.asarray(first_dims, dtype=np.int64) * _row_elems(src)
    out = torch.empty((int(sum(first_dims)),) + tuple(src.shape[1:]), dtype=src.dtype)
    recv = _np(out).reshape(-1)
    with world.traffic.timed(src.nbytes * (world.size - 1), kind):
        world.comm.Allgatherv(_np(src).reshape(-1), [recv, counts])
    return _like(t, out)


def _exchange_headers(world, src: torch.Tensor, what: str) -> list[int]:
    max_dims = 8
    if src.dim() > max_dims:
        raise ValueError(f"{what}: at most {max_dims} dimensions supported, got {src.dim()}")
    header = np.full(2 + max_dims, -1, dtype=np.int64)
    header[0], header[1] = src.shape[0], _DTYPES[src.dtype]
    header[2:2 + src.dim() - 1] = src.shape[1:]
    headers = np.empty((world.size, header.size), dtype=np.int64)
    world.comm.Allgather(header, headers)
    for r in range(world.size):
        if headers[r, 1] != headers[0, 1]:
            raise ValueError(f"{what}: rank {r} sent dtype {_CODE_TO_DTYPE[int(headers[r, 1])]} "
                             f"but rank 0 sent {_CODE_TO_DTYPE[int(headers[0, 1])]}")
        if not np.array_equal(headers[r, 2:], headers[0, 2:]):
            shape_r = [int(x) for x in headers[r, 2:] if x >= 0]
            shape_0 = [int(x) for x in headers[0, 2:] if x >= 0]
            raise ValueError(f"{what}: rank {r} sent trailing shape {shape_r} but rank 0 sent "
                             f"{shape_0}; only dim 0 may differ")
    return [int(n) for n in headers[:, 0]]


def alltoallv(world, t: torch.Tensor, send_counts) -> tuple[torch.Tensor, list[int]]:
    """Personalised exchange: rows [offset_d, offset_d + send_counts[d]) of `t` go to rank d.

    `t`'s rows must be grouped by destination in rank order. The counts (in rows) are exchanged
    inside, together with dtype and row size, which are checked. Returns the received rows,
    grouped by source rank in rank order, and the number of rows received from each rank.
    """
    _check_dtype(t, "alltoallv")
    counts = [int(c) for c in (send_counts.tolist() if hasattr(send_counts, "tolist") else send_counts)]
    if len(counts) != world.size or min(counts, default=0) < 0:
        raise ValueError(f"alltoallv: send_counts must have {world.size} non-negative entries, "
                         f"got {counts}")
    if t.dim() == 0 or sum(counts) != t.shape[0]:
        raise ValueError(f"alltoallv: send_counts sum to {sum(counts)} but the tensor has "
                         f"{t.shape[0] if t.dim() else 0} rows")
    if world.size == 1:
        return t, counts
    src = _host(t)
    row = _row_elems(src)
    # Per destination: (rows, elements per row, dtype code); one Alltoall carries all three.
    header = np.empty((world.size, 3), dtype=np.int64)
    header[:, 0] = counts
    header[:, 1] = row
    header[:, 2] = _DTYPES[src.dtype]
    recv_header = np.empty_like(header)
    world.comm.Alltoall(header, recv_header)
    for r in range(world.size):
        if recv_header[r, 1] != row or recv_header[r, 2] != header[0, 2]:
            raise ValueError(
                f"alltoallv: rank {r} sends rows of {recv_header[r, 1]} x "
                f"{_CODE_TO_DTYPE[int(recv_header[r, 2])]} but rank {world.rank} expects "
                f"{row} x {src.dtype}")
    recv_counts = [int(c) for c in recv_header[:, 0]]
    out = torch.empty((sum(recv_counts),) + tuple(src.shape[1:]), dtype=src.dtype)
    send_elems = np.asarray(counts, dtype=np.int64) * row
    recv_elems = np.asarray(recv_counts, dtype=np.int64) * row
    sent = int(send_elems.sum() - send_elems[world.rank]) * src.element_size()
    with world.traffic.timed(sent):
        world.comm.Alltoallv([_np(src).reshape(-1), send_elems],
                             [_np(out).reshape(-1), recv_elems])
    return _like(t, out), recv_counts


def alltoallv_known(world, t: torch.Tensor, send_counts: Sequence[int],
                    recv_counts: Sequence[int], kind: str = "other") -> torch.Tensor:
    """`alltoallv` when both sides' counts are already known (the reverse leg of an exchange,
    e.g. gradients returning along the route the forward took): no header round."""
    _check_dtype(t, "alltoallv_known")
    if world.size == 1:
        return t
    src = _host(t)
    row = _row_elems(src)
    out = torch.empty((int(sum(recv_counts)),) + tuple(src.shape[1:]), dtype=src.dtype)
    send_elems = np.asarray(send_counts, dtype=np.int64) * row
    sent = int(send_elems.sum() - send_elems[world.rank]) * src.element_size()
    with world.traffic.timed(sent, kind):
        world.comm.Alltoallv([_np(src).reshape(-1), send_elems],
                             [_np(out).reshape(-1), np.asarray(recv_counts, dtype=np.int64) * row])
    return _like(t, out)


_OPS = ("sum", "max", "min")


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"reduction op {op!r} not one of {'|'.join(_OPS)}")


def _mpi_op(op: str):
    from mpi4py import MPI  # noqa: PLC0415 - only reached with a real communicator

    _check_op(op)
    return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]


def allreduce(world, t: torch.Tensor, op: str = "sum", kind: str = "other") -> torch.Tensor:
    """Elementwise reduction (`sum`, `max` or `min`) over ranks; every rank gets the result in a
    new tensor (the input is not modified). Same shape and dtype required on all ranks (not
    re-checked: a mismatch is our bug, and MPI would report a truncation error). The bytes
    count in `world.traffic` under `kind`."""
    _check_dtype(t, "allreduce", _REDUCE_DTYPES)
    _check_op(op)
    if world.size == 1:
        return t.clone()
    src = _host(t)
    out = torch.empty_like(src)
    with world.traffic.timed(ring_allreduce_bytes(world, src.nbytes), kind):
        world.comm.Allreduce(_np(src), _np(out), op=_mpi_op(op))
    return _like(t, out)


def allreduce_(world, t: torch.Tensor, op: str = "sum", kind: str = "other") -> torch.Tensor:
    """In-place `allreduce` of a contiguous CPU tensor (no extra buffer)."""
    _check_dtype(t, "allreduce_", _REDUCE_DTYPES)
    _check_op(op)
    if world.size == 1:
        return t
    if t.device.type != "cpu" or not t.is_contiguous():
        t.copy_(allreduce(world, t, op, kind))
        return t
    from mpi4py import MPI  # noqa: PLC0415

    with world.traffic.timed(ring_allreduce_bytes(world, t.nbytes), kind):
        world.comm.Allreduce(MPI.IN_PLACE, _np(t.detach()), op=_mpi_op(op))
    return t


def reduce_scatter(world, t: torch.Tensor, counts: Sequence[int] | None = None,
                   kind: str = "other") -> torch.Tensor:
    """Sum `t` over ranks and give rank r the rows [offset_r, offset_r + counts[r]) of the sum.

    `counts` (rows per rank) defaults to a balanced split of dim 0 (as `class_counts`). All ranks
    pass tensors of the same shape.
    """
    from mpi.partition import class_counts  # noqa: PLC0415

    _check_dtype(t, "reduce_scatter", _REDUCE_DTYPES)
    if t.dim() == 0:
        raise ValueError("reduce_scatter: tensor must have at least one dimension")
    counts = list(counts) if counts is not None else class_counts(t.shape[0], world.size)
    if len(counts) != world.size or sum(counts) != t.shape[0]:
        raise ValueError(f"reduce_scatter: counts {counts} must have {world.size} entries "
                         f"summing to dim 0 = {t.shape[0]}")
    if world.size == 1:
        return t.clone()
    src = _host(t)
    row = _row_elems(src)
    out = torch.empty((counts[world.rank],) + tuple(src.shape[1:]), dtype=src.dtype)
    with world.traffic.timed(src.nbytes * (world.size - 1) // world.size, kind):
        world.comm.Reduce_scatter(_np(src).reshape(-1), _np(out).reshape(-1),
                                  recvcounts=[c * row for c in counts], op=_mpi_op("sum"))
    return _like(t, out)


def broadcast_object(world, obj, root: int = 0):
    """Pickle-based broadcast of a small Python object (configs, plans, manifests)."""
    if world.size == 1:
        return obj
    return world.comm.bcast(obj, root=root)


def allgather_object(world, obj) -> list:
    """Pickle-based allgather of a small Python object, one entry per rank."""
    if world.size == 1:
        return [obj]
    return world.comm.allgather(obj)


def first_error(world, error: str | None) -> str | None:
    """Collective agreement on a set-up failure: every rank passes its own error message (or
    None) and all get the message of the lowest failing rank (or None). Entry points validate
    their inputs without communicating, then call this before their first collective, so a rank
    that failed alone exits cleanly with the others instead of leaving them waiting."""
    errors = [e for e in allgather_object(world, error) if e]
    return errors[0] if errors else None
