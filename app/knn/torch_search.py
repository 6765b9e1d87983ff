"""The `torch` index: exact cosine search in torch on the device the rows are on (a GPU's when
the classifier rows live there, else the CPU), for machines without faiss-gpu; on the CPU a
correctness reference for the faiss indexes.

Same ring as the faiss indexes (`ring.py`): each rank keeps its own unit rows on the device and
every travelling query chunk visits it. A visit moves the chunk and its running top-k to the
device once, scores it against the local rows by chunked matmul (at most SCORE_ELEMENTS scores
at a time), merges each piece's top-k into the running top-k there, and moves the result back
to the host for the next hop. Like faiss's flat index it returns the class itself among the
candidates; `search.finish_rows` puts it in column 0 and drops it from the rest.

Legend: c = this rank's classes (rows), D = embedding dim, q = rows of a query piece,
p = local rows of a piece, k = candidates kept.
"""
from __future__ import annotations

import numpy as np
import torch

from app.knn import ring
from app.knn.ring import Layout, ring_pass

# Scores computed at once (q x p): 2^24 float32 = 64 MiB on the CPU, 1 GiB on a GPU.
SCORE_ELEMENTS, SCORE_ELEMENTS_GPU = 1 << 24, 1 << 28
# Local rows scored per piece (p); query rows per piece are SCORE_ELEMENTS // p. All of a
# rank's rows at once up to this many: one top-k per query row over 50k local rows cost 25%
# less CPU than top-k per 8192 rows and merges (4000 queries, D = 128, k = 64, one thread).
LOCAL_ROWS = 65_536


def rows_device(weight_cD) -> torch.device:
    """Where the rows are: a tensor's device, the CPU for anything else."""
    return weight_cD.device if isinstance(weight_cD, torch.Tensor) else torch.device("cpu")


def merge(score_a, id_a, score_b, id_b, k: int):
    """Row-wise top-k of two candidate lists (tensors on one device, no id in both)."""
    score = torch.cat([score_a, score_b], dim=1)
    top = torch.topk(score, min(k, score.shape[1]), dim=1, sorted=True)
    return top.values, torch.gather(torch.cat([id_a, id_b], dim=1), 1, top.indices)


def local_topk(x_cD: torch.Tensor, start: int, query_qD: torch.Tensor, score_qk: torch.Tensor,
               id_qk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k (score_qk, id_qk: global ids) of the queries merged with their top-k
    among the local rows x_cD (global ids start, start + 1, ...), piece by piece."""
    num_rows = x_cD.shape[0]
    step_p = max(1, min(LOCAL_ROWS, num_rows))
    budget = SCORE_ELEMENTS if x_cD.device.type == "cpu" else SCORE_ELEMENTS_GPU
    step_q = max(1, budget // step_p)
    out_s, out_i = [], []
    for q0 in range(0, query_qD.shape[0], step_q):
        best_s, best_i = score_qk[q0:q0 + step_q], id_qk[q0:q0 + step_q]
        for p0 in range(0, num_rows, step_p):
            sim_qp = query_qD[q0:q0 + step_q] @ x_cD[p0:p0 + step_p].T
            top = torch.topk(sim_qp, min(k, sim_qp.shape[1]), dim=1, sorted=False)
            best_s, best_i = merge(best_s, best_i, top.values, top.indices + (start + p0), k)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def torch_ring_search(world, layout: Layout, x_cD: np.ndarray, start: int, k: int,
                      device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Collective: global top-k (scores, ids) of this rank's unit rows `x_cD` over ALL classes,
    computed on `device`; the query chunks visit every rank on the ring."""
    num_rows = x_cD.shape[0]
    local_cD = torch.from_numpy(x_cD).to(device)
    fields = {"query": x_cD,
              "score": np.full((num_rows, k), -np.inf, dtype=np.float32),
              "id": np.full((num_rows, k), -1, dtype=np.int64)}

    def visit(block):
        if num_rows == 0 or block["query"].shape[0] == 0:
            return
        query_qD, score_qk, id_qk = (torch.from_numpy(block[name]).to(device)
                                     for name in ("query", "score", "id"))
        score_qk, id_qk = local_topk(local_cD, start, query_qD, score_qk, id_qk, k)
        block["score"], block["id"] = score_qk.cpu().numpy(), id_qk.cpu().numpy()

    got = ring_pass(world, layout, fields, visit, ("score", "id"), ring.CHUNK_ROWS)
    return got["score"], got["id"]
