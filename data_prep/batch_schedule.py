"""Which samples one rank takes for each batch: the data order of training, as pure arithmetic.

Shapes in names: N = samples in the split, G = global batch (size * b), b = per-rank batch.

Distributed contract. For epoch e there is ONE permutation of the N sample indices,
`np.random.default_rng([seed, e]).permutation(N)` (the identity when shuffle=False). Global batch
j is perm[j*G:(j+1)*G] and rank r takes its slice [r*b:(r+1)*b]. So P ranks with batch b see
exactly what one rank with batch P*b sees, concatenated in rank order, and a position (epoch,
batch) means the same samples at any world size with the same G. With drop_last=True (training)
the incomplete last global batch is dropped. With drop_last=False (evaluation) the last global
batch of L < G samples is split as evenly as possible: rank r takes [floor(r*L/P),
floor((r+1)*L/P)), which may be EMPTY (zero rows, so every rank still yields the same number of
batches and stays in step with collectives); every sample is then seen exactly once per epoch
across ranks.

Nothing here reads data or communicates: the schedule of any rank of any world size can be
computed in one process.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """int64 (N,): the order of the split's samples in `epoch` (the contract above)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_bounds(length: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s part of a global batch of `length` samples: equal parts of
    length // size for a full batch, sizes differing by at most one for the last one."""
    return rank * length // size, (rank + 1) * length // size


class BatchSchedule:
    """One rank's batches of a split of `num_samples` samples, and the position of the next one.

    `batch_size` is PER RANK. `batches_from(epoch, batch)` lists the global sample indices of
    each batch from a position on; `position` is the (epoch, batch) of the next batch the caller
    takes, moved by `advance()` and restored by `load_state_dict`. `split` only names the data
    in the state, so that a state is not restored onto another split.
    """

    def __init__(self, num_samples: int, split: str, rank: int, size: int, batch_size: int,
                 seed: int, shuffle: bool = True, drop_last: bool = True) -> None:
        if not (size >= 1 and 0 <= rank < size):
            raise ValueError(f"need 0 <= rank < size, got rank {rank}, size {size}")
        if num_samples < 1 or batch_size < 1 or seed < 0:
            raise ValueError(f"need num_samples >= 1, batch_size >= 1, seed >= 0, got "
                             f"{num_samples}, {batch_size}, {seed}")
        self.num_samples, self.split = num_samples, split
        self.rank, self.size, self.batch_size, self.seed = rank, size, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.global_batch_size = size * batch_size
        if drop_last and num_samples < self.global_batch_size:
            raise ValueError(f"split {split!r} has {num_samples} samples, fewer than one "
                             f"global batch of {self.global_batch_size} (drop_last=True)")
        self.epoch, self.batch = 0, 0   # the next batch the caller will take

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch the caller will take."""
        return self.epoch, self.batch

    def advance(self) -> None:
        """The caller took the batch at `position`: move to the next one."""
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def batches_from(self, epoch: int, batch: int,
                     end_epoch: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch, this rank's int64 global indices (b,)) from the given position up to
        the start of `end_epoch` (endless if None). Reads only the fixed settings, never
        `position`, so it may run in another thread."""
        while end_epoch is None or epoch < end_epoch:
            perm_N = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
            for j in range(batch, self.batches_per_epoch):
                global_G = perm_N[j * self.global_batch_size:(j + 1) * self.global_batch_size]
                start, stop = rank_bounds(len(global_G), self.rank, self.size)
                yield epoch, j, global_G[start:stop]
            epoch, batch = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The position: "epoch" and "batch" of the next batch, plus what must match on
        restore. Equal on every rank."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "split": self.split, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "global_batch_size": self.global_batch_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any], allow_new_batch_size: bool = False) -> None:
        """Continues from `state` (from state_dict(), possibly of a schedule with another
        number of ranks): the next batch is the one that would have come. ValueError naming the
        key if seed, split, shuffle, drop_last, global batch or sample count differ; the
        position is unchanged then.

        With `allow_new_batch_size` a different global batch is accepted: the epoch's
        permutation is kept and reading continues at the first new-size batch that starts at
        or after the samples already consumed (at most one new batch of the epoch is skipped,
        nothing is repeated)."""
        self._check_order(state, allow_new_batch_size)
        epoch, batch = state.get("epoch"), state.get("batch")
        old_global = state.get("global_batch_size", self.global_batch_size)
        if isinstance(batch, int) and old_global != self.global_batch_size:
            consumed = batch * old_global
            batch = -(-consumed // self.global_batch_size)  # ceil: never repeat a sample
            if batch >= self.batches_per_epoch:
                epoch, batch = epoch + 1, 0
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(batch, int)
                and 0 <= batch < self.batches_per_epoch):
            raise ValueError(f"reader state needs epoch >= 0 and 0 <= batch < "
                             f"{self.batches_per_epoch}, got epoch {epoch!r}, batch {batch!r}")
        self.epoch, self.batch = epoch, batch

    def _check_order(self, state: dict[str, Any], allow_new_batch_size: bool) -> None:
        """ValueError naming the first key of `state` that gives another data order."""
        mine = self.state_dict()
        keys = ["seed", "split", "shuffle", "drop_last", "num_samples"]
        if not allow_new_batch_size:
            keys.append("global_batch_size")
        for key in keys:
            if key not in state:
                raise ValueError(f"reader state lacks {key!r}: {state}")
            if state[key] != mine[key]:
                raise ValueError(f"reader state has {key} = {state[key]!r} but this reader has "
                                 f"{mine[key]!r}; the data order would differ")
