"""The class-sharded softmax: local math, apart from the thin exchange around it.

Legend: N = samples of the global batch, b = this rank's samples, D = embedding dim,
c = classes of this rank's shard (or the sampled subset of it), C = all classes, P = ranks.

Every rank holds the rows [start, stop) of W. In `full` mode each rank scores all N gathered
features against its c rows (`logits_Nc`); the exact cross-entropy over all C classes is assembled
by `sharded_cross_entropy`, which allreduces the row max and the row sum of exponentials (and the
positive's logit) so the loss of every sample is known on every rank. Its backward needs no
communication: each rank's logit gradient is softmax - one-hot on its own columns (Megatron's
vocab-parallel cross-entropy). The feature gradient returns to the sample's rank through the
backward of `gather_rows` (a reduce-scatter that sums the shards' partial gradients).
`sampled` mode is the same with c = the positives of the shard plus uniform random negatives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpi import collectives
from mpi.world import Traffic


def class_logits(feat_ND: torch.Tensor, weight_cD: torch.Tensor, logit: str,
                 scale: float = 1.0) -> torch.Tensor:
    """Logits before the margin: `scale` x cosine of normalised feature and weight rows (the
    scale is applied to the N x D features, not to the N x c product), or the plain dot product
    (`scale` unused)."""
    if logit == "cosine":
        return (F.normalize(feat_ND, dim=1) * scale) @ F.normalize(weight_cD, dim=1).t()
    return feat_ND @ weight_cD.t()


def apply_margin_(logits_Nc: torch.Tensor, target_N: torch.Tensor, logit: str, scale: float,
                  margin: float, margin_type: str) -> torch.Tensor:
    """Additive margin on the positive logit, IN PLACE on the scaled cosine logits of
    `class_logits` (CosFace: s*(cos - m); ArcFace: s*cos(theta + m)); dot logits and a zero
    margin are left as they are. `target_N` holds each sample's positive column, or -1 where the
    positive is not among these columns. In place is safe for autograd here: the matmul that
    produced the logits keeps its inputs, not its output."""
    if logit != "cosine" or margin == 0.0:
        return logits_Nc
    rows = torch.nonzero(target_N >= 0).squeeze(1)
    cols = target_N[rows]
    if margin_type == "arcface":
        # cos(theta + m); the clamp keeps acos differentiable at |cos| = 1.
        cos_pos = (logits_Nc[rows, cols] / scale).clamp(-1 + 1e-7, 1 - 1e-7)
        new_pos = scale * torch.cos(torch.acos(cos_pos) + margin)
    else:
        new_pos = logits_Nc[rows, cols] - scale * margin
    return logits_Nc.index_put_((rows, cols), new_pos)


def local_row_max(logits_Nc: torch.Tensor) -> torch.Tensor:
    """Each row's max over this rank's columns (-inf where the rank has none): what the ranks
    allreduce (max) first."""
    if logits_Nc.shape[1] > 0:
        return logits_Nc.max(dim=1).values
    return torch.full((logits_Nc.shape[0],), -math.inf, dtype=logits_Nc.dtype)


def local_exp_sums(logits_Nc: torch.Tensor, max_N: torch.Tensor,
                   target_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(logits - global max) on this rank's columns, [row sum of those, positive's logit
    where owned else 0] as N x 2): the second is what the ranks allreduce (sum) next, one
    message for both."""
    exp_Nc = (logits_Nc - max_N.unsqueeze(1)).exp_()
    owned = target_N >= 0
    pos_N = torch.zeros(logits_Nc.shape[0], dtype=logits_Nc.dtype)
    pos_N[owned] = logits_Nc[owned, target_N[owned]]
    return exp_Nc, torch.stack([exp_Nc.sum(dim=1), pos_N], dim=1)


def logit_grad_(softmax_Nc: torch.Tensor, grad_N: torch.Tensor,
                target_N: torch.Tensor) -> torch.Tensor:
    """d loss / d logits on this rank's columns, (softmax - one-hot) x grad_N, IN PLACE in
    `softmax_Nc` (an N x c buffer less matters at millions of classes)."""
    grad_Nc = softmax_Nc.mul_(grad_N.unsqueeze(1))
    owned = torch.nonzero(target_N >= 0).squeeze(1)
    grad_Nc[owned, target_N[owned]] -= grad_N[owned]
    return grad_Nc


class _ShardedCrossEntropy(torch.autograd.Function):
    """forward: per-sample cross-entropy over the columns of ALL ranks (logits_Nc are this
    rank's columns; target_N is the local positive column or -1); the result is identical on all
    ranks. backward: local only, d logits = softmax - one-hot on this rank's columns (no sum
    over ranks: each rank's columns are its own)."""

    @staticmethod
    def forward(ctx, logits_Nc, target_N, world):
        max_N = collectives.allreduce(world, local_row_max(logits_Nc), "max", Traffic.LOGITS)
        exp_Nc, stats_N2 = local_exp_sums(logits_Nc, max_N, target_N)
        sums_N2 = collectives.allreduce(world, stats_N2, kind=Traffic.LOGITS)
        sum_exp_N, pos_N = sums_N2[:, 0], sums_N2[:, 1]
        loss_N = torch.log(sum_exp_N) + max_N - pos_N
        exp_Nc.div_(sum_exp_N.unsqueeze(1))  # now the softmax; kept for backward
        ctx.save_for_backward(exp_Nc, target_N)
        return loss_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        softmax_Nc, target_N = ctx.saved_tensors
        # The saved softmax becomes the gradient in place: backward runs once per step.
        return logit_grad_(softmax_Nc, grad_N, target_N), None, None


def sharded_cross_entropy(world, logits_Nc: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """Exact per-sample softmax cross-entropy whose classes are spread over the ranks; see
    `_ShardedCrossEntropy`. Every sample's positive must be owned by exactly one rank."""
    return _ShardedCrossEntropy.apply(logits_Nc, target_N, world)


@dataclass(frozen=True)
class ShardColumns:
    """Which of this rank's rows take part in the step: `rows_c` (local row indices, sorted) or
    None for all rows, and `target_N` (each sample's positive column among them, or -1)."""

    rows_c: torch.Tensor | None
    target_N: torch.Tensor


def full_columns(labels_N: torch.Tensor, start: int, stop: int) -> ShardColumns:
    """All rows of the shard take part (mode `full`)."""
    owned = (labels_N >= start) & (labels_N < stop)
    return ShardColumns(None, torch.where(owned, labels_N - start, -1))


def sampled_columns(labels_N: torch.Tensor, start: int, stop: int, sample_rate: float,
                    generator: torch.Generator) -> ShardColumns:
    """Partial FC's sampling (mode `sampled`): every positive class of the global batch owned by
    this shard, plus uniform random negatives of the shard, ceil(sample_rate * c) rows in all
    (more if the positives alone exceed that). sample_rate 1.0 selects every row, so it equals
    `full`. Costs O(c) per step, like Partial FC."""
    num_local = stop - start
    owned = (labels_N >= start) & (labels_N < stop)
    positives = torch.unique(labels_N[owned] - start)
    num_keep = max(int(math.ceil(sample_rate * num_local)), positives.numel())
    if num_keep >= num_local:
        return full_columns(labels_N, start, stop)
    score_c = torch.rand(num_local, generator=generator)
    score_c[positives] = 2.0  # positives always win the top-k
    rows_c = torch.topk(score_c, num_keep, sorted=False).indices.sort().values
    target_N = torch.full_like(labels_N, -1)
    target_N[owned] = torch.searchsorted(rows_c, labels_N[owned] - start)
    return ShardColumns(rows_c, target_N)
