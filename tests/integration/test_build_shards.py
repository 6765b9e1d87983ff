"""python -m data_prep.build_shards through real processes and real mpirun: bad images skipped
and reported, an interrupted build resumed to the identical dataset, bad input refused."""
import csv
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.format import load_dataset_info, read_classes
from data_prep.inspect import inspect_dataset
from tests.integration.conftest import (BAD_IMAGES, IMAGE_CLASSES, IMAGE_SIZE, IMAGES_PER_CLASS,
                                        build_shards_cmd, class_colour)
from tests.integration.launch import mpirun_cmd, run

CRASH_ENV = {"BUILD_SHARDS_CRASH_AFTER_SHARDS": "1"}


def build(np_, input_, out, *extra, env=None):
    cmd = build_shards_cmd(input_, out, *extra)
    cmd = mpirun_cmd(np_, *cmd) if np_ > 1 else [sys.executable, *cmd]
    return run(cmd, timeout=180, env=env or {})


def shard_entries(out):
    """The shard lists of dataset.json: (path, num_samples, sha256) per split."""
    info = json.loads((Path(out) / "dataset.json").read_text())
    return {s: [(e["path"], e["num_samples"], e["sha256"]) for e in info["splits"][s]["shards"]]
            for s in ("train", "val")}


def skipped_rows(out):
    with open(Path(out) / "skipped.tsv", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def snapshot(directory):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(directory).rglob("*") if p.is_file()}


def test_bad_images_are_skipped_and_reported_exactly(image_folder, image_dataset):
    out, proc = image_dataset
    summary = inspect_dataset(out)  # schema, every shard, sha256, labels, class counts
    info = summary.dataset_info
    assert info.kind == "images" and info.input_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert info.num_classes == IMAGE_CLASSES
    # Every good image once; per class round(0.1 x files listed) = 1 in val (bad files included).
    assert info.splits["train"].num_samples + info.splits["val"].num_samples \
        == IMAGE_CLASSES * IMAGES_PER_CLASS
    assert info.splits["val"].num_samples <= IMAGE_CLASSES
    keys, _ = read_classes(out, IMAGE_CLASSES)
    assert keys == [f"class{c}" for c in range(IMAGE_CLASSES)]

    rows = skipped_rows(out)
    assert rows[0] == ["path", "reason"]
    reported = {Path(path).relative_to(image_folder).as_posix(): reason
                for path, reason in rows[1:]}
    assert sorted(reported) == sorted(BAD_IMAGES)
    for name, reason in BAD_IMAGES.items():
        assert reported[name].startswith(reason), (name, reported[name])
    assert "3 files skipped" in proc.stdout, proc.stdout

    # Images and labels stay aligned: each sample's mean colour is its class's colour.
    for split in ("train", "val"):
        for shard in info.splits[split].shards:
            with h5py.File(out / shard.path, "r") as h5:
                images, labels = h5["/inputs"][:], h5["/labels"][:]
            assert images.dtype == np.uint8 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
            means = images.reshape(len(images), -1, 3).mean(axis=1)
            expected = np.array([class_colour(int(c)) for c in labels])
            assert np.abs(means - expected).max() < 12


@pytest.mark.parametrize("np_", [1, 2])
def test_interrupted_build_resumes_to_the_same_dataset(image_folder, image_dataset, tmp_path,
                                                       np_):
    reference, _ = image_dataset
    out = tmp_path / "ds"
    crashed = build(np_, image_folder, out, env=CRASH_ENV)
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr, crashed.stderr[-2000:]
    assert not (out / "dataset.json").exists()
    assert list((out / ".build_shards").glob("*/part-*.json")), "no part was finished"

    resumed = build(np_, image_folder, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "kept from an interrupted run" in resumed.stdout, resumed.stdout
    assert shard_entries(out) == shard_entries(reference)
    for name in ("classes.tsv", "skipped.tsv"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert not (out / ".build_shards").exists()
    if np_ == 1:
        again = build(1, image_folder, out)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]


def test_manifest_of_the_folder_builds_the_identical_dataset(image_folder, image_dataset,
                                                             tmp_path):
    """A TSV manifest (image/label headers, paths relative to its folder) listing the folder's
    files gives the folder's dataset bit for bit: the split depends on names, not on input."""
    reference, _ = image_dataset
    manifest = image_folder / "list.tsv"
    files = sorted(p for p in image_folder.rglob("*") if p.is_file() and p != manifest)
    manifest.write_text("image\tlabel\n" + "".join(
        f"{p.relative_to(image_folder).as_posix()}\t{p.parent.name}\n" for p in reversed(files)))
    try:
        proc = build(1, manifest, tmp_path / "ds")
    finally:
        manifest.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_entries(tmp_path / "ds") == shard_entries(reference)
    assert load_dataset_info(tmp_path / "ds").generator["plan"]["listing_sha256"] == \
        load_dataset_info(reference).generator["plan"]["listing_sha256"]


def test_bad_input_is_one_line_exit_2_and_nothing_overwritten(image_folder, image_dataset,
                                                              tmp_path):
    reference, _ = image_dataset
    before = snapshot(reference)
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("filename,class\nclass0/00.png,class0\n")
    missing = tmp_path / "missing.csv"
    missing.write_text(f"path,class\n{image_folder}/class0/00.png,a\nnope/1.jpg,a\n"
                       "nope/2.jpg,b\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (no_path, "has no path column named path, image or file (its columns: filename, class)"),
        (missing, f"2 of 3 listed files do not exist: {tmp_path}/nope/1.jpg, "
                  f"{tmp_path}/nope/2.jpg"),
        (tmp_path / "empty", f"{tmp_path}/empty: holds no class sub-folders"),
    ]
    for input_, expect in cases:
        # --overwrite of a finished dataset: bad input must be refused before anything is removed.
        proc = build(1, input_, reference, "--overwrite")
        assert proc.returncode == 2, (input_, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expect in errors[0], (input_, proc.stderr[-2000:])
        assert snapshot(reference) == before, f"{input_} changed the dataset"

