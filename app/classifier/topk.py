"""Top-k classes over ALL C classes for features spread over the ranks, each rank scoring its
own rows of the sharded classifier (evaluation, prediction).

Legend: b = this rank's features, N = all ranks' features, c = this rank's classes, P = ranks.
"""
from __future__ import annotations

import math

import torch

from app.classifier.softmax import class_logits
from mpi import collectives


@torch.no_grad()
def global_topk(world, classifier, feat_bD: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k classes over ALL C classes for each of this rank's features (any batch size per
    rank, including 0). Each rank scores the gathered features against its rows and keeps its
    local top-k; the candidates (k per rank per sample) are gathered and merged. Returns
    (scores_bk, class_ids_bk) for this rank's samples."""
    sizes = [int(n) for n in collectives.allgather_object(world, feat_bD.shape[0])]
    feat_ND = collectives.allgather(world, feat_bD, sizes)
    num_rows = feat_ND.shape[0]
    kk = min(k, classifier.num_local)
    sim_Nc = class_logits(feat_ND, classifier.weight_cD, classifier.cfg.logit)
    vals_Nk = torch.full((num_rows, k), -math.inf, dtype=sim_Nc.dtype)
    ids_Nk = torch.full((num_rows, k), -1, dtype=torch.int64)
    if kk > 0:
        top = torch.topk(sim_Nc, kk, dim=1)
        vals_Nk[:, :kk], ids_Nk[:, :kk] = top.values, top.indices + classifier.start
    best_vals_Nk, ids_Nk = merge_rank_candidates(world, vals_Nk, ids_Nk,
                                                 min(k, classifier.num_classes))
    # This rank's samples are its slice of the gathered rows.
    lo = sum(sizes[:world.rank])
    return best_vals_Nk[lo:lo + feat_bD.shape[0]], ids_Nk[lo:lo + feat_bD.shape[0]]


def merge_rank_candidates(world, vals_Nk: torch.Tensor, ids_Nk: torch.Tensor,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: every rank's candidates for the same N samples (scores and global class ids,
    padding -inf / -1) merged into the best k per sample, best first, identical on all ranks."""
    num_rows = vals_Nk.shape[0]
    # Candidates of every rank for every sample: (P, N, k) -> per sample P*k candidates.
    all_vals = collectives.allgather(world, vals_Nk.unsqueeze(0), [1] * world.size)
    all_ids = collectives.allgather(world, ids_Nk.unsqueeze(0), [1] * world.size)
    vals_NPk = all_vals.permute(1, 0, 2).reshape(num_rows, -1)
    ids_NPk = all_ids.permute(1, 0, 2).reshape(num_rows, -1)
    best = torch.topk(vals_NPk, min(k, vals_NPk.shape[1]), dim=1)
    return best.values, torch.gather(ids_NPk, 1, best.indices)
