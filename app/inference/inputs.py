"""What `python -m app.predict --input PATH` reads, as numbered inputs read in slices:

  a folder of images     every file under it (recursively, sorted; names starting with '.'
                         left out), named by its path relative to the folder
  a manifest (.csv/.tsv) a header with a path column (`path`, `image` or `file`); relative paths
                         against the manifest's folder; named as the manifest writes them
  a dataset directory    (dataset.json) the samples of one split, named SPLIT/INDEX
  a file of inputs       .npy (N x d float vectors, or N x H x W x 3 uint8 images) or HDF5
                         (.h5/.hdf5, dataset /inputs), named by row number

Images are preprocessed exactly as data_prep.build_shards stored the training images
(data_prep.images.load_image at the model's image size). A file that cannot be decoded is
skipped with its reason; the others are predicted. Everything else that does not fit the model
(kind, dimension, image shape, an unreadable file) is a ValueError of one line naming it.
Legend: b = inputs of a slice, X = the per-input shape.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from data_prep.images import UnreadableImage, load_image

MANIFEST_SUFFIXES = (".csv", ".tsv")
ARRAY_SUFFIXES = (".npy", ".h5", ".hdf5")
PATH_COLUMNS = ("path", "image", "file")


class ImageFiles:
    """Image files, decoded and resized to the model's size when read."""

    kind = "images"

    def __init__(self, paths: list[str], names: list[str], size: int):
        self.paths, self.names, self.size = paths, names, size

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """(images_bHW3 uint8 of the readable files, their names, (name, reason) skipped)."""
        images, names, skipped = [], [], []
        for path, name in zip(self.paths[lo:hi], self.names[lo:hi]):
            try:
                images.append(load_image(path, self.size))
                names.append(name)
            except UnreadableImage as exc:
                skipped.append((name, str(exc)))
        shape = (0, self.size, self.size, 3)
        return (np.stack(images) if images else np.empty(shape, np.uint8)), names, skipped


class ArrayRows:
    """Rows of an array (a .npy memory map, an HDF5 dataset, a dataset's split)."""

    def __init__(self, path: Path, rows, names: list[str], kind: str):
        self.path, self.rows, self.names, self.kind = path, rows, names, kind

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        x = np.asarray(self.rows[lo:hi])
        if x.dtype != np.uint8 and not np.isfinite(x).all():
            bad = lo + int(np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))[0][0])
            raise ValueError(f"{self.path}: input {self.names[bad]} holds a NaN or infinite "
                             f"value; fix or remove it")
        return x, self.names[lo:hi], []


class SplitRows:
    """The samples of one split of a dataset directory, read shard by shard."""

    def __init__(self, directory: Path, split: str):
        from data_prep.format import load_dataset_info  # noqa: PLC0415

        info = load_dataset_info(directory)
        if split not in info.splits or info.splits[split].num_samples == 0:
            raise ValueError(f"{directory / 'dataset.json'}: no samples in split {split!r}; "
                             f"pass --split train or val")
        self.directory, self.info, self.split = directory, info, info.splits[split]
        self.offsets = self.split.offsets()
        self.kind = info.kind
        self.names = [f"{split}/{i}" for i in range(self.split.num_samples)]

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        from data_prep.format import open_shard  # noqa: PLC0415

        parts = []
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        for s in range(first, len(self.split.shards)):
            a, b = max(lo, int(self.offsets[s])), min(hi, int(self.offsets[s + 1]))
            if a >= b:
                break
            with open_shard(self.directory, self.info, self.split.shards[s]) as h5:
                parts.append(h5["inputs"][a - self.offsets[s]:b - self.offsets[s]])
        shape = (0, *self.info.input_shape)
        x = np.concatenate(parts) if parts else np.empty(shape, self.info.input_dtype)
        return x, self.names[lo:hi], []


def _list_folder(root: Path) -> tuple[list[str], list[str]]:
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(folder, f) for f in files if not f.startswith(".")]
    paths.sort()
    if not paths:
        raise ValueError(f"{root}: holds no files; pass a folder of images")
    return paths, [Path(p).relative_to(root).as_posix() for p in paths]


def _read_manifest(path: Path) -> tuple[list[str], list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot be read as a manifest ({exc})") from None
    header = [h.strip().lower() for h in (rows[0] if rows else [])]
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    if column is None:
        raise ValueError(f"{path}: the header names no path column "
                         f"({', '.join(PATH_COLUMNS)}); add one")
    names = [r[column] for r in rows[1:] if len(r) > column and r[column]]
    if not names:
        raise ValueError(f"{path}: lists no files")
    return [os.path.join(path.parent, n) for n in names], names


def _open_array(path: Path):
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    import h5py  # noqa: PLC0415

    try:
        return h5py.File(path, "r")["inputs"]
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: not an HDF5 file with a dataset /inputs ({exc})") from None


def _array_input(path: Path, manifest: dict) -> ArrayRows:
    rows = _open_array(path)
    shape, want = tuple(rows.shape[1:]), tuple(manifest["input"]["shape"])
    kind = "images" if rows.dtype == np.uint8 and len(shape) == 3 else "vectors"
    if kind != manifest["input"]["kind"] or shape != want:
        raise ValueError(f"{path}: inputs of shape {shape} ({rows.dtype}), but the model takes "
                         f"{manifest['input']['kind']} of shape {want}; pass inputs of that "
                         f"shape")
    if kind == "vectors" and not np.issubdtype(rows.dtype, np.floating):
        raise ValueError(f"{path}: {rows.dtype} vectors; the model takes float vectors")
    return ArrayRows(path, rows, [str(i) for i in range(rows.shape[0])], kind)


def open_inputs(path: str | os.PathLike, manifest: dict, split: str = "val"):
    """The inputs at `path` (module docstring), checked against the model's input kind/shape."""
    path = Path(path)
    model_kind, shape = manifest["input"]["kind"], tuple(manifest["input"]["shape"])
    if path.is_dir() and (path / "dataset.json").exists():
        source = SplitRows(path, split)
        if source.kind != model_kind or tuple(source.info.input_shape) != shape:
            raise ValueError(f"{path / 'dataset.json'}: {source.kind} of shape "
                             f"{list(source.info.input_shape)}, but the model takes "
                             f"{model_kind} of shape {list(shape)}")
        return source
    if path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES:
        if model_kind != "images":
            raise ValueError(f"{path}: image files, but the model takes vectors of dimension "
                             f"{shape[0]}; pass a .npy or .h5 file of vectors")
        paths, names = _list_folder(path) if path.is_dir() else _read_manifest(path)
        return ImageFiles(paths, names, int(shape[0]))
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return _array_input(path, manifest)
    raise ValueError(f"{path}: not an input predict reads (a folder of images, a .csv/.tsv "
                     f"manifest, a dataset directory, or a .npy/.h5 file of inputs)")
