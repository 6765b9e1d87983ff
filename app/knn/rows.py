"""The classifier rows a KNN graph is built from: argument checks shared by every collective of
the package (the same answer on every rank), cosine as inner product of unit rows, and the
clamping of K to the number of classes.

Legend: c = this rank's classes (rows), D = embedding dim.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from app.knn.ring import Layout
from mpi import collectives

log = logging.getLogger("hundredm")


def rows_as_numpy(weight_cD) -> np.ndarray:
    """`weight_cD` (tensor or array) as a 2-D float numpy array, or ValueError."""
    if isinstance(weight_cD, torch.Tensor):
        weight_cD = weight_cD.detach().to("cpu").numpy()
    weight_cD = np.asarray(weight_cD)
    if weight_cD.ndim != 2 or not np.issubdtype(weight_cD.dtype, np.floating):
        raise ValueError(f"knn graph: weight rows must be a 2-D float array, got shape "
                         f"{weight_cD.shape} dtype {weight_cD.dtype}")
    return weight_cD


def normalised(weight_cD) -> np.ndarray:
    """float32 C-contiguous unit rows (computed in float64; a zero row stays zero)."""
    w = rows_as_numpy(weight_cD).astype(np.float64)
    norm_c = np.linalg.norm(w, axis=1, keepdims=True)
    return np.ascontiguousarray(w / np.maximum(norm_c, 1e-30), dtype=np.float32)


def check_args(world, weight_cD, start: int, num_classes: int, k: int) -> tuple[Layout, int]:
    """Collective: validate the arguments the same way on every rank; returns (layout, K)."""
    rows = rows_as_numpy(weight_cD)
    if num_classes < 1 or num_classes >= 2**31:
        raise ValueError(f"knn graph: num_classes={num_classes} must be in [1, 2^31)")
    if k < 1:
        raise ValueError(f"knn graph: k={k} must be >= 1")
    dims = collectives.allgather_object(world, rows.shape[1])
    if len(set(dims)) != 1:
        raise ValueError(f"knn graph: ranks hold rows of different dimensions {dims}")
    layout = Layout(world, start, rows.shape[0], num_classes)
    return layout, clamp_k(k, num_classes, world.is_root)


def clamp_k(k: int, num_classes: int, say: bool = True) -> int:
    """K, or num_classes if K is larger (with a warning when `say`)."""
    if k > num_classes:
        if say:
            log.warning("knn graph: k=%d > %d classes; using k=%d (every class lists all "
                        "classes)", k, num_classes, num_classes)
        return num_classes
    return k
