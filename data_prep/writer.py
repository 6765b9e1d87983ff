"""DatasetWriter: streams labelled samples into a new dataset directory (data_prep/format.py).

Shapes in names: n = samples of one write or shard, C = classes, X = the per-sample input shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from data_prep.format import (CLASSES_NAME, DATASET_JSON, DEFAULT_SHARD_BYTES, INPUT_DTYPES,
                              INPUTS_KEY, LABELS_KEY, SPLITS, Ancestor, DatasetError, DatasetInfo,
                              ShardInfo, SplitInfo,
                              clear_dataset, existing_shards, input_shape_error, nonfinite_problem,
                              nonfinite_rows, sha256_file, shard_path, write_classes,
                              write_dataset_info)


class ShardBuffer:
    """The samples of one split waiting for their shard: cut into shards of `shard_size`
    samples, written in one go each as contiguous, uncompressed HDF5 (the fastest layout for
    random reads) to `out_dir/<split>/shard-NNNNN.h5`. `shards` lists those written so far."""

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.shards: list[ShardInfo] = []
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._num_buffered = 0

    @property
    def num_samples(self) -> int:
        """Samples added so far (written or buffered)."""
        return sum(s.num_samples for s in self.shards) + self._num_buffered

    def add(self, inputs_nX: np.ndarray, labels_n: np.ndarray) -> None:
        """Buffers the samples (not copied: the caller must not modify them) and writes every
        shard that is full."""
        self._parts.append((inputs_nX, labels_n))
        self._num_buffered += len(labels_n)
        if self._num_buffered >= self.shard_size:
            self._flush(last=False)

    def finish(self) -> SplitInfo:
        """Writes the partial last shard; returns the split's entry of dataset.json."""
        if self._num_buffered:
            self._flush(last=True)
        return SplitInfo(sum(s.num_samples for s in self.shards), tuple(self.shards))

    def _flush(self, last: bool) -> None:
        """Writes the buffered samples as full shards, plus the partial rest if `last`; keeps
        the partial rest buffered otherwise."""
        import h5py

        inputs_nX = np.concatenate([x for x, _ in self._parts])
        labels_n = np.concatenate([y for _, y in self._parts])
        stop = len(labels_n) if last else len(labels_n) - len(labels_n) % self.shard_size
        for start in range(0, stop, self.shard_size):
            end = min(start + self.shard_size, stop)
            rel = shard_path(self.split, len(self.shards))
            with h5py.File(self.out_dir / rel, "w") as h5:
                h5.create_dataset(INPUTS_KEY, data=inputs_nX[start:end])
                h5.create_dataset(LABELS_KEY, data=labels_n[start:end])
            self.shards.append(ShardInfo(rel, end - start, sha256_file(self.out_dir / rel)))
        self._parts = [(inputs_nX[stop:], labels_n[stop:])] if stop < len(labels_n) else []
        self._num_buffered = len(labels_n) - stop


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Readies `out_dir` for a new dataset: refuses one that holds a dataset.json or shard
    files unless `overwrite`; then removes them (dataset.json first) and classes.tsv."""
    info_path = out_dir / DATASET_JSON
    old_shards = existing_shards(out_dir)
    if (info_path.exists() or old_shards) and not overwrite:
        what = "holds a dataset" if info_path.exists() else \
            f"holds shard files of an unfinished dataset ({old_shards[0]})"
        raise DatasetError(info_path if info_path.exists() else old_shards[0],
                           f"output directory {out_dir} {what}",
                           "choose another output directory or pass overwrite=True "
                           "(--overwrite) to replace it")
    clear_dataset(out_dir)


class DatasetWriter:
    """Streams labelled samples into a new dataset directory.

    Usage::

        with DatasetWriter(out_dir, "vectors", (128,), num_classes, class_keys) as writer:
            writer.write("train", inputs_nX, labels_n)   # any number of calls, any order of splits
            writer.write("val", inputs_nX, labels_n)
        # leaving the block normally calls finish(); after an exception nothing is finished

    Samples keep the order in which they are written; each split is cut into shards of
    `shard_size` samples (the last one shorter), see ShardBuffer. `finish()` writes the partial
    last shards, then classes.tsv (counts = train samples per class), then dataset.json last
    via `.tmp` + os.replace, so a dataset.json only exists for a complete dataset.

    `class_keys` is a sequence of C strings or a function of the class id (for very large C).
    `generator` is stored as dataset.json's free metadata, `lineage` (the versions this one was
    grown from, parent first, data_prep/lineage.py) as its lineage; dataset.json also records
    the sha256 of classes.tsv. The writer refuses a directory that
    already holds a dataset.json or shard files unless `overwrite=True`; then it removes
    dataset.json first and the old shards and classes.tsv, and leaves other files alone.
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str, input_shape: Sequence[int],
                 num_classes: int, class_keys: Sequence[str] | Callable[[int], str],
                 shard_size: int | None = None, generator: dict[str, Any] | None = None,
                 overwrite: bool = False, lineage: Sequence[Ancestor] = ()) -> None:
        input_shape = tuple(int(s) for s in input_shape)
        problem = input_shape_error(kind, input_shape)
        if problem:
            raise ValueError(problem)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not callable(class_keys) and len(class_keys) != num_classes:
            raise ValueError(f"class_keys holds {len(class_keys)} keys for {num_classes} classes")
        dtype = np.dtype(INPUT_DTYPES[kind])
        if shard_size is None:
            shard_size = max(1, DEFAULT_SHARD_BYTES // (dtype.itemsize * int(np.prod(input_shape))))
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.kind, self.input_shape, self.num_classes = kind, input_shape, num_classes
        self.shard_size, self.dtype = shard_size, dtype
        self._key_of = class_keys if callable(class_keys) else class_keys.__getitem__
        self._generator = dict(generator or {})
        self._lineage = tuple(lineage)
        self._buffers = {s: ShardBuffer(self.out_dir, s, shard_size) for s in SPLITS}
        self._train_counts_C = np.zeros(num_classes, dtype=np.int64)
        self._finished = False
        self.dataset_info: DatasetInfo | None = None   # set by finish()
        prepare_output_dir(self.out_dir, overwrite)

    def write(self, split: str, inputs_nX: np.ndarray, labels_n: np.ndarray) -> None:
        """Appends samples to `split`. inputs must have the dataset's dtype and per-sample shape
        (no silent casts) and, when float, be finite (a NaN or an infinity is a DatasetError
        naming the shard it would go to and the row of this write; nothing of the write is
        kept); labels must be integers in [0, num_classes). The arrays are kept until their
        shard is written: do not modify them afterwards."""
        if self._finished:
            raise ValueError("the writer is finished; create a new DatasetWriter")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        inputs_nX, labels_n = np.asarray(inputs_nX), np.asarray(labels_n)
        if inputs_nX.dtype != self.dtype or inputs_nX.shape[1:] != self.input_shape:
            raise ValueError(f"inputs must be {self.dtype} (n, *{self.input_shape}), got "
                             f"{inputs_nX.dtype} {inputs_nX.shape}")
        if labels_n.ndim != 1 or labels_n.shape[0] != inputs_nX.shape[0] \
                or labels_n.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers of shape ({inputs_nX.shape[0]},), got "
                             f"{labels_n.dtype} {labels_n.shape}")
        if labels_n.size and (labels_n.min() < 0 or labels_n.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                             f"[{labels_n.min()}, {labels_n.max()}]")
        self._check_finite(split, inputs_nX)
        labels_n = labels_n.astype(np.int64, copy=False)
        if split == "train":
            self._train_counts_C += np.bincount(labels_n, minlength=self.num_classes)
        self._buffers[split].add(inputs_nX, labels_n)

    def _check_finite(self, split: str, inputs_nX: np.ndarray) -> None:
        """DatasetError naming the shard the first NaN/infinite input row would go to and the
        row in this write; nothing of the write is kept."""
        bad_n = nonfinite_rows(inputs_nX)
        if bad_n.size:
            sample = self._buffers[split].num_samples + int(bad_n[0])
            where = f"of this write (it would be sample {sample} of the {split} split)"
            raise DatasetError(self.out_dir / shard_path(split, sample // self.shard_size),
                               nonfinite_problem(inputs_nX, bad_n, int(bad_n[0]), where),
                               "fix the source data or leave the row out; no shard holds "
                               "non-finite inputs")

    def finish(self) -> DatasetInfo:
        """Writes the last shards, classes.tsv and dataset.json (last, atomically)."""
        if self._finished:
            raise ValueError("finish() was already called")
        splits = {s: self._buffers[s].finish() for s in SPLITS}
        self._finished = True
        write_classes(self.out_dir, self.num_classes, self._key_of, self._train_counts_C)
        info = DatasetInfo(self.kind, self.input_shape, self.num_classes, splits,
                           self._generator, sha256_file(self.out_dir / CLASSES_NAME),
                           self._lineage)
        write_dataset_info(self.out_dir, info)
        self.dataset_info = info
        return info

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._finished:
            self.finish()
