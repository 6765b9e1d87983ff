"""python -m data_prep.build_shards: an image folder or a manifest -> a dataset of image shards.

What is read and how it is split: data_prep/listing.py (a folder with one sub-folder per class,
or a CSV/TSV manifest of path and class columns; the train/val split and the sample order are
decided per class from a seeded hash of the names, before any decoding). How an image becomes a
sample: data_prep/images.py (Pillow, RGB, shorter side to N, centre crop, uint8 N x N x 3). The
output is the dataset format of data_prep/format.py (`kind: images`).

Determinism, which is what makes the build resumable and parallel: each split is cut into parts
of `--shard-size` listed files. A part's content is a function of the listing, the seed and the
flags only, so part i is the same file whichever rank converts it, on any number of ranks, in
any run. Files that cannot be decoded are left out of their part and reported; a part left with
no sample produces no shard.

Resumability: parts are written under OUT/.build_shards/ (`.tmp`, then renamed), each followed
by a small JSON done-marker (sample count, sha256, skipped files). The build fingerprint (input
digest and every flag that shapes the output) is kept in OUT/.build_shards/plan.json and, once
finished, in dataset.json's generator.plan. A restarted run with the same fingerprint keeps
every part that has a marker and converts the rest. When all parts exist, rank 0 moves them to
OUT/{train,val}/shard-NNNNN.h5 (numbered without the empty ones), writes skipped.tsv,
classes.tsv and dataset.json last, then removes the work folder. A rerun of a finished build is
a no-op.

Parallelism: under mpirun or srun each rank converts parts rank, rank + P, ...; rank 0 lists
the input and broadcasts the listing, every rank checks that its slice of a manifest's files
exists, rank 0 finalises. A plain `python -m data_prep.build_shards` is one rank.

Catalogue versions: with --grow-from OLD, rank 0 decides the class table when it lists the
input (data_prep/lineage.py): OLD's classes keep their ids by key, the new keys follow in sorted
order, and a removed (unless --keep-removed-classes), changed or colliding key stops every rank
before --out is touched. The table reaches the other ranks with the listing; the fingerprint
records OLD's classes.tsv sha256, dataset.json the lineage.

Test hook: with BUILD_SHARDS_CRASH_AFTER_SHARDS=n in the environment, a rank raises after
converting n parts in this run (to test resuming).

Shapes in names: n samples of one part, N image size, C classes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from common.files import atomic_path, write_json_atomic, write_text_atomic
from data_prep.format import (CLASSES_NAME, DATASET_JSON, DEFAULT_SHARD_BYTES, INPUTS_KEY,
                              LABELS_KEY, SPLITS, DatasetError, DatasetInfo, ShardInfo, SplitInfo,
                              clear_dataset, existing_shards, load_dataset_info, sha256_file,
                              shard_path, write_classes, write_dataset_info)
from data_prep.images import IMAGE_FORMATS, UnreadableImage, load_image
from data_prep.lineage import KEEP_REMOVED_FLAG, GrownClasses, grow_classes
from data_prep.listing import Listing, list_input, missing_files, split_indices

GENERATOR_NAME = "data_prep.build_shards"
GENERATOR_VERSION = 1
WORK_DIR = ".build_shards"
# The build fingerprint's file in WORK_DIR and its key in dataset.json's generator keep their
# first names ("plan"): renaming them would make an interrupted build, or a finished one, of an
# earlier version look like a different build, and a rerun would start over or refuse.
FINGERPRINT_NAME = "plan.json"
FINGERPRINT_KEY = "plan"
SKIPPED_NAME = "skipped.tsv"
SKIPPED_HEADER = "path\treason"
CRASH_ENV = "BUILD_SHARDS_CRASH_AFTER_SHARDS"
_MISSING_SHOWN = 3
T = TypeVar("T")


# -- parts and the build fingerprint --------------------------------------------------------------
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


def build_fingerprint(listing: Listing, args: argparse.Namespace, shard_size: int,
                      grown: GrownClasses | None = None) -> dict:
    """Everything that determines the output: a rerun resumes only with an equal fingerprint.
    A grown build adds the version it grows from (identified by its classes.tsv, not its path);
    other builds keep the fingerprint of earlier versions, so their reruns still match."""
    fingerprint = {"name": GENERATOR_NAME, "version": GENERATOR_VERSION,
                   "image_size": args.image_size, "val_fraction": args.val_fraction,
                   "seed": args.seed, "shard_size": shard_size, "num_files": len(listing.names),
                   "num_classes": len(listing.class_keys), "listing_sha256": listing.digest()}
    if grown is not None:
        fingerprint["grow_from"] = {"classes_sha256": grown.lineage[0].classes_sha256,
                                    "num_classes": grown.num_old,
                                    "keep_removed_classes": args.keep_removed_classes}
    return fingerprint


# -- the output directory -------------------------------------------------------------------------
def prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> str:
    """Readies `out` for this build; returns "fresh", "resume" or "complete" (an equal finished
    build). Refuses, with nothing changed, a directory holding anything else unless
    `overwrite`; then removes dataset.json first, so an interrupted overwrite never looks
    finished."""
    work = out / WORK_DIR
    if out.exists() and not out.is_dir():
        raise DatasetError(out, "exists and is not a directory", "choose another --out")
    if not overwrite:
        state = _existing_build(out, fingerprint)
        if state is not None:
            return state
    clear_dataset(out, out / SKIPPED_NAME)
    shutil.rmtree(work, ignore_errors=True)
    for split in SPLITS:
        (work / split).mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / FINGERPRINT_NAME, fingerprint, indent=1)
    return "fresh"


def _existing_build(out: Path, fingerprint: dict) -> str | None:
    """What `out` holds: this build finished ("complete") or unfinished ("resume"), nothing of
    a dataset (None), or another one (DatasetError naming it)."""
    info_path, fingerprint_path = out / DATASET_JSON, out / WORK_DIR / FINGERPRINT_NAME
    fix = "choose another --out, or pass --overwrite to replace it"
    if info_path.exists():
        if load_dataset_info(out).generator.get(FINGERPRINT_KEY) == fingerprint:
            return "complete"
        raise DatasetError(info_path, f"output directory {out} holds a dataset built from "
                           "other input or flags", fix)
    if fingerprint_path.exists():
        old = json.loads(fingerprint_path.read_text())
        if old == fingerprint:
            return "resume"
        changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        raise DatasetError(fingerprint_path, f"holds an unfinished build with other "
                           f"{', '.join(changed)}", "rerun with the input and flags of that "
                           "build to resume it, or pass --overwrite to start over")
    old_shards = existing_shards(out)
    if old_shards:
        raise DatasetError(old_shards[0], f"output directory {out} holds shard files of "
                           "an unfinished dataset", fix)
    return None


# -- converting -----------------------------------------------------------------------------------
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
        path = work / f"{part.stem}.h5"
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset(INPUTS_KEY, data=images_nNN3[:num])
                h5.create_dataset(LABELS_KEY, data=labels_n[:num])
            with open(tmp, "rb+") as f:  # on disk before the marker claims it is complete
                os.fsync(f.fileno())
        marker["sha256"] = sha256_file(path)
    write_json_atomic(work / f"{part.stem}.json", marker, indent=1)
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
def finish(out: Path, listing: Listing, parts: list[Part], fingerprint: dict,
           grown: GrownClasses | None = None) -> tuple[DatasetInfo, int, np.ndarray]:
    """Moves the parts to their shard names, writes skipped.tsv, classes.tsv and dataset.json
    (last, with the sha256 of classes.tsv and, when `grown`, the lineage); returns the
    dataset's DatasetInfo, the number of skipped files and the int64 train counts (C,). Safe
    to rerun after a crash: a part already moved is found under its shard name."""
    shards, skipped, counts_C = _move_parts(out, listing, parts)
    _write_skipped(out, skipped)
    if not shards["train"]:
        raise DatasetError(listing.source, f"none of its {len(listing.names)} files could be "
                           f"used for training (see {out / SKIPPED_NAME})",
                           f"check that it holds {'/'.join(IMAGE_FORMATS)} images")
    write_classes(out, len(listing.class_keys), listing.class_keys.__getitem__, counts_C)
    size = fingerprint["image_size"]
    info = DatasetInfo("images", (size, size, 3), len(listing.class_keys),
                       {s: SplitInfo(sum(i.num_samples for i in shards[s]), tuple(shards[s]))
                        for s in SPLITS},
                       {"name": GENERATOR_NAME, "version": GENERATOR_VERSION,
                        "input": listing.source, "skipped": len(skipped),
                        FINGERPRINT_KEY: fingerprint},
                       sha256_file(out / CLASSES_NAME), grown.lineage if grown else ())
    write_dataset_info(out, info)
    shutil.rmtree(out / WORK_DIR)
    return info, len(skipped), counts_C


def _move_parts(out: Path, listing: Listing, parts: list[Part]
                ) -> tuple[dict[str, list[ShardInfo]], list[tuple[str, str]], np.ndarray]:
    """Moves each non-empty part to the next shard name of its split; returns the shards per
    split, every skipped (path, reason) and the int64 train samples per class (C,)."""
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
    return shards, skipped, counts_C


def _write_skipped(out: Path, skipped: list[tuple[str, str]]) -> None:
    """skipped.tsv: header, then one "path<TAB>reason" line per file, sorted by path (a tab or
    newline inside a path is written as a space, so every line has two fields)."""
    blank = str.maketrans("\t\n\r", "   ")
    write_text_atomic(out / SKIPPED_NAME, SKIPPED_HEADER + "\n" + "".join(
        f"{path.translate(blank)}\t{reason.translate(blank)}\n"
        for path, reason in sorted(skipped)))


# -- the command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build_shards",
        description="Convert an image folder (one sub-folder per class) or a CSV/TSV manifest "
                    "(path and class columns) into a dataset of uint8 N x N x 3 image shards "
                    "(docs/design.md, 'Contracts: Dataset directory'). Undecodable files are "
                    "skipped and listed in OUT/skipped.tsv. Runs as one process or in parallel "
                    "under mpirun/srun; an interrupted run resumes when started again with the "
                    "same arguments.")
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
    parser.add_argument("--grow-from", metavar="OLD_DATASET",
                        help="a new version of OLD_DATASET: its classes keep their ids by class "
                             "key, the input's new keys follow in sorted order; a class of OLD "
                             "missing from the input, a changed or colliding key is an error; "
                             "dataset.json records the lineage")
    parser.add_argument(KEEP_REMOVED_FLAG, action="store_true",
                        help="with --grow-from: keep classes of OLD_DATASET that the input no "
                             "longer holds as empty classes (train count 0) instead of failing")
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
    if args.keep_removed_classes and args.grow_from is None:
        parser.error(f"{KEEP_REMOVED_FLAG} applies to --grow-from only")
    if args.grow_from is not None and Path(args.grow_from).resolve() == Path(args.out).resolve():
        parser.error("--out must differ from --grow-from (the old version is kept)")
    return args.shard_size or max(1, DEFAULT_SHARD_BYTES // (args.image_size ** 2 * 3))


def _reported_as_dataset_error(func: Callable[[], T]) -> Callable[[], T]:
    """`func` with an OSError (an unreadable input, an unwritable --out) turned into a
    DatasetError naming the path, so that it stops every rank like bad input does."""

    def run() -> T:
        try:
            return func()
        except OSError as err:
            raise DatasetError(err.filename or "?", err.strerror or str(err),
                               "check the path and its permissions") from err

    return run


def _check_files_exist(world, listing: Listing) -> None:
    """DatasetError, the same on every rank, naming the first manifest files that do not exist;
    each rank checks a slice, so a big manifest on a shared filesystem is checked in parallel."""
    from mpi.collectives import allgather_object

    missing = sorted(p for part in allgather_object(
        world, missing_files(listing, world.rank, world.size)) for p in part)
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN])
        more = ", ..." if len(missing) > _MISSING_SHOWN else ""
        raise DatasetError(
            listing.source, f"{len(missing)} of {len(listing.names)} listed files do not exist: "
            f"{shown}{more}", "fix their paths (relative paths are resolved against the "
            "manifest's folder) or remove their lines")


def _list(args: argparse.Namespace) -> tuple[Listing, GrownClasses | None]:
    """Rank 0's listing of the input with its class ids: the sorted keys, or with --grow-from
    the old version's keys first (data_prep/lineage.py), and the grown class table."""
    listing = list_input(args.input, args.path_column, args.class_column, args.out)
    if args.grow_from is None:
        return listing, None
    grown = grow_classes(args.grow_from, listing.class_keys, listing.source,
                         args.keep_removed_classes)
    return listing.with_class_keys(grown.keys), grown


