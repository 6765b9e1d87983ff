"""The search index of an exported model: faiss IVF over the classifier rows (normalised for
cosine models, so inner product = cosine), one index per row range, and its recall against
exact search.

`ivf` stores the rows as float32 (IndexIVFFlat), `ivf-fp16` as float16 (IndexIVFScalarQuantizer,
half the memory, scores within about 1e-3); `ivf-pq4` scans 4-bit product-quantizer codes of the
rows (D/16 bytes each, faiss fast-scan: many codes per SIMD table look-up) and re-scores its
best 4k candidates on float16 rows (IndexRefine; scores as ivf-fp16's), about 17x less memory
scanned than ivf-fp16 per list; `hnsw` is a navigable graph over the float32 rows
(IndexHNSWFlat: no training, a slow build, best-first search whose width is efSearch). The coarse quantizer is k-means (IVF_NITER
iterations) on a seeded sample of at most IVF_TRAIN_PER_LIST rows per list; rows are added in
chunks, so building needs the index plus one chunk of memory. A query scans its `nprobe` nearest
lists: cost about (nlist + nprobe * c / nlist) x D per query instead of c x D.

Recall (the manifest's `index.recall`): recall@1 is the share of queries whose top-1 by the
index is exact search's top-1; recall@5 the mean share of exact's top-5 found in the index's
top-5. The lower bounds are one-sided 99% Hoeffding bounds over the queries: on new queries
from the same distribution the recall is at least that, except with probability 1%.

Legend: c = classes of one range, D = embedding dim, N = queries, k = classes asked for.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

INDEX_KINDS = ("ivf", "ivf-fp16", "ivf-pq4", "hnsw")
# ivf-pq4: rows as 4-bit PQ codes of D/8 sub-quantisers (pq4_index), the best
# REFINE_K_FACTOR x k candidates re-scored on float16 copies of the rows (8 x k: no better
# recall on the benchmark's rows, slower).
REFINE_K_FACTOR = 4
# faiss HNSW: links per node and candidate list while building; the search knob (`nprobe` of
# the manifest and the CLIs) is efSearch for HNSW.
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 40
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024)
IVF_NITER, IVF_TRAIN_PER_LIST = 10, 64
ADD_CHUNK_ROWS = 1 << 18
# nprobe values the export tries, in order, for the target recall.
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_DELTA = 0.01


def default_nlist(num_rows: int) -> int:
    """About 4 sqrt(c) lists (at least 1, at most c)."""
    return int(max(1, min(num_rows, round(4 * math.sqrt(max(num_rows, 1))))))


def search_rows(rows_cD: np.ndarray, logit: str) -> np.ndarray:
    """float32 rows as the index holds them: L2-normalised for cosine models."""
    rows = torch.from_numpy(np.asarray(rows_cD)).float()
    return np.ascontiguousarray((F.normalize(rows, dim=1) if logit == "cosine" else rows).numpy())


def new_index(kind: str, dim: int, nlist: int):
    """An empty index of `kind` with inner-product metric (IVF: still to be trained)."""
    import faiss  # noqa: PLC0415

    if kind not in INDEX_KINDS:
        raise ValueError(f"--index: {kind!r} is not available; use one of "
                         f"{', '.join(INDEX_KINDS)} or none")
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    if kind == "ivf-pq4":
        return pq4_index(dim, nlist)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist,
                                              faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # the index owns (and frees) its quantizer
    return index


def pq4_index(dim: int, nlist: int):
    """IVF (flat coarse quantizer) + PQ fast-scan, D/8 sub-quantisers of 4 bits over
    the residuals (D/16 bytes a row), inside a refine index holding float16 rows. (D/4
    sub-quantisers: the same recall after re-scoring, a slower scan.)"""
    import faiss  # noqa: PLC0415

    if dim % 8:
        raise ValueError(f"--index ivf-pq4 needs a dimension divisible by 8, not {dim}")
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{dim // 8}x4fs,Refine(SQfp16)",
                                faiss.METRIC_INNER_PRODUCT)
    index.k_factor = REFINE_K_FACTOR
    return index


def train_index(index, sample_sD: np.ndarray, seed: int,
                per_list: int = IVF_TRAIN_PER_LIST) -> None:
    """k-means of the coarse quantizer on `sample_sD` (search rows; at least nlist of them)."""
    import faiss  # noqa: PLC0415

    cp = faiss.extract_index_ivf(index).cp
    cp.niter, cp.seed = IVF_NITER, seed
    cp.min_points_per_centroid = 1
    cp.max_points_per_centroid = per_list
    index.train(np.ascontiguousarray(sample_sD, dtype=np.float32))


def training_sample(num_rows: int, nlist: int, seed: int,
                    per_list: int = IVF_TRAIN_PER_LIST) -> np.ndarray:
    """Sorted row positions of the k-means sample (seeded): `per_list` rows per list."""
    rng = np.random.default_rng([seed, num_rows, nlist])
    size = min(num_rows, per_list * nlist)
    return np.sort(rng.choice(num_rows, size, replace=False))


def build_index(kind: str, rows_cD: np.ndarray, logit: str, nlist: int, seed: int = 0):
    """A trained IVF index over the rows of one range (local ids 0..c-1), added in chunks."""
    num_rows, dim = rows_cD.shape
    index = new_index(kind, dim, min(nlist, max(num_rows, 1)))
    if kind != "hnsw":
        sample = training_sample(num_rows, num_lists(index), seed)
        train_index(index, search_rows(rows_cD[sample], logit), seed)
    for lo in range(0, num_rows, ADD_CHUNK_ROWS):
        index.add(search_rows(rows_cD[lo:lo + ADD_CHUNK_ROWS], logit))
    return index


def num_lists(index) -> int:
    """The IVF lists of an index (0: HNSW, no lists)."""
    import faiss  # noqa: PLC0415

    return 0 if hasattr(index, "hnsw") else int(faiss.extract_index_ivf(index).nlist)


def search_steps(kind: str, nlist: int) -> list[int]:
    """The search widths an export tries for its target recall, smallest first."""
    if kind == "hnsw":
        return list(EF_SEARCH_STEPS)
    return [n for n in NPROBE_STEPS if n < nlist] + [nlist]


def index_bytes(index) -> int:
    """Memory of an index: IVF, codes and ids of its lists plus the quantizer's centroids;
    HNSW, the rows plus the links of every level."""
    import faiss  # noqa: PLC0415

    if hasattr(index, "hnsw"):
        return int(index.ntotal * index.d * 4 + index.hnsw.neighbors.size() * 4
                   + index.hnsw.levels.size() * 4 + index.hnsw.offsets.size() * 8)
    refine = index.ntotal * index.d * 2 if hasattr(index, "refine_index") else 0
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    per_row = ivf.code_size + 8  # the code and its int64 id (fast-scan: packed in blocks)
    rows = sum(lists.list_size(i) for i in range(ivf.nlist))
    return int(rows * per_row + ivf.nlist * ivf.d * 4 + refine)


def recall(exact_ids_Nk: torch.Tensor, found_ids_Nk: torch.Tensor) -> dict:
    """recall@1 and recall@5 of the index's results against exact search's (module docstring),
    with their one-sided 99% lower bounds."""
    num = int(exact_ids_Nk.shape[0])
    at_1 = float((found_ids_Nk[:, 0] == exact_ids_Nk[:, 0]).double().mean()) if num else 1.0
    k = min(5, exact_ids_Nk.shape[1], found_ids_Nk.shape[1])
    hits = (found_ids_Nk[:, :k, None] == exact_ids_Nk[:, None, :k]).any(dim=2).sum(dim=1)
    at_5 = float((hits.double() / k).mean()) if num else 1.0
    slack = math.sqrt(math.log(1 / CONFIDENCE_DELTA) / (2 * max(num, 1)))
    return {"at_1": at_1, "at_5": at_5, "at_1_lower_bound": max(0.0, at_1 - slack),
            "at_5_lower_bound": max(0.0, at_5 - slack), "queries": num}
