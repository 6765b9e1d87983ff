"""python -m data_prep.inspect DIR: validate a dataset completely and print a short summary.

Checks, in order: the dataset.json schema, classes.tsv (header, ids 0..C-1, unique keys), then
for every shard of every split: it exists and opens as HDF5, its /inputs shape and dtype and its
sample counts agree with dataset.json, its sha256 matches, its labels are in [0, C), and every
float input value is finite (no NaN, no infinity; uint8 images need no check); finally the
classes.tsv counts equal the train samples per class. Every problem but a non-finite value stops
the check at once; non-finite rows are counted over all shards and reported at the end with the
first one (shard, row in it, sample index in the split).

`--quick` (for big datasets) reads a sample instead of every byte: no sha256, and the values of
only the first and one random chunk of QUICK_CHUNK_BYTES of rows of every shard (the random
chunk is drawn from a generator seeded by the shard's position, so a rerun checks the same
rows). Schema, layout, counts and labels are checked in full either way.

The summary names the versions the dataset was grown from (dataset.json's lineage,
data_prep/lineage.py) and whether each is still at its recorded path; the sha256 of classes.tsv
is checked against dataset.json's `classes_sha256` (not with --quick).

Exit code 0 when valid; otherwise one line "error: <file>: <problem>; <what to do>" on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.format import (CLASSES_NAME, DATASET_JSON, FORMAT_VERSION, INPUTS_KEY, LABELS_KEY,
                              SPLITS, DatasetError, DatasetInfo, check_labels, load_dataset_info,
                              nonfinite_fix, nonfinite_problem, nonfinite_rows, open_shard,
                              read_classes, sha256_file)

# --quick: the values of the first and one random chunk of this many bytes of every shard.
QUICK_CHUNK_BYTES = 4 << 20
# The full value check reads a shard's inputs this many bytes at a time.
VALUE_BLOCK_BYTES = 64 << 20


@dataclass
class ValueCheck:
    """The float input rows checked so far and the non-finite ones found among them."""

    quick: bool
    checked: int = 0
    bad: int = 0
    bad_shards: int = 0
    first: DatasetError | None = None   # the first bad row found, named

    def shard(self, h5, path: Path, split: str, first_sample: int, position: int) -> None:
        """Checks the rows of one open shard (all, or the --quick sample)."""
        inputs = h5[INPUTS_KEY]
        if inputs.dtype.kind != "f" or inputs.shape[0] == 0:
            return
        n = inputs.shape[0]
        row_bytes = inputs.dtype.itemsize * int(np.prod(inputs.shape[1:]))
        size = max(1, (QUICK_CHUNK_BYTES if self.quick else VALUE_BLOCK_BYTES) // row_bytes)
        starts = list(range(0, n, size))
        if self.quick and len(starts) > 1:
            starts = [0, starts[int(np.random.default_rng([position]).integers(1, len(starts)))]]
        elif self.quick:
            starts = [0]
        bad_before = self.bad
        for lo in starts:
            try:
                block_nX = inputs[lo:min(lo + size, n)]
            except OSError as err:
                raise DatasetError(path, f"reading {INPUTS_KEY} failed ({err})",
                                   "regenerate the dataset") from err
            self.checked += len(block_nX)
            bad_n = nonfinite_rows(block_nX)
            if bad_n.size and self.first is None:
                row = lo + int(bad_n[0])
                where = f"(row in this shard; sample {first_sample + row} of the {split} split)"
                self.first = DatasetError(path, nonfinite_problem(block_nX, bad_n[:1], row,
                                                                  where),
                                          nonfinite_fix(path.parent.parent))
            self.bad += int(bad_n.size)
        self.bad_shards += self.bad > bad_before

    def raise_if_bad(self, total: int) -> None:
        """DatasetError naming the first bad row and counting all of them (`total`: the float
        rows of the dataset)."""
        if self.first is not None:
            first = self.first
            scope = f"the {self.checked} of {total} rows checked with --quick" if self.quick \
                else f"all {total} rows"
            raise DatasetError(first.path, f"{first.problem}, the first of {self.bad} "
                               f"non-finite rows in {self.bad_shards} shard(s) among {scope}",
                               first.fix)

    def line(self, total: int) -> str:
        if self.checked == 0 and total:
            return "values: uint8 inputs, nothing to check"
        if self.quick:
            return (f"values: {self.checked} of {total} input rows checked (--quick: the first "
                    f"and one random chunk of every shard), all finite; sha256 not checked")
        return f"values: all {total} input rows finite"


@dataclass(frozen=True)
class DatasetSummary:
    """What inspect found in a valid dataset; `train_counts_C` is int64 (C,)."""

    dataset_info: DatasetInfo
    size_bytes: int
    train_counts_C: np.ndarray
    extra_lines: list[str] = field(default_factory=list)

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
            *self.extra_lines,
        ]


def _check_hash(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise DatasetError(path, f"sha256 {digest[:16]}... does not match {expected[:16]}... in "
                           "dataset.json, the file is corrupt or was modified",
                           "restore the file or regenerate the dataset")


def inspect_dataset(dataset_dir: str | Path, progress: bool = False,
                    quick: bool = False) -> DatasetSummary:
    """Validates `dataset_dir` (see the module docstring; `quick` = --quick); DatasetError on
    the first problem, or after all shards for non-finite values. One shard's labels and one
    block of its inputs in memory at a time."""
    from tqdm import tqdm

    dataset_dir = Path(dataset_dir)
    info = load_dataset_info(dataset_dir)
    keys, listed_counts_C = read_classes(dataset_dir, info.num_classes)
    train_counts_C = np.zeros(info.num_classes, dtype=np.int64)
    size = sum((dataset_dir / name).stat().st_size for name in (DATASET_JSON, CLASSES_NAME))
    shards = [(split, shard, first) for split in SPLITS for shard, first in
              zip(info.splits[split].shards, info.splits[split].offsets())]
    values = ValueCheck(quick)
    for position, (split, shard, first) in enumerate(tqdm(
            shards, unit="shard", desc="inspect", file=sys.stderr, disable=not progress)):
        path = dataset_dir / shard.path
        with open_shard(dataset_dir, info, shard) as h5:
            # Hash before reading labels: corrupt bytes are reported as such, not as odd labels.
            if not quick:
                _check_hash(path, shard.sha256)
            try:
                labels_n = h5[LABELS_KEY][:]
            except OSError as err:
                raise DatasetError(path, f"reading {LABELS_KEY} failed ({err})",
                                   "regenerate the dataset") from err
            check_labels(labels_n, info.num_classes, path)
            values.shard(h5, path, split, int(first), position)
        if split == "train":
            train_counts_C += np.bincount(labels_n, minlength=info.num_classes)
        size += path.stat().st_size
    _check_counts(dataset_dir, keys, listed_counts_C, train_counts_C)
    if info.classes_sha256 and not quick:  # after the counts: a wrong count is named first
        _check_hash(dataset_dir / CLASSES_NAME, info.classes_sha256)
    total = sum(info.splits[s].num_samples for s in SPLITS)
    values.raise_if_bad(total)
    return DatasetSummary(info, size, train_counts_C, [values.line(total),
                                                       *lineage_lines(info)])


def lineage_lines(info: DatasetInfo) -> list[str]:
    """The summary lines of the versions `info` was grown from, parent first, each with
    whether that version is still at its recorded path."""
    from data_prep.lineage import ancestor_of

    lines = []
    for generation, entry in enumerate(info.lineage):
        try:
            there = ancestor_of(entry.path, verify=False).classes_sha256
            where = "present there" if there == entry.classes_sha256 else \
                "another version is there now"
        except DatasetError:
            where = "not found there"
        verb = "grown from" if generation == 0 else "  which grew from"
        lines.append(f"{'lineage: ' if generation == 0 else ''}{verb} {entry.path} "
                     f"({entry.num_classes} classes, classes.tsv sha256 "
                     f"{entry.classes_sha256[:12]}..., {where})")
    return lines or ["lineage: none (not grown from another version)"]


def _check_counts(dataset_dir: Path, keys: list[str], listed_counts_C: np.ndarray,
                  train_counts_C: np.ndarray) -> None:
    wrong_C = np.flatnonzero(train_counts_C != listed_counts_C)
    if wrong_C.size:
        c = int(wrong_C[0])
        raise DatasetError(dataset_dir / CLASSES_NAME, f"class {c} ({keys[c]}) has count "
                           f"{listed_counts_C[c]} but the train shards hold {train_counts_C[c]} "
                           f"samples of it ({wrong_C.size} classes differ)",
                           "regenerate the dataset or rewrite classes.tsv from the shards")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description="Validate a dataset directory completely (schema, every shard, checksums, "
                    "labels, every float input value finite, class counts) and print a "
                    "summary. Non-finite values (NaN, infinity) are counted over all shards and "
                    "the first one is named (shard, row in it, sample index in the split). "
                    "Exit code 0 if valid, 2 with a one-line 'error: <file>: <problem>; <what "
                    "to do>' otherwise.")
    parser.add_argument("dataset_dir", metavar="DIR", help="dataset directory")
    parser.add_argument("--quick", action="store_true",
                        help="for big datasets: skip the sha256 of the shards and check the "
                             "values of a sample only, the first and one random chunk (4 MiB of "
                             "rows, the same on every run) of every shard; schema, layout, "
                             "counts and labels are still checked in full")
    args = parser.parse_args(argv)
    try:
        summary = inspect_dataset(args.dataset_dir, progress=sys.stderr.isatty(),
                                  quick=args.quick)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines(args.dataset_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