def build(world, args: argparse.Namespace, shard_size: int) -> str | None:
    """The whole build, collective; returns the summary line on rank 0, None elsewhere. Bad
    input or output found before converting raises SetupError (or DatasetError, from the
    gathered file check) on every rank; a failure while finishing, DatasetError on rank 0."""
    from mpi.agree import decide_on_root
    from mpi.collectives import allgather_object

    start, out = time.perf_counter(), Path(args.out)
    listing, grown = decide_on_root(world, _reported_as_dataset_error(lambda: _list(args)))
    if listing.from_manifest:
        _check_files_exist(world, listing)
    fingerprint = build_fingerprint(listing, args, shard_size, grown)
    state = decide_on_root(world, _reported_as_dataset_error(
        lambda: prepare_output(out, fingerprint, args.overwrite)))
    if state == "complete":
        return f"{out}: already holds this dataset (same input and flags); nothing to do"
    parts = make_parts(split_indices(listing, args.seed, args.val_fraction), shard_size)
    counts = allgather_object(world, convert_parts(listing, parts, args.image_size,
                                                   out / WORK_DIR, world))
    if not world.is_root:
        return None
    info, num_skipped, counts_C = finish(out, listing, parts, fingerprint, grown)
    line = _summary(out, info, num_skipped, counts, time.perf_counter() - start)
    if grown is not None:
        line += "\n" + grown.summary()
    empty = np.flatnonzero(counts_C == 0)
    if len(empty):
        line += (f"\nwarning: {len(empty)} classes have no train samples (first: "
                 f"{listing.class_keys[empty[0]]!r}); they stay in classes.tsv with count 0")
    return line


