"""recall@k of a KNN graph (the file attribute `recall_at_k`, docs/design.md "Contracts: KNN
graph file").

Our definition: for a seeded random sample of classes (default 1000), the exact neighbour set of
class c is c itself plus its e - 1 nearest other classes by exact cosine (e = min(10, K)), i.e.
the first e entries an exact graph row would hold; recall is |exact set ∩ graph row| / e averaged
over the sample. The row is sorted by exact cosine, so this equals comparing against its first e
entries. Column 0 counts, so a graph that holds nothing but the class itself scores 1/e.

The exact search for the sample is distributed too: the sampled rows are all-gathered, each rank
brute-forces them against its rows, and the per-rank candidates are merged.

Legend: c = this rank's classes (rows), D = embedding dim, K = neighbours per class, s = sampled
classes, e = exact neighbours per sampled class (min(10, K)), q = rows of a chunk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from app.knn import ring
from app.knn.ring import merge_topk
from app.knn.rows import check_args, normalised
from mpi import collectives

if TYPE_CHECKING:
    from app.knn.search import LocalGraph


def recall_at_k(world, weight_cD, start: int, num_classes: int, graph: LocalGraph,
                num_samples: int = 1000, seed: int = 0) -> float:
    """Recall of the graph against exact search on a seeded sample of classes (definition in the
    module docstring). Collective: every rank passes its own rows and graph rows; the same value
    on every rank."""
    check_args(world, weight_cD, start, num_classes, graph.k)
    x_cD = normalised(weight_cD)
    num_rows = x_cD.shape[0]
    if graph.start != start or graph.neighbors_ck.shape[0] != num_rows:
        raise ValueError(f"recall_at_k: the graph holds rows [{graph.start}, {graph.stop}) but "
                         f"this rank holds [{start}, {start + num_rows})")
    e = min(10, graph.k)
    rng = np.random.default_rng([seed, 0x5EC])
    sample_s = np.sort(rng.choice(num_classes, min(num_samples, num_classes), replace=False))
    mine_s = sample_s[(sample_s >= start) & (sample_s < start + num_rows)]
    exact_se = _exact_neighbours(world, x_cD, start, sample_s, mine_s, e)
    mine = np.searchsorted(sample_s, mine_s)
    rows_sK = graph.neighbors_ck[mine_s - start].astype(np.int64)
    hits = int((rows_sK[:, :, None] == exact_se[mine][:, None, :]).any(axis=1).sum())
    totals = collectives.allreduce(world, torch.tensor([hits, mine_s.shape[0] * e]))
    return float(totals[0]) / max(float(totals[1]), 1.0)


def _exact_neighbours(world, x_cD: np.ndarray, start: int, sample_s: np.ndarray,
                      mine_s: np.ndarray, e: int) -> np.ndarray:
    """Collective: (s, e) exact neighbour ids of every sampled class, itself first; `mine_s` are
    the sampled classes this rank holds."""
    # Rank order is class order, so the gathered queries are in sample order.
    query_sD = collectives.allgather(world, torch.from_numpy(x_cD[mine_s - start])).numpy()
    score_se, id_se = _best_local(x_cD, start, sample_s, query_sD, e - 1)
    every_score = collectives.allgather(world, torch.from_numpy(score_se).unsqueeze(0)).numpy()
    every_id = collectives.allgather(world, torch.from_numpy(id_se).unsqueeze(0)).numpy()
    best_score = np.concatenate(list(every_score), axis=1)
    best_id = np.concatenate(list(every_id), axis=1)
    _, exact_se, _ = merge_topk(best_score, best_id, np.zeros((len(sample_s), 0), np.float32),
                                np.zeros((len(sample_s), 0), np.int64), e - 1)
    return np.concatenate([sample_s[:, None], exact_se], axis=1)


def _best_local(x_cD: np.ndarray, start: int, sample_s: np.ndarray, query_sD: np.ndarray,
                num_best: int) -> tuple[np.ndarray, np.ndarray]:
    """(s, num_best) scores and ids of the nearest OTHER classes among this rank's rows, by
    brute force in chunks of ring.CHUNK_ROWS rows."""
    score_sb = np.full((sample_s.shape[0], num_best), -np.inf, dtype=np.float32)
    id_sb = np.full((sample_s.shape[0], num_best), -1, dtype=np.int64)
    for lo in range(0, x_cD.shape[0], ring.CHUNK_ROWS):
        part_qD = x_cD[lo:lo + ring.CHUNK_ROWS]
        sim_sq = query_sD @ part_qD.T
        ids_q = np.arange(start + lo, start + lo + part_qD.shape[0])
        sim_sq[sample_s[:, None] == ids_q[None, :]] = -np.inf  # the class itself is column 0
        kk = min(num_best, part_qD.shape[0])
        top = torch.topk(torch.from_numpy(sim_sq), kk, dim=1)
        score_sb, id_sb, _ = merge_topk(score_sb, id_sb, top.values.numpy(),
                                        ids_q[top.indices.numpy()], num_best)
    return score_sb, id_sb
