"""python -m data_prep.build_shards: an image folder or a manifest -> a dataset of image shards.

Input is a folder with one sub-folder per class (class key = sub-folder name, its images found
recursively) or a CSV/TSV manifest with a header naming a path column (`path`, `image` or `file`)
and a class column (`class`, `label` or `key`); relative paths are resolved against the
manifest's folder. Class ids are the class keys in sorted order, 0..C-1. Names starting with '.'
are ignored in a folder; every other file is either converted or reported in skipped.tsv.

Every image is decoded with Pillow (JPEG, PNG, WebP, BMP; EXIF orientation applied), converted to
RGB, its shorter side resized to N and centre-cropped to N x N (ImageOps.fit: crop to a square,
then one bicubic resize), and stored as uint8 N x N x 3 in the dataset format of
data_prep/format.py (`kind: images`).

Determinism, which is what makes the build resumable and parallel:

- The split is decided per class from the listed files, before any decoding: the files of a
  class are ordered by a hash of (seed, name), where name is the path relative to the folder or
  as the manifest writes it, and the first round(n x val_fraction) go to val (never all n).
  Within a split, samples are ordered by the same hash, so shards mix classes.
- Each split is cut into parts of `--shard-size` listed files. A part's content is a function of
  the listing, the seed and the flags only, so part i is the same file whichever rank converts
  it, on any number of ranks, in any run. Files that cannot be decoded are left out of their
  part and reported; a part left with no sample produces no shard.

Resumability: parts are written under OUT/.build_shards/ (`.tmp`, then renamed), each followed
by a small JSON done-marker (sample count, sha256, skipped files). A restarted run with the same
input and flags keeps every part that has a marker and converts the rest. When all parts exist,
rank 0 moves them to OUT/{train,val}/shard-NNNNN.h5 (numbered without the empty ones), writes
skipped.tsv, classes.tsv and dataset.json last, then removes the work folder. A rerun of a
finished build is a no-op.

Parallelism: under mpirun or srun each rank converts parts rank, rank + P, ...; rank 0 lists
the input and broadcasts the listing, every rank checks that its slice of a manifest's files
exists, rank 0 finalises. A plain `python -m data_prep.build_shards` is one rank.

Test hook: with BUILD_SHARDS_CRASH_AFTER_SHARDS=n in the environment, a rank raises after
converting n parts in this run (to test resuming).

Shapes in names: n samples of one part, N image size, C classes, m listed files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.format import (CLASSES_HEADER, CLASSES_NAME, DEFAULT_SHARD_BYTES, INPUTS_KEY,
                              LABELS_KEY, MANIFEST_NAME, SPLITS, DatasetError, Manifest,
                              ShardInfo, SplitInfo, _write_atomic, load_manifest, sha256_file,
                              shard_path)

GENERATOR_NAME = "data_prep.build_shards"
GENERATOR_VERSION = 1
WORK_DIR = ".build_shards"
PLAN_NAME = "plan.json"
SKIPPED_NAME = "skipped.tsv"
SKIPPED_HEADER = "path\treason"
PATH_COLUMNS = ("path", "image", "file")
CLASS_COLUMNS = ("class", "label", "key")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
CRASH_ENV = "BUILD_SHARDS_CRASH_AFTER_SHARDS"
_MISSING_SHOWN = 3


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

    def digest(self) -> str:
        """sha256 of the (name, class key) list: what the plan records of the input."""
        digest = hashlib.sha256()
        for name, label in zip(self.names, self.labels_m.tolist()):
            digest.update(f"{name}\t{self.class_keys[label]}\n".encode())
        return digest.hexdigest()


class UnreadableImage(Exception):
    """A listed file that is missing or cannot be decoded; the message is the skip reason."""


# -- listing the input ----------------------------------------------------------------------------
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


# -- the plan: split, order, parts ----------------------------------------------------------------
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


@dataclass(frozen=True, eq=False)
class Part:
    """Listed files `indices` (in sample order) of `split` that make up part `index`."""

    split: str
    index: int
    indices: np.ndarray

    @property
    def stem(self) -> str:
        return f"{self.split}/part-{self.index:05d}"


def make_parts(splits: dict[str, np.ndarray], shard_size: int) -> list[Part]:
    return [Part(split, i // shard_size, splits[split][i:i + shard_size])
            for split in SPLITS for i in range(0, len(splits[split]), shard_size)]


def make_plan(listing: Listing, args: argparse.Namespace, shard_size: int) -> dict:
    """Everything that determines the output: a rerun resumes only with an equal plan."""
    return {"name": GENERATOR_NAME, "version": GENERATOR_VERSION,
            "image_size": args.image_size, "val_fraction": args.val_fraction, "seed": args.seed,
            "shard_size": shard_size, "num_files": len(listing.names),
            "num_classes": len(listing.class_keys), "listing_sha256": listing.digest()}


# -- the output directory -------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda f: json.dump(obj, f, indent=1))


def prepare_output(out: Path, plan: dict, overwrite: bool) -> str:
    """Readies `out` for this plan; returns "fresh", "resume" or "complete" (an equal finished
    build). Refuses, with nothing changed, a directory holding anything else unless
    `overwrite`; then removes dataset.json first, so an interrupted overwrite never looks
    finished."""
    manifest, work = out / MANIFEST_NAME, out / WORK_DIR
    if out.exists() and not out.is_dir():
        raise DatasetError(out, "exists and is not a directory", "choose another --out")
    old_shards = [p for s in SPLITS for p in sorted((out / s).glob("shard-*.h5"))]
    fix = "choose another --out, or pass --overwrite to replace it"
    if not overwrite:
        if manifest.exists():
            if load_manifest(out).generator.get("plan") == plan:
                return "complete"
            raise DatasetError(manifest, f"output directory {out} holds a dataset built from "
                               "other input or flags", fix)
        if (work / PLAN_NAME).exists():
            old = json.loads((work / PLAN_NAME).read_text())
            if old == plan:
                return "resume"
            changed = [k for k in plan if old.get(k) != plan[k]]
            raise DatasetError(work / PLAN_NAME, f"holds an unfinished build with other "
                               f"{', '.join(changed)}", "rerun with the input and flags of that "
                               "build to resume it, or pass --overwrite to start over")
        if old_shards:
            raise DatasetError(old_shards[0], f"output directory {out} holds shard files of "
                               "an unfinished dataset", fix)
    for path in [manifest, out / CLASSES_NAME, out / SKIPPED_NAME, *old_shards]:
        path.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        (work / split).mkdir(parents=True, exist_ok=True)
    _write_json(work / PLAN_NAME, plan)
    return "fresh"


# -- converting -----------------------------------------------------------------------------------
def load_image(path: str, size: int) -> np.ndarray:
    """uint8 (N, N, 3): the image at `path`, shorter side resized to N, centre-cropped.
    Raises UnreadableImage with the reason when the file is missing, empty or not decodable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        num_bytes = os.path.getsize(path)
    except OSError as err:
        raise UnreadableImage("missing (gone since the input was listed)"
                              if isinstance(err, FileNotFoundError) else
                              f"cannot be read ({err.strerror})") from err
    if num_bytes == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            # JPEG: decode at the smallest 1/2^k scale whose shorter side is still >= N.
            width, height = img.size
            short = max(1, min(width, height))
            img.draft("RGB", (-(-width * size // short), -(-height * size // short)))
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            return np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC),
                              dtype=np.uint8)
    except UnidentifiedImageError as err:
        raise UnreadableImage(f"not an image ({'/'.join(IMAGE_FORMATS)})") from err
    # Pillow's decoders raise many types on malformed files (OSError for truncated data,
    # ValueError, SyntaxError, struct.error, DecompressionBombError, ...): all mean "skip it".
    except Exception as err:  # noqa: BLE001
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UnreadableImage(f"cannot be decoded ({reason})") from err


def convert_part(listing: Listing, part: Part, size: int, work: Path, bar) -> dict:
    """Decodes the files of `part`, writes work/<part>.h5 (if any sample) and then its done
    marker work/<part>.json; returns the marker."""
    import h5py

    images_nNN3 = np.empty((len(part.indices), size, size, 3), np.uint8)
    labels_n = np.empty(len(part.indices), np.int64)
    num, skipped = 0, []
    for i in part.indices.tolist():
        try:
            images_nNN3[num] = load_image(listing.path(i), size)
        except UnreadableImage as err:
            skipped.append((listing.path(i), str(err)))
        else:
            labels_n[num] = listing.labels_m[i]
            num += 1
        bar.update(1)
    marker = {"num_samples": num, "sha256": None, "skipped": skipped}
    if num:
        path, tmp = work / f"{part.stem}.h5", work / f"{part.stem}.h5.tmp"
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset(INPUTS_KEY, data=images_nNN3[:num])
            h5.create_dataset(LABELS_KEY, data=labels_n[:num])
        with open(tmp, "rb+") as f:  # on disk before the marker claims it is complete
            os.fsync(f.fileno())
        os.replace(tmp, path)
        marker["sha256"] = sha256_file(path)
    _write_json(work / f"{part.stem}.json", marker)
    return marker


def convert_parts(listing: Listing, parts: list[Part], size: int, work: Path, world) -> dict:
    """Converts this rank's parts (rank, rank + P, ...) that have no done marker yet."""
    from tqdm import tqdm

    mine = parts[world.rank::world.size]
    todo = [p for p in mine if not (work / f"{p.stem}.json").exists()]
    crash_after = int(os.environ.get(CRASH_ENV, "-1"))
    num_files = sum(len(p.indices) for p in mine)
    with tqdm(total=num_files, initial=num_files - sum(len(p.indices) for p in todo), unit="img",
              desc=f"build_shards (rank 0 of {world.size})", file=sys.stderr,
              disable=not world.is_root, mininterval=1.0) as bar:
        for done, part in enumerate(todo):
            if done == crash_after:
                raise RuntimeError(f"{CRASH_ENV}={crash_after}: injected failure")
            convert_part(listing, part, size, work, bar)
    return {"converted": len(todo), "reused": len(mine) - len(todo)}


# -- finishing (rank 0) ---------------------------------------------------------------------------
def finish(out: Path, listing: Listing, parts: list[Part],
           plan: dict) -> tuple[Manifest, int, np.ndarray]:
    """Moves the parts to their shard names, writes skipped.tsv, classes.tsv and dataset.json
    (last); returns the manifest, the number of skipped files and the int64 train counts (C,).
    Safe to rerun after a crash: a part already moved is found under its shard name."""
    import h5py

    work = out / WORK_DIR
    shards = {split: [] for split in SPLITS}
    skipped = list(listing.skipped)
    counts_C = np.zeros(len(listing.class_keys), np.int64)
    for part in parts:
        marker = json.loads((work / f"{part.stem}.json").read_text())
        skipped += [tuple(entry) for entry in marker["skipped"]]
        if not marker["num_samples"]:
            continue
        rel = shard_path(part.split, len(shards[part.split]))
        if (work / f"{part.stem}.h5").exists():
            os.replace(work / f"{part.stem}.h5", out / rel)
        elif not (out / rel).exists():
            raise DatasetError(work / f"{part.stem}.h5", f"is missing and so is {out / rel}",
                               "rerun with --overwrite to build the dataset again")
        shards[part.split].append(ShardInfo(rel, marker["num_samples"], marker["sha256"]))
        if part.split == "train":
            with h5py.File(out / rel, "r") as h5:
                counts_C += np.bincount(h5[LABELS_KEY][:], minlength=len(counts_C))
    _write_skipped(out, skipped)
    if not shards["train"]:
        raise DatasetError(listing.source, f"none of its {len(listing.names)} files could be "
                           f"used for training (see {out / SKIPPED_NAME})",
                           f"check that it holds {'/'.join(IMAGE_FORMATS)} images")
    _write_atomic(out / CLASSES_NAME, lambda f: f.write(CLASSES_HEADER + "\n" + "".join(
        f"{i}\t{key}\t{counts_C[i]}\n" for i, key in enumerate(listing.class_keys))))
    size = plan["image_size"]
    manifest = Manifest("images", (size, size, 3), len(listing.class_keys),
                        {s: SplitInfo(sum(i.num_samples for i in shards[s]), tuple(shards[s]))
                         for s in SPLITS},
                        {"name": GENERATOR_NAME, "version": GENERATOR_VERSION,
                         "input": listing.source, "skipped": len(skipped), "plan": plan})
    _write_json(out / MANIFEST_NAME, manifest.to_json())
    shutil.rmtree(work)
    return manifest, len(skipped), counts_C


def _write_skipped(out: Path, skipped: list[tuple[str, str]]) -> None:
    """skipped.tsv: header, then one "path<TAB>reason" line per file, sorted by path (a tab or
    newline inside a path is written as a space, so every line has two fields)."""
    blank = str.maketrans("\t\n\r", "   ")
    _write_atomic(out / SKIPPED_NAME, lambda f: f.write(SKIPPED_HEADER + "\n" + "".join(
        f"{path.translate(blank)}\t{reason.translate(blank)}\n"
        for path, reason in sorted(skipped))))


# -- the command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build_shards",
        description="Convert an image folder (one sub-folder per class) or a CSV/TSV manifest "
                    "(path and class columns) into a dataset of uint8 N x N x 3 image shards "
                    "(DESIGN.md section 4). Undecodable files are skipped and listed in "
                    "OUT/skipped.tsv. Runs as one process or in parallel under mpirun/srun; "
                    "an interrupted run resumes when started again with the same arguments.")
    parser.add_argument("--input", required=True, metavar="FOLDER_OR_MANIFEST",
                        help="image folder, or a .csv/.tsv manifest with a header line")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--image-size", type=int, required=True, metavar="N",
                        help="output images are N x N: shorter side resized to N, centre crop")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class's files in the val split (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/val split and of the sample order (default: 0)")
    parser.add_argument("--shard-size", type=int,
                        help="listed files per shard (default: about 64 MiB of images)")
    parser.add_argument("--path-column", metavar="NAME",
                        help="manifest column of image paths (default: path, image or file)")
    parser.add_argument("--class-column", metavar="NAME",
                        help="manifest column of class keys (default: class, label or key)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset or an unfinished build in --out")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Validates the numbers; returns the shard size in files."""
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.shard_size is not None and args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    return args.shard_size or max(1, DEFAULT_SHARD_BYTES // (args.image_size ** 2 * 3))


class BuildFailed(Exception):
    """Bad input found before converting, the same on every rank; the message is one line."""


def _on_root(world, func):
    """`func()` run on rank 0 and its result broadcast; a DatasetError or OSError (an
    unreadable input, an unwritable --out) there becomes BuildFailed on every rank, so all ranks
    stop at the same point."""
    from mpi.collectives import broadcast_object

    result, error = None, None
    if world.is_root:
        try:
            result = func()
        except DatasetError as err:
            error = str(err)
        except OSError as err:
            error = str(DatasetError(err.filename or "?", err.strerror or str(err),
                                     "check the path and its permissions"))
    result, error = broadcast_object(world, (result, error))
    if error:
        raise BuildFailed(error)
    return result


def _check_files_exist(world, listing: Listing) -> None:
    """BuildFailed (on every rank) naming the first manifest files that do not exist; each
    rank checks a slice, so a big manifest on a shared filesystem is checked in parallel."""
    from mpi.collectives import allgather_object

    missing = sorted(p for part in allgather_object(
        world, missing_files(listing, world.rank, world.size)) for p in part)
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN])
        more = ", ..." if len(missing) > _MISSING_SHOWN else ""
        raise BuildFailed(DatasetError(
            listing.source, f"{len(missing)} of {len(listing.names)} listed files do not exist: "
            f"{shown}{more}", "fix their paths (relative paths are resolved against the "
            "manifest's folder) or remove their lines"))


def build(world, args: argparse.Namespace, shard_size: int) -> str | None:
    """The whole build, collective; returns the summary line on rank 0, None elsewhere."""
    from mpi.collectives import allgather_object

    start, out = time.perf_counter(), Path(args.out)
    listing = _on_root(world, lambda: list_input(args.input, args.path_column,
                                                 args.class_column, args.out))
    if listing.from_manifest:
        _check_files_exist(world, listing)
    plan = make_plan(listing, args, shard_size)
    state = _on_root(world, lambda: prepare_output(out, plan, args.overwrite))
    if state == "complete":
        return f"{out}: already holds this dataset (same input and flags); nothing to do"
    parts = make_parts(split_indices(listing, args.seed, args.val_fraction), shard_size)
    counts = allgather_object(world, convert_parts(listing, parts, args.image_size,
                                                   out / WORK_DIR, world))
    if not world.is_root:
        return None
    manifest, num_skipped, counts_C = finish(out, listing, parts, plan)
    line = _summary(out, manifest, num_skipped, counts, time.perf_counter() - start)
    empty = np.flatnonzero(counts_C == 0)
    if len(empty):
        line += (f"\nwarning: {len(empty)} classes have no train samples (first: "
                 f"{listing.class_keys[empty[0]]!r}); they stay in classes.tsv with count 0")
    return line


def _summary(out: Path, manifest: Manifest, num_skipped: int, counts: list[dict],
             seconds: float) -> str:
    train, val = manifest.splits["train"], manifest.splits["val"]
    size = sum((out / s.path).stat().st_size for sp in (train, val) for s in sp.shards)
    reused = sum(c["reused"] for c in counts)
    total = reused + sum(c["converted"] for c in counts)
    resumed = f", {reused} of {total} parts kept from an interrupted run" if reused else ""
    return (f"wrote {out}: images {list(manifest.input_shape)} uint8, {manifest.num_classes} "
            f"classes, train {train.num_samples} / val {val.num_samples} samples in "
            f"{len(train.shards)} + {len(val.shards)} shards, {num_skipped} files skipped "
            f"(listed in {out / SKIPPED_NAME}){resumed}, {size / 2**20:.1f} MiB, {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shard_size = _check_args(parser, args)
    from mpi.world import init_world  # noqa: PLC0415 - MPI starts here, not at import

    world = init_world(use_horovod=False)
    try:
        summary = build(world, args, shard_size)
    except (BuildFailed, DatasetError) as err:  # DatasetError: rank 0 while finishing
        if world.is_root:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if summary:
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
