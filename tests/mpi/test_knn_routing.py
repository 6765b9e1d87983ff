"""KNN softmax with K < C on 1-4 ranks against a float64 dense reference computed here, and the
all-to-all routing plan's consistency (uneven pair counts, ranks that own no pair).

The active classes are drawn by the test, not by the product's sampler: a numpy Generator of its
own draws the labels and a graph (row c: c, then K-1 distinct other classes), handed to the
product as data; a sample's active set is its label's graph row. With random negatives, which
the product draws itself, each sample's active set is read back from the product as data (dot
logits against an identity W: the feature gradient is non-zero exactly on the scored classes)
and checked before the reference is computed over it.
"""
import numpy as np
import pytest
import torch

from app.classifier import ShardedClassifier
from app.classifier.knn_softmax import plan_pairs
from app.config import OptimConfig, SoftmaxConfig
from mpi import collectives
from tests.softmax_reference import shard_step

PER_RANK, DIM, STEP = 4, 6, 5


class TableGraph:
    """A KNN graph given as a table (the product reads rows of it, like a GraphFile)."""

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.int32)

    def rows(self, class_ids):
        return self.table[np.asarray(class_ids, dtype=np.int64)]


def draw_graph(rng, num_classes, k):
    """Row c: c, then k-1 distinct other classes in random order."""
    table = np.empty((num_classes, k), dtype=np.int64)
    for c in range(num_classes):
        others = rng.permutation(np.delete(np.arange(num_classes), c))[:k - 1]
        table[c] = np.concatenate([[c], others])
    return table


def shard_bounds(num_classes, size):
    """Balanced contiguous [start, stop) per rank (first ranks one larger), via numpy."""
    cuts = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(num_classes), size)])
    return [(int(cuts[r]), int(cuts[r + 1])) for r in range(size)]


