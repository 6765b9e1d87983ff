"""Catalogue versions: the class table of a dataset grown from an earlier one, and the record of
where a dataset came from.

A catalogue grows: products appear, photos are added. `--grow-from OLD` (data_prep.build_shards,
data_prep.synthetic) writes a new version whose class ids 0..C_old-1 are OLD's classes, matched
by exact class key (the folder name or manifest label that OLD's classes.tsv records), followed
by the input's new keys in sorted order, ids C_old.. . A model trained on OLD keeps the meaning
of its classifier rows on the new version; a later `app.train --init-from` checks with
`descends_from` that the data descends from the checkpoint's.

The class table of a grown version (`grow_class_keys`); each violation is one DatasetError
naming the key(s) and OLD's classes.tsv (or the input, for two new keys):
- Every class of OLD must be in the input. A removed class is an error by default, so that a
  renamed or half-copied folder never silently becomes an empty class plus a new one; with
  `keep_removed` (`--keep-removed-classes`) it stays, under its id, as an empty class (train
  count 0), and the build warns naming it.
- A changed key (a missing OLD key that the input holds up to case, spaces or Unicode form,
  e.g. `Cola` -> `cola`) is always an error, also with `keep_removed`: it would split one class
  into an empty old one and a new one.
- A new key must not collide with another key, old or new: equal in Unicode NFC form but not
  in bytes (a macOS NFD folder name beside an NFC manifest label) is one name to a person and
  two classes to the code.

Lineage: dataset.json's `lineage` lists the versions a dataset grew from, its parent first, each
an `Ancestor` (absolute path, sha256 of its classes.tsv, class count); a grown version's lineage
is its parent followed by the parent's lineage, so a grandchild names both. A version is
identified by the sha256 of its classes.tsv (dataset.json's `classes_sha256`), not by its path,
so a moved dataset is still recognised.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_prep.format import (CLASSES_NAME, Ancestor, DatasetError, DatasetInfo,
                              load_dataset_info, read_classes, sha256_file)

_SHOWN = 3
KEEP_REMOVED_FLAG = "--keep-removed-classes"


def ancestor_of(dataset_dir: str | os.PathLike, info: DatasetInfo | None = None,
                verify: bool = True) -> Ancestor:
    """`dataset_dir` as a lineage entry. The sha256 is hashed from classes.tsv, and must equal
    dataset.json's `classes_sha256` where one is recorded; with verify=False a recorded sha256
    is taken as it is (no read of a classes.tsv that may be gigabytes)."""
    info = info or load_dataset_info(dataset_dir)
    path = Path(dataset_dir) / CLASSES_NAME
    if info.classes_sha256 and not verify:
        return Ancestor(os.path.abspath(dataset_dir), info.classes_sha256, info.num_classes)
    if not path.is_file():
        raise DatasetError(path, "missing", "restore it or rebuild the dataset")
    digest = sha256_file(path)
    if info.classes_sha256 and digest != info.classes_sha256:
        raise DatasetError(path, f"sha256 {digest[:16]}... differs from dataset.json's "
                           f"classes_sha256 {info.classes_sha256[:16]}...: it was changed after "
                           "the dataset was written", "restore it or rebuild the dataset")
    return Ancestor(os.path.abspath(dataset_dir), digest, info.num_classes)


def child_lineage(parent_dir: str | os.PathLike,
                  info: DatasetInfo | None = None) -> tuple[Ancestor, ...]:
    """The lineage of a version grown from `parent_dir`: the parent, then its own lineage."""
    info = info or load_dataset_info(parent_dir)
    return (ancestor_of(parent_dir, info),) + info.lineage


def descends_from(new_info: DatasetInfo, old: Ancestor) -> tuple[bool, str]:
    """Whether the dataset of `new_info` was grown, in one or more versions, from `old` (see
    `ancestor_of`); and why, in words. A dataset does not descend from itself: a caller that
    also accepts the same dataset compares the two `classes_sha256`."""
    for generation, entry in enumerate(new_info.lineage, start=1):
        if entry.classes_sha256 != old.classes_sha256:
            continue
        if entry.num_classes != old.num_classes:
            return False, (f"its lineage names {entry.path} with {old.classes_sha256[:12]}... "
                           f"but {entry.num_classes} classes, not {old.num_classes}: the "
                           "lineage is inconsistent")
        what = "parent" if generation == 1 else f"ancestor, {generation} versions back"
        return True, (f"grown from {old.path} (its {what}): its {old.num_classes} classes are "
                      f"ids 0..{old.num_classes - 1} of the {new_info.num_classes}")
    if not new_info.lineage:
        return False, "it has no lineage (it was not built with --grow-from)"
    return False, (f"its lineage ({', '.join(e.path for e in new_info.lineage)}) does not hold "
                   f"{old.path} (classes.tsv sha256 {old.classes_sha256[:12]}...)")


@dataclass(frozen=True)
class GrownClasses:
    """The class table of a version grown from OLD: `keys` by id (OLD's, then the new ones),
    `num_old` = OLD's class count, `removed` the OLD keys not in the input (kept as empty
    classes), `lineage` the new version's lineage."""

    keys: list[str]
    num_old: int
    removed: list[str]
    lineage: tuple[Ancestor, ...]

    def summary(self) -> str:
        """The lines a build prints about the growth: ids kept, new ids, classes kept empty."""
        num_new = len(self.keys) - self.num_old
        line = (f"grown from {self.lineage[0].path}: its {self.num_old} classes keep ids "
                f"0..{self.num_old - 1}, {num_new} new classes" +
                (f" get ids {self.num_old}..{len(self.keys) - 1}" if num_new else ""))
        if not self.removed:
            return line
        shown = ", ".join(f"{key!r} (id {self.keys.index(key)})"
                          for key in self.removed[:_SHOWN])
        more = ", ..." if len(self.removed) > _SHOWN else ""
        return (f"{line}\nwarning: {len(self.removed)} classes of {self.lineage[0].path} are "
                f"not in the input and stay as empty classes (train count 0): {shown}{more}")


