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


# train.precision=bf16: the classifier is float32 and its features went through a bf16 backbone.
# Compared with the float64 reference on the unrounded features, to bf16's precision: its 8-bit
# significand rounds each feature to 2^-9 relative, which the cosine scale (8) magnifies.
BF16_TOLERANCE = {"rtol": 3e-2, "atol": 3e-3}
FP64_TOLERANCE = {"rtol": 1e-6, "atol": 1e-12}


def bf16_backbone_features(x_bD):
    """x through an identity Linear under train.precision=bf16 (app/training/precision.py): the
    features the classifier gets are x rounded to bfloat16, then cast to float32; the gradient
    comes back through the casts as float32."""
    from app.training.precision import backbone_features

    eye = torch.nn.Linear(x_bD.shape[1], x_bD.shape[1], bias=False).to(x_bD.device, x_bD.dtype)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(x_bD.shape[1]))
    feat_bD = backbone_features(eye, x_bD, "bf16")
    assert feat_bD.dtype == torch.float32 and not torch.equal(feat_bD, x_bD.float())  # rounded
    return feat_bD


def check_classifier_parity(world, softmax_cfg, per_rank=5, num_classes=23, dim=6, seed=0,
                            graph=None, precision="fp32"):
    """Run ShardedClassifier.loss on this rank's slice and compare loss, feature gradient and
    every row gradient it produced with the dense reference, to 1e-6 relative in float64
    (`precision` fp32), or to BF16_TOLERANCE with a float32 classifier fed by a bf16 backbone
    (`bf16`). Returns the global ids of the rows that received a gradient on this rank."""
    from app.classifier import ShardedClassifier
    from app.config import OptimConfig

    feat, labels, weight = make_problem(seed, world.size, per_rank, num_classes, dim)
    ref_loss, ref_dfeat, ref_dweight = dense_reference(feat, labels, weight, softmax_cfg)

    dtype = torch.float64 if precision == "fp32" else torch.float32
    tolerance = FP64_TOLERANCE if precision == "fp32" else BF16_TOLERANCE
    clf = ShardedClassifier(world, num_classes, dim, softmax_cfg, OptimConfig(), seed,
                            dtype=dtype)
    clf.weight_cD.copy_(weight[clf.start:clf.stop])
    lo = world.rank * per_rank
    x_b = feat[lo:lo + per_rank].to(dtype).clone().requires_grad_()
    feat_b = x_b if precision == "fp32" else bf16_backbone_features(x_b)
    if graph is not None:
        clf.set_graph(graph)
    loss, value = clf.loss(feat_b, labels[lo:lo + per_rank], step=3)
    loss.backward()
    assert value.dtype == dtype and x_b.grad.dtype == dtype
    torch.testing.assert_close(value.double(), ref_loss, **tolerance)
    torch.testing.assert_close(x_b.grad.double(), ref_dfeat[lo:lo + per_rank], **tolerance)
    rows, grads = clf.row_grads()
    torch.testing.assert_close(grads.double(), ref_dweight[rows], **tolerance)
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
