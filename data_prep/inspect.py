"""python -m data_prep.inspect DIR: validate a dataset completely and print a short summary.

Checks, in order, stopping at the first problem: the dataset.json schema, classes.tsv (header,
ids 0..C-1, unique keys), then for every shard of every split: it exists and opens as HDF5, its
/inputs shape and dtype and its sample counts agree with dataset.json, its sha256 matches, its
labels are in [0, C); finally the classes.tsv counts equal the train samples per class.
Exit code 0 when valid; otherwise one line "error: <file>: <problem>; <what to do>" on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.format import (CLASSES_NAME, DATASET_JSON, FORMAT_VERSION, LABELS_KEY, SPLITS,
                              DatasetError, DatasetInfo, check_labels, load_dataset_info,
                              open_shard, read_classes, sha256_file)


@dataclass(frozen=True)
class DatasetSummary:
    """What inspect found in a valid dataset; `train_counts_C` is int64 (C,)."""

    dataset_info: DatasetInfo
    size_bytes: int
    train_counts_C: np.ndarray

    def lines(self, dataset_dir: str | Path) -> list[str]:
        m, counts_C = self.dataset_info, self.train_counts_C
        splits = ", ".join(f"{name} {m.splits[name].num_samples} samples in "
                           f"{len(m.splits[name].shards)} shards" for name in SPLITS)
        return [
            f"{dataset_dir}: valid dataset (format {FORMAT_VERSION})",
            f"kind {m.kind}, input shape {list(m.input_shape)} {m.input_dtype}, "
            f"{m.num_classes} classes",
            f"{splits}, {self.size_bytes / 2**20:.1f} MiB on disk",
            f"train samples per class: min {counts_C.min()}, mean {counts_C.mean():.2f}, "
            f"max {counts_C.max()}",
        ]


def inspect_dataset(dataset_dir: str | Path, progress: bool = False) -> DatasetSummary:
    """Validates `dataset_dir` fully (see the module docstring); DatasetError on the first
    problem. Hashes and reads the labels of every shard, one shard in memory at a time."""
    from tqdm import tqdm

    dataset_dir = Path(dataset_dir)
    info = load_dataset_info(dataset_dir)
    keys, listed_counts_C = read_classes(dataset_dir, info.num_classes)
    train_counts_C = np.zeros(info.num_classes, dtype=np.int64)
    size = sum((dataset_dir / name).stat().st_size for name in (DATASET_JSON, CLASSES_NAME))
    shards = [(split, shard) for split in SPLITS for shard in info.splits[split].shards]
    for split, shard in tqdm(shards, unit="shard", desc="inspect", file=sys.stderr,
                             disable=not progress):
        path = dataset_dir / shard.path
        with open_shard(dataset_dir, info, shard) as h5:
            # Hash before reading labels: corrupt bytes are reported as such, not as odd labels.
            digest = sha256_file(path)
            if digest != shard.sha256:
                raise DatasetError(path, f"sha256 {digest[:16]}... does not match "
                                   f"{shard.sha256[:16]}... in dataset.json, the file is corrupt "
                                   "or was modified", "restore the file or regenerate the dataset")
            try:
                labels_n = h5[LABELS_KEY][:]
            except OSError as err:
                raise DatasetError(path, f"reading {LABELS_KEY} failed ({err})",
                                   "regenerate the dataset") from err
        check_labels(labels_n, info.num_classes, path)
        if split == "train":
            train_counts_C += np.bincount(labels_n, minlength=info.num_classes)
        size += path.stat().st_size
    wrong_C = np.flatnonzero(train_counts_C != listed_counts_C)
    if wrong_C.size:
        c = int(wrong_C[0])
        raise DatasetError(dataset_dir / CLASSES_NAME, f"class {c} ({keys[c]}) has count "
                           f"{listed_counts_C[c]} but the train shards hold {train_counts_C[c]} "
                           f"samples of it ({wrong_C.size} classes differ)",
                           "regenerate the dataset or rewrite classes.tsv from the shards")
    return DatasetSummary(info, size, train_counts_C)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description="Validate a dataset directory completely (schema, every shard, checksums, "
                    "labels, class counts) and print a summary. Exit code 0 if valid, 2 with a "
                    "one-line 'error: <file>: <problem>; <what to do>' otherwise.")
    parser.add_argument("dataset_dir", metavar="DIR", help="dataset directory")
    args = parser.parse_args(argv)
    try:
        summary = inspect_dataset(args.dataset_dir, progress=sys.stderr.isatty())
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines(args.dataset_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
