"""The KNN graph file (docs/design.md "Contracts: KNN graph file"): the writer, collective over
the ranks, and `GraphFile`, the memory-mapped reader every rank of a training run uses.

HDF5 with `/neighbors` int32 C x K and `/similarity` float16 C x K, CONTIGUOUS layout (no chunks,
no filters) so that every rank memory-maps it; attributes `num_classes`, `k`, `metric`
("cosine"), `step`, `index`, `index_detail`, `recall_at_k`, `format_version`.

No parallel HDF5: rank 0 creates the file with both datasets allocated at their full size and
all attributes, closes it and broadcasts the datasets' byte offsets; then every rank writes its
row block as raw little-endian bytes at `offset + start * K * itemsize` (in parallel; a
contiguous dataset is exactly such a byte range, the same fact the memory-mapping reader relies
on), fsyncs, and once all ranks succeeded rank 0 renames the `.tmp` file to its name.

Legend: c = this rank's classes (rows), C = all classes, K = neighbours per class (column 0 = the
class itself).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from app.knn.ring import Layout
from common.files import publish, tmp_path
from mpi.agree import SetupError, agree, decide_on_root

if TYPE_CHECKING:
    from app.knn.search import LocalGraph

GRAPH_VERSION = 1
METRIC = "cosine"
# (name, little-endian dtype) of the datasets, in file order.
DATASETS = (("neighbors", "<i4"), ("similarity", "<f2"))
REQUIRED_ATTRS = ("num_classes", "k", "metric", "step", "index", "recall_at_k")


def write_graph(world, path, graph: LocalGraph, num_classes: int, k: int, step: int,
                recall: float) -> None:
    """Write the graph file at `path` (format in the module docstring). Collective: every rank
    passes its own rows; the file appears atomically (rank 0 renames `path.tmp`) once every
    rank's rows are on disk, and replaces an older file of that name. A failure on any rank
    (creating, writing or publishing the file) raises the same ValueError on every rank, and
    the `.tmp` file is removed."""
    path = Path(path)
    tmp = tmp_path(path)
    Layout(world, graph.start, graph.neighbors_ck.shape[0], num_classes)
    if graph.k != k:
        raise ValueError(f"write_graph: the graph has K={graph.k} columns but k={k}")
    attrs = {"num_classes": num_classes, "k": k, "metric": METRIC, "step": step,
             "index": graph.index, "index_detail": graph.detail, "recall_at_k": float(recall),
             "format_version": GRAPH_VERSION}
    offsets = decide_on_root(world, lambda: _create_file(tmp, num_classes, k, attrs))
    try:
        # Every rank learns of any rank's failure before the file is published.
        agree(world, lambda: _write_rows(tmp, graph, offsets, k, world.rank))
    except SetupError:
        if world.is_root:
            tmp.unlink(missing_ok=True)
        raise
    decide_on_root(world, lambda: _publish(path))  # also the closing barrier


def _create_file(tmp: Path, num_classes: int, k: int, attrs: dict) -> dict:
    """Rank 0: the HDF5 file with both datasets allocated contiguously at full size (not
    filled: every byte is written by some rank) and all attributes. Returns name -> offset."""
    import h5py  # noqa: PLC0415

    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        offsets = {}
        with h5py.File(tmp, "w") as f:
            for name, dtype in DATASETS:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                space = h5py.h5s.create_simple((num_classes, k))
                dset = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)),
                                       space, dcpl=dcpl)
                offsets[name] = int(dset.get_offset())
            f.attrs.update(attrs)
    except OSError as exc:
        raise ValueError(f"{tmp}: cannot create the graph file ({exc})") from None
    return offsets


def _write_rows(tmp: Path, graph: LocalGraph, offsets: dict, k: int, rank: int) -> None:
    """This rank's rows of both datasets, written in place at their byte ranges and fsynced."""
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for (name, dtype), rows in zip(DATASETS, (graph.neighbors_ck, graph.similarity_ck)):
                block = np.ascontiguousarray(rows, dtype=dtype)
                _pwrite_all(fd, block, offsets[name] + graph.start * k * block.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ValueError(f"{tmp}: rank {rank} cannot write its rows ({exc})") from None


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _publish(path: Path) -> None:
    """Rank 0: the complete file under its name."""
    try:
        publish(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot publish the graph ({exc.strerror})") from None


class GraphFile:
    """A graph file opened for reading: `/neighbors` (and `/similarity`) memory-mapped, so every
    rank of a job shares one copy in the page cache and reads only the rows it asks for. Not
    collective: each rank opens the file for itself."""

    def __init__(self, path: Path, neighbors_CK: np.ndarray, similarity_CK: np.ndarray,
                 attrs: dict):
        self.path, self.attrs = path, attrs
        self.neighbors_CK, self.similarity_CK = neighbors_CK, similarity_CK

    @property
    def num_classes(self) -> int:
        return self.neighbors_CK.shape[0]

    @property
    def k(self) -> int:
        return self.neighbors_CK.shape[1]

    @property
    def step(self) -> int:
        return int(self.attrs["step"])

    @property
    def index(self) -> str:
        return str(self.attrs["index"])

    @property
    def recall_at_k(self) -> float:
        return float(self.attrs["recall_at_k"])

    @classmethod
    def open(cls, path, num_classes: int) -> GraphFile:
        """Open and check a graph file written for `num_classes` classes. Raises a one-line
        ValueError naming the file if it is missing or unreadable, was written for another
        number of classes, or has datasets of the wrong dtype, shape or layout."""
        path = Path(path)
        attrs, maps = _read_header(path, num_classes)
        if attrs["metric"] != METRIC:
            raise ValueError(f"{path}: KNN graph metric {attrs['metric']!r}, expected {METRIC!r}")
        size = path.stat().st_size
        views = []
        for offset, dtype, shape in maps:
            if offset + int(np.prod(shape)) * np.dtype(dtype).itemsize > size:
                raise ValueError(f"{path}: truncated KNN graph file ({size} bytes)")
            views.append(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
        return cls(path, views[0], views[1], attrs)

    def rows(self, class_ids) -> np.ndarray:
        """(n, K) int32 neighbour rows of `class_ids` (column 0 = the class itself)."""
        ids = self._ids(class_ids)
        return np.asarray(self.neighbors_CK[ids], dtype=np.int32)

    def similarities(self, class_ids) -> np.ndarray:
        """(n, K) float32 cosines matching `rows(class_ids)`."""
        return np.asarray(self.similarity_CK[self._ids(class_ids)], dtype=np.float32)

    def _ids(self, class_ids) -> np.ndarray:
        if isinstance(class_ids, torch.Tensor):
            class_ids = class_ids.cpu().numpy()
        ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            bad = ids[(ids < 0) | (ids >= self.num_classes)][0]
            raise ValueError(f"{self.path}: class id {bad} outside [0, {self.num_classes})")
        return ids


def _read_header(path: Path, num_classes: int) -> tuple[dict, list]:
    """The attributes of a graph file and the (byte offset, dtype, shape) of its datasets, each
    checked; ValueError naming the file otherwise."""
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as f:
            attrs = {key: _plain(value) for key, value in f.attrs.items()}
            if "num_classes" in attrs and int(attrs["num_classes"]) != num_classes:
                raise ValueError(f"{path}: KNN graph written for {attrs['num_classes']} "
                                 f"classes but this run has {num_classes}; rebuild it "
                                 f"(python -m app.knn_graph)")
            missing = [a for a in REQUIRED_ATTRS if a not in attrs]
            if missing:
                raise ValueError(f"{path}: not a KNN graph file (attributes "
                                 f"{', '.join(missing)} missing)")
            maps = [_dataset_map(path, f, name, dtype, (num_classes, int(attrs["k"])))
                    for name, dtype in DATASETS]
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the KNN graph ({exc})") from None
    return attrs, maps


def _plain(value):
    """HDF5 attribute as a plain Python value (bytes -> str, numpy scalars -> int/float)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _dataset_map(path: Path, f, name: str, dtype: str, shape: tuple) -> tuple[int, str, tuple]:
    """(byte offset, dtype, shape) of a dataset that can be memory-mapped, or ValueError."""
    import h5py  # noqa: PLC0415

    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise ValueError(f"{path}: KNN graph dataset /{name} missing")
    dset = f[name]
    if dset.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: /{name} has dtype {dset.dtype}, expected {np.dtype(dtype)}")
    if dset.shape != shape:
        raise ValueError(f"{path}: /{name} has shape {dset.shape}, expected {shape} "
                         f"(num_classes x k)")
    offset = dset.id.get_offset()
    if dset.chunks is not None or offset is None:
        raise ValueError(f"{path}: /{name} is not stored contiguously (chunked, compressed or "
                         f"never written); it cannot be memory-mapped")
    return int(offset), dtype, shape
