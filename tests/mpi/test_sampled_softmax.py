"""Sampled softmax (Partial FC) at sample_rate 0.1 on 2-4 ranks against an independent reference.

The product draws its columns; the test reads which global classes every rank scored from
`row_grads()` (data, gathered from all ranks) and checks that they are the positives plus about
10% of C. A one-process float64 cross-entropy written here from the formulas, over exactly those
columns, must then give the product's loss, feature gradient, row gradients and row update.
Rows outside the drawn columns must keep their weight and momentum untouched.
"""
import numpy as np
import pytest
import torch

from app.classifier import ShardedClassifier
from app.config import OptimConfig, SoftmaxConfig
from mpi import collectives
from tests.softmax_reference import shard_step

RATE, PER_RANK, DIM, LR = 0.1, 4, 8, 0.5
LOGITS = [("cosine", 0.2, "cosface"), ("cosine", 0.3, "arcface"), ("dot", 0.0, "cosface")]


def balanced_shards(num_classes, size):
    """[start, stop) of each rank: contiguous, sizes differing by at most one (first ranks larger),
    written here with numpy rather than taken from mpi.partition."""
    parts = np.array_split(np.arange(num_classes), size)
    return [(int(p[0]), int(p[-1]) + 1) if len(p) else (0, 0) for p in parts]


