"""The dataset directory format (docs/design.md, "Contracts: Dataset directory"): constants, the
parsed dataset.json (`DatasetInfo`), reading and writing its files, and the per-file checks.

Layout of a dataset directory::

    dataset.json            DatasetInfo, written LAST (its presence means the dataset is complete);
                            with the sha256 of classes.tsv and, in a grown version, its lineage
    classes.tsv             header "id<TAB>key<TAB>count", one line per class id 0..C-1
    train/shard-00000.h5    /inputs  float32 n x d ("vectors") or uint8 n x H x W x 3 ("images")
    val/shard-00000.h5      /labels  int64 n, every label in [0, C)

Shapes in names: n = samples of one write or shard, C = classes, X = the per-sample input shape.

Every problem with a dataset on disk raises `DatasetError`, a `ValueError` whose message is one
line "<file>: <problem>; <what to do>", so the CLIs can print it as it is and exit with code 2.
The training reader (`data_prep.reader`) and the full validator (`data_prep.inspect`) share the
per-file checks below; only inspect hashes files, because hashing every shard at start-up would
make a big run wait minutes before its first step. The writers (`data_prep.writer.DatasetWriter`
and `data_prep.build_shards`) share `write_classes`, `write_dataset_info` and `clear_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.files import atomic_path, write_json_atomic

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
CLASSES_NAME = "classes.tsv"
CLASSES_HEADER = "id\tkey\tcount"
SPLITS = ("train", "val")
INPUT_DTYPES = {"vectors": "float32", "images": "uint8"}
INPUTS_KEY = "/inputs"
LABELS_KEY = "/labels"
# A shard holds this many bytes of inputs unless the writer is told a sample count: big enough
# that per-file overhead is negligible, small enough to buffer one shard per split in memory.
DEFAULT_SHARD_BYTES = 64 << 20
_REGENERATE = "regenerate the dataset (python -m data_prep.synthetic or data_prep.build_shards)"


class DatasetError(ValueError):
    """A dataset on disk is missing, corrupt or inconsistent.

    The message is one line, "<file>: <problem>; <what to do>"; `path`, `problem` and `fix` keep
    the parts for callers that want them.
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = str(path), problem, fix
        message = f"{self.path}: {problem}; {fix}"
        super().__init__(message.replace("\r", " ").replace("\n", " "))


def shard_path(split: str, index: int) -> str:
    """Relative path of shard `index` of `split`, e.g. "train/shard-00000.h5"."""
    return f"{split}/shard-{index:05d}.h5"


def input_shape_error(kind: str, input_shape: Sequence[int]) -> str | None:
    """Why `input_shape` is not valid for `kind`, or None when it is."""
    if kind not in INPUT_DTYPES:
        return f"kind must be one of {sorted(INPUT_DTYPES)}, got {kind!r}"
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
        return f"input_shape must be positive integers, got {list(input_shape)}"
    if kind == "vectors" and len(input_shape) != 1:
        return f"vectors need input_shape [d], got {list(input_shape)}"
    if kind == "images" and (len(input_shape) != 3 or input_shape[2] != 3):
        return f"images need input_shape [H, W, 3], got {list(input_shape)}"
    return None


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: `path` relative to the dataset directory, its sample count and sha256."""

    path: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split: its total sample count and its shards in sample order."""

    num_samples: int
    shards: tuple[ShardInfo, ...]

    def offsets(self) -> np.ndarray:
        """int64 array (num_shards + 1,): global index of each shard's first sample, then N."""
        return np.cumsum([0] + [s.num_samples for s in self.shards], dtype=np.int64)


@dataclass(frozen=True)
class Ancestor:
    """An earlier version of a dataset, as a grown dataset's `lineage` records it: `path` where
    it was (absolute; informational, datasets move), `classes_sha256` (the sha256 of its
    classes.tsv: what identifies it) and `num_classes` (its ids 0..num_classes-1 are the same
    classes, by key, in the descendant). See data_prep/lineage.py."""

    path: str
    classes_sha256: str
    num_classes: int