def dense_reference(feat_ND, labels_N, weight_CD, active, cfg):
    """Mean over samples of the cross-entropy over the sample's active classes (a list of global
    id arrays, distinct ids), the label the target, written in float64 from the formulas.
    Returns (loss, d feat N x D, d W C x D)."""
    feat = torch.tensor(feat_ND, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor(weight_CD, dtype=torch.float64, requires_grad=True)
    total = torch.zeros((), dtype=torch.float64)
    for i, cls in enumerate(active):
        w = weight[torch.as_tensor(cls)]
        pos = int(np.flatnonzero(np.asarray(cls) == labels_N[i])[0])
        if cfg.logit == "cosine":
            cos = (w / w.norm(dim=1, keepdim=True)) @ (feat[i] / feat[i].norm())
            with_margin = cos[pos] - cfg.margin
            logits = cfg.scale * torch.cat([cos[:pos], with_margin.reshape(1), cos[pos + 1:]])
        else:
            logits = w @ feat[i]
        total = total + torch.logsumexp(logits, 0) - logits[pos]
    loss = total / len(active)
    loss.backward()
    return loss.detach(), feat.grad.numpy(), weight.grad.numpy()


def product_step(world, cfg, table, feat_ND, labels_N, weight_CD, seed=11, step=STEP):
    num_classes, dim = weight_CD.shape
    clf = ShardedClassifier(world, num_classes, dim, cfg, OptimConfig(), seed=seed,
                            dtype=torch.float64)
    clf.set_graph(TableGraph(table))
    return shard_step(world, clf, weight_CD, feat_ND, labels_N, PER_RANK, step)


def scored_classes(world, feat_b):
    """Each sample's scored classes from a probe run (D = C, W = identity, dot logits):
    d loss / d feat_i = sum over the scored classes c of (p_ic - [c = label]) e_c / N is non-zero
    exactly on them."""
    grad_ND = collectives.allgather(world, feat_b.grad).numpy()
    return [np.flatnonzero(g != 0) for g in grad_ND]


def check_against_reference(world, clf, feat_b, loss, value, ref, weight_CD, active):
    ref_loss, ref_dfeat, ref_dw = ref
    torch.testing.assert_close(value, ref_loss, rtol=1e-9, atol=1e-12)
    # Each rank backpropagates its own samples' share; the shares add up to the mean.
    torch.testing.assert_close(collectives.allreduce(world, loss.detach().reshape(1))[0],
                               ref_loss, rtol=1e-9, atol=1e-12)
    lo = world.rank * PER_RANK
    np.testing.assert_allclose(feat_b.grad.numpy(), ref_dfeat[lo:lo + PER_RANK], rtol=1e-9,
                               atol=1e-12)
    rows, grads = clf.row_grads()
    np.testing.assert_allclose(grads.numpy(), ref_dw[rows.numpy()], rtol=1e-9, atol=1e-12)
    # Exactly the active classes owned here got a gradient ...
    union = set(np.concatenate(active).tolist())
    assert set(rows.tolist()) == {c for c in union if clf.start <= c < clf.stop}
    # ... and only they move: the others keep weight and momentum.
    before = clf.weight_cD.clone()
    clf.step(0.5)
    untouched = [c - clf.start for c in range(clf.start, clf.stop) if c not in union]
    assert torch.equal(clf.weight_cD[untouched], before[untouched])
    assert not clf.optimizer.momentum_cD[untouched].any()
    moved = [c - clf.start for c in union if clf.start <= c < clf.stop]
    assert (clf.weight_cD[moved] != before[moved]).any(dim=1).all()


@pytest.mark.parametrize("num_classes,k", [(40, 5), (41, 1), (7, 3), (3, 2)])
@pytest.mark.parametrize("logit", ["cosine", "dot"])
def test_knn_equals_dense_reference_on_graph_rows_drawn_by_the_test(world, num_classes, k,
                                                                    logit):
    cfg = SoftmaxConfig(mode="knn", k=k, random_negatives=0, logit=logit,
                        scale=8.0 if logit == "cosine" else 1.0,
                        margin=0.2 if logit == "cosine" else 0.0)
    rng = np.random.default_rng([num_classes, k, world.size])  # the same on every rank
    num_rows = world.size * PER_RANK
    labels_N = rng.integers(0, num_classes, num_rows)
    table = draw_graph(rng, num_classes, k)
    feat_ND = rng.standard_normal((num_rows, DIM))
    weight_CD = rng.standard_normal((num_classes, DIM))
    active = [table[y] for y in labels_N]  # the label and its K-1 graph neighbours

    clf, feat_b, loss, value = product_step(world, cfg, table, feat_ND, labels_N, weight_CD)
    ref = dense_reference(feat_ND, labels_N, weight_CD, active, cfg)
    check_against_reference(world, clf, feat_b, loss, value, ref, weight_CD, active)


@pytest.mark.parametrize("num_classes,k,negatives", [(40, 5, 3), (30, 1, 4), (9, 3, 6)])
def test_knn_random_negatives_read_back_as_data_match_the_reference(world, num_classes, k,
                                                                    negatives):
    rng = np.random.default_rng([num_classes, k, negatives, world.size])
    num_rows = world.size * PER_RANK
    labels_N = rng.integers(0, num_classes, num_rows)
    table = draw_graph(rng, num_classes, k)

    # Probe: D = C, W = identity, dot logits (see scored_classes).
    probe_cfg = SoftmaxConfig(mode="knn", k=k, random_negatives=negatives, logit="dot",
                              scale=1.0)
    probe_feat = rng.standard_normal((num_rows, num_classes))
    clf, feat_b, *_ = product_step(world, probe_cfg, table, probe_feat, labels_N,
                                   np.eye(num_classes))
    active = scored_classes(world, feat_b)

    extra = 0
    for y, cls in zip(labels_N, active):
        assert set(table[y].tolist()) <= set(cls.tolist())  # label and its graph row
        assert len(cls) <= k + negatives
        extra += len(cls) - k
    # Random negatives really took part: R uniform draws among the C - 1 other classes add on
    # average (C - k) (1 - (1 - 1/(C - 1))^R) classes outside the graph row to a sample.
    expected = num_rows * (num_classes - k) * (1 - (1 - 1 / (num_classes - 1)) ** negatives)
    assert extra >= 0.6 * expected, (extra, expected)

    # The same seed and step draw the same classes; now cosine with a margin, D = 6.
    cfg = SoftmaxConfig(mode="knn", k=k, random_negatives=negatives, logit="cosine", scale=8.0,
                        margin=0.2)
    feat_ND = rng.standard_normal((num_rows, DIM))
    weight_CD = rng.standard_normal((num_classes, DIM))
    clf, feat_b, loss, value = product_step(world, cfg, table, feat_ND, labels_N, weight_CD)
    ref = dense_reference(feat_ND, labels_N, weight_CD, active, cfg)
    check_against_reference(world, clf, feat_b, loss, value, ref, weight_CD, active)


def test_random_negatives_are_uniform_over_the_other_classes(world):
    # K = 1: a sample's active classes are its label and its random negatives. Over 20 steps
    # every class other than the label must be drawn about equally often (a draw that skips
    # some class, e.g. the last one, or favours low ids fails).
    num_classes, negatives, steps = 9, 6, 20
    cfg = SoftmaxConfig(mode="knn", k=1, random_negatives=negatives, logit="dot", scale=1.0)
    rng = np.random.default_rng([world.size, 99])
    num_rows = world.size * PER_RANK
    table = np.arange(num_classes).reshape(-1, 1)
    counts, chances = np.zeros(num_classes), np.zeros(num_classes)
    for step in range(steps):
        labels_N = rng.integers(0, num_classes, num_rows)
        feat_ND = rng.standard_normal((num_rows, num_classes))
        _, feat_b, *_ = product_step(world, cfg, table, feat_ND, labels_N, np.eye(num_classes),
                                     step=step)
        for y, cls in zip(labels_N, scored_classes(world, feat_b)):
            assert y in cls
            counts[cls[cls != y]] += 1
            chances += np.arange(num_classes) != y
    # P(class c among R uniform draws over the C - 1 others) = 1 - (1 - 1/(C - 1))^R.
    expected = chances * (1 - (1 - 1 / (num_classes - 1)) ** negatives)
    ratio = counts / expected
    assert ratio.min() > 0.7 and ratio.max() < 1.3, ratio


def test_plan_counts_agree_across_ranks(world):
    # Labels concentrated on the classes of rank 0 (others own few or no pairs); the active
    # classes are the test's graph rows, the expected counts the test's own ownership.
    num_classes = 50
    num_rows = world.size * PER_RANK
    labels_N = np.arange(num_rows) % 5
    table = draw_graph(np.random.default_rng(3), num_classes, 4)
    cls_NA = torch.from_numpy(table[labels_N])
    plan = plan_pairs(cls_NA, torch.ones_like(cls_NA, dtype=torch.bool), num_classes,
                      world.rank, world.size, PER_RANK)
    owner = np.zeros(num_classes, dtype=np.int64)
    for r, (start, stop) in enumerate(shard_bounds(num_classes, world.size)):
        owner[start:stop] = r
    owner_NA = owner[table[labels_N]]
    sample_rank = np.arange(num_rows) // PER_RANK
    for r in range(world.size):
        mine_for_r = int(((owner_NA == world.rank) & (sample_rank == r)[:, None]).sum())
        assert plan.send_counts[r] == mine_for_r
        theirs_for_me = int(((owner_NA == r) & (sample_rank == world.rank)[:, None]).sum())
        assert plan.recv_counts[r] == theirs_for_me
    sends = collectives.allgather_object(world, plan.send_counts)
    recvs = collectives.allgather_object(world, plan.recv_counts)
    for q in range(world.size):
        for r in range(world.size):
            assert sends[q][r] == recvs[r][q]
    assert sorted(plan.recv_pos.tolist()) == list(range(PER_RANK * cls_NA.shape[1]))
