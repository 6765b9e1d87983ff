"""Top-k classes of features: exact search (every row scored: the reference) and index search
(faiss IVF, a few lists scored), both over this rank's class range, and the merge of the ranks'
candidates into the global top-k.

Scores are those of training's logits before scale and margin (`app.classifier.softmax.
class_logits`): cosine of feature and row for `cosine` models, the dot product for `dot`.
Legend: N = features, c = classes of a chunk, D = embedding dim, k = classes asked for,
P = ranks.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from app.classifier.topk import merge_rank_candidates
from mpi import collectives

# Rows scored at once by the exact search: bounds the N x c score block (1000 x 2^16 float32 =
# 256 MiB) whatever C is.
EXACT_CHUNK_ROWS = 1 << 16


def empty_topk(num_rows: int, k: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((num_rows, k), -math.inf, dtype=dtype),
            torch.full((num_rows, k), -1, dtype=torch.int64))


def merge_topk(vals_a: torch.Tensor, ids_a: torch.Tensor, vals_b: torch.Tensor,
               ids_b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of two candidate sets per row (N x ka and N x kb), best first; padding
    (-inf, -1) sorts last."""
    vals, ids = torch.cat([vals_a, vals_b.to(vals_a.dtype)], 1), torch.cat([ids_a, ids_b], 1)
    best = torch.topk(vals, min(k, vals.shape[1]), dim=1)
    return best.values, torch.gather(ids, 1, best.indices)


class ExactSearcher:
    """Every row of the range [start, start + c) scored against every feature, in chunks of
    EXACT_CHUNK_ROWS rows. Rows are normalised once for `cosine` (as `class_logits` does)."""

    def __init__(self, rows_cD: torch.Tensor, start: int, logit: str):
        self.rows_cD = F.normalize(rows_cD, dim=1) if logit == "cosine" else rows_cD
        self.start, self.logit = start, logit

    @property
    def num_rows(self) -> int:
        return self.rows_cD.shape[0]

    @torch.no_grad()
    def search(self, feat_ND: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores_Nk, global ids_Nk), best first; (-inf, -1) beyond this range's rows."""
        feat_ND = feat_ND.to(self.rows_cD.dtype)
        if self.logit == "cosine":
            feat_ND = F.normalize(feat_ND, dim=1)
        vals_Nk, ids_Nk = empty_topk(feat_ND.shape[0], k, self.rows_cD.dtype)
        for lo in range(0, self.num_rows, EXACT_CHUNK_ROWS):
            chunk_cD = self.rows_cD[lo:lo + EXACT_CHUNK_ROWS]
            sim_Nc = feat_ND @ chunk_cD.t()
            top = torch.topk(sim_Nc, min(k, chunk_cD.shape[0]), dim=1)
            vals_Nk, ids_Nk = merge_topk(vals_Nk, ids_Nk, top.values,
                                         top.indices + (self.start + lo), k)
        return vals_Nk, ids_Nk


class IndexSearcher:
    """faiss indexes over consecutive class ranges (one per exported index file), each searched
    with `nprobe` lists; candidates merged. Features go in as float32, normalised for cosine."""

    def __init__(self, shards: list[tuple[object, int]], logit: str, nprobe: int):
        self.shards, self.logit = shards, logit  # (faiss index, first class id of its range)
        for index, _ in shards:
            set_nprobe(index, nprobe)

    @torch.no_grad()
    def search(self, feat_ND: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        feat_ND = feat_ND.float()
        if self.logit == "cosine":
            feat_ND = F.normalize(feat_ND, dim=1)
        query_ND = np.ascontiguousarray(feat_ND.numpy())
        vals_Nk, ids_Nk = empty_topk(feat_ND.shape[0], k)
        for index, start in self.shards:
            if feat_ND.shape[0] == 0 or index.ntotal == 0:
                continue
            score_Nk, local_Nk = index.search(query_ND, min(k, index.ntotal))
            found = local_Nk >= 0
            score = torch.from_numpy(np.where(found, score_Nk, -np.inf).astype(np.float32))
            ids = torch.from_numpy(np.where(found, local_Nk + start, -1).astype(np.int64))
            vals_Nk, ids_Nk = merge_topk(vals_Nk, ids_Nk, score, ids, k)
        return vals_Nk, ids_Nk


def set_nprobe(index, nprobe: int) -> None:
    """The search width: lists an IVF index scans per query, or an HNSW index's efSearch."""
    import faiss  # noqa: PLC0415

    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(nprobe)
        return
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(int(nprobe), ivf.nlist)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)


def global_search(world, searcher, feat_bD: torch.Tensor, k: int,
                  num_classes: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Collective: top-k over ALL classes for the features of every rank, each rank searching
    its own rows or index shards (`searcher`), candidates merged. Returns (features per rank,
    scores_Nk, ids_Nk) for all ranks' features, in rank order, on every rank."""
    sizes = [int(n) for n in collectives.allgather_object(world, feat_bD.shape[0])]
    feat_ND = collectives.allgather(world, feat_bD.contiguous(), sizes)
    vals_Nk, ids_Nk = searcher.search(feat_ND, k)
    vals_Nk, ids_Nk = merge_rank_candidates(world, vals_Nk, ids_Nk,
                                            min(k, num_classes))
    return sizes, vals_Nk, ids_Nk
