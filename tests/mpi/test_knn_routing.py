"""KNN softmax with K < C and random negatives on 1-4 ranks against a dense float64 reference,
and the all-to-all routing plan's consistency (uneven pair counts, ranks that own no pair)."""
import pytest
import torch

from app.classifier import ShardedClassifier
from app.config import OptimConfig, SoftmaxConfig
from app.classifier.knn_softmax import active_classes, plan_pairs
from mpi import collectives
from tests.softmax_reference import RandomGraph, knn_reference, make_problem


@pytest.mark.parametrize("num_classes,k,negatives", [(40, 5, 3), (40, 1, 0), (7, 3, 6),
                                                     (3, 2, 1)])
@pytest.mark.parametrize("logit", ["cosine", "dot"])
def test_knn_equals_dense_reference_on_active_sets(world, num_classes, k, negatives, logit):
    cfg = SoftmaxConfig(mode="knn", k=k, random_negatives=negatives, logit=logit,
                        scale=8.0 if logit == "cosine" else 1.0,
                        margin=0.2 if logit == "cosine" else 0.0)
    per_rank = 4
    feat, labels, weight = make_problem(7, world.size, per_rank, num_classes, 6)
    graph = RandomGraph(num_classes, k)
    clf = ShardedClassifier(world, num_classes, 6, cfg, OptimConfig(), seed=11,
                            dtype=torch.float64)
    clf.set_graph(graph)
    clf.weight_cD.copy_(weight[clf.start:clf.stop])
    lo = world.rank * per_rank
    feat_b = feat[lo:lo + per_rank].clone().requires_grad_()
    loss, value = clf.loss(feat_b, labels[lo:lo + per_rank], step=5)
    loss.backward()

    cls_NA, valid_NA = active_classes(labels, graph, num_classes, negatives,
                                      clf._generator(5, 0))
    ref_loss, ref_dfeat, ref_dweight = knn_reference(feat, labels, weight, cls_NA, valid_NA, cfg)
    torch.testing.assert_close(value, ref_loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(collectives.allreduce(world, loss.detach()), ref_loss)
    torch.testing.assert_close(feat_b.grad, ref_dfeat[lo:lo + per_rank], rtol=1e-6, atol=1e-12)
    rows, grads = clf.row_grads()
    torch.testing.assert_close(grads, ref_dweight[rows], rtol=1e-6, atol=1e-12)
    # Exactly the active classes owned here got a gradient; every other row had none.
    active = set(cls_NA[valid_NA].tolist())
    mine = {c for c in active if clf.start <= c < clf.stop}
    assert set(rows.tolist()) == mine
    untouched = [c for c in range(num_classes) if c not in active]
    assert torch.all(ref_dweight[untouched] == 0)


def test_plan_counts_agree_across_ranks(world):
    # Labels concentrated on the classes of rank 0 (others own few or no pairs).
    num_classes, per_rank = 50, 3
    labels = torch.tensor([c % 5 for c in range(world.size * per_rank)])
    graph = RandomGraph(num_classes, 4, seed=3)
    cls, valid = active_classes(labels, graph, num_classes, 2, torch.Generator().manual_seed(1))
    plan = plan_pairs(cls, valid, num_classes, world.rank, world.size, per_rank)
    sends = collectives.allgather_object(world, plan.send_counts)
    recvs = collectives.allgather_object(world, plan.recv_counts)
    for q in range(world.size):
        for r in range(world.size):
            assert sends[q][r] == recvs[r][q]
    assert sum(plan.recv_counts) == per_rank * cls.shape[1]
    assert sorted(plan.recv_pos.tolist()) == list(range(per_rank * cls.shape[1]))
