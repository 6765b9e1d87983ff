"""faiss indexes over this rank's rows, for the ring search of `flat`, `ivf` and `hnsw`: all
inner product on L2-normalised rows, i.e. cosine. `flat` is IndexFlatIP (exact), `ivf`
IndexIVFFlat (k-means lists trained on a seeded sample of the local rows), `hnsw` IndexHNSWFlat.
Flat and IVF indexes move to this rank's GPU where faiss has GPU support and sees one.

Legend: c = this rank's classes (rows), D = embedding dim, q = rows of a query chunk,
k = neighbours asked for.
"""
from __future__ import annotations

import math

import numpy as np

# faiss HNSW: links per node, candidate list while building; efSearch is max(HNSW_EF_SEARCH, K).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 40, 64
# IVF k-means: iterations and training rows per list (on a seeded sample of the local rows).
IVF_NITER, IVF_TRAIN_PER_LIST = 10, 32
# faiss GPU search takes k <= 2048.
GPU_MAX_K = 2048


def load_faiss(world):
    """The faiss module, with this rank's share of the node's threads."""
    import faiss  # noqa: PLC0415 - heavy; only where an index is built

    faiss.omp_set_num_threads(max(1, int(world.threads)))
    return faiss


class Searcher:
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


def build_index(world, kind: str, x_cD: np.ndarray, start: int, k: int, nprobe: int,
                seed: int) -> tuple[Searcher | None, str]:
    """The local index of `kind` (flat | ivf | hnsw) over this rank's normalised rows (None for
    a rank without rows) and a one-line description of its parameters."""
    faiss = load_faiss(world)
    num_rows, dim = x_cD.shape
    index, detail = _new_index(faiss, kind, num_rows, dim, k, nprobe, world.rank)
    if num_rows == 0:
        return None, detail
    if kind == "ivf":
        _train_ivf(index, x_cD, start, seed)
    index.add(x_cD)
    return _maybe_gpu(world, faiss, kind, index, start, num_rows, k), detail


def _new_index(faiss, kind: str, num_rows: int, dim: int, k: int, nprobe: int,
               rank: int) -> tuple[object, str]:
    """An empty index of `kind` with its search parameters set, and their description."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim), "flat (exact inner product)"
    if kind == "ivf":
        nlist = int(max(1, min(num_rows, round(4 * math.sqrt(num_rows)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, nlist)
        return index, f"ivf nlist={nlist} (rank {rank}) nprobe={index.nprobe}"
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    return index, (f"hnsw M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION} "
                   f"efSearch={index.hnsw.efSearch}")


def _train_ivf(index, x_cD: np.ndarray, start: int, seed: int) -> None:
    """k-means on a seeded sample: IVF_TRAIN_PER_LIST rows per list is plenty for cells whose
    only job is to route queries; faiss's own 39-per-list warning does not apply."""
    index.cp.niter, index.cp.seed = IVF_NITER, seed
    index.cp.min_points_per_centroid = 1
    index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
    num_rows = x_cD.shape[0]
    rng = np.random.default_rng([seed, start])
    sample = min(num_rows, IVF_TRAIN_PER_LIST * index.nlist)
    index.train(x_cD[np.sort(rng.choice(num_rows, sample, replace=False))])


def _maybe_gpu(world, faiss, kind: str, index, start: int, num_rows: int, k: int) -> Searcher:
    """Move flat and IVF indexes to this rank's GPU when faiss has GPU support and sees one
    (faiss-gpu) and k fits its search. HNSW stays on the CPU (no GPU HNSW)."""
    num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if num_gpus > 0 and hasattr(faiss, "StandardGpuResources") and kind != "hnsw" \
            and k <= GPU_MAX_K:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, world.local_rank % num_gpus, index)
        return Searcher(gpu_index, start, num_rows, resources)
    return Searcher(index, start, num_rows)
