"""The distributed build of the KNN graph (`build_graph`) and this rank's part of it
(`LocalGraph`).

Rank r holds only its rows [start, stop) of W and searches ALL classes for them on the ring
(`ring.py`). Indexes: `flat`, `ivf`, `hnsw` are faiss indexes of each rank's own rows that the
query chunks visit (`indexes.py`); `torch` is the same exact search as `flat` done in torch on
the device the rows are on (`torch_search.py`); `auto` is `flat` (exact) up to FLAT_MAX_CLASSES
classes and above it the shared cells of `cells.py` followed by AUTO_REFINE passes of
neighbours-of-neighbours (`refine.py`). A previous graph of the same rows (`init`) is rescored under the current weights
and refined instead of searching from scratch.

Column 0 is forced to be the class itself (similarity = its own cosine, 1 for a non-zero row),
followed by its K-1 nearest OTHER classes, even when another class has an identical vector. K > C
is clamped to C with a warning. Where an approximate index found fewer than K-1 other classes
(an IVF probe that reached too few rows), the row is completed with distinct random classes whose
similarity is NaN (unknown); a warning counts them.

Legend: c = this rank's classes (rows), C = all classes, D = embedding dim, K = neighbours per
class (column 0 = the class itself), q = rows of a travelling query chunk.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from app.knn import ring
from app.knn.cells import cells_search
from app.knn.indexes import Searcher, build_index
from app.knn.refine import refine_pass, rescore
from app.knn.ring import Layout, merge_topk, ring_pass
from app.knn.rows import check_args, normalised
from app.knn.torch_search import rows_device, torch_ring_search
from mpi import collectives

INDEXES = ("flat", "ivf", "hnsw", "torch", "auto")
# Exact search costs C^2 D: 20k classes x 128 dims is about 0.1 TFLOP, a few seconds on 2 cores.
FLAT_MAX_CLASSES = 20_000
# Refinement passes of `auto` above FLAT_MAX_CLASSES and of a refresh from a previous graph.
AUTO_REFINE = 2

log = logging.getLogger("hundredm")


@dataclass
class LocalGraph:
    """This rank's rows [start, start + n) of the graph.

    neighbors_ck: int32 (n, K) global class ids, column 0 = the class itself.
    similarity_ck: float32 (n, K) cosine of each neighbour (NaN where unknown: random graphs,
        random completion of a short row).
    index: the index actually used (`flat`, `ivf`, `hnsw`, `torch`; `refine` for a refined previous
        graph; `random`); detail: its parameters, in words.
    seconds: wall time of the build on this rank.
    """

    neighbors_ck: np.ndarray
    similarity_ck: np.ndarray
    start: int
    index: str
    seconds: float = 0.0
    detail: str = ""

    @property
    def stop(self) -> int:
        return self.start + self.neighbors_ck.shape[0]

    @property
    def k(self) -> int:
        return self.neighbors_ck.shape[1]


def build_graph(world, weight_cD, start: int, num_classes: int, k: int, index: str = "auto",
                nprobe: int = 16, seed: int = 0, *, refine: int | None = None,
                init: LocalGraph | None = None) -> LocalGraph:
    """The K nearest classes of this rank's classes [start, start + n) among ALL classes.

    Collective: every rank passes its own rows `weight_cD` (n x D; contiguous class ranges in
    rank order, a rank may hold none) and the same num_classes, k, index, nprobe and seed; each
    gets its own rows of the graph. `index`: flat | ivf | hnsw | torch | auto (module
    docstring); `torch` computes on the device of `weight_cD` (a tensor's, else the CPU).
    `refine`: passes of neighbours-of-neighbours after the search (None: AUTO_REFINE for `auto`
    above FLAT_MAX_CLASSES classes and with `init`, else 0). `init`: a previous graph of the
    same rows (e.g. built before the weights moved) to rescore and refine instead of searching
    from scratch; the result's index is then `refine`.
    """
    started = time.perf_counter()
    if index not in INDEXES:
        raise ValueError(f"knn graph: index={index!r} is not one of {'|'.join(INDEXES)}")
    if nprobe < 1:
        raise ValueError(f"knn graph: nprobe={nprobe} must be >= 1")
    layout, k = check_args(world, weight_cD, start, num_classes, k)
    x_cD = normalised(weight_cD)
    auto = index == "auto" and num_classes > FLAT_MAX_CLASSES
    passes = (AUTO_REFINE if auto or init is not None else 0) if refine is None else int(refine)
    kind, score_cK, id_cK, detail = _first_graph(world, layout, x_cD, start, k, index, auto,
                                                 nprobe, seed, init, rows_device(weight_cD))
    fresh_cK = np.ones(id_cK.shape, dtype=bool)
    for _ in range(passes):
        score_cK, id_cK, fresh_cK = refine_pass(world, layout, x_cD, start, score_cK, id_cK,
                                                fresh_cK)
    if passes:
        detail += f" + {passes} refinement passes"
    nbr_cK, sim_cK, filled = finish_rows(x_cD, start, num_classes, score_cK, id_cK, k, seed)
    total_filled = int(collectives.allreduce(world, torch.tensor([filled]))[0])
    if total_filled and world.is_root:
        log.warning("knn graph: the %s index found fewer than K-1 other classes for some "
                    "classes; %d entries completed with random classes (similarity NaN); probe "
                    "more lists (knn.nprobe) or use flat", kind, total_filled)
    return LocalGraph(nbr_cK, sim_cK, start, kind, time.perf_counter() - started, detail)


def _first_graph(world, layout: Layout, x_cD: np.ndarray, start: int, k: int, index: str,
                 auto: bool, nprobe: int, seed: int, init: LocalGraph | None,
                 device: torch.device):
    """Collective: the graph before refinement: (kind of index, scores, ids, detail)."""
    if init is not None:
        score_cK, id_cK = rescore(world, layout, x_cD, start, init, k)
        return "refine", score_cK, id_cK, f"previous {init.index} graph rescored"
    if auto:
        return ("ivf",) + cells_search(world, layout, x_cD, start, k, seed)
    if index == "torch":
        score_cK, id_cK = torch_ring_search(world, layout, x_cD, start, k, device)
        return "torch", score_cK, id_cK, f"torch (exact inner product on {device})"
    kind = "flat" if index == "auto" else index
    # The index (a copy of the rows, lists, links) is freed on return, before refinement.
    searcher, detail = build_index(world, kind, x_cD, start, k, nprobe, seed)
    score_cK, id_cK = ring_search(world, layout, searcher, x_cD, k)
    return kind, score_cK, id_cK, detail


def ring_search(world, layout: Layout, searcher: Searcher | None, x_cD: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Collective: global top-k (scores, ids) of this rank's rows over ALL classes: the query
    chunks visit every rank's index on the ring."""
    num_rows = x_cD.shape[0]
    fields = {"query": x_cD,
              "score": np.full((num_rows, k), -np.inf, dtype=np.float32),
              "id": np.full((num_rows, k), -1, dtype=np.int64)}

    def visit(block):
        if searcher is None or block["query"].shape[0] == 0:
            return
        score_qk, id_qk = searcher.search(block["query"], k)
        block["score"], block["id"], _ = merge_topk(
            block["score"], block["id"], score_qk, id_qk, k)

    got = ring_pass(world, layout, fields, visit, ("score", "id"), ring.CHUNK_ROWS)
    return got["score"], got["id"]


def finish_rows(x_cD: np.ndarray, start: int, num_classes: int, score_cK: np.ndarray,
                id_cK: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Column 0 = the class itself, then its first K-1 OTHER found classes in score order; rows
    with fewer are completed with distinct random classes (similarity NaN). Returns
    (neighbors int32, similarity float32, number of completed entries)."""
    num_rows = id_cK.shape[0]
    self_c = np.arange(start, start + num_rows, dtype=np.int64)
    skip_cK = (id_cK == self_c[:, None]) | (id_cK < 0)
    # Stable: kept entries stay in score order, skipped ones move to the back.
    order = np.argsort(skip_cK, axis=1, kind="stable")[:, :k - 1]
    nbr_cK = np.concatenate([self_c[:, None], np.take_along_axis(id_cK, order, axis=1)], axis=1)
    sim_cK = np.concatenate([np.einsum("cd,cd->c", x_cD, x_cD)[:, None],
                             np.take_along_axis(score_cK, order, axis=1)], axis=1)
    missing_cK = np.concatenate([np.zeros((num_rows, 1), dtype=bool),
                                 np.take_along_axis(skip_cK, order, axis=1)], axis=1)
    sim_cK[missing_cK] = np.nan
    _complete_rows(nbr_cK, missing_cK, start, num_classes, seed)
    return nbr_cK.astype(np.int32), sim_cK.astype(np.float32), int(missing_cK.sum())


def _complete_rows(nbr_cK: np.ndarray, missing_cK: np.ndarray, start: int, num_classes: int,
                   seed: int) -> None:
    """Fill the missing entries of each row with distinct random classes not in the row, drawn
    from a generator keyed by (seed, class): the same whatever the partition."""
    for row in np.flatnonzero(missing_cK.any(axis=1)):
        taken = set(nbr_cK[row][~missing_cK[row]].tolist())
        rng = np.random.default_rng([seed, start + int(row)])
        fill = []
        while len(fill) < int(missing_cK[row].sum()):
            c = int(rng.integers(num_classes))
            if c not in taken:
                taken.add(c)
                fill.append(c)
        nbr_cK[row, missing_cK[row]] = fill
