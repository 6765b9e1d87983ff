"""One forward and backward of a ShardedClassifier on this rank's slice of a global batch: the
product side of the softmax reference tests (test_sampled_softmax.py, test_knn_routing.py)."""
import torch


def shard_step(world, clf, weight_CD, feat_ND, labels_N, per_rank, step):
    """Loads `clf`'s rows from the global `weight_CD`, runs its loss on samples
    [rank * per_rank, (rank + 1) * per_rank) and backward; returns (clf, features, loss, value)."""
    clf.weight_cD.copy_(torch.from_numpy(weight_CD[clf.start:clf.stop]))
    lo = world.rank * per_rank
    feat_b = torch.tensor(feat_ND[lo:lo + per_rank], requires_grad=True)
    loss, value = clf.loss(feat_b, torch.from_numpy(labels_N[lo:lo + per_rank]), step=step)
    loss.backward()
    return clf, feat_b, loss, value
