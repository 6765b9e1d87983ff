"""The input of data_prep.build_shards: which image files there are, their classes, and the
train/val split with the sample order, all decided before any image is decoded.

Input is a folder with one sub-folder per class (class key = sub-folder name, its images found
recursively) or a CSV/TSV manifest with a header naming a path column (`path`, `image` or `file`)
and a class column (`class`, `label` or `key`); relative paths are resolved against the
manifest's folder. Class ids are the class keys in sorted order, 0..C-1. Names starting with '.'
are ignored in a folder; a file directly in the folder is reported as skipped.

The split is decided per class from the listed files: the files of a class are ordered by a
hash of (seed, name), where name is the path relative to the folder or as the manifest writes
it, and the first round(n x val_fraction) go to val (never all n). Within a split, samples are
ordered by the same hash, so shards mix classes. So the split and order depend on the names,
the seed and the fraction only: not on listing order, number of ranks or mount point.

Every problem with the input raises DatasetError naming it. Shapes in names: m listed files,
C classes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from data_prep.format import DatasetError

PATH_COLUMNS = ("path", "image", "file")
CLASS_COLUMNS = ("class", "label", "key")


@dataclass
class Listing:
    """The input's files, sorted by name. File i is opened at os.path.join(base, names[i]) and
    belongs to class labels_m[i]; `skipped` holds (path, reason) of files left out while listing."""

    source: str
    base: str
    names: list[str]
    labels_m: np.ndarray
    class_keys: list[str]
    from_manifest: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def path(self, i: int) -> str:
        return os.path.join(self.base, self.names[i])

    def with_class_keys(self, class_keys: list[str]) -> "Listing":
        """This listing with the class ids of `class_keys` (keys by id; it holds every key of
        this listing and may hold more, classes without files; kept, not copied). The split and
        the digest depend on the keys, not the ids, so they do not change."""
        index = {key: i for i, key in enumerate(class_keys)}
        remap_c = np.fromiter((index[key] for key in self.class_keys), np.int64,
                              len(self.class_keys))
        return replace(self, labels_m=remap_c[self.labels_m], class_keys=class_keys)

    def digest(self) -> str:
        """sha256 of the (name, class key) list: what the build fingerprint records of the input."""
        digest = hashlib.sha256()
        for name, label in zip(self.names, self.labels_m.tolist()):
            digest.update(f"{name}\t{self.class_keys[label]}\n".encode())
        return digest.hexdigest()


def _check_key(key: str, source: str | Path) -> None:
    if any(c in key for c in "\t\n\r"):
        raise DatasetError(source, f"class key {key!r} holds a tab or newline",
                           "rename the class (classes.tsv is tab-separated)")


def list_folder(root: Path, exclude: Path | None = None) -> Listing:
    """Class sub-folders of `root` (sorted) and the files under each, found recursively;
    the folder `exclude` (the output, when it lies inside the input) is left out."""

    def keep(folder: Path, name: str) -> bool:
        return not name.startswith(".") and (exclude is None or name != exclude.name or
                                             (folder / name).resolve() != exclude)

    entries = sorted(e for e in os.listdir(root) if keep(root, e))
    class_keys = [e for e in entries if (root / e).is_dir()]
    skipped = [(str(root / e), "not inside a class sub-folder") for e in entries
               if (root / e).is_file()]
    fix = f"put each class's images in a sub-folder named by its class key ({root}/KEY/IMAGE.jpg)"
    if not class_keys:
        raise DatasetError(root, "holds no class sub-folders" +
                           (f" (only {len(skipped)} files)" if skipped else " (it is empty)"), fix)
    names, labels = [], []
    for label, key in enumerate(class_keys):
        _check_key(key, root / key)
        for folder, dirs, files in os.walk(root / key, followlinks=True):
            dirs[:] = sorted(d for d in dirs if keep(Path(folder), d))
            rel = Path(folder).relative_to(root)
            for name in sorted(f for f in files if not f.startswith(".")):
                names.append((rel / name).as_posix())
                labels.append(label)
    if not names:
        raise DatasetError(root, f"its {len(class_keys)} class sub-folders hold no files", fix)
    order = sorted(range(len(names)), key=names.__getitem__)  # os.walk lists files before dirs
    return Listing(str(root), str(root), [names[i] for i in order],
                   np.asarray(labels, np.int64)[order], class_keys, False, skipped)


def _delimiter(path: Path, sample: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return ","
    if suffix in (".tsv", ".tab"):
        return "\t"
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error as err:
        raise DatasetError(path, "cannot tell whether it is comma- or tab-separated",
                           "name it .csv or .tsv") from err


def _find_column(header: list[str], given: str | None, defaults: tuple[str, ...]) -> int | None:
    """Index of the column named `given` (exact, then any case) or of the first default name."""
    folded = [h.strip().lower() for h in header]
    if given is not None:
        if given in header:
            return header.index(given)
        return folded.index(given.lower()) if given.lower() in folded else None
    return next((folded.index(name) for name in defaults if name in folded), None)


def read_manifest(path: Path, path_column: str | None, class_column: str | None) -> Listing:
    """The (path, class key) rows of a CSV/TSV manifest with a header line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            delimiter = _delimiter(path, f.read(65536))
            f.seek(0)
            rows = list(csv.reader(f, delimiter=delimiter))
    except UnicodeDecodeError as err:
        raise DatasetError(path, f"is not UTF-8 text ({err.reason} at byte {err.start})",
                           "pass an image folder or a CSV/TSV manifest") from err
    except csv.Error as err:
        raise DatasetError(path, f"is not valid CSV/TSV ({err})", "fix the file") from err
    if not rows:
        raise DatasetError(path, "is empty", "write a header line, e.g. 'path,class', then one "
                           "line per image")
    header = [h.strip() for h in rows[0]]
    columns = {}
    for what, given, defaults, flag in (("path", path_column, PATH_COLUMNS, "--path-column"),
                                        ("class", class_column, CLASS_COLUMNS, "--class-column")):
        index = _find_column(header, given, defaults)
        if index is None:
            wanted = f"'{given}'" if given else f"{', '.join(defaults[:-1])} or {defaults[-1]}"
            raise DatasetError(path, f"has no {what} column named {wanted} (its columns: "
                               f"{', '.join(header) or 'none'})",
                               f"pass {flag} with one of its columns" if given else
                               f"name that column {defaults[0]}, or pass {flag} NAME")
        columns[what] = index
    return _manifest_listing(path, rows, columns["path"], columns["class"])


