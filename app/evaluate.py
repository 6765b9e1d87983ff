"""Distributed evaluation: top-1 and top-5 over ALL C classes on the val split.

`python -m app.evaluate --run DIR` evaluates the newest checkpoint of a run (under mpirun with
any number of ranks) and appends to the run's eval.jsonl.
"""
from __future__ import annotations

import numpy as np
import torch


def as_input(inputs: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A batch from the reader as the backbone's input: float vectors in the run's dtype; uint8
    images as they are (the image backbone scales and normalises them)."""
    x = torch.from_numpy(inputs)
    return x if x.dtype == torch.uint8 else x.to(dtype)


@torch.no_grad()
def evaluate(world, backbone, classifier, reader, max_samples: int = 0, dtype=torch.float32) -> dict:
    """Each rank embeds its part of the val split; `classifier.topk` scores every feature against
    every class (each rank its rows, candidates merged). Returns global counts and accuracies,
    identical on all ranks."""
    from mpi import collectives  # noqa: PLC0415

    was_training = backbone.training
    backbone.eval()
    correct1 = correct5 = seen = 0
    for batch in reader.one_epoch():
        feat_bD = backbone(as_input(batch.inputs, dtype))
        _, ids_bk = classifier.topk(feat_bD.to(classifier.weight_cD.dtype), 5)
        labels_b = torch.from_numpy(batch.labels)
        if ids_bk.shape[0]:
            correct1 += int((ids_bk[:, 0] == labels_b).sum())
            correct5 += int((ids_bk == labels_b.unsqueeze(1)).any(dim=1).sum())
        seen += int(labels_b.shape[0])
        # Every rank takes part in every batch's collectives, so the stop decision is global.
        if max_samples and int(collectives.allreduce(world, torch.tensor([seen]))[0]) >= max_samples:
            break
    backbone.train(was_training)
    totals = collectives.allreduce(world, torch.tensor([correct1, correct5, seen], dtype=torch.int64))
    c1, c5, n = (int(v) for v in totals)
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "num_samples": n,
            "num_classes": classifier.num_classes}
