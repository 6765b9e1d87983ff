"""Class centres under the current backbone, and imprinting: classifier rows started at the
centres (`model.classifier_init`). The first KNN graph of a run is built from the same centres.

Legend: c = this rank's classes, D = embedding dim, b = samples in a batch.
"""
from __future__ import annotations

import torch

from mpi import collectives
from mpi.partition import class_owner


@torch.no_grad()
def class_centres(world, backbone, reader, classifier, dtype) -> torch.Tensor:
    """Mean feature of each of this rank's classes under the current backbone (one distributed
    pass over `reader`'s epoch): every (label, feature) goes to its class owner by alltoallv and
    is summed there. A class without samples keeps its current weight row as its centre."""
    from app.model import as_input  # noqa: PLC0415

    start, num_local, dim = classifier.start, classifier.num_local, classifier.dim
    sums_cD = torch.zeros(num_local, dim, dtype=torch.float64)
    counts_c = torch.zeros(num_local, dtype=torch.float64)
    was_training = backbone.training
    backbone.eval()
    for batch in reader.one_epoch():
        feat_bD = backbone(as_input(batch.inputs, dtype)).to(torch.float64)
        labels_b = torch.from_numpy(batch.labels)
        owner_b = torch.from_numpy(class_owner(batch.labels, classifier.num_classes, world.size))
        order = torch.sort(owner_b, stable=True).indices
        counts = torch.bincount(owner_b, minlength=world.size).tolist()
        # One message per destination: [label, feature...] rows, in float64.
        rows_bE = torch.cat([labels_b[order].unsqueeze(1).to(torch.float64), feat_bD[order]], 1)
        recv, _ = collectives.alltoallv(world, rows_bE, counts)
        local = recv[:, 0].long() - start
        sums_cD.index_add_(0, local, recv[:, 1:])
        counts_c.index_add_(0, local, torch.ones_like(recv[:, 0]))
    backbone.train(was_training)
    centres_cD = classifier.weight_cD.to(torch.float64).clone()
    seen = counts_c > 0
    centres_cD[seen] = sums_cD[seen] / counts_c[seen].unsqueeze(1)
    return centres_cD.to(classifier.weight_cD.dtype)


def train_centres(world, cfg, backbone, classifier, dtype) -> torch.Tensor:
    """This rank's class centres under the current backbone, from one pass over the train
    split (`class_centres`)."""
    from data_prep.reader import ShardedReader  # noqa: PLC0415

    with ShardedReader(cfg.data.path, "train", world.rank, world.size, cfg.train.eval_batch_size,
                       cfg.seed, shuffle=False, drop_last=False, prefetch=cfg.data.prefetch) as r:
        return class_centres(world, backbone, r, classifier, dtype)


def starts_imprinted(cfg) -> bool:
    """Whether the classifier rows start at the class centres (`model.classifier_init`)."""
    init = cfg.model.classifier_init
    return init == "centres" or (init == "auto" and cfg.softmax.mode == "knn"
                                 and cfg.knn.init == "centres")


def imprint(classifier, centres_cD: torch.Tensor) -> None:
    """Classifier rows := the class centres at unit norm (`model.classifier_init=centres`); a
    class without samples (its centre is its own row) keeps its row."""
    norm_c1 = centres_cD.norm(dim=1, keepdim=True)
    fresh = (centres_cD != classifier.weight_cD).any(dim=1, keepdim=True) & (norm_c1 > 0)
    rows_cD = torch.where(fresh, centres_cD / norm_c1.clamp_min(1e-30), classifier.weight_cD)
    classifier.weight_cD.copy_(rows_cD.to(classifier.weight_cD.dtype))