def grow_classes(old_dir: str | os.PathLike, input_keys: Sequence[str], source: str,
                 keep_removed: bool) -> GrownClasses:
    """The class table and lineage of a version of `old_dir` whose input (`source`) holds the
    class keys `input_keys`; DatasetError (see the module docstring) when it cannot keep every
    id of OLD."""
    info = load_dataset_info(old_dir)
    old_keys, _ = read_classes(old_dir, info.num_classes)
    keys, removed = grow_class_keys(old_keys, input_keys, Path(old_dir) / CLASSES_NAME, source,
                                    keep_removed)
    return GrownClasses(keys, len(old_keys), removed, child_lineage(old_dir, info))


def grow_class_keys(old_keys: Sequence[str], input_keys: Sequence[str], classes_path: Path,
                    source: str, keep_removed: bool) -> tuple[list[str], list[str]]:
    """(keys by id: `old_keys`, then the input's other keys sorted; the OLD keys missing from
    the input). DatasetError naming the key(s) for a removed (unless `keep_removed`), changed
    or colliding key."""
    old_id = {key: i for i, key in enumerate(old_keys)}
    in_set = set(input_keys)
    new = sorted(key for key in in_set if key not in old_id)
    _check_collisions(old_id, new, classes_path, source)
    removed = [key for key in old_keys if key not in in_set]
    if removed:
        _check_removed(old_id, removed, new, classes_path, source, keep_removed)
    return list(old_keys) + new, removed


def _nfc(key: str) -> str:
    return unicodedata.normalize("NFC", key)


def _loose(key: str) -> str:
    """A key up to Unicode form, case and spaces: what makes a changed key."""
    return " ".join(_nfc(key).casefold().split())


def _check_collisions(old_id: dict[str, int], new: list[str], classes_path: Path,
                      source: str) -> None:
    """DatasetError for a new key equal to another key in NFC form but not in bytes. Of OLD's
    keys (maybe 10^8) only the non-ASCII ones are normalised: an ASCII key is its own NFC."""
    seen: dict[str, str] = {_nfc(k): k for k in old_id if not k.isascii()}
    for key in new:
        form = _nfc(key)
        other = seen.get(form) or (form if form in old_id else None)
        if other is not None:
            if other in old_id:
                raise DatasetError(classes_path, f"class key {ascii(key)} of the input {source} "
                                   f"collides with its class {old_id[other]} {ascii(other)}: the "
                                   "same name in Unicode NFC form, other bytes",
                                   f"spell it {ascii(other)} in the input if it is that class, "
                                   "or rename it")
            raise DatasetError(source, f"class keys {ascii(other)} and {ascii(key)} collide: "
                               "the same name in Unicode NFC form, other bytes",
                               "spell them alike if they are one class, or rename one")
        seen.setdefault(form, key)


def _check_removed(old_id: dict[str, int], removed: list[str], new: list[str],
                   classes_path: Path, source: str, keep_removed: bool) -> None:
    """DatasetError for changed keys, and for removed ones unless `keep_removed`."""
    loose_new = {_loose(key): key for key in new}
    changed = [(key, loose_new[_loose(key)]) for key in removed if _loose(key) in loose_new]
    more = ", ..." if max(len(changed), len(removed)) > _SHOWN else ""
    if changed:
        shown = ", ".join(f"{old!r} (id {old_id[old]}) as {now!r}" for old, now in
                          changed[:_SHOWN])
        raise DatasetError(classes_path, f"{len(changed)} of its class keys changed in the "
                           f"input {source} (case, spaces or Unicode form): {shown}{more}",
                           "rename them back in the input: a class keeps its id by its exact "
                           "key")
    if not keep_removed:
        shown = ", ".join(f"{key!r} (id {old_id[key]})" for key in removed[:_SHOWN])
        raise DatasetError(classes_path, f"{len(removed)} of its {len(old_id)} classes are "
                           f"not in the input {source}: {shown}{more}",
                           f"restore their images, or pass {KEEP_REMOVED_FLAG} to keep them "
                           "as empty classes (train count 0)")
