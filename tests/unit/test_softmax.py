"""Sharded softmax on one rank against the dense float64 reference (F.cross_entropy)."""
import pytest
import torch

from app.config import SoftmaxConfig
from app.classifier.softmax import full_columns, sampled_columns
from mpi.world import fake_world
from tests.softmax_reference import FullGraph, check_classifier_parity

LOGITS = [("cosine", 0.0, "cosface"), ("cosine", 0.2, "cosface"), ("cosine", 0.3, "arcface"),
          ("dot", 0.0, "cosface")]


@pytest.mark.parametrize("logit,margin,margin_type", LOGITS)
def test_full_equals_dense_reference(logit, margin, margin_type):
    cfg = SoftmaxConfig(mode="full", logit=logit, scale=8.0 if logit == "cosine" else 1.0,
                        margin=margin, margin_type=margin_type)
    rows = check_classifier_parity(fake_world(), cfg)
    assert rows.tolist() == list(range(23))


@pytest.mark.parametrize("logit", ["cosine", "dot"])
def test_sampled_at_rate_one_equals_full(logit):
    cfg = SoftmaxConfig(mode="sampled", sample_rate=1.0, logit=logit, scale=8.0)
    rows = check_classifier_parity(fake_world(), cfg)
    assert rows.tolist() == list(range(23))


def test_sampled_keeps_positives_and_the_rate():
    labels = torch.tensor([3, 3, 17, 40, 41, 99])
    gen = torch.Generator().manual_seed(0)
    cols = sampled_columns(labels, start=10, stop=60, sample_rate=0.2, generator=gen)
    assert cols.rows_c.numel() == 10
    assert set((torch.tensor([17, 40, 41]) - 10).tolist()) <= set(cols.rows_c.tolist())
    assert torch.all(cols.rows_c[1:] > cols.rows_c[:-1])
    owned = cols.target_N >= 0
    assert owned.tolist() == [False, False, True, True, True, False]
    torch.testing.assert_close(cols.rows_c[cols.target_N[owned]] + 10, labels[owned])
    assert full_columns(labels, 10, 60).target_N.tolist() == [-1, -1, 7, 30, 31, -1]


def test_sampled_rows_match_reference_on_the_sampled_subset():
    # With sampling, the loss is a different (smaller) softmax; its row gradients for the kept
    # rows equal a dense reference restricted to the kept classes.
    import torch.nn.functional as F

    from app.classifier import ShardedClassifier
    from app.config import OptimConfig
    from tests.softmax_reference import make_problem, reference_logits

    cfg = SoftmaxConfig(mode="sampled", sample_rate=0.3, logit="cosine", scale=8.0, margin=0.1)
    feat, labels, weight = make_problem(1, 1, 8, 40, 6)
    clf = ShardedClassifier(fake_world(), 40, 6, cfg, OptimConfig(), 0, dtype=torch.float64)
    clf.weight_cD.copy_(weight)
    feat_b = feat.clone().requires_grad_()
    loss, _ = clf.loss(feat_b, labels, step=0)
    loss.backward()
    rows, grads = clf.row_grads()
    assert set(labels.tolist()) <= set(rows.tolist()) and rows.numel() == 12
    sub_w = weight[rows].clone().requires_grad_()
    sub_feat = feat.clone().requires_grad_()
    target = torch.searchsorted(rows, labels)
    logits = reference_logits(sub_feat, sub_w, target, cfg)
    ref = F.cross_entropy(logits, target)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads, sub_w.grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(feat_b.grad, sub_feat.grad, rtol=1e-6, atol=1e-12)


def test_row_sgd_is_torch_sgd_on_touched_rows_and_lazy_elsewhere():
    from app.classifier import RowSGD

    weight = torch.randn(6, 3, dtype=torch.float64)
    ref = weight.clone().requires_grad_()
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = RowSGD(weight, momentum=0.9, weight_decay=0.01)
    untouched = weight[[1, 4]].clone()
    rows = torch.tensor([0, 2, 3, 5])
    for _ in range(3):
        grad = torch.randn(4, 3, dtype=torch.float64)
        opt.step(rows, grad, lr=0.1)
        # Reference: dense SGD on a 4-row problem made of the touched rows.
        ref_opt.zero_grad()
        ref.grad = torch.zeros_like(ref)
        ref.grad[rows] = grad
        ref_opt.step()
    torch.testing.assert_close(weight[rows], ref.detach()[rows])
    torch.testing.assert_close(weight[[1, 4]], untouched)
    assert torch.all(opt.momentum_cD[[1, 4]] == 0)


@pytest.mark.parametrize("logit,margin,margin_type", LOGITS)
def test_knn_with_k_equal_c_equals_full(logit, margin, margin_type):
    cfg = SoftmaxConfig(mode="knn", k=23, random_negatives=0, logit=logit,
                        scale=8.0 if logit == "cosine" else 1.0, margin=margin,
                        margin_type=margin_type)
    rows = check_classifier_parity(fake_world(), cfg, graph=FullGraph(23))
    assert rows.tolist() == list(range(23))


def test_random_negatives_never_the_label_and_duplicates_masked():
    from app.classifier.knn_softmax import active_classes

    class TwoNeighbours:
        def rows(self, ids):
            import numpy as np
            ids = np.asarray(ids)
            return np.stack([ids, (ids + 1) % 10], axis=1)

    labels = torch.arange(10).repeat(50)
    cls, valid = active_classes(labels, TwoNeighbours(), 10, 6, torch.Generator().manual_seed(0))
    assert cls.shape == (500, 8)
    assert torch.all(cls[:, 2:] != labels.unsqueeze(1))
    assert torch.all(valid[:, :2])
    for row, ok in zip(cls.tolist(), valid.tolist()):
        seen = set()
        for c, v in zip(row, ok):
            assert v == (c not in seen)
            seen.add(c)
    # Uniform over the other 9 classes: every class shows up as a negative.
    assert set(cls[:, 2:].reshape(-1).tolist()) == set(range(10))
