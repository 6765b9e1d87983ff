"""A random KNN graph: column 0 the class itself, then K-1 distinct random other classes. The graph
a run starts from with `knn.init=random`, and the baseline a graph's recall is compared with.

Rows are drawn in keyed blocks (`common.keyed_random`), so a row does not depend on how many
ranks share the classes.

Legend: c = this rank's classes (rows), K = neighbours per class, b = rows of a block,
m = random others per row (K - 1).
"""
from __future__ import annotations

import numpy as np

from app.knn.rows import clamp_k
from app.knn.search import LocalGraph
from common.keyed_random import BLOCK_ROWS, fill_keyed_rows

# Key of the random graph's blocks, after the seed.
_PURPOSE = 0x6A2F


def random_graph(start: int, stop: int, num_classes: int, k: int, seed: int) -> LocalGraph:
    """Rows [start, stop) of a random graph: column 0 the class itself, then K-1 distinct random
    other classes (similarity NaN: unknown). The same rows for any partition of the classes.
    Not collective: each rank draws only its own rows."""
    if not 0 <= start <= stop <= num_classes:
        raise ValueError(f"random_graph: rows [{start}, {stop}) outside [0, {num_classes})")
    if k < 1:
        raise ValueError(f"random_graph: k={k} must be >= 1")
    k = clamp_k(k, num_classes)

    def draw(rng: np.random.Generator, lo: int) -> np.ndarray:
        # The last block stops at num_classes: its rows are drawn for exactly those classes.
        ids_b = np.arange(lo, min(lo + BLOCK_ROWS, num_classes), dtype=np.int64)
        return np.concatenate([ids_b[:, None], _distinct_others(rng, ids_b, num_classes, k - 1)],
                              axis=1)

    nbr_cK = fill_keyed_rows(np.empty((stop - start, k), dtype=np.int32), [seed, _PURPOSE],
                             start, draw)
    sim_cK = np.full(nbr_cK.shape, np.nan, dtype=np.float32)
    sim_cK[:, 0] = 1.0
    return LocalGraph(nbr_cK, sim_cK, start, "random", 0.0, "random")


def _distinct_others(rng, ids_b: np.ndarray, num_classes: int, m: int) -> np.ndarray:
    """(b, m) distinct classes per row, none equal to the row's class: drawn from [0, C-1) and
    shifted past the class."""
    b, pool = ids_b.shape[0], num_classes - 1
    if m == 0:
        return np.zeros((b, 0), dtype=np.int64)
    if m * m <= pool:
        # Rows with a repeat are redrawn whole: with m^2 <= pool most rows have none.
        draw = rng.integers(0, pool, (b, m))
        while True:
            s = np.sort(draw, axis=1)
            again = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not again.any():
                break
            draw[again] = rng.integers(0, pool, (int(again.sum()), m))
    else:
        # Few classes per row left out: the first m of a random order, in slices of rows that
        # keep the (rows, C) keys below 2^24 entries.
        step = max(1, 2**24 // pool)
        draw = np.concatenate([np.argsort(rng.random((min(step, b - i), pool)), axis=1)[:, :m]
                               for i in range(0, b, step)])
    return draw + (draw >= ids_b[:, None])
