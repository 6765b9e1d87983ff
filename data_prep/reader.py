"""The training reader: one rank's batches of a dataset split, deterministic across world sizes.

Shapes in names: N = samples in the split, G = global batch (size * b), b = per-rank batch,
m = samples of one read, X = the per-sample input shape.

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
"""

from __future__ import annotations

import queue
import threading
from collections import namedtuple
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_prep.format import (INPUTS_KEY, LABELS_KEY, SPLITS, DatasetError, check_labels,
                              load_manifest, open_shard)

# A split whose inputs and labels take at most this many bytes is read into memory once at
# start: h5py fancy indexing costs about a hyperslab per sample, memory indexing does not.
DEFAULT_CACHE_BYTES = 256 << 20

Batch = namedtuple("Batch", ["inputs", "labels", "indices"])
Batch.__doc__ = """One rank's batch: inputs (b, *X) float32 or uint8, labels (b,) int64 and the
global sample indices (b,) int64 within the split (b may be 0, see the module docstring)."""


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """int64 (N,): the order of the split's samples in `epoch` (the contract above)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_bounds(length: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s part of a global batch of `length` samples: equal parts of
    length // size for a full batch, sizes differing by at most one for the last one."""
    return rank * length // size, (rank + 1) * length // size


def _shard_arrays(h5, path: Path) -> tuple[Any, Any]:
    """(inputs, labels) of an open shard, indexable by a slice or increasing row indices.

    Contiguous, uncompressed datasets (what DatasetWriter writes) are memory-mapped at their
    offset in the file: a random row then costs a memory copy, whereas h5py builds a hyperslab
    selection per row (about 10x slower for a shuffled batch). Other layouts fall back to h5py.
    """
    arrays = []
    for key in (INPUTS_KEY, LABELS_KEY):
        ds = h5[key]
        offset = ds.id.get_offset()
        if ds.chunks is not None or offset is None:
            arrays.append(ds)
        elif offset + ds.nbytes > path.stat().st_size:
            raise DatasetError(path, f"{key} ends at byte {offset + ds.nbytes} but the file has "
                               f"{path.stat().st_size}, the file is truncated",
                               "restore the file or regenerate the dataset")
        else:
            arrays.append(np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape))
    return arrays[0], arrays[1]


