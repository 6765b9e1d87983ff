"""The dataset directory format (DESIGN.md section 4): constants, manifest, writer and checks.

Layout of a dataset directory::

    dataset.json            manifest, written LAST (its presence means the dataset is complete)
    classes.tsv             header "id<TAB>key<TAB>count", one line per class id 0..C-1
    train/shard-00000.h5    /inputs  float32 n x d ("vectors") or uint8 n x H x W x 3 ("images")
    val/shard-00000.h5      /labels  int64 n, every label in [0, C)

Shapes in names: n = samples of one write or shard, C = classes, X = the per-sample input shape.

Every problem with a dataset on disk raises `DatasetError`, a `ValueError` whose message is one
line "<file>: <problem>; <what to do>", so the CLIs can print it as it is and exit with code 2.
The training reader (`data_prep.reader`) and the full validator (`data_prep.inspect`) share the
per-file checks below; only inspect hashes files, because hashing every shard at start-up would
make a big run wait minutes before its first step.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
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
class Manifest:
    """The parsed `dataset.json`. `generator` is free metadata of the tool that wrote it."""

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    splits: dict[str, SplitInfo]
    generator: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(INPUT_DTYPES[self.kind])

    def to_json(self) -> dict[str, Any]:
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
            "generator": self.generator,
        }

    @classmethod
    def from_json(cls, obj: Any, path: str | os.PathLike) -> "Manifest":
        """Checks the schema of a loaded dataset.json; raises DatasetError naming the key."""

        def fail(problem: str) -> DatasetError:
            return DatasetError(path, problem, f"fix the file or {_REGENERATE}")

        def count(value: Any, key: str, minimum: int) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise fail(f"'{key}' must be an integer >= {minimum}, got {value!r}")
            return value

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
        num_classes = count(obj["num_classes"], "num_classes", 1)
        if not isinstance(obj["splits"], dict) or sorted(obj["splits"]) != sorted(SPLITS):
            raise fail(f"'splits' must hold exactly {list(SPLITS)}")
        splits = {}
        for name in SPLITS:
            split = obj["splits"][name]
            if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
                raise fail(f"'splits.{name}' must hold 'num_samples' and a list 'shards'")
            shards = []
            for i, entry in enumerate(split["shards"]):
                key = f"splits.{name}.shards[{i}]"
                if not isinstance(entry, dict) or entry.get("path") != shard_path(name, i):
                    raise fail(f"'{key}.path' must be {shard_path(name, i)!r}")
                digest = entry.get("sha256")
                if not (isinstance(digest, str) and len(digest) == 64
                        and all(c in "0123456789abcdef" for c in digest)):
                    raise fail(f"'{key}.sha256' must be 64 lowercase hex digits")
                shards.append(ShardInfo(entry["path"],
                                        count(entry.get("num_samples"), f"{key}.num_samples", 1),
                                        digest))
            total = count(split.get("num_samples"), f"splits.{name}.num_samples", 0)
            if total != sum(s.num_samples for s in shards):
                raise fail(f"'splits.{name}.num_samples' is {total} but its shards hold "
                           f"{sum(s.num_samples for s in shards)}")
            splits[name] = SplitInfo(total, tuple(shards))
        generator = obj.get("generator", {})
        if not isinstance(generator, dict):
            raise fail("'generator' must be a JSON object")
        return cls(kind, tuple(shape), num_classes, splits, generator)


def load_manifest(dataset_dir: str | os.PathLike) -> Manifest:
    """Reads and checks `dataset_dir/dataset.json`; DatasetError if missing or malformed."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        what = "is not a directory" if not Path(dataset_dir).is_dir() else "has no dataset.json"
        raise DatasetError(path, f"missing ({dataset_dir} {what})",
                           "pass the directory of a complete dataset (one written by python -m "
                           "data_prep.synthetic or data_prep.build_shards)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(path, f"cannot be read as JSON ({err})", _REGENERATE) from err
    return Manifest.from_json(obj, path)


def open_shard(dataset_dir: str | os.PathLike, manifest: Manifest, shard: ShardInfo):
    """Opens one shard read-only after checking it against the manifest.

    Checks that the file exists and opens as HDF5 (h5py raises OSError for truncated or corrupt
    files), that /inputs has the manifest's per-sample shape and dtype, that /labels is int64 and
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
        check_shard_layout(h5, manifest, shard, path)
    except BaseException:
        h5.close()
        raise
    return h5


def check_shard_layout(h5, manifest: Manifest, shard: ShardInfo, path: Path) -> None:
    """Checks the datasets of an open shard against the manifest (see `open_shard`)."""
    fix = f"the shard does not belong to this dataset.json: {_REGENERATE}"
    for key in (INPUTS_KEY, LABELS_KEY):
        if key not in h5:
            raise DatasetError(path, f"has no {key} dataset", fix)
    inputs, labels = h5[INPUTS_KEY], h5[LABELS_KEY]
    if inputs.shape[1:] != manifest.input_shape or inputs.dtype != manifest.input_dtype:
        raise DatasetError(path, f"{INPUTS_KEY} is {inputs.dtype} {list(inputs.shape[1:])} per "
                           f"sample but dataset.json says {manifest.input_dtype} "
                           f"{list(manifest.input_shape)}", fix)
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
        raise DatasetError(path, "class keys are not unique", _REGENERATE)
    return keys, counts


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Writes a text file through `path.tmp` and os.replace, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


class DatasetWriter:
    """Streams labelled samples into a new dataset directory.

    Usage::

        with DatasetWriter(out_dir, "vectors", (128,), num_classes, class_keys) as writer:
            writer.write("train", inputs_nX, labels_n)   # any number of calls, any order of splits
            writer.write("val", inputs_nX, labels_n)
        # leaving the block normally calls finish(); after an exception nothing is finished

    Samples keep the order in which they are written; each split is cut into shards of
    `shard_size` samples (the last one shorter). A shard is buffered in memory and written in one
    go as contiguous, uncompressed HDF5 (the fastest layout for random reads). `finish()` writes
    the partial last shards, then classes.tsv (counts = train samples per class), then
    dataset.json last via `.tmp` + os.replace, so a dataset.json only exists for a complete
    dataset.

    `class_keys` is a sequence of C strings or a function of the class id (for very large C).
    `generator` is stored as the manifest's free metadata. The writer refuses a directory that
    already holds a dataset.json or shard files unless `overwrite=True`; then it removes
    dataset.json first and the old shards and classes.tsv, and leaves other files alone.
    """

    def __init__(self, out_dir: str | os.PathLike, kind: str, input_shape: Sequence[int],
                 num_classes: int, class_keys: Sequence[str] | Callable[[int], str],
                 shard_size: int | None = None, generator: dict[str, Any] | None = None,
                 overwrite: bool = False) -> None:
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
        self._buffers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
        self._buffered = {s: 0 for s in SPLITS}
        self._shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        self._train_counts_C = np.zeros(num_classes, dtype=np.int64)
        self._finished = False
        self.manifest: Manifest | None = None   # set by finish()
        self._prepare_directory(overwrite)

    def _prepare_directory(self, overwrite: bool) -> None:
        manifest = self.out_dir / MANIFEST_NAME
        old_shards = [p for s in SPLITS for p in sorted((self.out_dir / s).glob("shard-*.h5"))]
        if (manifest.exists() or old_shards) and not overwrite:
            what = "holds a dataset" if manifest.exists() else \
                f"holds shard files of an unfinished dataset ({old_shards[0]})"
            raise DatasetError(manifest if manifest.exists() else old_shards[0],
                               f"output directory {self.out_dir} {what}",
                               "choose another output directory or pass overwrite=True "
                               "(--overwrite) to replace it")
        # dataset.json goes first, so an interrupted overwrite never looks like a valid dataset.
        for path in [manifest, self.out_dir / CLASSES_NAME, *old_shards]:
            path.unlink(missing_ok=True)
        for split in SPLITS:
            (self.out_dir / split).mkdir(parents=True, exist_ok=True)

    def write(self, split: str, inputs_nX: np.ndarray, labels_n: np.ndarray) -> None:
        """Appends samples to `split`. inputs must have the dataset's dtype and per-sample shape
        (no silent casts); labels must be integers in [0, num_classes). The arrays are kept
        until their shard is written: do not modify them afterwards."""
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
        labels_n = labels_n.astype(np.int64, copy=False)
        if split == "train":
            self._train_counts_C += np.bincount(labels_n, minlength=self.num_classes)
        self._buffers[split].append((inputs_nX, labels_n))
        self._buffered[split] += len(labels_n)
        if self._buffered[split] >= self.shard_size:
            self._flush(split, last=False)

    def _flush(self, split: str, last: bool) -> None:
        """Writes the buffered samples of `split` as full shards, plus the partial rest if
        `last`; keeps the partial rest buffered otherwise."""
        import h5py

        inputs_nX = np.concatenate([x for x, _ in self._buffers[split]])
        labels_n = np.concatenate([y for _, y in self._buffers[split]])
        stop = len(labels_n) if last else len(labels_n) - len(labels_n) % self.shard_size
        for start in range(0, stop, self.shard_size):
            end = min(start + self.shard_size, stop)
            rel = shard_path(split, len(self._shards[split]))
            with h5py.File(self.out_dir / rel, "w") as h5:
                h5.create_dataset(INPUTS_KEY, data=inputs_nX[start:end])
                h5.create_dataset(LABELS_KEY, data=labels_n[start:end])
            self._shards[split].append(ShardInfo(rel, end - start,
                                                 sha256_file(self.out_dir / rel)))
        self._buffers[split] = [(inputs_nX[stop:], labels_n[stop:])] if stop < len(labels_n) else []
        self._buffered[split] = len(labels_n) - stop

    def finish(self) -> Manifest:
        """Writes the last shards, classes.tsv and dataset.json (last, atomically)."""
        if self._finished:
            raise ValueError("finish() was already called")
        for split in SPLITS:
            if self._buffered[split]:
                self._flush(split, last=True)
        self._finished = True

        def write_classes(f) -> None:
            f.write(CLASSES_HEADER + "\n")
            for start in range(0, self.num_classes, 65536):
                ids = range(start, min(start + 65536, self.num_classes))
                f.write("".join(f"{i}\t{self._checked_key(i)}\t{self._train_counts_C[i]}\n"
                                for i in ids))

        _write_atomic(self.out_dir / CLASSES_NAME, write_classes)
        manifest = Manifest(
            self.kind, self.input_shape, self.num_classes,
            {s: SplitInfo(sum(i.num_samples for i in self._shards[s]), tuple(self._shards[s]))
             for s in SPLITS},
            self._generator)
        _write_atomic(self.out_dir / MANIFEST_NAME,
                      lambda f: json.dump(manifest.to_json(), f, indent=1))
        self.manifest = manifest
        return manifest

    def _checked_key(self, class_id: int) -> str:
        key = str(self._key_of(class_id))
        if not key or any(c in key for c in "\t\n\r"):
            raise ValueError(f"class key {key!r} of class {class_id} is empty or holds a "
                             "tab or newline")
        return key

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._finished:
            self.finish()
