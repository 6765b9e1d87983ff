"""Classifier rows saved by P ranks load bit-identically on any other number of ranks."""
import pytest
import torch

from app import checkpoint
from app.classifier import ShardedClassifier, init_rows
from app.config import OptimConfig, SoftmaxConfig
from mpi.world import World


def shard(rank, size, num_classes=37, dim=5, seed=3):
    world = World(rank=rank, size=size, local_rank=rank, local_size=size,
                  device=torch.device("cpu"), threads=1)
    return ShardedClassifier(world, num_classes, dim, SoftmaxConfig(), OptimConfig(), seed)


@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (4, 3), (1, 4), (3, 7)])
def test_rows_bit_identical_after_repartition(tmp_path, old, new):
    entries, weights, moments = [], [], []
    for r in range(old):
        clf = shard(r, old)
        clf.weight_cD.add_(torch.rand_like(clf.weight_cD))  # "trained" rows
        clf.optimizer.momentum_cD.copy_(torch.rand_like(clf.weight_cD))
        entries.append(checkpoint.write_rows(tmp_path, clf.start, clf.stop, clf.state_arrays()))
        weights.append(clf.weight_cD.clone())
        moments.append(clf.optimizer.momentum_cD.clone())
    full_w, full_m = torch.cat(weights), torch.cat(moments)
    for r in range(new):
        clf = shard(r, new)
        manifest = {"embedding_dim": 5, "classifier": entries}
        clf.load_state_arrays(checkpoint.read_rows(tmp_path, manifest, clf.start, clf.stop,
                                                   ("weight", "momentum")))
        assert torch.equal(clf.weight_cD, full_w[clf.start:clf.stop])
        assert torch.equal(clf.optimizer.momentum_cD, full_m[clf.start:clf.stop])


def test_initial_rows_do_not_depend_on_world_size():
    one = shard(0, 1).weight_cD
    parts = torch.cat([shard(r, 3).weight_cD for r in range(3)])
    assert torch.equal(one, parts)


def test_incomplete_checkpoint_is_refused(tmp_path):
    first = shard(0, 2)
    entry = checkpoint.write_rows(tmp_path, first.start, first.stop, first.state_arrays())
    second = shard(1, 2)
    with pytest.raises(ValueError, match=r"covers 0 of the classes \[19, 37\)"):
        checkpoint.read_rows(tmp_path, {"embedding_dim": 5, "classifier": [entry]},
                             second.start, second.stop)


def test_imprint_sets_unit_rows_along_the_centres_and_keeps_unseen_classes():
    from types import SimpleNamespace

    from app.classifier.centres import imprint

    weight = init_rows(3, 0, 5, 4, torch.float32)
    before = weight.clone()
    centres = weight.clone()
    centres[[0, 2, 3]] = torch.tensor([[3.0, 0, 0, 4], [0, 2, 0, 0], [1, 1, 1, 1]])
    imprint(SimpleNamespace(weight_cD=weight), centres)
    assert torch.allclose(weight[[0, 2, 3]], torch.tensor([[0.6, 0, 0, 0.8], [0, 1.0, 0, 0],
                                                          [0.5, 0.5, 0.5, 0.5]]))
    assert torch.equal(weight[[1, 4]], before[[1, 4]])  # classes without samples
