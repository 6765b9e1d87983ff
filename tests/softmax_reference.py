"""One-process dense reference for the sharded softmax: plain F.cross_entropy over the whole W,
in float64. Shared by the unit tests (1 rank) and the MPI tests (2-4 ranks)."""
import torch
import torch.nn.functional as F



def reference_logits(feat, weight, target, cfg):
    """Logits written out from the formulas, independently of app/softmax.py: s * cos with the
    CosFace (cos - m) or ArcFace cos(theta + m) margin on the target column; or feat . w."""
    if cfg.logit != "cosine":
        return feat @ weight.t()
    cos = F.normalize(feat, dim=1) @ F.normalize(weight, dim=1).t()
    onehot = F.one_hot(target, cos.shape[1]).bool()
    if cfg.margin_type == "arcface":
        with_margin = torch.cos(torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) + cfg.margin)
    else:
        with_margin = cos - cfg.margin
    return cfg.scale * torch.where(onehot, with_margin, cos)


def make_problem(seed: int, num_ranks: int, per_rank: int, num_classes: int, dim: int):
    """The same global batch and classifier on every rank: features N x D, labels N, W C x D."""
    gen = torch.Generator().manual_seed(seed)
    num_rows = num_ranks * per_rank
    feat = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (num_rows,), generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    return feat, labels, weight


def dense_reference(feat, labels, weight, softmax_cfg):
    """(loss, d loss / d feat, d loss / d W) of the global-batch mean cross-entropy."""
    feat = feat.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    logits = reference_logits(feat, weight, labels, softmax_cfg)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), feat.grad, weight.grad


def check_classifier_parity(world, softmax_cfg, per_rank=5, num_classes=23, dim=6, seed=0,
                            graph=None):
    """Run ShardedClassifier.loss on this rank's slice and compare loss, feature gradient and
    every row gradient it produced with the dense reference, to 1e-6 relative in float64.
    Returns the global ids of the rows that received a gradient on this rank."""
    from app.classifier import ShardedClassifier
    from app.config import OptimConfig

    feat, labels, weight = make_problem(seed, world.size, per_rank, num_classes, dim)
    ref_loss, ref_dfeat, ref_dweight = dense_reference(feat, labels, weight, softmax_cfg)

    clf = ShardedClassifier(world, num_classes, dim, softmax_cfg, OptimConfig(), seed,
                            dtype=torch.float64)
    clf.weight_cD.copy_(weight[clf.start:clf.stop])
    lo = world.rank * per_rank
    feat_b = feat[lo:lo + per_rank].clone().requires_grad_()
    if graph is not None:
        clf.set_graph(graph)
    loss, value = clf.loss(feat_b, labels[lo:lo + per_rank], step=3)
    loss.backward()
    torch.testing.assert_close(value, ref_loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(feat_b.grad, ref_dfeat[lo:lo + per_rank], rtol=1e-6, atol=1e-12)
    rows, grads = clf.row_grads()
    torch.testing.assert_close(grads, ref_dweight[rows], rtol=1e-6, atol=1e-12)
    # Rows that did not take part must have no gradient in the reference either, unless the
    # mode samples (then the reference's gradient for them is what sampling leaves out).
    return rows


class FullGraph:
    """A KNN graph with K = C: row c is c followed by every other class (in a scrambled order,
    so the routing cannot rely on sorted rows)."""

    def __init__(self, num_classes: int, seed: int = 0):
        self.num_classes = num_classes
        self.perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))

    def rows(self, class_ids):
        import numpy as np

        ids = np.asarray(class_ids, dtype=np.int64)
        others = self.perm.numpy()
        out = np.empty((ids.size, self.num_classes), dtype=np.int32)
        for n, c in enumerate(ids):
            out[n, 0] = c
            out[n, 1:] = others[others != c]
        return out


class RandomGraph:
    """Row c: c, then K-1 distinct other classes drawn from (seed, c)."""

    def __init__(self, num_classes: int, k: int, seed: int = 0):
        import numpy as np

        self.table = np.empty((num_classes, k), dtype=np.int32)
        for c in range(num_classes):
            others = np.random.default_rng([seed, c]).permutation(num_classes - 1)[:k - 1]
            self.table[c, 0] = c
            self.table[c, 1:] = others + (others >= c)

    def rows(self, class_ids):
        import numpy as np

        return self.table[np.asarray(class_ids, dtype=np.int64)]


def knn_reference(feat, labels, weight, cls_NA, valid_NA, softmax_cfg):
    """Dense float64 reference of the KNN softmax: per sample, cross-entropy over its valid
    active classes (label first). Returns (loss, d feat, d W)."""
    feat = feat.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    target = torch.zeros(len(labels), dtype=torch.int64)
    # Per sample, the logits against its own active classes (column 0 = label).
    logits = torch.stack([reference_logits(feat[i:i + 1], weight[cls_NA[i]], target[i:i + 1],
                                           softmax_cfg)[0] for i in range(len(labels))])
    logits = logits.masked_fill(~valid_NA, -torch.inf)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    return loss.detach(), feat.grad, weight.grad


# The product side of the reference tests (tests/mpi/test_sampled_softmax.py, test_knn_routing.py):
# one forward and backward of a ShardedClassifier on this rank's slice of a global batch.
def shard_step(world, clf, weight_CD, feat_ND, labels_N, per_rank, step):
    """Loads `clf`'s rows from the global `weight_CD`, runs its loss on samples
    [rank * per_rank, (rank + 1) * per_rank) and backward; returns (clf, features, loss, value)."""
    clf.weight_cD.copy_(torch.from_numpy(weight_CD[clf.start:clf.stop]))
    lo = world.rank * per_rank
    feat_b = torch.tensor(feat_ND[lo:lo + per_rank], requires_grad=True)
    loss, value = clf.loss(feat_b, torch.from_numpy(labels_N[lo:lo + per_rank]), step=step)
    loss.backward()
    return clf, feat_b, loss, value
