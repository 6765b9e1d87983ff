"""Refinement of a graph by neighbours of neighbours (as NN-descent), and the rescoring of a
previous graph under moved weights (the starting point of a refresh by refinement).

One pass: every class takes as candidates the first REFINE_EXPAND entries of the rows of its
first REFINE_FORWARD neighbours and of up to REFINE_REVERSE classes that list it among theirs
(reverse edges); a candidate reached through an old neighbour counts only if it is itself new in
that row (older pairs were scored before). Rows are fetched from their owners by alltoallv; the
candidates not yet in a row travel the ring with the row and every rank scores those it owns
(faiss's fused gather-dot).

Legend: c = this rank's classes (rows), D = embedding dim, K = neighbours per class, q = rows of
a travelling chunk or of a slice, m = forward and r = reverse neighbours expanded, v = m + r,
x = entries taken from each expanded row, w = new candidates per row.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from app.knn import ring
from app.knn.indexes import load_faiss
from app.knn.ring import Layout, merge_topk, ring_pass
from mpi import collectives

if TYPE_CHECKING:
    from app.knn.search import LocalGraph

# Forward and reverse neighbours expanded, entries taken from each expanded row: 6 + 6 cost a
# third less than 8 + 8 for little recall (clustered weights at C = 1M, docs/results/).
REFINE_FORWARD, REFINE_REVERSE, REFINE_EXPAND = 6, 6, 8
# Rows per slice of the candidate search: small slices keep the sort keys in cache.
_SLICE_ROWS = 8192


def refine_pass(world, layout: Layout, x_cD: np.ndarray, start: int, score_cK: np.ndarray,
                id_cK: np.ndarray, fresh_cK: np.ndarray):
    """Collective: one pass of neighbours-of-neighbours (module docstring). As in NN-descent, a
    candidate w reached through neighbour v is taken only if v or w is fresh (entered its list
    in the last pass). Returns (scores, ids, fresh) improved."""
    cand_cw = _candidates(world, layout, start, id_cK, fresh_cK)
    score_cw = score_on_ring(world, layout, x_cD, start, cand_cw)
    return merge_topk(score_cK, id_cK, score_cw, cand_cw, id_cK.shape[1])


def rescore(world, layout: Layout, x_cD: np.ndarray, start: int, init: LocalGraph,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Collective: a previous graph's rows scored under the current weights, best first: the
    starting point of refinement when the weights have moved since it was built."""
    if init.start != start or init.neighbors_ck.shape[0] != x_cD.shape[0]:
        raise ValueError(f"knn graph: the previous graph holds rows [{init.start}, {init.stop}) "
                         f"but this rank holds [{start}, {start + x_cD.shape[0]})")
    num_rows = x_cD.shape[0]
    cand_cK = np.full((num_rows, k), -1, dtype=np.int64)
    width = min(k, init.k)
    cand_cK[:, :width] = init.neighbors_ck[:, :width]
    score_cK = score_on_ring(world, layout, x_cD, start, cand_cK)
    none_c0 = np.zeros((num_rows, 0))
    return merge_topk(none_c0.astype(np.float32), none_c0.astype(np.int64), score_cK, cand_cK,
                      k)[:2]


def score_on_ring(world, layout: Layout, x_cD: np.ndarray, start: int,
                  cand_cw: np.ndarray) -> np.ndarray:
    """Collective: cosine of each of this rank's rows with each of its candidate classes (global
    ids, -1 = none: -inf). The rows travel the ring with their candidates; every rank scores the
    candidates it owns with faiss's fused gather-dot."""
    faiss = load_faiss(world)
    num_rows, width = cand_cw.shape
    fields = {"query": x_cD, "cand": cand_cw.astype(np.int32),
              "score": np.full((num_rows, width), -np.inf, dtype=np.float32)}

    def visit(block):
        local_qw = block["cand"].astype(np.int64) - start
        mine = (local_qw >= 0) & (local_qw < num_rows)
        if not mine.any():
            return
        local_qw[~mine] = -1  # faiss skips negative ids
        got_qw = np.empty(local_qw.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(got_qw), faiss.swig_ptr(block["query"]), faiss.swig_ptr(x_cD),
            faiss.swig_ptr(local_qw), x_cD.shape[1], local_qw.shape[0], width)
        block["score"][mine] = got_qw[mine]

    return ring_pass(world, layout, fields, visit, ("score",), ring.CHUNK_ROWS)["score"]


def _candidates(world, layout: Layout, start: int, id_cK: np.ndarray,
                fresh_cK: np.ndarray) -> np.ndarray:
    """Collective: (c, w) new candidates of every row (-1 pads; w the same on every rank)."""
    via_cv, via_fresh_cv = _expanded_neighbours(world, layout, start, id_cK, fresh_cK)
    valid = via_cv >= 0
    wanted, where = np.unique(via_cv[valid], return_inverse=True)
    # Rows travel as 2 * id + fresh: one exchange for both.
    table_cx = 2 * id_cK[:, :REFINE_EXPAND] + fresh_cK[:, :REFINE_EXPAND]
    rows_vx = exchange_ids(world, layout, wanted, np.ascontiguousarray(table_cx), start)
    row_of_cv = np.zeros(via_cv.shape, dtype=np.int64)
    row_of_cv[valid] = where
    parts = []
    for lo in range(0, id_cK.shape[0], _SLICE_ROWS):
        hi = lo + _SLICE_ROWS
        got_qvx = rows_vx[row_of_cv[lo:hi]]
        take = (got_qvx >= 0) & ((got_qvx & 1).astype(bool) | via_fresh_cv[lo:hi, :, None])
        take &= valid[lo:hi, :, None]
        cand_qvx = np.where(take, got_qvx >> 1, -1)
        parts.append(new_candidates(id_cK[lo:hi], cand_qvx.reshape(cand_qvx.shape[0], -1),
                                    start + lo))
    return _stack_slices(world, parts, id_cK.shape[0])


