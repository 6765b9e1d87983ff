"""Builds the two halves of the model for a run: the replicated backbone (with batch norm
synchronised over the ranks) and this rank's shard of the classifier. Used by training,
evaluation and the KNN graph so all of them build exactly the same thing."""
from __future__ import annotations

import numpy as np
import torch

from app.backbones import build_backbone
from app.classifier import ShardedClassifier
from mpi.sync_batchnorm import convert_sync_batchnorm

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(world, cfg, input_shape, num_classes: int):
    """(backbone, classifier, dtype). The backbone's initial weights depend only on cfg.seed, the
    classifier rows' only on (cfg.seed, class id): the same model at any world size."""
    dtype = DTYPES[cfg.train.dtype]
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.model, tuple(input_shape)).to(dtype)
    backbone = convert_sync_batchnorm(backbone, world)
    classifier = ShardedClassifier(world, num_classes, cfg.model.embedding_dim, cfg.softmax,
                                   cfg.optim, cfg.seed, dtype)
    return backbone, classifier, dtype


def as_input(inputs: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A batch from the reader as the backbone's input: float vectors in the run's dtype; uint8
    images as they are (the image backbone scales and normalises them)."""
    x = torch.from_numpy(inputs)
    return x if x.dtype == torch.uint8 else x.to(dtype)
