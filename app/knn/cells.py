"""The first graph of `auto` above the flat limit: an IVF whose cells are shared by all ranks.

Plain faiss indexes are too slow or too inexact on clustered weights (families of confusable
classes: an IVF cell holds several families and splits many), so `auto` builds its own:

- Cells shared by all ranks: spherical k-means (L = CELLS_PER_SQRT * sqrt(C) centroids; Lloyd
  iterations distributed over the ranks' parts of a seeded sample).
- Every class lives in its nearest cell and probes its CELLS_NPROBE nearest, computed once by its
  owner; the probes travel with the rows around the ring (`ring.ring_pass`).
- Each rank lays out its members of a cell in CELLS_KEEP groups (members that share their
  second-nearest cell, typically one family, dealt round-robin over the groups), multiplies the
  visiting rows that probe the cell with its members (one matrix product per cell, not faiss's
  per-vector scan) and keeps the best member of each group: a max over a few rows instead of a
  top-k, which would cost as much as the product.

Probing several cells gives each family links across the cells that split it; the refinement
passes that follow (`refine.py`) close them.

Legend: c = this rank's classes (rows), C = all classes, D = embedding dim, L = cells, p = cells
probed per class, s = sampled classes (k-means), G = member slots of all cells (groups padded),
q = rows of a travelling chunk, k = neighbours kept.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from app.knn.indexes import load_faiss
from app.knn.ring import Layout, merge_topk, ring_pass
from mpi import collectives

# Cells per sqrt(C), cells probed per class, groups per cell (the best member of each is kept),
# k-means sample rows per cell and iterations. Tuned on clustered weights at C = 1M
# (docs/results/): 8 probes give a family enough links across the cells that split it for the
# refinement passes to close them; fewer than 12 groups lose recall.
CELLS_PER_SQRT, CELLS_NPROBE, CELLS_KEEP, CELLS_TRAIN_PER_CELL, CELLS_NITER = 4.0, 8, 12, 16, 6
# Rows per chunk of the cell scan (its candidate buffers: rows x probes x groups x 12 bytes).
CELLS_CHUNK_ROWS = 262_144


def cells_search(world, layout: Layout, x_cD: np.ndarray, start: int, k: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Collective: the top-k (scores, global ids) of this rank's unit rows `x_cD` over the
    shared cells they probe (module docstring), and a one-line description."""
    num_classes = layout.num_classes
    num_cells = int(max(1, min(num_classes // 4, round(CELLS_PER_SQRT * math.sqrt(num_classes)))))
    centroids_LD = shared_cells(world, layout, x_cD, start, num_cells, seed)
    num_probe = min(CELLS_NPROBE, num_cells)
    probe_cp = _nearest_cells(world, x_cD, centroids_LD, num_probe)
    groups = cell_groups(x_cD, start, probe_cp, num_cells)

    def visit(block):
        if block["query"].shape[0] == 0:
            return
        score_qx, id_qx = _best_of_groups(block["query"], block["probe"], groups, num_cells)
        block["score"], block["id"], _ = merge_topk(block["score"], block["id"], score_qx,
                                                    id_qx, k)

    fields = {"query": x_cD, "probe": probe_cp,
              "score": np.full((x_cD.shape[0], k), -np.inf, dtype=np.float32),
              "id": np.full((x_cD.shape[0], k), -1, dtype=np.int64)}
    got = ring_pass(world, layout, fields, visit, ("score", "id"), CELLS_CHUNK_ROWS)
    detail = (f"ivf: {num_cells} shared k-means cells, {num_probe} probed, scanned by matrix "
              f"products, best of {CELLS_KEEP} groups")
    return got["score"], got["id"], detail


def shared_cells(world, layout: Layout, x_cD: np.ndarray, start: int, num_cells: int,
                 seed: int) -> np.ndarray:
    """(L, D) unit centroids of spherical k-means over a seeded sample of all classes, the same
    on every rank. Distributed Lloyd iterations: each rank assigns its own sampled rows, the
    per-cell sums are all-reduced; rank 0's final centroids are broadcast, so that float
    differences between the ranks' reductions cannot give two ranks different cells."""
    faiss = load_faiss(world)
    num_classes, dim = layout.num_classes, x_cD.shape[1]
    rng = np.random.default_rng([seed, 0xCE11])
    sample = np.sort(rng.choice(num_classes, min(num_classes, CELLS_TRAIN_PER_CELL * num_cells),
                                replace=False))
    mine_sD = x_cD[sample[(sample >= start) & (sample < start + x_cD.shape[0])] - start]
    # Start from L sampled classes (gathered from their owners).
    first = np.sort(rng.choice(sample, num_cells, replace=False))
    first = first[(first >= start) & (first < start + x_cD.shape[0])] - start
    centroids_LD = collectives.allgather(world, torch.from_numpy(x_cD[first])).numpy()
    for _ in range(CELLS_NITER):
        index = faiss.IndexFlatIP(dim)
        index.add(centroids_LD)
        cell_s = index.search(mine_sD, 1)[1][:, 0] if len(mine_sD) else np.zeros(0, np.int64)
        sums_LD = torch.zeros(num_cells, dim, dtype=torch.float64)
        sums_LD.index_add_(0, torch.from_numpy(cell_s), torch.from_numpy(mine_sD).double())
        sums_LD = collectives.allreduce(world, sums_LD)
        norm_L1 = sums_LD.norm(dim=1, keepdim=True)
        # A cell that drew no row keeps its centroid.
        centroids_LD = torch.where(norm_L1 > 0, sums_LD / norm_L1.clamp_min(1e-30),
                                   torch.from_numpy(centroids_LD).double()).float().numpy()
    return collectives.broadcast_object(world, np.ascontiguousarray(centroids_LD))


def _nearest_cells(world, x_cD: np.ndarray, centroids_LD: np.ndarray,
                   num_probe: int) -> np.ndarray:
    """(c, p) int32 cells probed by each of this rank's rows, nearest first."""
    quantizer = load_faiss(world).IndexFlatIP(x_cD.shape[1])
    quantizer.add(centroids_LD)
    if not len(x_cD):
        return np.zeros((0, num_probe), dtype=np.int32)
    return quantizer.search(x_cD, num_probe)[1].astype(np.int32)


def cell_order(cell_n: np.ndarray, num_cells: int) -> np.ndarray:
    """Stable order of entries by cell: numpy radix-sorts 16-bit keys in O(n) (the cell ids of
    up to 268M classes fit)."""
    if num_cells <= np.iinfo(np.uint16).max:
        cell_n = cell_n.astype(np.uint16)
    return np.argsort(cell_n, kind="stable")


def cell_groups(x_cD: np.ndarray, start: int, probe_cp: np.ndarray, num_cells: int):
    """This rank's members laid out cell by cell, each cell split into CELLS_KEEP groups of
    g = ceil(members / CELLS_KEEP) rows (padded with zero rows of id -1), so that the scan keeps
    the best member of every group (a max over g, far cheaper than a top-k). Members that share
    their second-nearest cell (typically one family) are dealt round-robin over the groups, so
    that they compete in different groups. Returns (rows G x D, ids G, cell bounds L + 1,
    group size L)."""
    order = np.lexsort((probe_cp[:, 1] if probe_cp.shape[1] > 1 else probe_cp[:, 0],
                        probe_cp[:, 0]))
    counts = np.bincount(probe_cp[:, 0], minlength=num_cells)
    group = -(-counts // CELLS_KEEP)
    bounds = np.concatenate([[0], np.cumsum(group * CELLS_KEEP)])
    members_GD = np.zeros((int(bounds[-1]), x_cD.shape[1]), dtype=np.float32)
    ids_G = np.full(int(bounds[-1]), -1, dtype=np.int64)
    # Member t of a cell (in sorted order) goes to group t % KEEP, slot t // KEEP.
    cell_of = probe_cp[order, 0].astype(np.int64)
    t = np.arange(order.shape[0]) - np.concatenate([[0], np.cumsum(counts)])[cell_of]
    dest = bounds[cell_of] + (t % CELLS_KEEP) * group[cell_of] + t // CELLS_KEEP
    members_GD[dest] = x_cD[order]
    ids_G[dest] = order + start
    return torch.from_numpy(members_GD), torch.from_numpy(ids_G), bounds, group


def _best_of_groups(query_qD: np.ndarray, probe_qp: np.ndarray, groups,
                    num_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, p * CELLS_KEEP) scores and global ids: for each probe of each visiting row, the best
    of this rank's members in each group of the probed cell (-inf, -1 where there is none).

    The (query, probe) pairs are grouped by cell; each cell's queries are gathered (a few
    hundred rows, in cache), multiplied with its members, and the best of each of its groups
    written straight to the pairs' rows of the (q * p, CELLS_KEEP) buffers."""
    members_GD, member_ids_G, bounds, group = groups
    num_q, num_probe = probe_qp.shape
    flat = probe_qp.reshape(-1)
    pairs = cell_order(flat, num_cells)
    pair_bounds = np.searchsorted(flat[pairs], np.arange(num_cells + 1))
    pairs_t = torch.from_numpy(pairs)
    query_qD = torch.from_numpy(query_qD)
    buf_score = torch.full((num_q * num_probe, CELLS_KEEP), -math.inf)
    buf_id = torch.full((num_q * num_probe, CELLS_KEEP), -1, dtype=torch.int64)
    for cell in np.flatnonzero((np.diff(pair_bounds) > 0) & (group > 0)):
        a, z = int(pair_bounds[cell]), int(pair_bounds[cell + 1])
        lo, hi = int(bounds[cell]), int(bounds[cell + 1])
        rows = pairs_t[a:z]
        sim_qm = query_qD.index_select(0, rows // num_probe) @ members_GD[lo:hi].T
        best = sim_qm.view(z - a, CELLS_KEEP, int(group[cell])).max(dim=2)
        buf_score.index_copy_(0, rows, best.values)
        buf_id.index_copy_(0, rows, member_ids_G[lo:hi][best.indices + torch.arange(
            0, hi - lo, int(group[cell]))])
    buf_score[buf_id < 0] = -math.inf  # padding
    return buf_score.numpy().reshape(num_q, -1), buf_id.numpy().reshape(num_q, -1)