def _expanded_neighbours(world, layout: Layout, start: int, id_cK: np.ndarray,
                         fresh_cK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collective: (c, v) the forward and reverse neighbours whose rows each row expands (-1
    pads; the class itself is left out), and whether each entered its list in the last pass."""
    num_rows = id_cK.shape[0]
    fwd_cm = id_cK[:, :REFINE_FORWARD + 1].copy()
    fwd_cm[fwd_cm == np.arange(start, start + num_rows)[:, None]] = -1
    fresh_cm = fresh_cK[:, :REFINE_FORWARD + 1]
    rev_cr, rev_fresh_cr = reverse_neighbours(world, layout, fwd_cm, fresh_cm, start,
                                              REFINE_REVERSE)
    return (np.concatenate([fwd_cm, rev_cr], axis=1),
            np.concatenate([fresh_cm, rev_fresh_cr], axis=1))


def _stack_slices(world, parts: list, num_rows: int) -> np.ndarray:
    """Collective: the slices' candidates in one (c, w) array, w the widest slice of any rank
    (the ring needs the same width on every rank)."""
    width = int(collectives.allreduce(
        world, torch.tensor([max([p.shape[1] for p in parts], default=0)]), "max")[0])
    cand_cw = np.full((num_rows, width), -1, dtype=np.int64)
    for lo, part in zip(range(0, num_rows, _SLICE_ROWS), parts):
        cand_cw[lo:lo + part.shape[0], :part.shape[1]] = part
    return cand_cw


def exchange_ids(world, layout: Layout, wanted: np.ndarray, table_cX: np.ndarray,
                 start: int) -> np.ndarray:
    """Collective: rows of `table_cX` (one per local class, on every rank) for the sorted unique
    global ids `wanted`: each id is requested from its owner by alltoallv and answered the same
    way."""
    owner = layout.owner(wanted)
    counts = np.bincount(owner, minlength=world.size)
    req, req_counts = collectives.alltoallv(world, torch.from_numpy(wanted), counts)
    answer = torch.from_numpy(np.ascontiguousarray(table_cX[req.numpy() - start]))
    return collectives.alltoallv_known(world, answer, req_counts, counts.tolist()).numpy()


def reverse_neighbours(world, layout: Layout, fwd_cm: np.ndarray, fresh_cm: np.ndarray,
                       start: int, num_rev: int) -> tuple[np.ndarray, np.ndarray]:
    """Collective: (c, num_rev) global ids of classes whose forward lists hold this rank's
    classes (those that rank them highest first; -1 pads), and whether each such edge is
    fresh."""
    num_rows, m = fwd_cm.shape
    src = np.repeat(np.arange(start, start + num_rows, dtype=np.int64), m)
    pos = np.tile(np.arange(m, dtype=np.int64), num_rows)
    dst = fwd_cm.reshape(-1)
    keep = dst >= 0
    edges = np.stack([dst[keep], src[keep], pos[keep], fresh_cm.reshape(-1)[keep]], axis=1)
    edges = edges[np.argsort(edges[:, 0], kind="stable")]
    counts = np.bincount(layout.owner(edges[:, 0]), minlength=world.size)
    got = collectives.alltoallv(world, torch.from_numpy(edges), counts)[0].numpy()
    rev_cr = np.full((num_rows, num_rev), -1, dtype=np.int64)
    fresh_cr = np.zeros((num_rows, num_rev), dtype=bool)
    if got.shape[0]:
        got = got[np.lexsort((got[:, 2], got[:, 0]))]  # by target, then by rank in the list
        local = got[:, 0] - start
        slot = np.arange(local.shape[0]) - np.searchsorted(local, local, side="left")
        take = slot < num_rev
        rev_cr[local[take], slot[take]] = got[take, 1]
        fresh_cr[local[take], slot[take]] = got[take, 3] > 0
    return rev_cr, fresh_cr


def new_candidates(id_cK: np.ndarray, cand_cw: np.ndarray, start: int) -> np.ndarray:
    """Candidates of each row that are valid, not the class itself, not already in the row and
    not repeated; compacted to the left of an (n, w') int64 array padded with -1."""
    num_rows, k = id_cK.shape
    # One sortable key per entry: 2 * id, + 1 for a candidate, so that an id already in the row
    # sorts just before its candidate copies; -1 and the class itself become `last`. numpy's
    # vectorised sort of int32 rows is several times faster than torch.sort.
    dtype = np.int32 if max(int(id_cK.max(initial=0)), int(cand_cw.max(initial=0))) < 2**30 \
        else np.int64
    last = np.iinfo(dtype).max
    both = np.concatenate([id_cK, cand_cw], axis=1)
    key = both.astype(dtype) * 2
    key[:, k:] += 1
    key[(both < 0) | (both == np.arange(start, start + num_rows)[:, None])] = last
    key.sort(axis=1)
    new = (key & 1).astype(bool) & (key != last)
    new[:, 1:] &= (key[:, 1:] >> 1) != (key[:, :-1] >> 1)
    out = np.where(new, key >> 1, last)
    out.sort(axis=1)
    out = out[:, :int(new.sum(axis=1).max(initial=0))].astype(np.int64)
    out[out == last] = -1
    return out
