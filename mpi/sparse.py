"""The exchange of sparse vectors as (int32 index, value) pairs: the communication of the sparse
backbone-gradient exchange (app/training/sparse_grad.py chooses what to send).

Legend: n = entries this rank sends, M = entries all ranks send, L = length of the dense vector.

`allgather_pairs` concatenates every rank's pairs in rank order with one Allgather of the
per-rank counts (a rank may send none) and one Allgatherv each for the indices and the values.
`sparse_allreduce` adds the gathered values into a dense vector by index: the SUM over ranks
of every rank's sparse vector (the summed-gradient convention of data_parallel.py), added in
rank order. Bytes sent (the direct algorithm: each rank's pairs reach the P-1 others) are
counted in `world.traffic` under `kind`.
"""
from __future__ import annotations

import numpy as np
import torch

from mpi.collectives import _DTYPES, _np

INDEX_DTYPE = torch.int32
MAX_LENGTH = 2**31 - 1  # int32 indices


def _check_pairs(index_n: torch.Tensor, value_n: torch.Tensor, length: int) -> None:
    if index_n.dtype != INDEX_DTYPE or index_n.dim() != 1:
        raise ValueError(f"sparse exchange: indices must be a 1-d int32 tensor, got "
                         f"{index_n.dtype} of shape {tuple(index_n.shape)}")
    if value_n.dim() != 1 or value_n.shape[0] != index_n.shape[0]:
        raise ValueError(f"sparse exchange: {index_n.shape[0]} indices but values of shape "
                         f"{tuple(value_n.shape)}")
    if value_n.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sparse exchange: values must be float32 or float64, got {value_n.dtype}")
    if not 0 < length <= MAX_LENGTH:
        raise ValueError(f"sparse exchange: dense length {length} not in [1, {MAX_LENGTH}] "
                         f"(int32 indices)")


def allgather_pairs(world, index_n: torch.Tensor, value_n: torch.Tensor,
                    kind: str = "other") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(index_M, value_M, counts): every rank's pairs in rank order and how many each sent.

    Every rank passes its own number of pairs (zero allowed); the value dtype must be the same
    on all ranks (checked through the count header: the same ValueError on every rank)."""
    if world.size == 1:
        return index_n, value_n, [int(index_n.shape[0])]
    idx = index_n.detach().cpu().contiguous()
    val = value_n.detach().cpu().contiguous()
    header = np.array([idx.shape[0], _DTYPES[val.dtype]], dtype=np.int64)
    headers = np.empty((world.size, 2), dtype=np.int64)
    sent = header.nbytes + idx.shape[0] * (idx.element_size() + val.element_size())
    with world.traffic.timed(sent * (world.size - 1), kind):
        world.comm.Allgather(header, headers)
        if np.any(headers[:, 1] != header[1]):
            raise ValueError(f"sparse exchange: value dtypes differ across ranks "
                             f"(codes {headers[:, 1].tolist()})")
        counts = headers[:, 0]
        index_M = torch.empty(int(counts.sum()), dtype=INDEX_DTYPE)
        value_M = torch.empty(int(counts.sum()), dtype=val.dtype)
        world.comm.Allgatherv(_np(idx), [_np(index_M), counts])
        world.comm.Allgatherv(_np(val), [_np(value_M), counts])
    return index_M, value_M, [int(c) for c in counts]


def sparse_allreduce(world, index_n: torch.Tensor, value_n: torch.Tensor, length: int,
                     kind: str = "other") -> torch.Tensor:
    """The dense length-L sum over ranks of every rank's sparse vector (index_n, value_n):
    out[i] = sum over ranks r, in rank order, of the values rank r sent for i. Indices within
    one rank should be distinct (as a top-k selection gives); duplicates are added too."""
    _check_pairs(index_n, value_n, length)
    if index_n.numel() and (int(index_n.min()) < 0 or int(index_n.max()) >= length):
        raise ValueError(f"sparse exchange: indices must lie in [0, {length})")
    index_M, value_M, _ = allgather_pairs(world, index_n, value_n, kind)
    out_L = torch.zeros(length, dtype=value_M.dtype)
    # index_add_ on the CPU accumulates serially in the order of index_M: rank order.
    out_L.index_add_(0, index_M.long(), value_M)
    return out_L