@dataclass(frozen=True)
class DatasetInfo:
    """The parsed `dataset.json`. `generator` is free metadata of the tool that wrote it;
    `classes_sha256` the sha256 of classes.tsv (None in datasets written before it existed);
    `lineage` the versions it was grown from, its parent first (empty when not grown)."""

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    splits: dict[str, SplitInfo]
    generator: dict[str, Any] = field(default_factory=dict)
    classes_sha256: str | None = None
    lineage: tuple[Ancestor, ...] = ()

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(INPUT_DTYPES[self.kind])

    def to_json(self) -> dict[str, Any]:
        # Optional keys, written when set: datasets written before they existed lack them.
        optional = {"classes_sha256": self.classes_sha256} if self.classes_sha256 else {}
        if self.lineage:
            optional["lineage"] = [vars(a) for a in self.lineage]
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "input_dtype": str(self.input_dtype),
            "num_classes": self.num_classes,
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "shards": [vars(s) for s in split.shards],
                }
                for name, split in self.splits.items()
            },
            **optional,
            "generator": self.generator,
        }

    @classmethod
    def from_json(cls, obj: Any, path: str | os.PathLike) -> "DatasetInfo":
        """Checks the schema of a loaded dataset.json; raises DatasetError naming the key."""

        def fail(problem: str) -> DatasetError:
            return DatasetError(path, problem, f"fix the file or {_REGENERATE}")

        if not isinstance(obj, dict):
            raise fail("top level must be a JSON object")
        missing = [k for k in ("format_version", "kind", "input_shape", "input_dtype",
                               "num_classes", "splits") if k not in obj]
        if missing:
            raise fail(f"missing key(s) {missing}")
        if obj["format_version"] != FORMAT_VERSION:
            raise fail(f"format_version {obj['format_version']!r} is not supported "
                       f"(this code reads version {FORMAT_VERSION})")
        kind, shape = obj["kind"], obj["input_shape"]
        problem = input_shape_error(kind, shape) if isinstance(shape, list) else \
            f"input_shape must be a list, got {shape!r}"
        if problem:
            raise fail(problem)
        if obj["input_dtype"] != INPUT_DTYPES[kind]:
            raise fail(f"input_dtype of {kind} must be {INPUT_DTYPES[kind]}, "
                       f"got {obj['input_dtype']!r}")
        num_classes = _count(obj["num_classes"], "num_classes", 1, fail)
        if not isinstance(obj["splits"], dict) or sorted(obj["splits"]) != sorted(SPLITS):
            raise fail(f"'splits' must hold exactly {list(SPLITS)}")
        splits = {name: _split_from_json(obj["splits"][name], name, fail) for name in SPLITS}
        generator = obj.get("generator", {})
        if not isinstance(generator, dict):
            raise fail("'generator' must be a JSON object")
        classes_sha256 = obj.get("classes_sha256")
        if classes_sha256 is not None and not is_sha256(classes_sha256):
            raise fail("'classes_sha256' must be 64 lowercase hex digits")
        return cls(kind, tuple(shape), num_classes, splits, generator, classes_sha256,
                   _lineage_from_json(obj.get("lineage", []), num_classes, fail))


