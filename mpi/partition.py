"""Pure topology arithmetic: which rank owns which classifier rows.

The C classes are split into P contiguous ranges whose sizes differ by at most one; the first
`C % P` ranks hold one extra class. These functions are pure (no communicator) so they can be
checked at world sizes far larger than we can launch, and so a checkpoint written on P ranks can
be re-partitioned for any other P.
"""
from __future__ import annotations

import numpy as np


def class_range(num_classes: int, rank: int, size: int) -> tuple[int, int]:
    """Half-open range [start, stop) of the classes owned by `rank` among `size` ranks."""
    if num_classes < 0 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"class_range: need num_classes >= 0 and 0 <= rank < size, "
                         f"got num_classes={num_classes} rank={rank} size={size}")
    base, extra = divmod(num_classes, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def class_counts(num_classes: int, size: int) -> list[int]:
    """Number of classes owned by each rank, in rank order."""
    base, extra = divmod(num_classes, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def class_owner(class_ids, num_classes: int, size: int) -> np.ndarray:
    """Owning rank of each class id (vectorised; accepts ints, numpy arrays or torch tensors)."""
    ids = np.asarray(class_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = ids[(ids < 0) | (ids >= num_classes)][0]
        raise ValueError(f"class_owner: class id {bad} outside [0, {num_classes})")
    base, extra = divmod(num_classes, size)
    # The first `extra` ranks own base+1 classes each, covering ids below `boundary`.
    boundary = extra * (base + 1)
    low = ids // (base + 1)
    high = extra + (ids - boundary) // max(base, 1)
    return np.where(ids < boundary, low, high).astype(np.int64)
