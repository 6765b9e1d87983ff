"""Random rows that do not depend on how the rows are partitioned over ranks.

Row i of a keyed array lies in block i // BLOCK_ROWS, and every block is drawn from its own
generator `numpy.random.default_rng([*key, block])`. A rank that needs rows [start, stop) draws
only the blocks that overlap them, and gets the same values as a single process drawing all
rows: a 1-rank and a 4-rank run start from identical classifier rows, random graphs and
synthetic weights.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

BLOCK_ROWS = 8192


def fill_keyed_rows(out: np.ndarray, key: Sequence[int], start: int,
                    draw: Callable[[np.random.Generator, int], np.ndarray],
                    block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Fills `out` with rows [start, start + len(out)) of the keyed array and returns it.

    `draw(rng, lo)` returns the rows of the block that begins at row `lo` (row j of its result
    is row lo + j; it may stop early at the end of the array), drawn from `rng` only."""
    stop = start + out.shape[0]
    if stop <= start:
        return out
    for block in range(start // block_rows, (stop - 1) // block_rows + 1):
        lo = block * block_rows
        rows = draw(np.random.default_rng([*key, block]), lo)
        a, z = max(lo, start), min(lo + block_rows, stop)
        out[a - start:z - start] = rows[a - lo:z - lo]
    return out