def _manifest_listing(path: Path, rows: list[list[str]], path_col: int,
                      class_col: int) -> Listing:
    pairs, seen = [], {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(path_col, class_col):
            raise DatasetError(path, f"line {line_no} has {len(row)} fields, the header "
                               f"{len(rows[0])}", "give every line a path and a class")
        name, key = row[path_col].strip(), row[class_col].strip()
        if not name or not key:
            empty = "path" if not name else "class"
            raise DatasetError(path, f"line {line_no} has an empty {empty}",
                               "give every line a path and a class")
        if name in seen:
            raise DatasetError(path, f"line {line_no} lists {name!r} again (first on line "
                               f"{seen[name]})", "list each image once")
        seen[name] = line_no
        pairs.append((name, key))
    if not pairs:
        raise DatasetError(path, "lists no images", "add one line per image below the header")
    pairs.sort()
    class_keys = sorted({key for _, key in pairs})
    for key in class_keys:
        _check_key(key, path)
    label_of = {key: i for i, key in enumerate(class_keys)}
    labels_m = np.fromiter((label_of[key] for _, key in pairs), np.int64, len(pairs))
    return Listing(str(path), str(path.parent), [name for name, _ in pairs], labels_m,
                   class_keys, True)


def list_input(source: str, path_column: str | None, class_column: str | None,
               out: str | None = None) -> Listing:
    """The listing of a folder or manifest; DatasetError naming the input if it is unusable.
    `out`, the output directory, is never listed as part of an input folder."""
    path = Path(source)
    if not path.exists():
        raise DatasetError(path, "does not exist", "pass an image folder (one sub-folder per "
                           "class) or a CSV/TSV manifest")
    if path.is_dir():
        if path_column or class_column:
            raise DatasetError(path, "is a folder, but --path-column/--class-column apply to a "
                               "manifest", "drop them, or pass the manifest file")
        return list_folder(path, Path(out).resolve() if out else None)
    return read_manifest(path, path_column, class_column)


def missing_files(listing: Listing, rank: int, size: int) -> list[str]:
    """Paths of this rank's slice (rank, rank + size, ...) of the listing that are not files."""
    return [listing.path(i) for i in range(rank, len(listing.names), size)
            if not os.path.isfile(listing.path(i))]


# -- the split and the sample order ---------------------------------------------------------------
def _name_hashes(names: list[str], seed: int) -> np.ndarray:
    """uint64 (m,): a seeded hash of each name, which orders files independently of listing."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8,
                                        key=seed.to_bytes(8, "little")).digest(), "little")
         for name in names), np.uint64, len(names))


def split_indices(listing: Listing, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Listing indices of each split, in shard order (see the module docstring)."""
    labels_m = listing.labels_m
    hash_m = _name_hashes(listing.names, seed)
    num_classes = len(listing.class_keys)
    # Rank of each file within its class by hash (lexsort is stable: ties by listing order).
    by_class = np.lexsort((hash_m, labels_m))
    counts_C = np.bincount(labels_m, minlength=num_classes)
    starts_C = np.cumsum(counts_C) - counts_C
    rank_m = np.empty_like(labels_m)
    rank_m[by_class] = np.arange(len(labels_m)) - np.repeat(starts_C, counts_C)
    num_val_C = np.minimum(np.floor(counts_C * val_fraction + 0.5).astype(np.int64),
                           np.maximum(counts_C - 1, 0))
    is_val_m = rank_m < num_val_C[labels_m]
    order = np.argsort(hash_m, kind="stable")
    return {"train": order[~is_val_m[order]], "val": order[is_val_m[order]]}

