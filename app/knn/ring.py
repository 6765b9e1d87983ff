"""The ring of ranks that every distributed search of the KNN graph runs on.

Rank r holds only its rows [start, stop) of W: contiguous class ranges in rank order (`class_range`
or any uneven split; a rank may own no class). Query blocks (rank r's rows, in chunks, with
whatever travels with them) go around the ring with mpi4py Sendrecv (r sends to r+1, receives from
r-1); every rank visits every block. After P-1 hops every block has visited every rank; one last
hop carries only the results home. No rank ever holds more than its own rows plus one travelling
chunk of another rank's rows.

Legend: c = this rank's classes (rows), q = rows of a travelling chunk, k = candidates kept.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from mpi import collectives
from mpi.world import Traffic

# Query rows per travelling chunk: bounds the memory of a block (and of faiss's result heaps).
CHUNK_ROWS = 65_536


class Layout:
    """Row ranges of all ranks, learnt from one allgather and validated identically everywhere."""

    def __init__(self, world, start: int, num_rows: int, num_classes: int):
        spans = collectives.allgather_object(world, (int(start), int(num_rows)))
        self.starts = np.array([s for s, _ in spans] + [num_classes], dtype=np.int64)
        self.counts = [n for _, n in spans]
        expect = 0
        for r, (s, n) in enumerate(spans):
            if s != expect or n < 0:
                raise ValueError(
                    f"knn graph: rank {r} holds rows [{s}, {s + n}) but the ranks' rows must be "
                    f"contiguous class ranges in rank order; the next row expected was {expect}")
            expect = s + n
        if expect != num_classes:
            raise ValueError(f"knn graph: the ranks hold {expect} rows in all but "
                             f"num_classes={num_classes}")

    @property
    def num_classes(self) -> int:
        return int(self.starts[-1])

    def owner(self, ids: np.ndarray) -> np.ndarray:
        """Rank holding each global class id (ranks with no rows never own one)."""
        return np.searchsorted(self.starts, ids, side="right") - 1


def sendrecv(world, block: dict, rows: int) -> dict:
    """Send `block` (name -> array, same names, dtypes and trailing shapes on every rank) to
    rank r+1 and receive the next one, of `rows` rows, from rank r-1."""
    dest, source = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    out = {}
    for tag, name in enumerate(sorted(block)):
        send = np.ascontiguousarray(block[name])
        recv = np.empty((rows,) + send.shape[1:], dtype=send.dtype)
        with world.traffic.timed(send.nbytes, Traffic.KNN_GRAPH):
            world.comm.Sendrecv(send, dest=dest, sendtag=tag, recvbuf=recv, source=source,
                                recvtag=tag)
        out[name] = recv
    return out


def ring_pass(world, layout: Layout, fields: dict, visit: Callable[[dict], None],
              returned: tuple, chunk_rows: int) -> dict:
    """Pass this rank's rows (`fields`: name -> array with one row per local class) around the
    ring in chunks of `chunk_rows` rows. Every rank, the owner first, calls `visit(block)` on
    every chunk (`block`: name -> the chunk's rows, updated in place); after P-1 hops one more
    hop carries only the `returned` fields home. Returns those fields for this rank's rows.
    Collective; every rank runs the same number of rounds, with empty chunks where it has run
    out of rows."""
    rank, size = world.rank, world.size
    num_rounds = max(1, max(math.ceil(n / chunk_rows) for n in layout.counts))

    def span(origin: int, j: int) -> tuple[int, int]:
        n = layout.counts[origin]
        return min(j * chunk_rows, n), min((j + 1) * chunk_rows, n)

    out = {name: np.empty_like(fields[name]) for name in returned}
    for j in range(num_rounds):
        lo, hi = span(rank, j)
        block = {name: a[lo:hi].copy() for name, a in fields.items()}
        visit(block)
        for hop in range(1, size):
            o_lo, o_hi = span((rank - hop) % size, j)
            block = sendrecv(world, block, o_hi - o_lo)
            visit(block)
        if size > 1:
            block = sendrecv(world, {name: block[name] for name in returned}, hi - lo)
        for name in returned:
            out[name][lo:hi] = block[name]
    return out


def merge_topk(score_a, id_a, score_b, id_b, k: int):
    """Row-wise top-k of two candidate lists (no id appears in both), best first: (scores, ids,
    mask of the entries taken from list b)."""
    score = torch.from_numpy(np.concatenate([score_a, score_b], axis=1))
    ids = torch.from_numpy(np.concatenate([id_a, id_b], axis=1))
    top = torch.topk(score, min(k, score.shape[1]), dim=1, sorted=True)
    from_b = (top.indices >= score_a.shape[1]).numpy()
    return top.values.numpy(), torch.gather(ids, 1, top.indices).numpy(), from_b
