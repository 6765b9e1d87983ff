"""Sharded softmax on 2-4 ranks against the one-process dense float64 reference."""
import pytest
import torch

from app.config import SoftmaxConfig
from mpi import collectives
from tests.softmax_reference import FullGraph, check_classifier_parity

LOGITS = [("cosine", 0.0, "cosface"), ("cosine", 0.2, "cosface"), ("cosine", 0.3, "arcface"),
          ("dot", 0.0, "cosface")]


@pytest.mark.parametrize("mode", ["full", "sampled", "knn"])
@pytest.mark.parametrize("logit,margin,margin_type", LOGITS)
@pytest.mark.parametrize("num_classes", [23, 3])  # 3 < 4 ranks: some ranks own no class
def test_parity_with_dense_reference(world, mode, logit, margin, margin_type, num_classes):
    # sampled at rate 1.0 and knn with K = C (no random negatives) must equal full exactly.
    cfg = SoftmaxConfig(mode=mode, sample_rate=1.0, k=num_classes, random_negatives=0,
                        logit=logit, scale=8.0 if logit == "cosine" else 1.0, margin=margin,
                        margin_type=margin_type)
    graph = FullGraph(num_classes) if mode == "knn" else None
    rows = check_classifier_parity(world, cfg, num_classes=num_classes, graph=graph)
    # Together the ranks produced a gradient for every class exactly once.
    all_rows = collectives.allgather(world, rows)
    assert sorted(all_rows.tolist()) == list(range(num_classes))


@pytest.mark.parametrize("mode", ["full", "sampled", "knn"])
@pytest.mark.parametrize("logit,margin,margin_type", [LOGITS[1], LOGITS[3]])
def test_parity_with_bf16_backbone_features(world, mode, logit, margin, margin_type):
    """train.precision=bf16: features from a bf16 backbone into the float32 classifier on P ranks
    equal the float64 one-process reference to bf16's precision (BF16_TOLERANCE)."""
    cfg = SoftmaxConfig(mode=mode, sample_rate=1.0, k=23, random_negatives=0, logit=logit,
                        scale=8.0 if logit == "cosine" else 1.0, margin=margin,
                        margin_type=margin_type)
    graph = FullGraph(23) if mode == "knn" else None
    rows = check_classifier_parity(world, cfg, graph=graph, precision="bf16")
    all_rows = collectives.allgather(world, rows)
    assert sorted(all_rows.tolist()) == list(range(23))


def test_sampled_rows_cover_positives(world):
    from app.classifier import ShardedClassifier
    from app.config import OptimConfig
    from tests.softmax_reference import make_problem

    cfg = SoftmaxConfig(mode="sampled", sample_rate=0.25, scale=8.0)
    feat, labels, weight = make_problem(2, world.size, 6, 200, 6)
    clf = ShardedClassifier(world, 200, 6, cfg, OptimConfig(), 0, dtype=torch.float64)
    lo = world.rank * 6
    loss, _ = clf.loss(feat[lo:lo + 6].clone().requires_grad_(), labels[lo:lo + 6], step=1)
    loss.backward()
    rows, _ = clf.row_grads()
    all_rows = collectives.allgather(world, rows)
    assert set(labels.tolist()) <= set(all_rows.tolist())
    assert torch.isfinite(loss)
