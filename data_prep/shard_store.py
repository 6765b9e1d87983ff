"""The samples of one split on disk, read by global index: what the training reader reads from.

Shapes in names: N = samples in the split, m = samples of one read, X = the per-sample input
shape.

At start every shard of the split is checked against dataset.json (exists, opens, input shape
and dtype, sample counts) but not hashed (data_prep.inspect does). A split of at most
`cache_bytes` is read into memory once, its labels checked, and its files closed: h5py fancy
indexing costs about a hyperslab per sample, memory indexing does not. Otherwise every shard
stays open until close() (memory-mapped when contiguous, see `_shard_arrays`) and each read
takes its rows shard by shard, checking the labels it read. Float inputs are checked the same
way, once at start for a cached split and as they are read otherwise: a NaN or an infinity is a
DatasetError naming the shard, the row in it and the sample's index in the split (one
np.isfinite pass over the rows read; uint8 images are not checked). Every problem is a
DatasetError naming the shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_prep.format import (INPUTS_KEY, LABELS_KEY, DatasetError, DatasetInfo, check_finite,
                              check_labels, open_shard)


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


class ShardStore:
    """The samples of `split` of the dataset described by `info`, by global index 0..N-1 (the
    shards' rows in order). Not thread-safe for concurrent reads; one reader thread at a time."""

    def __init__(self, dataset_dir: str | Path, info: DatasetInfo, split: str,
                 cache_bytes: int) -> None:
        self.info, self.split = info, split
        shards = info.splits[split].shards
        self.num_samples = info.splits[split].num_samples
        self._offsets = info.splits[split].offsets()
        self._paths = [Path(dataset_dir) / s.path for s in shards]
        self._files: list = []     # open h5py.File per shard
        self._arrays: list = []    # (inputs, labels) per shard, see _shard_arrays
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        try:
            for shard in shards:
                self._files.append(open_shard(dataset_dir, info, shard))
            sample_bytes = info.input_dtype.itemsize * int(np.prod(info.input_shape))
            if self.num_samples * (sample_bytes + 8) <= cache_bytes:
                self._cache = self._load_all()
                self.close()
            else:
                self._arrays = [_shard_arrays(h5, path)
                                for h5, path in zip(self._files, self._paths)]
        except BaseException:
            self.close()
            raise

    def read(self, indices_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (m, *X), int64 labels (m,)) of global indices `indices_m`, in that order."""
        if self._cache is not None:
            inputs_NX, labels_N = self._cache
            return inputs_NX[indices_m], labels_N[indices_m]
        inputs_mX = np.empty((len(indices_m), *self.info.input_shape), self.info.input_dtype)
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
                inputs_nX = self._arrays[s][0][sel]
                labels_m[order_m[seg]] = self._arrays[s][1][sel]
            except OSError as err:
                raise self._read_error(s, err) from err
            check_labels(labels_m[order_m[seg]], self.info.num_classes, self._paths[s],
                         rows_n=rows)
            check_finite(inputs_nX, self._paths[s], self.split, int(self._offsets[s]), rows_n=rows)
            inputs_mX[order_m[seg]] = inputs_nX
        return inputs_mX, labels_m

    def _load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split in memory, labels and float inputs checked: (inputs (N, *X),
        labels (N,))."""
        inputs_NX = np.empty((self.num_samples, *self.info.input_shape), self.info.input_dtype)
        labels_N = np.empty(self.num_samples, np.int64)
        for s, h5 in enumerate(self._files):
            lo, hi = self._offsets[s], self._offsets[s + 1]
            try:
                h5[INPUTS_KEY].read_direct(inputs_NX, dest_sel=np.s_[lo:hi])
                h5[LABELS_KEY].read_direct(labels_N, dest_sel=np.s_[lo:hi])
            except OSError as err:
                raise self._read_error(s, err) from err
            check_labels(labels_N[lo:hi], self.info.num_classes, self._paths[s])
            check_finite(inputs_NX[lo:hi], self._paths[s], self.split, int(lo))
        return inputs_NX, labels_N

    def _read_error(self, shard: int, err: OSError) -> DatasetError:
        return DatasetError(self._paths[shard], f"reading failed, the file is corrupt ({err})",
                            "check it with python -m data_prep.inspect and regenerate the dataset")

    def close(self) -> None:
        """Closes the shard files (a cached split stays readable); idempotent."""
        self._arrays = []
        for h5 in self._files:
            h5.close()
        self._files = []
