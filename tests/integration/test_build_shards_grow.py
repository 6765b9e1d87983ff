"""python -m data_prep.build_shards --grow-from through real processes and real mpirun: a new
catalogue version keeps every class id of the old one by key, new classes follow, lineage is
recorded; a removed, changed or colliding key is one line naming it, exit 2, nothing written."""
import shutil
import unicodedata

import h5py
import numpy as np
import pytest

from data_prep.format import load_dataset_info, read_classes, sha256_file
from data_prep.inspect import inspect_dataset
from data_prep.lineage import ancestor_of, descends_from
from tests.integration.conftest import IMAGE_CLASSES, class_colour
from tests.integration.test_build_shards import build, shard_entries, snapshot

OLD_KEYS = [f"class{c}" for c in range(IMAGE_CLASSES)]


def photos(image_folder, tmp_path, name, new=(), remove=(), rename=()):
    """A copy of image_folder with new classes (a copy of the images of class N, as `key`: N),
    removed class folders and renamed ones ((old, new) pairs)."""
    root = tmp_path / name
    shutil.copytree(image_folder, root)
    for key, source in dict(new).items():
        shutil.copytree(image_folder / f"class{source}", root / key)
    for key in remove:
        shutil.rmtree(root / key)
    for old, now in rename:
        (root / old).rename(root / now)
    return root


def errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def v2(image_folder, image_dataset, tmp_path_factory):
    """The reference dataset grown by two classes that sort before and after the old keys."""
    old, _ = image_dataset
    tmp_path = tmp_path_factory.mktemp("grow")
    input_ = photos(image_folder, tmp_path, "photos2", new={"aaa": 1, "zzz": 2})
    proc = build(1, input_, tmp_path / "v2", "--grow-from", old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return input_, tmp_path / "v2", proc


def test_old_ids_are_kept_and_new_classes_follow(image_dataset, v2):
    old, _ = image_dataset
    _, out, proc = v2
    info = inspect_dataset(out).dataset_info
    keys, counts = read_classes(out, IMAGE_CLASSES + 2)
    assert keys == OLD_KEYS + ["aaa", "zzz"]         # sorted keys alone would put aaa first
    assert list(counts[:IMAGE_CLASSES]) == list(read_classes(old, IMAGE_CLASSES)[1])
    assert f"grown from {old}: its 4 classes keep ids 0..3, 2 new classes get ids 4..5" \
        in proc.stdout
    # Labels follow the keys: an old class's samples have its colour, aaa's class 1's colour.
    colours = [class_colour(c) for c in range(IMAGE_CLASSES)] + [class_colour(1), class_colour(2)]
    for split in ("train", "val"):
        for shard in info.splits[split].shards:
            with h5py.File(out / shard.path, "r") as h5:
                images, labels = h5["/inputs"][:], h5["/labels"][:]
            means = images.reshape(len(images), -1, 3).mean(axis=1)
            assert np.abs(means - np.array([colours[c] for c in labels])).max() < 12


def test_lineage_is_recorded_and_a_grandchild_descends_from_both(image_folder, image_dataset,
                                                                 v2, tmp_path):
    old, _ = image_dataset
    input2, out2, _ = v2
    info2 = load_dataset_info(out2)
    assert [(a.path, a.classes_sha256, a.num_classes) for a in info2.lineage] == \
        [(str(old), sha256_file(old / "classes.tsv"), IMAGE_CLASSES)]
    assert info2.generator["plan"]["grow_from"]["classes_sha256"] == \
        sha256_file(old / "classes.tsv")
    input3 = photos(input2, tmp_path, "photos3", new={"mmm": 3})
    proc = build(1, input3, tmp_path / "v3", "--grow-from", out2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info3 = inspect_dataset(tmp_path / "v3").dataset_info
    assert read_classes(tmp_path / "v3", 7)[0] == OLD_KEYS + ["aaa", "zzz", "mmm"]
    assert [a.path for a in info3.lineage] == [str(out2), str(old)]
    assert descends_from(info3, ancestor_of(out2))[0] and descends_from(info3, ancestor_of(old))[0]
    assert descends_from(info2, ancestor_of(old))[0]
    assert not descends_from(info2, ancestor_of(tmp_path / "v3"))[0]
    assert not descends_from(load_dataset_info(old), ancestor_of(out2))[0]


def test_two_ranks_build_the_same_grown_dataset(image_dataset, v2, tmp_path):
    old, _ = image_dataset
    input_, reference, _ = v2
    proc = build(2, input_, tmp_path / "v2", "--grow-from", old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_entries(tmp_path / "v2") == shard_entries(reference)
    for name in ("classes.tsv", "skipped.tsv"):
        assert (tmp_path / "v2" / name).read_text() == (reference / name).read_text()
    assert load_dataset_info(tmp_path / "v2").lineage == load_dataset_info(reference).lineage
    again = build(1, input_, tmp_path / "v2", "--grow-from", old)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]


NFD_CAFE = unicodedata.normalize("NFD", "caf\u00e9")


@pytest.mark.parametrize("np_, change, expect", [
    (1, {"remove": ["class2"]}, "{classes}: 1 of its 4 classes are not in the input {input}: "
                                "'class2' (id 2); restore their images, or pass "
                                "--keep-removed-classes"),
    (2, {"rename": [("class3", "Class3")]}, "{classes}: 1 of its class keys changed in the input "
                                            "{input} (case, spaces or Unicode form): 'class3' "
                                            "(id 3) as 'Class3'"),
    (1, {"new": {"caf\u00e9": 0, NFD_CAFE: 1}}, "{input}: class keys 'cafe\\u0301' and "
                                                "'caf\\xe9' collide"),
])
def test_a_removed_changed_or_colliding_key_is_one_line_and_nothing_is_written(
        image_folder, image_dataset, tmp_path, np_, change, expect):
    old, _ = image_dataset
    before = snapshot(old)
    input_ = photos(image_folder, tmp_path, "photos", **change)
    # A changed key is refused even with --keep-removed-classes (on one rank: enough here).
    runs = [(np_, ())] + ([(1, ("--keep-removed-classes",))] if "rename" in change else [])
    for ranks, extra in runs:
        proc = build(ranks, input_, tmp_path / "new", "--grow-from", old, *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = errors(proc)
        assert len(lines) == 1, proc.stderr[-2000:]
        assert expect.format(classes=old / "classes.tsv", input=input_) in lines[0], lines[0]
        assert not (tmp_path / "new").exists()
    assert snapshot(old) == before


def test_removed_classes_kept_empty_on_request(image_folder, image_dataset, tmp_path):
    old, _ = image_dataset
    input_ = photos(image_folder, tmp_path, "photos", new={"new": 0}, remove=["class1"])
    proc = build(1, input_, tmp_path / "new", "--grow-from", old, "--keep-removed-classes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys, counts = read_classes(tmp_path / "new", IMAGE_CLASSES + 1)
    assert keys == OLD_KEYS + ["new"] and counts[1] == 0 and counts.min(initial=1) == 0
    assert (f"warning: 1 classes of {old} are not in the input and stay as empty classes (train "
            "count 0): 'class1' (id 1)") in proc.stdout
    inspect_dataset(tmp_path / "new")