def _summary(out: Path, info: DatasetInfo, num_skipped: int, counts: list[dict],
             seconds: float) -> str:
    train, val = info.splits["train"], info.splits["val"]
    size = sum((out / s.path).stat().st_size for sp in (train, val) for s in sp.shards)
    reused = sum(c["reused"] for c in counts)
    total = reused + sum(c["converted"] for c in counts)
    resumed = f", {reused} of {total} parts kept from an interrupted run" if reused else ""
    return (f"wrote {out}: images {list(info.input_shape)} uint8, {info.num_classes} "
            f"classes, train {train.num_samples} / val {val.num_samples} samples in "
            f"{len(train.shards)} + {len(val.shards)} shards, {num_skipped} files skipped "
            f"(listed in {out / SKIPPED_NAME}){resumed}, {size / 2**20:.1f} MiB, {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shard_size = _check_args(parser, args)
    # MPI starts here, not at import.
    from mpi.agree import SetupError, exit_on_setup_error  # noqa: PLC0415
    from mpi.world import init_world  # noqa: PLC0415

    world = init_world(use_horovod=False)
    try:
        summary = build(world, args, shard_size)
    except (SetupError, DatasetError) as err:  # DatasetError: all ranks, or rank 0 finishing
        return exit_on_setup_error(world, err)
    if summary:
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