def is_sha256(value: Any) -> bool:
    """Whether `value` is a hex sha256 digest as the format writes it (64 lowercase digits)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef"
                                                               for c in value)


def _lineage_from_json(lineage: Any, num_classes: int,
                       fail: Callable[[str], DatasetError]) -> tuple[Ancestor, ...]:
    """The checked `lineage` list: ancestors parent first, each with a path, a classes.tsv
    sha256 and a class count that never grows towards older versions."""
    if not isinstance(lineage, list):
        raise fail("'lineage' must be a list")
    ancestors, limit = [], num_classes
    for i, entry in enumerate(lineage):
        key = f"lineage[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise fail(f"'{key}' must hold 'path', 'classes_sha256' and 'num_classes'")
        if not is_sha256(entry.get("classes_sha256")):
            raise fail(f"'{key}.classes_sha256' must be 64 lowercase hex digits")
        count = _count(entry.get("num_classes"), f"{key}.num_classes", 1, fail)
        if count > limit:
            raise fail(f"'{key}.num_classes' is {count}, more than the {limit} classes of the "
                       "version grown from it")
        ancestors.append(Ancestor(entry["path"], entry["classes_sha256"], count))
        limit = count
    return tuple(ancestors)


def _count(value: Any, key: str, minimum: int, fail: Callable[[str], DatasetError]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise fail(f"'{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _split_from_json(split: Any, name: str, fail: Callable[[str], DatasetError]) -> SplitInfo:
    """The checked `splits.<name>` entry of dataset.json (see DatasetInfo.from_json)."""
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        raise fail(f"'splits.{name}' must hold 'num_samples' and a list 'shards'")
    shards = []
    for i, entry in enumerate(split["shards"]):
        key = f"splits.{name}.shards[{i}]"
        if not isinstance(entry, dict) or entry.get("path") != shard_path(name, i):
            raise fail(f"'{key}.path' must be {shard_path(name, i)!r}")
        digest = entry.get("sha256")
        if not is_sha256(digest):
            raise fail(f"'{key}.sha256' must be 64 lowercase hex digits")
        shards.append(ShardInfo(entry["path"],
                                _count(entry.get("num_samples"), f"{key}.num_samples", 1, fail),
                                digest))
    total = _count(split.get("num_samples"), f"splits.{name}.num_samples", 0, fail)
    if total != sum(s.num_samples for s in shards):
        raise fail(f"'splits.{name}.num_samples' is {total} but its shards hold "
                   f"{sum(s.num_samples for s in shards)}")
    return SplitInfo(total, tuple(shards))


def load_dataset_info(dataset_dir: str | os.PathLike) -> DatasetInfo:
    """Reads and checks `dataset_dir/dataset.json`; DatasetError if missing or malformed."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        what = "is not a directory" if not Path(dataset_dir).is_dir() else "has no dataset.json"
        raise DatasetError(path, f"missing ({dataset_dir} {what})",
                           "pass the directory of a complete dataset (one written by python -m "
                           "data_prep.synthetic or data_prep.build_shards)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(path, f"cannot be read as JSON ({err})", _REGENERATE) from err
    return DatasetInfo.from_json(obj, path)


def write_dataset_info(dataset_dir: str | os.PathLike, info: DatasetInfo) -> None:
    """Writes `dataset_dir/dataset.json` atomically. Writers call it LAST: its presence means
    the dataset is complete."""
    write_json_atomic(Path(dataset_dir) / DATASET_JSON, info.to_json(), indent=1)


def open_shard(dataset_dir: str | os.PathLike, info: DatasetInfo, shard: ShardInfo):
    """Opens one shard read-only after checking it against dataset.json (`info`).

    Checks that the file exists and opens as HDF5 (h5py raises OSError for truncated or corrupt
    files), that /inputs has dataset.json's per-sample shape and dtype, that /labels is int64 and
    that both hold `shard.num_samples` rows. Does not read the data or hash the file.
    Returns the open `h5py.File`; the caller closes it. Raises DatasetError naming the file.
    """
    import h5py

    path = Path(dataset_dir) / shard.path
    if not path.is_file():
        raise DatasetError(path, "shard listed in dataset.json is missing",
                           f"restore the file or {_REGENERATE}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(path, f"cannot be opened as HDF5, the file is truncated or corrupt "
                           f"({err})", f"restore the file or {_REGENERATE}") from err
    try:
        check_shard_layout(h5, info, shard, path)
    except BaseException:
        h5.close()
        raise
    return h5


def check_shard_layout(h5, info: DatasetInfo, shard: ShardInfo, path: Path) -> None:
    """Checks the datasets of an open shard against dataset.json (see `open_shard`)."""
    fix = f"the shard does not belong to this dataset.json: {_REGENERATE}"
    for key in (INPUTS_KEY, LABELS_KEY):
        if key not in h5:
            raise DatasetError(path, f"has no {key} dataset", fix)
    inputs, labels = h5[INPUTS_KEY], h5[LABELS_KEY]
    if inputs.shape[1:] != info.input_shape or inputs.dtype != info.input_dtype:
        raise DatasetError(path, f"{INPUTS_KEY} is {inputs.dtype} {list(inputs.shape[1:])} per "
                           f"sample but dataset.json says {info.input_dtype} "
                           f"{list(info.input_shape)}", fix)
    if labels.ndim != 1 or labels.dtype != np.int64:
        raise DatasetError(path, f"{LABELS_KEY} must be int64 with one dimension, got "
                           f"{labels.dtype} {list(labels.shape)}", fix)
    if not inputs.shape[0] == labels.shape[0] == shard.num_samples:
        raise DatasetError(path, f"holds {inputs.shape[0]} inputs and {labels.shape[0]} labels "
                           f"but dataset.json says {shard.num_samples} samples", fix)


def check_labels(labels_n: np.ndarray, num_classes: int, path: str | os.PathLike,
                 rows_n: np.ndarray | None = None) -> None:
    """DatasetError naming the first label outside [0, num_classes) and its row in the file;
    `rows_n` gives the file row of each label when they are not rows 0..n-1."""
    bad_n = (labels_n < 0) | (labels_n >= num_classes)
    if bad_n.any():
        i = int(np.flatnonzero(bad_n)[0])
        row = i if rows_n is None else int(rows_n[i])
        raise DatasetError(path, f"label {int(labels_n[i])} at row {row} is outside "
                           f"[0, {num_classes})", _REGENERATE)


def nonfinite_rows(inputs_nX: np.ndarray) -> np.ndarray:
    """int64 indices of the rows of `inputs_nX` that hold a NaN or an infinity; empty when every
    value is finite or the inputs are integers (uint8 images cannot hold either). One vectorised
    pass (np.isfinite) when all is well; the per-row search only runs on a bad array."""
    inputs_nX = np.asarray(inputs_nX)
    if inputs_nX.dtype.kind != "f" or np.isfinite(inputs_nX).all():
        return np.empty(0, dtype=np.int64)
    finite_n = np.isfinite(inputs_nX.reshape(len(inputs_nX), -1)).all(axis=1)
    return np.flatnonzero(~finite_n).astype(np.int64)


def nonfinite_problem(inputs_nX: np.ndarray, bad_n: np.ndarray, row: int, where: str) -> str:
    """The problem part of the message for the first bad row `bad_n[0]` of `inputs_nX`, which
    is `row` of its file: "input row R <where> holds a non-finite value (nan)", plus how many
    of the rows checked with it are bad when there are several."""
    values = np.asarray(inputs_nX[bad_n[0]]).ravel()
    value = values[~np.isfinite(values)][0]
    also = f" ({len(bad_n)} of the {len(inputs_nX)} rows checked with it are non-finite)" \
        if len(bad_n) > 1 else ""
    return f"input row {row} {where} holds a non-finite value ({value}){also}"


def nonfinite_fix(dataset_dir: str | os.PathLike) -> str:
    return (f"rebuild the shard or drop the row (python -m data_prep.inspect {dataset_dir} "
            f"counts every bad row)")


def check_finite(inputs_nX: np.ndarray, path: str | os.PathLike, split: str, first_sample: int,
                 rows_n: np.ndarray | None = None) -> None:
    """DatasetError naming the first input row of `inputs_nX` with a NaN or an infinity: its row
    in the shard file `path` (`rows_n[i]`, or i when the inputs are the file's rows 0..n-1) and
    its global sample index in `split` (`first_sample` = the split index of the shard's row 0).
    Integer inputs pass unchecked."""
    bad_n = nonfinite_rows(inputs_nX)
    if bad_n.size:
        row = int(bad_n[0]) if rows_n is None else int(rows_n[bad_n[0]])
        where = f"(row in this shard; sample {first_sample + row} of the {split} split)"
        raise DatasetError(path, nonfinite_problem(inputs_nX, bad_n, row, where),
                           nonfinite_fix(Path(path).parent.parent))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_classes(dataset_dir: str | os.PathLike, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Reads classes.tsv: (keys by class id, int64 train counts (C,)); DatasetError if the file
    is missing, has a bad header, or does not list ids 0..C-1 in order with unique keys."""
    path = Path(dataset_dir) / CLASSES_NAME
    if not path.is_file():
        raise DatasetError(path, "missing", _REGENERATE)
    keys, counts = [], np.zeros(num_classes, dtype=np.int64)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n")
        if header != CLASSES_HEADER:
            raise DatasetError(path, f"header must be {CLASSES_HEADER!r}, got {header!r}",
                               _REGENERATE)
        for line_no, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            class_id = len(keys)
            if (len(fields) != 3 or fields[0] != str(class_id) or not fields[1]
                    or not fields[2].isdigit() or class_id >= num_classes):
                raise DatasetError(path, f"line {line_no} must be '{class_id}<TAB>key<TAB>count' "
                                   f"for a class id below {num_classes}, got {line.strip()!r}",
                                   _REGENERATE)
            keys.append(fields[1])
            counts[class_id] = int(fields[2])
    if len(keys) != num_classes:
        raise DatasetError(path, f"lists {len(keys)} classes but dataset.json says {num_classes}",
                           _REGENERATE)
    if len(set(keys)) != num_classes:
        first = {}
        dup = next(i for i, key in enumerate(keys) if first.setdefault(key, i) != i)
        raise DatasetError(path, f"class keys are not unique: {keys[dup]!r} is class "
                           f"{first[keys[dup]]} and class {dup}", _REGENERATE)
    return keys, counts


def write_classes(dataset_dir: str | os.PathLike, num_classes: int, key_of: Callable[[int], str],
                  counts_C: np.ndarray) -> None:
    """Writes classes.tsv atomically, streamed in blocks of classes (C may be 10^8): the header,
    then "id<TAB>key<TAB>count" for ids 0..C-1. ValueError if a key is empty or holds a tab or
    newline (the file would not parse back)."""
    with atomic_path(Path(dataset_dir) / CLASSES_NAME) as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        f.write(CLASSES_HEADER + "\n")
        for start in range(0, num_classes, 65536):
            ids = range(start, min(start + 65536, num_classes))
            f.write("".join(f"{i}\t{_checked_key(key_of, i)}\t{counts_C[i]}\n" for i in ids))


def _checked_key(key_of: Callable[[int], str], class_id: int) -> str:
    key = str(key_of(class_id))
    if not key or any(c in key for c in "\t\n\r"):
        raise ValueError(f"class key {key!r} of class {class_id} is empty or holds a "
                         "tab or newline")
    return key


def existing_shards(dataset_dir: str | os.PathLike) -> list[Path]:
    """The shard files in `dataset_dir`'s split folders (of a dataset or an unfinished one)."""
    return [p for s in SPLITS for p in sorted((Path(dataset_dir) / s).glob("shard-*.h5"))]


def clear_dataset(dataset_dir: str | os.PathLike, *others: Path) -> None:
    """Removes a dataset's files (dataset.json FIRST, so an interrupted removal never looks like
    a valid dataset, then classes.tsv, `others` and the shards) and makes the empty split
    folders. Other files are left alone."""
    dataset_dir = Path(dataset_dir)
    shards = existing_shards(dataset_dir)
    for path in [dataset_dir / DATASET_JSON, dataset_dir / CLASSES_NAME, *others, *shards]:
        path.unlink(missing_ok=True)
    for split in SPLITS:
        (dataset_dir / split).mkdir(parents=True, exist_ok=True)