class _Prefetcher:
    """Runs an iterator in a daemon thread, at most `depth` items ahead of the consumer.
    An exception in the thread is re-raised by the consumer's next()."""

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True,
                                        name="ShardedReader-prefetch")
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer, who re-raises it
            self._put(err)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        # Poll so that close() can stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "_Prefetcher":
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ShardedReader:
    """Batches of one split for one rank; see the module docstring for the contract.

    `batch_size` is PER RANK. Iterating (`for batch in reader`) never ends: it runs through
    epochs, `reader.epoch` counting them; `one_epoch()` yields the rest of the current epoch and
    stops (evaluation). Each item is a `Batch(inputs, labels, indices)`.

    At start the reader checks every shard of the split against dataset.json (exists, opens,
    input shape and dtype, sample counts) but does not hash files (data_prep.inspect does).
    Labels are checked when read: all at start for a cached split, per batch otherwise; a label
    outside [0, num_classes) raises DatasetError naming the shard. A split of at most
    `cache_bytes` is read into memory at start and its files closed; otherwise every shard stays
    open until close() (memory-mapped when contiguous, see _shard_arrays) and each batch reads
    its rows shard by shard.

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
        self.manifest = load_manifest(dataset_dir)
        info = self.manifest.splits[split]
        self._num_samples, self._offsets = info.num_samples, info.offsets()
        self.global_batch_size = size * batch_size
        if info.num_samples == 0:
            raise DatasetError(self.dataset_dir / "dataset.json", f"split {split!r} has no "
                               "samples", "regenerate the dataset with samples in this split")
        if drop_last and info.num_samples < self.global_batch_size:
            raise ValueError(f"split {split!r} has {info.num_samples} samples, fewer than one "
                             f"global batch of {self.global_batch_size} (drop_last=True)")
        self._paths = [self.dataset_dir / s.path for s in info.shards]
        self._files: list = []     # open h5py.File per shard
        self._arrays: list = []    # (inputs, labels) per shard, see _shard_arrays
        try:
            for shard in info.shards:
                self._files.append(open_shard(dataset_dir, self.manifest, shard))
            sample_bytes = self.manifest.input_dtype.itemsize * int(np.prod(self.input_shape))
            if info.num_samples * (sample_bytes + 8) <= cache_bytes:
                self._cache = self._load_all()
                self._close_files()
            else:
                self._cache = None
                self._arrays = [_shard_arrays(h5, path)
                                for h5, path in zip(self._files, self._paths)]
        except BaseException:
            self._close_files()
            raise
        self._epoch, self._batch = 0, 0      # the next batch the caller will take
        self._source: Iterator | None = None  # (epoch, batch, Batch) items from that position
        self._closed = False

    # -- properties -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self._num_samples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch the caller will take."""
        return self._epoch

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> "ShardedReader":
        return self

    def __next__(self) -> Batch:
        return self._take(bounded=False)

    def one_epoch(self) -> Iterator[Batch]:
        """Yields the remaining batches of the current epoch, then stops (the position is then
        the start of the next epoch). A prefetch thread started here stops at the epoch's end,
        so evaluation reads nothing beyond it."""
        epoch = self._epoch
        while self._epoch == epoch:
            yield self._take(bounded=True)

    def _take(self, bounded: bool) -> Batch:
        if self._closed:
            raise ValueError("the reader is closed")
        while True:
            if self._source is None:
                self._source = self._start_source(self._epoch + 1 if bounded else None)
            try:
                epoch, batch, item = next(self._source)
                break
            except StopIteration:  # a bounded source ended with its epoch: start a new one
                self._stop_source()
            except BaseException:  # the source is dead; a retry restarts it at this position
                self._stop_source()
                raise
        assert (epoch, batch) == (self._epoch, self._batch), "prefetch out of order"
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return item

    def _start_source(self, end_epoch: int | None) -> Iterator:
        items = self._produce(self._epoch, self._batch, end_epoch)
        return _Prefetcher(items, self.prefetch) if self.prefetch else items

    def _stop_source(self) -> None:
        if isinstance(self._source, _Prefetcher):
            self._source.close()
        self._source = None

    def _produce(self, epoch: int, batch: int, end_epoch: int | None) -> Iterator:
        """(epoch, batch, Batch) from the given position up to the start of `end_epoch`."""
        while end_epoch is None or epoch < end_epoch:
            perm_N = epoch_permutation(self._num_samples, self.seed, epoch, self.shuffle)
            for j in range(batch, self.batches_per_epoch):
                global_G = perm_N[j * self.global_batch_size:(j + 1) * self.global_batch_size]
                start, stop = rank_bounds(len(global_G), self.rank, self.size)
                yield epoch, j, self._read(global_G[start:stop])
            epoch, batch = epoch + 1, 0

    # -- reading ----------------------------------------------------------------------------
    def _load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split in memory, labels checked: (inputs (N, *X), labels (N,))."""
        inputs_NX = np.empty((self._num_samples, *self.input_shape), self.manifest.input_dtype)
        labels_N = np.empty(self._num_samples, np.int64)
        for s, h5 in enumerate(self._files):
            lo, hi = self._offsets[s], self._offsets[s + 1]
            try:
                h5[INPUTS_KEY].read_direct(inputs_NX, dest_sel=np.s_[lo:hi])
                h5[LABELS_KEY].read_direct(labels_N, dest_sel=np.s_[lo:hi])
            except OSError as err:
                raise self._read_error(s, err) from err
            check_labels(labels_N[lo:hi], self.num_classes, self._paths[s])
        return inputs_NX, labels_N

    def _read(self, indices_m: np.ndarray) -> Batch:
        """The samples of global indices `indices_m`, in that order."""
        if self._cache is not None:
            inputs_NX, labels_N = self._cache
            return Batch(inputs_NX[indices_m], labels_N[indices_m], indices_m)
        inputs_mX = np.empty((len(indices_m), *self.input_shape), self.manifest.input_dtype)
        labels_m = np.empty(len(indices_m), np.int64)
        # h5py fancy indexing needs increasing indices: read each shard's rows sorted, then
        # scatter them back to their positions in the batch.
        order_m = np.argsort(indices_m, kind="stable")
        sorted_m = indices_m[order_m]
        shard_m = np.searchsorted(self._offsets, sorted_m, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_m)) + 1
        for seg in np.split(np.arange(len(sorted_m)), bounds) if len(sorted_m) else []:
            s = int(shard_m[seg[0]])
            rows = sorted_m[seg] - self._offsets[s]
            # A run of consecutive rows (shuffle=False) is one slice read, not len(rows) points.
            sel = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == len(rows) \
                else rows
            try:
                inputs_mX[order_m[seg]] = self._arrays[s][0][sel]
                labels_m[order_m[seg]] = self._arrays[s][1][sel]
            except OSError as err:
                raise self._read_error(s, err) from err
            check_labels(labels_m[order_m[seg]], self.num_classes, self._paths[s], rows_n=rows)
        return Batch(inputs_mX, labels_m, indices_m)

    def _read_error(self, shard: int, err: OSError) -> DatasetError:
        return DatasetError(self._paths[shard], f"reading failed, the file is corrupt ({err})",
                            "check it with python -m data_prep.inspect and regenerate the dataset")

    # -- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the batches the caller has taken (prefetched ones not counted):
        "epoch" and "batch" of the next batch, plus what must match on restore."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "split": self.split, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "global_batch_size": self.global_batch_size, "num_samples": self._num_samples}

    def load_state_dict(self, state: dict[str, Any], allow_new_batch_size: bool = False) -> None:
        """Continues from `state` (from state_dict(), possibly of a reader with another number
        of ranks): the next batch is the one that would have come. ValueError naming the key if
        seed, split, shuffle, drop_last, global batch or sample count differ.

        With `allow_new_batch_size` a different global batch is accepted: the epoch's
        permutation is kept and reading continues at the first new-size batch that starts at
        or after the samples already consumed (at most one new batch of the epoch is skipped,
        nothing is repeated)."""
        keys = ["seed", "split", "shuffle", "drop_last", "num_samples"]
        if not allow_new_batch_size:
            keys.append("global_batch_size")
        for key in keys:
            if key not in state:
                raise ValueError(f"reader state lacks {key!r}: {state}")
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"reader state has {key} = {state[key]!r} but this reader has "
                                 f"{self.state_dict()[key]!r}; the data order would differ")
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
        self._stop_source()
        self._epoch, self._batch = epoch, batch

    # -- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the prefetch thread and closes the files; idempotent."""
        if not self._closed:
            self._closed = True
            self._stop_source()
            self._close_files()

    def _close_files(self) -> None:
        self._arrays = []
        for h5 in self._files:
            h5.close()
        self._files = []

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