def reference(feat_ND, labels_N, weight_CD, cols, cfg):
    """float64 mean cross-entropy of each sample over the classes `cols` (global ids, the label
    among them), with the margin on the positive logit. Returns (loss, d feat, d W[cols])."""
    feat = torch.tensor(feat_ND, dtype=torch.float64, requires_grad=True)
    w_sub = torch.tensor(weight_CD[cols], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([int(np.flatnonzero(cols == y)[0]) for y in labels_N])
    if cfg.logit == "cosine":
        cos = (feat / feat.norm(dim=1, keepdim=True)) @ (w_sub / w_sub.norm(dim=1, keepdim=True)).t()
        rows = torch.arange(len(pos))
        cos_pos = cos[rows, pos]
        if cfg.margin_type == "arcface":
            pos_logit = torch.cos(torch.acos(cos_pos.clamp(-1 + 1e-7, 1 - 1e-7)) + cfg.margin)
        else:
            pos_logit = cos_pos - cfg.margin
        onehot = torch.zeros_like(cos, dtype=torch.bool)
        onehot[rows, pos] = True
        logits = cfg.scale * torch.where(onehot, pos_logit.unsqueeze(1).expand_as(cos), cos)
    else:
        logits = feat @ w_sub.t()
    shifted = logits - logits.max(dim=1, keepdim=True).values
    log_norm = torch.log(torch.exp(shifted).sum(dim=1))
    loss = (log_norm - shifted[torch.arange(len(pos)), pos]).mean()
    loss.backward()
    return loss.detach(), feat.grad.numpy(), w_sub.grad.numpy()


def run_product(world, cfg, optim, feat_ND, labels_N, weight_CD, step):
    clf = ShardedClassifier(world, len(weight_CD), DIM, cfg, optim, seed=3, dtype=torch.float64)
    return shard_step(world, clf, weight_CD, feat_ND, labels_N, PER_RANK, step)


@pytest.mark.parametrize("logit,margin,margin_type", LOGITS)
@pytest.mark.parametrize("num_classes", [1000, 1003])  # 1003: divisible by none of 2, 3, 4
def test_sampled_rate_01_matches_float64_reference_over_the_drawn_columns(
        world, num_classes, logit, margin, margin_type):
    cfg = SoftmaxConfig(mode="sampled", sample_rate=RATE, logit=logit,
                        scale=16.0 if logit == "cosine" else 1.0, margin=margin,
                        margin_type=margin_type)
    optim = OptimConfig(classifier_momentum=0.9, classifier_weight_decay=1e-3)
    rng = np.random.default_rng([num_classes, world.size])  # the same data on every rank
    num_rows = world.size * PER_RANK
    feat_ND = rng.standard_normal((num_rows, DIM))
    labels_N = rng.integers(0, num_classes, num_rows)
    weight_CD = rng.standard_normal((num_classes, DIM))

    clf, feat_b, loss, value = run_product(world, cfg, optim, feat_ND, labels_N, weight_CD, 7)
    rows, grads = clf.row_grads()
    rows = rows.numpy()
    # The columns the product scored, as data: every rank's global row ids.
    per_rank_cols = collectives.allgather_object(world, rows.tolist())
    cols = np.sort(np.concatenate([np.asarray(c, dtype=np.int64) for c in per_rank_cols]))
    assert len(np.unique(cols)) == len(cols)

    # Rate 0.1 is in effect: every positive, and about 10% of each rank's shard.
    assert set(labels_N.tolist()) <= set(cols.tolist())
    for (start, stop), mine in zip(balanced_shards(num_classes, world.size), per_rank_cols):
        assert all(start <= c < stop for c in mine)
        assert RATE * (stop - start) <= len(mine) < RATE * (stop - start) + 1, (start, stop)
    assert RATE * num_classes <= len(cols) <= RATE * num_classes + world.size
    negatives = np.setdiff1d(cols, labels_N)
    assert len(negatives) >= RATE * num_classes - num_rows
    # ... drawn over the whole range, not a block: both halves of every shard are sampled.
    for start, stop in balanced_shards(num_classes, world.size):
        mid = (start + stop) // 2
        assert np.any((negatives >= start) & (negatives < mid))
        assert np.any((negatives >= mid) & (negatives < stop))

    ref_loss, ref_dfeat, ref_dw = reference(feat_ND, labels_N, weight_CD, cols, cfg)
    torch.testing.assert_close(value, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-9, atol=1e-12)
    lo = world.rank * PER_RANK
    np.testing.assert_allclose(feat_b.grad.numpy(), ref_dfeat[lo:lo + PER_RANK], rtol=1e-9,
                               atol=1e-12)
    where = np.searchsorted(cols, rows)
    np.testing.assert_allclose(grads.numpy(), ref_dw[where], rtol=1e-9, atol=1e-12)

    # The update: SGD with momentum from zero, g + wd * w, on the drawn rows only.
    before = clf.weight_cD.clone()
    assert clf.step(LR) == len(rows)
    own_w = weight_CD[clf.start:clf.stop]
    local = rows - clf.start
    expected = own_w[local] - LR * (ref_dw[where] + optim.classifier_weight_decay * own_w[local])
    np.testing.assert_allclose(clf.weight_cD.numpy()[local], expected, rtol=1e-9, atol=1e-12)
    untouched = np.setdiff1d(np.arange(clf.stop - clf.start), local)
    assert len(untouched) >= 0.8 * (clf.stop - clf.start)
    assert torch.equal(clf.weight_cD[untouched], before[untouched])
    assert not clf.optimizer.momentum_cD[untouched].any()
    assert clf.optimizer.momentum_cD[local].abs().sum(dim=1).min() > 0


def test_sampled_columns_are_redrawn_every_step(world):
    cfg = SoftmaxConfig(mode="sampled", sample_rate=RATE, scale=16.0)
    rng = np.random.default_rng(17)
    num_rows = world.size * PER_RANK
    feat_ND = rng.standard_normal((num_rows, DIM))
    labels_N = rng.integers(0, 1003, num_rows)
    weight_CD = rng.standard_normal((1003, DIM))
    drawn = []
    for step in (1, 2):
        clf, *_ = run_product(world, cfg, OptimConfig(), feat_ND, labels_N, weight_CD, step)
        rows = clf.row_grads()[0].tolist()
        drawn.append({c for mine in collectives.allgather_object(world, rows) for c in mine})
    # Two independent 10% draws of ~1000 classes share about 10% of their negatives.
    negatives = [d - set(labels_N.tolist()) for d in drawn]
    overlap = len(negatives[0] & negatives[1]) / len(negatives[0])
    assert overlap < 0.4, overlap
    assert len(drawn[0]) == len(drawn[1])  # the same positives, the same ceil(0.1 c) per rank
