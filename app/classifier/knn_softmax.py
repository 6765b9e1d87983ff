"""KNN softmax (docs/design.md, "One step"): each sample's softmax runs over A = K + R active classes,
its label's K graph neighbours (column 0 = the label) plus R uniform random negatives, so the
per-step cost depends on the batch and A, not on C.

Legend: N = global batch, b = this rank's samples, A = active classes per sample, D = embedding
dim, p = (sample, class) pairs whose class this rank owns, u = distinct local rows among them.

Routing. Every rank derives the same `cls_NA` from the all-gathered labels, the memory-mapped
graph and a step-seeded generator, so both ends of every exchange know the counts without a
header. Class owners compute the logits of their pairs from all-gathered features and send them
with mpi4py Alltoallv to the sample's rank, which assembles `logits_bA` and computes the loss.
In backward the logit gradients travel back along the same route (the reverse Alltoallv), owners
accumulate row gradients of the u touched rows only, and the partial feature gradients return to
the sample ranks through the reduce-scatter behind `gather_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mpi.partition import class_owner


@dataclass(frozen=True)
class PairPlan:
    """Who scores which (sample, class) pair and where its logit goes; identical inputs give
    an identical plan on every rank.

    cls_NA: active classes of every sample of the global batch (column 0 = its label).
    valid_NA: False where a random negative repeats a class already in the row (masked).
    mine_p: flat indices i*A + a of the pairs whose class this rank owns (row-major, so grouped
        by the sample's rank).
    send_counts: how many of those pairs belong to each rank's samples.
    recv_counts: how many pairs of this rank's samples each rank owns.
    recv_pos: where each received logit goes in this rank's flat b*A block, in arrival order.
    """

    cls_NA: torch.Tensor
    valid_NA: torch.Tensor
    mine_p: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_pos: torch.Tensor


def active_classes(labels_N: torch.Tensor, graph, num_classes: int, random_negatives: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls_NA, valid_NA): graph rows of the labels, then R uniform random classes per sample
    that are never the label; a random class already in the row is marked invalid (a softmax is
    over a set of classes, each counted once)."""
    nbr_NK = torch.from_numpy(np.asarray(graph.rows(labels_N.numpy()), dtype=np.int64))
    if nbr_NK.shape[1] and not torch.equal(nbr_NK[:, 0], labels_N):
        raise ValueError("KNN graph rows must start with the class itself (column 0)")
    if random_negatives == 0:
        return nbr_NK, torch.ones_like(nbr_NK, dtype=torch.bool)
    num_rows = labels_N.shape[0]
    # Uniform over the C - 1 classes other than the label: draw in [0, C-1), skip the label.
    rand_NR = torch.randint(0, num_classes - 1, (num_rows, random_negatives), generator=generator)
    rand_NR += (rand_NR >= labels_N.unsqueeze(1)).long()
    cls_NA = torch.cat([nbr_NK, rand_NR], dim=1)
    # A random class is invalid if it appears earlier in the row (in the graph part or as an
    # earlier random draw). Sorting each row keeps this O(N A log A).
    sorted_NA, order_NA = torch.sort(cls_NA, dim=1, stable=True)
    dup_sorted = torch.zeros_like(sorted_NA, dtype=torch.bool)
    dup_sorted[:, 1:] = sorted_NA[:, 1:] == sorted_NA[:, :-1]
    valid_NA = torch.ones_like(cls_NA, dtype=torch.bool)
    valid_NA.scatter_(1, order_NA, ~dup_sorted)
    return cls_NA, valid_NA


def plan_pairs(cls_NA: torch.Tensor, valid_NA: torch.Tensor, num_classes: int, rank: int,
              size: int, per_rank: int) -> PairPlan:
    """The exchange plan for pairs (i, a); sample i lives on rank i // per_rank."""
    num_active = cls_NA.shape[1]
    owner_NA = torch.from_numpy(class_owner(cls_NA.numpy(), num_classes, size))
    mine_p = torch.nonzero(owner_NA.reshape(-1) == rank).squeeze(1)
    sample_rank_p = (mine_p // num_active) // per_rank
    send_counts = torch.bincount(sample_rank_p, minlength=size).tolist()
    lo = rank * per_rank
    owner_bA = owner_NA[lo:lo + per_rank].reshape(-1)
    recv_counts = torch.bincount(owner_bA, minlength=size).tolist()
    # Arrivals are grouped by source rank, each group in row-major order: a stable sort by owner.
    recv_pos = torch.sort(owner_bA, stable=True).indices
    return PairPlan(cls_NA, valid_NA, mine_p, send_counts, recv_counts, recv_pos)


class _PairDot(torch.autograd.Function):
    """forward: sim_p = x[ix_p] . y[iy_p] for each pair p; backward: dx = sum over pairs of
    g_p y[iy_p] into row ix_p (index_add_), dy likewise. One gather per operand and one
    index_add_ per gradient: autograd's advanced indexing would add a sort-based scatter."""

    @staticmethod
    def forward(ctx, x_nD, y_mD, ix_p, iy_p):
        ctx.save_for_backward(x_nD, y_mD, ix_p, iy_p)
        return (x_nD.index_select(0, ix_p) * y_mD.index_select(0, iy_p)).sum(dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_p):
        x_nD, y_mD, ix_p, iy_p = ctx.saved_tensors
        g_p1 = grad_p.unsqueeze(1)
        grad_x = torch.zeros_like(x_nD).index_add_(0, ix_p, y_mD.index_select(0, iy_p) * g_p1)
        grad_y = torch.zeros_like(y_mD).index_add_(0, iy_p, x_nD.index_select(0, ix_p) * g_p1)
        return grad_x, grad_y, None, None


def pair_similarities(feat_ND: torch.Tensor, weight_leaf_uD: torch.Tensor, rows_inv_p: torch.Tensor,
                      samples_p: torch.Tensor, logit: str) -> torch.Tensor:
    """Similarity of each owned pair: cosine of (feature, weight row) or their dot product."""
    if logit == "cosine":
        feat_ND = F.normalize(feat_ND, dim=1)
        weight_leaf_uD = F.normalize(weight_leaf_uD, dim=1)
    return _PairDot.apply(feat_ND, weight_leaf_uD, samples_p, rows_inv_p)


def assemble(sim_recv: torch.Tensor, plan: PairPlan, per_rank: int) -> torch.Tensor:
    """Received pair similarities -> sim_bA in this rank's sample order (differentiable)."""
    num_active = plan.cls_NA.shape[1]
    flat = torch.zeros(per_rank * num_active, dtype=sim_recv.dtype)
    return flat.index_put((plan.recv_pos,), sim_recv).view(per_rank, num_active)
