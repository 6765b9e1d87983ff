"""The KNN graph of the classes: for every class c, its K nearest classes by cosine of the
normalised classifier rows, column 0 being c itself (DESIGN.md sections 2 and 4).

`python -m app.knn_graph --run RUN_DIR --k K` (under mpirun, any number of ranks) builds the graph
of the newest complete checkpoint of a run and writes `RUN_DIR/knn/graph-step-NNNNNNNN.h5`.

Distributed build (`build_graph`). Rank r holds only its rows [start, stop) of W and indexes only
those (faiss: `flat` IndexFlatIP, `ivf` IndexIVFFlat, `hnsw` IndexHNSWFlat, all inner product on
L2-normalised rows, i.e. cosine). The query blocks (rank r's own normalised rows, in chunks) then
travel around the ring of ranks with mpi4py Sendrecv (r sends to r+1, receives from r-1), each
carrying its partial top-K (scores and global ids); every rank searches the visiting block in its
own index and merges. After P-1 hops every block has visited every index; one last hop carries
only the finished top-K (no vectors) home. No rank ever holds more than its own rows plus one
travelling chunk of another rank's rows. Rows must be contiguous class ranges in rank order
(`class_range`, or any uneven split; ranks may own no class).

`auto` picks `flat` (exact) up to FLAT_MAX_CLASSES classes. Above, plain faiss indexes are too
slow or too inexact on clustered weights (families of confusable classes: an IVF cell holds
several families and splits many), so `auto` builds an IVF of its own and then refines it:

1. Cells shared by all ranks: spherical k-means (L = CELLS_PER_SQRT * sqrt(C) centroids; Lloyd
   iterations distributed over the ranks' parts of a seeded sample). Every class lives in its
   nearest cell and probes its CELLS_NPROBE nearest, computed once by its owner; the probes
   travel with the rows around the same ring. Each rank lays out its members of a cell in
   CELLS_KEEP groups (members that share their second-nearest cell, typically one family, dealt
   round-robin over the groups), multiplies the visiting rows that probe the cell with its
   members (one matrix product per cell, not faiss's per-vector scan) and keeps the best member
   of each group: a max over a few rows instead of a top-k, which cost as much as the product.
2. AUTO_REFINE passes of neighbours-of-neighbours (as NN-descent): every class takes as
   candidates the first REFINE_EXPAND entries of the rows of its first REFINE_FORWARD
   neighbours and of up to REFINE_REVERSE classes that list it among theirs (reverse edges);
   a candidate reached through an old neighbour counts only if it is itself new in that row.
   Rows are fetched from their owners by alltoallv; the candidates not yet in a row travel the
   ring with the row and every rank scores those it owns (faiss's fused gather-dot). Probing
   several cells gives each family links across the cells that split it; the passes close them.
Measured (app/bench_graph.py, docs/results/knn_graph*.json): at C = 1M, D = 128, K = 64 on 2 ranks
of 1 thread, recall 0.912 in 70 s (median of 3); refining the graph after the weights drift
(`init`, knn.rebuild_every) takes 33 s for recall 0.947. The faiss IVF needs nprobe 16 for 0.90
at C = 100k and costs more than the whole `auto` build there.

Column 0 is forced to be the class itself (similarity = its own cosine, 1 for a non-zero row),
followed by its K-1 nearest OTHER classes, even when another class has an identical vector. K > C
is clamped to C with a warning. Where an approximate index found fewer than K-1 other classes
(an IVF probe that reached too few rows), the row is completed with distinct random classes
whose similarity is NaN (unknown); a warning counts them.

recall_at_k (the file attribute `recall_at_k`, DESIGN.md section 4), our definition: for a seeded
random sample of classes (default 1000), the exact neighbour set of class c is c itself plus its
k10 - 1 nearest other classes by exact cosine (k10 = min(10, K)), i.e. the first k10 entries an
exact graph row would hold; recall is |exact set ∩ graph row| / k10 averaged over the sample. The
row is sorted by exact cosine, so this equals comparing against its first k10 entries. Column 0
counts, so a graph that holds nothing but the class itself scores 1/k10. The exact search for the
sample is distributed too: the sampled rows are all-gathered, each rank brute-forces them against
its rows, and the per-rank candidates are merged.

File (`write_graph`, read by `KnnGraph.open`): HDF5 with `/neighbors` int32 C x K and `/similarity`
float16 C x K, CONTIGUOUS layout (no chunks, no filters) so that every rank memory-maps it;
attributes `num_classes`, `k`, `metric` ("cosine"), `step`, `index`, `index_detail`,
`recall_at_k`. No parallel HDF5: rank 0 creates the file with both datasets allocated at their
full size and all attributes, closes it and broadcasts the datasets' byte offsets; then every
rank writes its row block as raw little-endian bytes at `offset + start * K * itemsize` (in
parallel; a contiguous dataset is exactly such a byte range, the same fact the memory-mapping
reader relies on), fsyncs, and after a barrier rank 0 renames `path + ".tmp"` to `path`.

Legend: c = this rank's classes (rows), C = all classes, D = embedding dim, K = neighbours per
class (column 0 = the class itself), q = rows of a travelling query chunk, L = cells, p = cells
probed per class, m = forward and r = reverse neighbours expanded, v = m + r, x = entries taken
from each expanded row, w = new candidates per row, s = sampled classes (recall), e = exact
neighbours per sampled class (min(10, K)), b = rows of a random-graph block.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpi import collectives

INDEXES = ("flat", "ivf", "hnsw", "auto")
# Exact search costs C^2 D: 20k classes x 128 dims is about 0.1 TFLOP, a few seconds on 2 cores.
FLAT_MAX_CLASSES = 20_000
# Query rows per travelling chunk: bounds the memory of a block (and of faiss's result heaps).
CHUNK_ROWS = 65_536
# faiss HNSW: links per node, candidate list while building; efSearch is max(HNSW_EF_SEARCH, K).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 40, 64
# IVF k-means: iterations and training rows per list (on a seeded sample of the local rows).
IVF_NITER, IVF_TRAIN_PER_LIST = 10, 32
# `auto` above FLAT_MAX_CLASSES (module docstring): cells per sqrt(C), cells probed per class,
# groups per cell (the best member of each is kept), k-means sample rows per cell and
# iterations; refinement passes, forward and reverse neighbours expanded, entries taken from
# each expanded row. Tuned on clustered weights at C = 1M (docs/results/knn_graph.json): 8
# probes give a family enough links across the cells that split it for two passes to reach
# recall 0.9; 12 groups keep that recall (8 lose 0.002), and 6 + 6 expanded neighbours cost a
# third less than 8 + 8 for 0.01 of recall.
CELLS_PER_SQRT, CELLS_NPROBE, CELLS_KEEP, CELLS_TRAIN_PER_CELL, CELLS_NITER = 4.0, 8, 12, 16, 6
AUTO_REFINE = 2
REFINE_FORWARD, REFINE_REVERSE, REFINE_EXPAND = 6, 6, 8
# Rows per chunk of the cell scan (its candidate buffers: rows x probes x groups x 12 bytes).
CELLS_CHUNK_ROWS = 262_144
GRAPH_VERSION = 1

log = logging.getLogger("hundredm")


@dataclass
class LocalGraph:
    """This rank's rows [start, start + n) of the graph.

    neighbors_ck: int32 (n, K) global class ids, column 0 = the class itself.
    similarity_ck: float32 (n, K) cosine of each neighbour (NaN where unknown: random graphs,
        random completion of a short row).
    index: the index actually used (`flat`, `ivf`, `hnsw`; `refine` for a refined previous
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


# -- layout: which rank holds which rows ------------------------------------------------------

class _Layout:
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

    def owner(self, ids: np.ndarray) -> np.ndarray:
        """Rank holding each global class id (ranks with no rows never own one)."""
        return np.searchsorted(self.starts, ids, side="right") - 1


def _rows_as_numpy(weight_cD) -> np.ndarray:
    if isinstance(weight_cD, torch.Tensor):
        weight_cD = weight_cD.detach().to("cpu").numpy()
    weight_cD = np.asarray(weight_cD)
    if weight_cD.ndim != 2 or not np.issubdtype(weight_cD.dtype, np.floating):
        raise ValueError(f"knn graph: weight rows must be a 2-D float array, got shape "
                         f"{weight_cD.shape} dtype {weight_cD.dtype}")
    return weight_cD


def _normalised(weight_cD) -> np.ndarray:
    """float32 C-contiguous unit rows (computed in float64; a zero row stays zero)."""
    w = _rows_as_numpy(weight_cD).astype(np.float64)
    norm_c = np.linalg.norm(w, axis=1, keepdims=True)
    return np.ascontiguousarray(w / np.maximum(norm_c, 1e-30), dtype=np.float32)


def _check_args(world, weight_cD, start: int, num_classes: int, k: int) -> tuple[_Layout, int]:
    """Collective: validate the arguments the same way on every rank; returns (layout, K)."""
    rows = _rows_as_numpy(weight_cD)
    if num_classes < 1 or num_classes >= 2**31:
        raise ValueError(f"knn graph: num_classes={num_classes} must be in [1, 2^31)")
    if k < 1:
        raise ValueError(f"knn graph: k={k} must be >= 1")
    dims = collectives.allgather_object(world, rows.shape[1])
    if len(set(dims)) != 1:
        raise ValueError(f"knn graph: ranks hold rows of different dimensions {dims}")
    layout = _Layout(world, start, rows.shape[0], num_classes)
    return layout, _clamp_k(k, num_classes, world.is_root)


def _clamp_k(k: int, num_classes: int, say: bool = True) -> int:
    if k > num_classes:
        if say:
            log.warning("knn graph: k=%d > %d classes; using k=%d (every class lists all "
                        "classes)", k, num_classes, num_classes)
        return num_classes
    return k


# -- faiss indexes over this rank's rows ------------------------------------------------------

def _faiss(world):
    import faiss  # noqa: PLC0415 - heavy; only where an index is built

    faiss.omp_set_num_threads(max(1, int(world.threads)))
    return faiss


class _Searcher:
    """A faiss index over this rank's rows; `search` returns global ids (-1: none found)."""

    def __init__(self, index, start: int, num_rows: int, gpu_resources=None):
        self.index, self.start, self.num_rows = index, start, num_rows
        self._gpu_resources = gpu_resources  # must outlive a GPU index

    def search(self, query_qD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, self.num_rows)
        score_qk, local_qk = self.index.search(query_qD, kk)
        found = local_qk >= 0
        score_qk = np.where(found, score_qk, -np.inf).astype(np.float32)
        return score_qk, np.where(found, local_qk + self.start, -1)


def _build_index(world, kind: str, x_cD: np.ndarray, start: int, k: int, nprobe: int,
                 seed: int) -> tuple[_Searcher | None, str]:
    """The local index of `kind` over this rank's normalised rows (None for a rank without rows)
    and a one-line description of its parameters."""
    faiss = _faiss(world)
    num_rows, dim = x_cD.shape
    if kind == "flat":
        index, detail = faiss.IndexFlatIP(dim), "flat (exact inner product)"
    elif kind == "ivf":
        nlist = int(max(1, min(num_rows, round(4 * math.sqrt(num_rows)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, nlist)
        detail = f"ivf nlist={nlist} (rank {world.rank}) nprobe={index.nprobe}"
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        detail = (f"hnsw M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION} "
                  f"efSearch={index.hnsw.efSearch}")
    if num_rows == 0:
        return None, detail
    if kind == "ivf":
        # k-means on a seeded sample: IVF_TRAIN_PER_LIST rows per list is plenty for cells
        # whose only job is to route queries; faiss's own 39-per-list warning does not apply.
        index.cp.niter, index.cp.seed = IVF_NITER, seed
        index.cp.min_points_per_centroid = 1
        index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
        rng = np.random.default_rng([seed, start])
        sample = min(num_rows, IVF_TRAIN_PER_LIST * index.nlist)
        index.train(x_cD[np.sort(rng.choice(num_rows, sample, replace=False))])
    index.add(x_cD)
    return _maybe_gpu(world, faiss, kind, index, start, num_rows, k), detail


def _maybe_gpu(world, faiss, kind: str, index, start: int, num_rows: int, k: int) -> _Searcher:
    """Move flat and IVF indexes to this rank's GPU when faiss has GPU support and sees one
    (faiss-gpu); faiss GPU search takes k <= 2048. HNSW stays on the CPU (no GPU HNSW)."""
    num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if num_gpus > 0 and hasattr(faiss, "StandardGpuResources") and kind != "hnsw" and k <= 2048:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, world.local_rank % num_gpus, index)
        return _Searcher(gpu_index, start, num_rows, resources)
    return _Searcher(index, start, num_rows)


# -- the ring ---------------------------------------------------------------------------------

def _sendrecv(world, block: dict, rows: int) -> dict:
    """Send `block` (name -> array, same names, dtypes and trailing shapes on every rank) to
    rank r+1 and receive the next one, of `rows` rows, from rank r-1."""
    dest, source = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    out = {}
    for tag, name in enumerate(sorted(block)):
        send = np.ascontiguousarray(block[name])
        recv = np.empty((rows,) + send.shape[1:], dtype=send.dtype)
        with world.traffic.timed(send.nbytes):
            world.comm.Sendrecv(send, dest=dest, sendtag=tag, recvbuf=recv, source=source,
                                recvtag=tag)
        out[name] = recv
    return out


def _ring(world, layout: _Layout, fields: dict, visit, returned: tuple, chunk_rows: int) -> dict:
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
            block = _sendrecv(world, block, o_hi - o_lo)
            visit(block)
        if size > 1:
            block = _sendrecv(world, {name: block[name] for name in returned}, hi - lo)
        for name in returned:
            out[name][lo:hi] = block[name]
    return out


def _merge_topk(score_a, id_a, score_b, id_b, k: int):
    """Row-wise top-k of two candidate lists (no id appears in both), best first: (scores, ids,
    mask of the entries taken from list b)."""
    score = torch.from_numpy(np.concatenate([score_a, score_b], axis=1))
    ids = torch.from_numpy(np.concatenate([id_a, id_b], axis=1))
    top = torch.topk(score, min(k, score.shape[1]), dim=1, sorted=True)
    from_b = (top.indices >= score_a.shape[1]).numpy()
    return top.values.numpy(), torch.gather(ids, 1, top.indices).numpy(), from_b


def _ring_search(world, layout: _Layout, searcher: _Searcher | None, x_cD: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k (scores, ids) of this rank's rows over ALL classes, by the ring."""
    num_rows = x_cD.shape[0]
    fields = {"query": x_cD,
              "score": np.full((num_rows, k), -np.inf, dtype=np.float32),
              "id": np.full((num_rows, k), -1, dtype=np.int64)}

    def visit(block):
        if searcher is None or block["query"].shape[0] == 0:
            return
        score_qk, id_qk = searcher.search(block["query"], k)
        block["score"], block["id"], _ = _merge_topk(
            block["score"], block["id"], score_qk, id_qk, k)

    got = _ring(world, layout, fields, visit, ("score", "id"), CHUNK_ROWS)
    return got["score"], got["id"]


def _shared_cells(world, layout: _Layout, x_cD: np.ndarray, start: int, num_cells: int,
                  seed: int) -> np.ndarray:
    """(L, D) unit centroids of spherical k-means over a seeded sample of all classes, the same
    on every rank. Distributed Lloyd iterations: each rank assigns its own sampled rows, the
    per-cell sums are all-reduced; rank 0's final centroids are broadcast, so that float
    differences between the ranks' reductions cannot give two ranks different cells."""
    faiss = _faiss(world)
    num_classes, dim = int(layout.starts[-1]), x_cD.shape[1]
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


def _cell_order(cell_n: np.ndarray, num_cells: int) -> np.ndarray:
    """Stable order of entries by cell: numpy radix-sorts 16-bit keys in O(n) (the cell ids of
    up to 268M classes fit)."""
    if num_cells <= np.iinfo(np.uint16).max:
        cell_n = cell_n.astype(np.uint16)
    return np.argsort(cell_n, kind="stable")


def _cell_groups(x_cD: np.ndarray, start: int, probe_cp: np.ndarray, num_cells: int):
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
    members_gD = np.zeros((int(bounds[-1]), x_cD.shape[1]), dtype=np.float32)
    ids_g = np.full(int(bounds[-1]), -1, dtype=np.int64)
    # Member t of a cell (in sorted order) goes to group t % KEEP, slot t // KEEP.
    cell_of = probe_cp[order, 0].astype(np.int64)
    t = np.arange(order.shape[0]) - np.concatenate([[0], np.cumsum(counts)])[cell_of]
    dest = bounds[cell_of] + (t % CELLS_KEEP) * group[cell_of] + t // CELLS_KEEP
    members_gD[dest] = x_cD[order]
    ids_g[dest] = order + start
    return torch.from_numpy(members_gD), torch.from_numpy(ids_g), bounds, group


def _cells_search(world, layout: _Layout, x_cD: np.ndarray, start: int, k: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """First graph for `auto` at large C: an IVF whose cells are shared by all ranks. Every
    class lives in its nearest cell and probes its CELLS_NPROBE nearest (computed once, by its
    owner; the probes travel with the rows). On the ring, each rank multiplies the visiting
    rows that probe a cell with its own members of that cell (one GEMM per cell) and keeps the
    best member of each of the cell's CELLS_KEEP groups; the K best of those are merged."""
    num_classes = int(layout.starts[-1])
    num_cells = int(max(1, min(num_classes // 4, round(CELLS_PER_SQRT * math.sqrt(num_classes)))))
    centroids_LD = _shared_cells(world, layout, x_cD, start, num_cells, seed)
    faiss = _faiss(world)
    quantizer = faiss.IndexFlatIP(x_cD.shape[1])
    quantizer.add(centroids_LD)
    num_probe = min(CELLS_NPROBE, num_cells)
    probe_cp = quantizer.search(x_cD, num_probe)[1].astype(np.int32) if len(x_cD) else \
        np.zeros((0, num_probe), dtype=np.int32)
    members_gD, member_ids_t, bounds, group = _cell_groups(x_cD, start, probe_cp, num_cells)

    def visit(block):
        num_q = block["query"].shape[0]
        if num_q == 0:
            return
        # (query, probe) pairs grouped by cell; each cell's queries are gathered (a few hundred
        # rows, in cache), multiplied with its members, and the best of each of its groups
        # written straight to the pairs' rows of the (query * probe, CELLS_KEEP) buffers.
        flat = block["probe"].reshape(-1)
        pairs = _cell_order(flat, num_cells)
        pair_bounds = np.searchsorted(flat[pairs], np.arange(num_cells + 1))
        pairs_t = torch.from_numpy(pairs)
        query_qD = torch.from_numpy(block["query"])
        buf_score = torch.full((num_q * num_probe, CELLS_KEEP), -math.inf)
        buf_id = torch.full((num_q * num_probe, CELLS_KEEP), -1, dtype=torch.int64)
        for cell in np.flatnonzero((np.diff(pair_bounds) > 0) & (group > 0)):
            a, z = int(pair_bounds[cell]), int(pair_bounds[cell + 1])
            lo, hi = int(bounds[cell]), int(bounds[cell + 1])
            rows = pairs_t[a:z]
            sim_qm = query_qD.index_select(0, rows // num_probe) @ members_gD[lo:hi].T
            best = sim_qm.view(z - a, CELLS_KEEP, int(group[cell])).max(dim=2)
            buf_score.index_copy_(0, rows, best.values)
            buf_id.index_copy_(0, rows, member_ids_t[lo:hi][best.indices + torch.arange(
                0, hi - lo, int(group[cell]))])
        buf_score[buf_id < 0] = -math.inf  # padding
        block["score"], block["id"], _ = _merge_topk(
            block["score"], block["id"], buf_score.numpy().reshape(num_q, -1),
            buf_id.numpy().reshape(num_q, -1), k)

    fields = {"query": x_cD, "probe": probe_cp,
              "score": np.full((x_cD.shape[0], k), -np.inf, dtype=np.float32),
              "id": np.full((x_cD.shape[0], k), -1, dtype=np.int64)}
    got = _ring(world, layout, fields, visit, ("score", "id"), CELLS_CHUNK_ROWS)
    return got["score"], got["id"], (f"ivf: {num_cells} shared k-means cells, {num_probe} "
                                     f"probed, scanned by matrix products, best of {CELLS_KEEP} groups")


# -- refinement: neighbours of neighbours -----------------------------------------------------

def _exchange_ids(world, layout: _Layout, wanted: np.ndarray, table_cX: np.ndarray,
                  start: int) -> np.ndarray:
    """Rows of `table_cX` (one per local class, on every rank) for the sorted unique global ids
    `wanted`: each id is requested from its owner by alltoallv and answered the same way."""
    owner = layout.owner(wanted)
    counts = np.bincount(owner, minlength=world.size)
    req, req_counts = collectives.alltoallv(world, torch.from_numpy(wanted), counts)
    answer = torch.from_numpy(np.ascontiguousarray(table_cX[req.numpy() - start]))
    return collectives.alltoallv_known(world, answer, req_counts, counts.tolist()).numpy()


def _reverse_neighbours(world, layout: _Layout, fwd_cm: np.ndarray, fresh_cm: np.ndarray,
                        start: int, num_rev: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, num_rev) global ids of classes whose forward lists hold this rank's classes (those
    that rank them highest first; -1 pads), and whether each such edge is fresh."""
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


def _new_candidates(id_cK: np.ndarray, cand_cw: np.ndarray, start: int) -> np.ndarray:
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


def _score_on_ring(world, layout: _Layout, x_cD: np.ndarray, start: int,
                   cand_cw: np.ndarray) -> np.ndarray:
    """Cosine of each of this rank's rows with each of its candidate classes (global ids, -1 =
    none: -inf). The rows travel the ring with their candidates; every rank scores the
    candidates it owns with faiss's fused gather-dot."""
    faiss = _faiss(world)
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

    return _ring(world, layout, fields, visit, ("score",), CHUNK_ROWS)["score"]


def _refine_pass(world, layout: _Layout, x_cD: np.ndarray, start: int, score_cK: np.ndarray,
                 id_cK: np.ndarray, fresh_cK: np.ndarray):
    """One pass of neighbours-of-neighbours (module docstring). As in NN-descent, a candidate
    w reached through neighbour v is taken only if v or w is fresh (entered its list in the
    last pass); older pairs were scored before. Returns (scores, ids, fresh) improved."""
    num_rows, k = id_cK.shape
    fwd_cm = id_cK[:, :REFINE_FORWARD + 1].copy()
    fwd_cm[fwd_cm == np.arange(start, start + num_rows)[:, None]] = -1
    fresh_cm = fresh_cK[:, :REFINE_FORWARD + 1]
    rev_cr, rev_fresh_cr = _reverse_neighbours(world, layout, fwd_cm, fresh_cm, start,
                                               REFINE_REVERSE)
    via_cv = np.concatenate([fwd_cm, rev_cr], axis=1)
    via_fresh_cv = np.concatenate([fresh_cm, rev_fresh_cr], axis=1)
    valid = via_cv >= 0
    wanted, where = np.unique(via_cv[valid], return_inverse=True)
    # Rows travel as 2 * id + fresh: one exchange for both.
    table_cx = 2 * id_cK[:, :REFINE_EXPAND] + fresh_cK[:, :REFINE_EXPAND]
    rows_vx = _exchange_ids(world, layout, wanted, np.ascontiguousarray(table_cx), start)
    row_of_cv = np.zeros(via_cv.shape, dtype=np.int64)
    row_of_cv[valid] = where
    parts = []
    # Small slices keep the sort keys of _new_candidates in cache.
    for lo in range(0, num_rows, 8192):
        got_qvx = rows_vx[row_of_cv[lo:lo + 8192]]
        take = (got_qvx >= 0) & ((got_qvx & 1).astype(bool) | via_fresh_cv[lo:lo + 8192, :, None])
        take &= valid[lo:lo + 8192, :, None]
        cand_qvx = np.where(take, got_qvx >> 1, -1)
        parts.append(_new_candidates(id_cK[lo:lo + 8192],
                                     cand_qvx.reshape(cand_qvx.shape[0], -1), start + lo))
    # The ring needs the same width on every rank.
    width = int(collectives.allreduce(
        world, torch.tensor([max([p.shape[1] for p in parts], default=0)]), "max")[0])
    cand_cw = np.full((num_rows, width), -1, dtype=np.int64)
    for lo, part in zip(range(0, num_rows, 8192), parts):
        cand_cw[lo:lo + part.shape[0], :part.shape[1]] = part
    score_cw = _score_on_ring(world, layout, x_cD, start, cand_cw)
    return _merge_topk(score_cK, id_cK, score_cw, cand_cw, k)


def _rescore(world, layout: _Layout, x_cD: np.ndarray, start: int, init: LocalGraph,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """A previous graph's rows scored under the current weights, best first: the starting point
    of refinement when the weights have moved since it was built."""
    if init.start != start or init.neighbors_ck.shape[0] != x_cD.shape[0]:
        raise ValueError(f"knn graph: the previous graph holds rows [{init.start}, {init.stop}) "
                         f"but this rank holds [{start}, {start + x_cD.shape[0]})")
    num_rows = x_cD.shape[0]
    cand_cK = np.full((num_rows, k), -1, dtype=np.int64)
    width = min(k, init.k)
    cand_cK[:, :width] = init.neighbors_ck[:, :width]
    score_cK = _score_on_ring(world, layout, x_cD, start, cand_cK)
    none_c0 = np.zeros((num_rows, 0))
    return _merge_topk(none_c0.astype(np.float32), none_c0.astype(np.int64), score_cK, cand_cK,
                       k)[:2]


# -- the graph --------------------------------------------------------------------------------

def _finish_rows(x_cD: np.ndarray, start: int, num_classes: int, score_cK: np.ndarray,
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
    for row in np.flatnonzero(missing_cK.any(axis=1)):
        taken = set(nbr_cK[row][~missing_cK[row]].tolist())
        rng = np.random.default_rng([seed, int(self_c[row])])
        fill = []
        while len(fill) < int(missing_cK[row].sum()):
            c = int(rng.integers(num_classes))
            if c not in taken:
                taken.add(c)
                fill.append(c)
        nbr_cK[row, missing_cK[row]] = fill
    return nbr_cK.astype(np.int32), sim_cK.astype(np.float32), int(missing_cK.sum())


def build_graph(world, weight_cD, start: int, num_classes: int, k: int, index: str = "auto",
                nprobe: int = 16, seed: int = 0, *, refine: int | None = None,
                init: LocalGraph | None = None) -> LocalGraph:
    """The K nearest classes of this rank's classes [start, start + n) among ALL classes.

    Collective: every rank passes its own rows `weight_cD` (n x D; contiguous class ranges in
    rank order, a rank may hold none) and the same num_classes, k, index, nprobe and seed; each
    gets its own rows of the graph. `index`: flat | ivf | hnsw | auto (module docstring).
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
    layout, k = _check_args(world, weight_cD, start, num_classes, k)
    x_cD = _normalised(weight_cD)
    auto = index == "auto" and num_classes > FLAT_MAX_CLASSES
    kind = ("ivf" if auto else "flat") if index == "auto" else index
    passes = (AUTO_REFINE if auto or init is not None else 0) if refine is None else int(refine)
    if init is not None:
        score_cK, id_cK = _rescore(world, layout, x_cD, start, init, k)
        kind, detail = "refine", f"previous {init.index} graph rescored"
    elif auto:
        score_cK, id_cK, detail = _cells_search(world, layout, x_cD, start, k, seed)
    else:
        searcher, detail = _build_index(world, kind, x_cD, start, k, nprobe, seed)
        score_cK, id_cK = _ring_search(world, layout, searcher, x_cD, k)
        del searcher  # its memory (a copy of the rows, lists, links) before refinement
    fresh_cK = np.ones(id_cK.shape, dtype=bool)
    for _ in range(passes):
        score_cK, id_cK, fresh_cK = _refine_pass(world, layout, x_cD, start, score_cK, id_cK,
                                                 fresh_cK)
    if passes:
        detail += f" + {passes} refinement passes"
    nbr_cK, sim_cK, filled = _finish_rows(x_cD, start, num_classes, score_cK, id_cK, k, seed)
    total_filled = int(collectives.allreduce(world, torch.tensor([filled]))[0])
    if total_filled and world.is_root:
        log.warning("knn graph: the %s index found fewer than K-1 other classes for some "
                    "classes; %d entries completed with random classes (similarity NaN); probe "
                    "more lists (knn.nprobe) or use flat", kind, total_filled)
    return LocalGraph(nbr_cK, sim_cK, start, kind, time.perf_counter() - started, detail)


def recall_at_k(world, weight_cD, start: int, num_classes: int, graph: LocalGraph,
                num_samples: int = 1000, seed: int = 0) -> float:
    """Recall of the graph against exact search on a seeded sample of classes (definition in the
    module docstring). Collective; the same value on every rank."""
    _check_args(world, weight_cD, start, num_classes, graph.k)
    x_cD = _normalised(weight_cD)
    num_rows = x_cD.shape[0]
    if graph.start != start or graph.neighbors_ck.shape[0] != num_rows:
        raise ValueError(f"recall_at_k: the graph holds rows [{graph.start}, {graph.stop}) but "
                         f"this rank holds [{start}, {start + num_rows})")
    e = min(10, graph.k)
    rng = np.random.default_rng([seed, 0x5EC])
    sample_s = np.sort(rng.choice(num_classes, min(num_samples, num_classes), replace=False))
    mine_s = sample_s[(sample_s >= start) & (sample_s < start + num_rows)]
    # Rank order is class order, so the gathered queries are in sample order.
    query_sD = collectives.allgather(world, torch.from_numpy(x_cD[mine_s - start])).numpy()
    score_se = np.full((sample_s.shape[0], e - 1), -np.inf, dtype=np.float32)
    id_se = np.full((sample_s.shape[0], e - 1), -1, dtype=np.int64)
    for lo in range(0, num_rows, CHUNK_ROWS):
        part = x_cD[lo:lo + CHUNK_ROWS]
        sim_sq = query_sD @ part.T
        ids_q = np.arange(start + lo, start + lo + part.shape[0])
        sim_sq[sample_s[:, None] == ids_q[None, :]] = -np.inf  # the class itself is column 0
        kk = min(e - 1, part.shape[0])
        top = torch.topk(torch.from_numpy(sim_sq), kk, dim=1)
        score_se, id_se, _ = _merge_topk(score_se, id_se, top.values.numpy(),
                                         ids_q[top.indices.numpy()], e - 1)
    every_score = collectives.allgather(world, torch.from_numpy(score_se).unsqueeze(0)).numpy()
    every_id = collectives.allgather(world, torch.from_numpy(id_se).unsqueeze(0)).numpy()
    best_score = np.concatenate(list(every_score), axis=1)
    best_id = np.concatenate(list(every_id), axis=1)
    _, exact_se, _ = _merge_topk(best_score, best_id, np.zeros((len(sample_s), 0), np.float32),
                              np.zeros((len(sample_s), 0), np.int64), e - 1)
    exact_se = np.concatenate([sample_s[:, None], exact_se], axis=1)
    mine = np.searchsorted(sample_s, mine_s)
    rows_sK = graph.neighbors_ck[mine_s - start].astype(np.int64)
    hits = int((rows_sK[:, :, None] == exact_se[mine][:, None, :]).any(axis=1).sum())
    totals = collectives.allreduce(world, torch.tensor([hits, mine_s.shape[0] * e]))
    return float(totals[0]) / max(float(totals[1]), 1.0)


# -- random graph -----------------------------------------------------------------------------

# Rows are drawn in fixed blocks keyed by (seed, block) so that a row does not depend on how
# many ranks share the classes.
_RANDOM_BLOCK = 8192


def random_graph(start: int, stop: int, num_classes: int, k: int, seed: int) -> LocalGraph:
    """Rows [start, stop) of a random graph: column 0 the class itself, then K-1 distinct random
    other classes (similarity NaN: unknown). The same rows for any partition of the classes."""
    if not 0 <= start <= stop <= num_classes:
        raise ValueError(f"random_graph: rows [{start}, {stop}) outside [0, {num_classes})")
    if k < 1:
        raise ValueError(f"random_graph: k={k} must be >= 1")
    k = _clamp_k(k, num_classes)
    nbr_cK = np.empty((stop - start, k), dtype=np.int32)
    for block in range(start // _RANDOM_BLOCK, -(-stop // _RANDOM_BLOCK)):
        lo = block * _RANDOM_BLOCK
        hi = min(lo + _RANDOM_BLOCK, num_classes)
        ids_b = np.arange(lo, hi, dtype=np.int64)
        rng = np.random.default_rng([seed, 0x6A2F, block])
        rows_bK = np.concatenate([ids_b[:, None], _distinct_others(rng, ids_b, num_classes, k - 1)],
                                 axis=1)
        a, z = max(lo, start), min(hi, stop)
        nbr_cK[a - start:z - start] = rows_bK[a - lo:z - lo]
    sim_cK = np.full(nbr_cK.shape, np.nan, dtype=np.float32)
    sim_cK[:, 0] = 1.0
    return LocalGraph(nbr_cK, sim_cK, start, "random", 0.0, "random")


def _distinct_others(rng, ids_b: np.ndarray, num_classes: int, m: int) -> np.ndarray:
    """(b, m) distinct classes per row, none equal to the row's class: drawn from [0, C-1) and
    shifted past the class."""
    b, pool = ids_b.shape[0], num_classes - 1
    if m == 0:
        return np.zeros((b, 0), dtype=np.int64)
    if m * m <= pool:
        # Rows with a repeat are redrawn whole: with m^2 <= pool most rows have none.
        draw = rng.integers(0, pool, (b, m))
        while True:
            s = np.sort(draw, axis=1)
            again = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not again.any():
                break
            draw[again] = rng.integers(0, pool, (int(again.sum()), m))
    else:
        # Few classes per row left out: the first m of a random order, in slices of rows that
        # keep the (rows, C) keys below 2^24 entries.
        step = max(1, 2**24 // pool)
        draw = np.concatenate([np.argsort(rng.random((min(step, b - i), pool)), axis=1)[:, :m]
                               for i in range(0, b, step)])
    return draw + (draw >= ids_b[:, None])


# -- the file ---------------------------------------------------------------------------------

_DATASETS = (("neighbors", "<i4"), ("similarity", "<f2"))


def _create_file(tmp: Path, num_classes: int, k: int, attrs: dict) -> dict:
    """Rank 0: the HDF5 file with both datasets allocated contiguously at full size (not
    filled: every byte is written by some rank) and all attributes. Returns name -> offset."""
    import h5py  # noqa: PLC0415

    tmp.parent.mkdir(parents=True, exist_ok=True)
    offsets = {}
    with h5py.File(tmp, "w") as f:
        for name, dtype in _DATASETS:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            space = h5py.h5s.create_simple((num_classes, k))
            dset = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)),
                                   space, dcpl=dcpl)
            offsets[name] = int(dset.get_offset())
        f.attrs.update(attrs)
    return offsets


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_graph(world, path, graph: LocalGraph, num_classes: int, k: int, step: int,
                recall: float) -> None:
    """Write the graph file at `path` (format in the module docstring). Collective: every rank
    passes its own rows; the file appears atomically (rank 0 renames `path.tmp`) once every
    rank's rows are on disk, and replaces an older file of that name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _Layout(world, graph.start, graph.neighbors_ck.shape[0], num_classes)
    if graph.k != k:
        raise ValueError(f"write_graph: the graph has K={graph.k} columns but k={k}")
    attrs = {"num_classes": num_classes, "k": k, "metric": "cosine", "step": step,
             "index": graph.index, "index_detail": graph.detail, "recall_at_k": float(recall),
             "format_version": GRAPH_VERSION}
    created = None
    if world.is_root:
        try:
            created = _create_file(tmp, num_classes, k, attrs)
        except OSError as exc:
            created = f"{tmp}: cannot create the graph file ({exc})"
    created = collectives.broadcast_object(world, created)
    if isinstance(created, str):
        raise ValueError(created)
    error = None
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for (name, dtype), rows in zip(_DATASETS, (graph.neighbors_ck, graph.similarity_ck)):
                block = np.ascontiguousarray(rows, dtype=dtype)
                _pwrite_all(fd, block, created[name] + graph.start * k * block.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        error = f"{tmp}: rank {world.rank} cannot write its rows ({exc})"
    # Every rank learns of any rank's failure before the file is published.
    errors = [e for e in collectives.allgather_object(world, error) if e]
    if errors:
        if world.is_root:
            tmp.unlink(missing_ok=True)
        raise ValueError(errors[0])
    published = None
    if world.is_root:
        try:
            os.replace(tmp, path)
        except OSError as exc:
            published = f"{path}: cannot publish the graph ({exc.strerror})"
    published = collectives.broadcast_object(world, published)  # also the closing barrier
    if published:
        raise ValueError(published)


class KnnGraph:
    """A graph file opened for reading: `/neighbors` (and `/similarity`) memory-mapped, so every
    rank of a job shares one copy in the page cache and reads only the rows it asks for."""

    def __init__(self, path: Path, neighbors_CK: np.ndarray, similarity_CK: np.ndarray,
                 attrs: dict):
        self.path, self.attrs = path, attrs
        self.neighbors_CK, self.similarity_CK = neighbors_CK, similarity_CK

    @property
    def num_classes(self) -> int:
        return self.neighbors_CK.shape[0]

    @property
    def k(self) -> int:
        return self.neighbors_CK.shape[1]

    @property
    def step(self) -> int:
        return int(self.attrs["step"])

    @property
    def index(self) -> str:
        return str(self.attrs["index"])

    @property
    def recall_at_k(self) -> float:
        return float(self.attrs["recall_at_k"])

    @classmethod
    def open(cls, path, num_classes: int) -> "KnnGraph":
        """Open and check a graph file written for `num_classes` classes. Raises a one-line
        ValueError naming the file if it is missing or unreadable, was written for another
        number of classes, or has datasets of the wrong dtype, shape or layout."""
        import h5py  # noqa: PLC0415

        path = Path(path)
        try:
            with h5py.File(path, "r") as f:
                attrs = {key: _plain(value) for key, value in f.attrs.items()}
                if "num_classes" in attrs and int(attrs["num_classes"]) != num_classes:
                    raise ValueError(f"{path}: KNN graph written for {attrs['num_classes']} "
                                     f"classes but this run has {num_classes}; rebuild it "
                                     f"(python -m app.knn_graph)")
                missing = [a for a in ("num_classes", "k", "metric", "step", "index",
                                       "recall_at_k") if a not in attrs]
                if missing:
                    raise ValueError(f"{path}: not a KNN graph file (attributes "
                                     f"{', '.join(missing)} missing)")
                maps = [_dataset_map(path, f, name, dtype, (num_classes, int(attrs["k"])))
                        for name, dtype in _DATASETS]
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the KNN graph ({exc})") from None
        if attrs["metric"] != "cosine":
            raise ValueError(f"{path}: KNN graph metric {attrs['metric']!r}, expected 'cosine'")
        size = path.stat().st_size
        views = []
        for offset, dtype, shape in maps:
            if offset + int(np.prod(shape)) * np.dtype(dtype).itemsize > size:
                raise ValueError(f"{path}: truncated KNN graph file ({size} bytes)")
            views.append(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
        return cls(path, views[0], views[1], attrs)

    def rows(self, class_ids) -> np.ndarray:
        """(n, K) int32 neighbour rows of `class_ids` (column 0 = the class itself)."""
        ids = self._ids(class_ids)
        return np.asarray(self.neighbors_CK[ids], dtype=np.int32)

    def similarities(self, class_ids) -> np.ndarray:
        """(n, K) float32 cosines matching `rows(class_ids)`."""
        return np.asarray(self.similarity_CK[self._ids(class_ids)], dtype=np.float32)

    def _ids(self, class_ids) -> np.ndarray:
        if isinstance(class_ids, torch.Tensor):
            class_ids = class_ids.cpu().numpy()
        ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            bad = ids[(ids < 0) | (ids >= self.num_classes)][0]
            raise ValueError(f"{self.path}: class id {bad} outside [0, {self.num_classes})")
        return ids


def _plain(value):
    """HDF5 attribute as a plain Python value (bytes -> str, numpy scalars -> int/float)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _dataset_map(path: Path, f, name: str, dtype: str, shape: tuple) -> tuple[int, str, tuple]:
    """(byte offset, dtype, shape) of a dataset that can be memory-mapped, or ValueError."""
    import h5py  # noqa: PLC0415

    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise ValueError(f"{path}: KNN graph dataset /{name} missing")
    dset = f[name]
    if dset.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: /{name} has dtype {dset.dtype}, expected {np.dtype(dtype)}")
    if dset.shape != shape:
        raise ValueError(f"{path}: /{name} has shape {dset.shape}, expected {shape} "
                         f"(num_classes x k)")
    offset = dset.id.get_offset()
    if dset.chunks is not None or offset is None:
        raise ValueError(f"{path}: /{name} is not stored contiguously (chunked, compressed or "
                         f"never written); it cannot be memory-mapped")
    return int(offset), dtype, shape


# -- command line -----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m app.knn_graph",
        description="Build the KNN graph of the classes from the newest complete checkpoint of a "
                    "run (under mpirun, any number of ranks), measure its recall and write it "
                    "to RUN_DIR/knn/graph-step-NNNNNNNN.h5. Exit code 2 on bad input.")
    p.add_argument("--run", required=True, help="run directory (out_dir of app.train)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the newest complete one "
                                        "under RUN_DIR/checkpoints)")
    p.add_argument("--k", type=int, required=True, help="neighbours per class, itself included")
    p.add_argument("--index", choices=INDEXES, default="auto",
                   help="faiss index (default: %(default)s: flat up to "
                        f"{FLAT_MAX_CLASSES} classes, else IVF + refinement)")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed (default: 16)")
    p.add_argument("--refine", type=int, default=None,
                   help=f"refinement passes (default: {AUTO_REFINE} for auto above the flat "
                        f"limit, else 0)")
    p.add_argument("--random", action="store_true",
                   help="write a random graph (class itself + K-1 random classes) instead")
    p.add_argument("--samples", type=int, default=1000,
                   help="classes sampled to measure recall (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (default: 0)")
    p.add_argument("--out", help="output file (default: RUN_DIR/knn/graph-step-NNNNNNNN.h5)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mpi.partition import class_range  # noqa: PLC0415
    from mpi.world import init_world  # noqa: PLC0415
    from app import checkpoint  # noqa: PLC0415
    from app.runlog import init_logging  # noqa: PLC0415

    world = init_world(use_horovod=False)
    init_logging(world)
    run_dir, error, job = Path(args.run), None, None
    try:
        if args.k < 1 or args.samples < 1 or args.nprobe < 1:
            raise ValueError(f"--k, --samples and --nprobe must be >= 1, got {args.k}, "
                             f"{args.samples}, {args.nprobe}")
        directory = checkpoint.find_checkpoint(run_dir, args.checkpoint)
        manifest = checkpoint.read_manifest(directory)
        num_classes, step = int(manifest["num_classes"]), int(manifest["step"])
        start, stop = class_range(num_classes, world.rank, world.size)
        rows_cD = None if args.random else \
            checkpoint.read_rows(directory, manifest, start, stop)["weight"]
        out = Path(args.out) if args.out else run_dir / "knn" / f"graph-step-{step:08d}.h5"
        job = (num_classes, step, start, stop, rows_cD, out)
    except ValueError as exc:
        error = str(exc)
    # Every rank checked its own files; agree before any collective so no rank waits alone.
    error = collectives.first_error(world, error)
    if error:
        if world.is_root:
            print(f"error: {error}", file=sys.stderr)
        return 2
    num_classes, step, start, stop, rows_cD, out = job
    k = _clamp_k(args.k, num_classes, world.is_root)
    if rows_cD is None:
        graph, recall = random_graph(start, stop, num_classes, k, args.seed), float("nan")
    else:
        graph = build_graph(world, rows_cD, start, num_classes, k, args.index, args.nprobe,
                            args.seed, refine=args.refine)
        recall = recall_at_k(world, rows_cD, start, num_classes, graph, args.samples, args.seed)
    write_graph(world, out, graph, num_classes, k, step, recall)
    seconds = max(collectives.allgather_object(world, graph.seconds))
    if world.is_root:
        print(f"knn graph: {num_classes} classes, K={k}, index {graph.detail}, built in "
              f"{seconds:.1f}s on {world.size} ranks, recall@{min(10, k)} {recall:.3f} "
              f"-> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
