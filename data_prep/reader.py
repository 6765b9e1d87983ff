"""The training reader: one rank's batches of a dataset split, deterministic across world sizes.

Shapes in names: b = per-rank batch, X = the per-sample input shape.

`ShardedReader` composes three parts, each with its own contract:

- `data_prep.batch_schedule.BatchSchedule`: which global sample indices this rank takes for
  each batch (one permutation per epoch, rank slices of the global batch, so a position means
  the same samples at any world size with the same global batch) and the resumable position.
- `data_prep.shard_store.ShardStore`: the split's shards, checked at start, read by global
  index (cached in memory when small), labels and float inputs (finite) checked, errors naming
  the shard.
- `data_prep.prefetch.Prefetcher`: the thread that reads the next batches ahead.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any, Iterator

from data_prep.batch_schedule import BatchSchedule
from data_prep.format import SPLITS, DatasetError, load_dataset_info
from data_prep.prefetch import Prefetcher
from data_prep.shard_store import ShardStore

# A split whose inputs and labels take at most this many bytes is read into memory once at
# start: h5py fancy indexing costs about a hyperslab per sample, memory indexing does not.
DEFAULT_CACHE_BYTES = 256 << 20

Batch = namedtuple("Batch", ["inputs", "labels", "indices"])
Batch.__doc__ = """One rank's batch: inputs (b, *X) float32 or uint8, labels (b,) int64 and the
global sample indices (b,) int64 within the split (b may be 0, see data_prep.batch_schedule)."""


class ShardedReader:
    """Batches of one split for one rank; see data_prep.batch_schedule for the contract.

    `batch_size` is PER RANK. Iterating (`for batch in reader`) never ends: it runs through
    epochs, `reader.epoch` counting them; `one_epoch()` yields the rest of the current epoch and
    stops (evaluation). Each item is a `Batch(inputs, labels, indices)`.

    At start the reader checks every shard of the split against dataset.json (exists, opens,
    input shape and dtype, sample counts) but does not hash files (data_prep.inspect does).
    Labels and float inputs are checked when read: all at start for a cached split, per batch
    otherwise; a label outside [0, num_classes) or a NaN/infinite input value raises
    DatasetError naming the shard (and, for a value, the row in it and the sample's index in
    the split). A split of at most
    `cache_bytes` is read into memory at start and its files closed; otherwise every shard stays
    open until close() and each batch reads its rows shard by shard (data_prep.shard_store).

    A background thread reads `prefetch` batches ahead (0: read in the caller's thread); an
    error in it is raised by the next call for a batch. `state_dict()` counts the batches the
    caller has taken, not the prefetched ones, so after `load_state_dict(state)` (in this or a
    new reader, at any world size with the same global batch) the next batch is the one that
    would have come. Use as a context manager or call close().
    """

    def __init__(self, dataset_dir: str | Path, split: str, rank: int, size: int,
                 batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                 prefetch: int = 2, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not (size >= 1 and 0 <= rank < size):
            raise ValueError(f"need 0 <= rank < size, got rank {rank}, size {size}")
        if batch_size < 1 or seed < 0 or prefetch < 0:
            raise ValueError(f"need batch_size >= 1, seed >= 0, prefetch >= 0, got "
                             f"{batch_size}, {seed}, {prefetch}")
        self.dataset_dir, self.split = Path(dataset_dir), split
        self.rank, self.size, self.batch_size, self.seed = rank, size, batch_size, seed
        self.shuffle, self.drop_last, self.prefetch = shuffle, drop_last, prefetch
        self.dataset_info = load_dataset_info(dataset_dir)
        num_samples = self.dataset_info.splits[split].num_samples
        if num_samples == 0:
            raise DatasetError(self.dataset_dir / "dataset.json", f"split {split!r} has no "
                               "samples", "regenerate the dataset with samples in this split")
        self._schedule = BatchSchedule(num_samples, split, rank, size, batch_size, seed,
                                       shuffle, drop_last)
        self.global_batch_size = self._schedule.global_batch_size
        self._store = ShardStore(dataset_dir, self.dataset_info, split, cache_bytes)
        self._source: Iterator | None = None  # (epoch, batch, Batch) items from the position
        self._closed = False

    # -- properties -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._schedule.num_samples

    @property
    def num_classes(self) -> int:
        return self.dataset_info.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.dataset_info.input_shape

    @property
    def kind(self) -> str:
        return self.dataset_info.kind

    @property
    def batches_per_epoch(self) -> int:
        return self._schedule.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next batch the caller will take."""
        return self._schedule.epoch

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> "ShardedReader":
        return self

    def __next__(self) -> Batch:
        return self._take(bounded=False)

    def one_epoch(self) -> Iterator[Batch]:
        """Yields the remaining batches of the current epoch, then stops (the position is then
        the start of the next epoch). A prefetch thread started here stops at the epoch's end,
        so evaluation reads nothing beyond it."""
        epoch = self._schedule.epoch
        while self._schedule.epoch == epoch:
            yield self._take(bounded=True)

    def _take(self, bounded: bool) -> Batch:
        if self._closed:
            raise ValueError("the reader is closed")
        while True:
            if self._source is None:
                self._source = self._start_source(self._schedule.epoch + 1 if bounded else None)
            try:
                epoch, batch, item = next(self._source)
                break
            except StopIteration:  # a bounded source ended with its epoch: start a new one
                self._stop_source()
            except BaseException:  # the source is dead; a retry restarts it at this position
                self._stop_source()
                raise
        assert (epoch, batch) == self._schedule.position, "prefetch out of order"
        self._schedule.advance()
        return item

    def _start_source(self, end_epoch: int | None) -> Iterator:
        items = self._produce(*self._schedule.position, end_epoch)
        return Prefetcher(items, self.prefetch) if self.prefetch else items

    def _stop_source(self) -> None:
        if isinstance(self._source, Prefetcher):
            self._source.close()
        self._source = None

    def _produce(self, epoch: int, batch: int, end_epoch: int | None) -> Iterator:
        """(epoch, batch, Batch) from the given position up to the start of `end_epoch`."""
        for at_epoch, at_batch, indices_b in self._schedule.batches_from(epoch, batch, end_epoch):
            yield at_epoch, at_batch, Batch(*self._store.read(indices_b), indices_b)

    # -- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the batches the caller has taken (prefetched ones not counted):
        "epoch" and "batch" of the next batch, plus what must match on restore."""
        return self._schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any], allow_new_batch_size: bool = False) -> None:
        """Continues from `state` (from state_dict(), possibly of a reader with another number
        of ranks): the next batch is the one that would have come. ValueError naming the key if
        seed, split, shuffle, drop_last, global batch or sample count differ. With
        `allow_new_batch_size` a different global batch is accepted (see
        BatchSchedule.load_state_dict: nothing is repeated, at most one batch skipped)."""
        self._schedule.load_state_dict(state, allow_new_batch_size)
        self._stop_source()

    # -- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the prefetch thread and closes the files; idempotent."""
        if not self._closed:
            self._closed = True
            self._stop_source()
            self._store.close()

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
