"""Catalogue versions (data_prep/lineage.py): grown class tables keep every old id by key, a
removed, changed or colliding key is named, dataset.json records the lineage, and
`descends_from` recognises children and grandchildren only."""
import json
import shutil
import unicodedata

import numpy as np
import pytest

from data_prep.format import Ancestor, DatasetError, load_dataset_info, read_classes, sha256_file
from data_prep.inspect import inspect_dataset
from data_prep.lineage import ancestor_of, descends_from, grow_class_keys, grow_classes
from data_prep.listing import Listing
from data_prep.synthetic import SyntheticParams, generate, main

PARAMS = SyntheticParams(dim=8, per_class=2, val_per_class=1, family_size=4)
NFD_CAFE = unicodedata.normalize("NFD", "caf\u00e9")


def grow(old, new, keep_removed=False, classes_path="OLD/classes.tsv"):
    return grow_class_keys(old, new, classes_path, "INPUT", keep_removed)


def test_old_keys_keep_their_ids_and_new_keys_follow_sorted():
    old = ["pear", "apple", "fig"]           # any order: ids are OLD's, not re-sorted
    keys, removed = grow(old, ["fig", "zucchini", "apple", "banana", "pear"])
    assert keys == ["pear", "apple", "fig", "banana", "zucchini"] and removed == []
    assert grow(old, ["apple", "fig", "pear"]) == (old, [])


def test_a_removed_class_is_named_or_kept_empty_on_request():
    with pytest.raises(DatasetError) as err:
        grow(["a", "b", "c", "d", "e"], ["a", "c", "x"])
    message = str(err.value)
    assert message.startswith("OLD/classes.tsv: 3 of its 5 classes are not in the input INPUT: "
                              "'b' (id 1), 'd' (id 3), 'e' (id 4)")
    assert "--keep-removed-classes" in message and "\n" not in message
    assert grow(["a", "b", "c"], ["a", "c", "x"], keep_removed=True) == \
        (["a", "b", "c", "x"], ["b"])


@pytest.mark.parametrize("now", ["Cola", " cola", "COLA  "])
def test_a_changed_key_is_named_even_when_removed_classes_are_kept(now):
    old = ["apple", "cola"]
    for keep in (False, True):
        with pytest.raises(DatasetError, match=rf"1 of its class keys changed in the input "
                                               rf"INPUT .*'cola' \(id 1\) as '{now}'"):
            grow(old, ["apple", now], keep_removed=keep)


def test_a_key_that_collides_in_unicode_form_is_named():
    with pytest.raises(DatasetError) as err:           # a new key against an old one
        grow(["caf\u00e9", "tea"], ["caf\u00e9", "tea", NFD_CAFE])
    assert str(err.value).startswith("OLD/classes.tsv: class key 'cafe\\u0301' of the input "
                                     "INPUT collides with its class 0 'caf\\xe9'")
    with pytest.raises(DatasetError) as err:           # two new keys
        grow(["tea"], ["tea", "caf\u00e9", NFD_CAFE])
    assert str(err.value).startswith("INPUT: class keys 'cafe\\u0301' and 'caf\\xe9' collide")
    with pytest.raises(DatasetError, match="'\\\\u212a' of the input INPUT collides with its "
                                           "class 1 'K'"):
        grow(["J", "K"], ["J", "K", "\u212a"])         # KELVIN SIGN, NFC form 'K'
    assert grow(["cola"], ["cola", "Cola"])[0] == ["cola", "Cola"]   # case alone: two classes


def test_listing_relabelled_to_the_grown_table():
    listing = Listing("in", "in", ["a/1", "b/1", "b/2", "c/1"], np.array([0, 1, 1, 2]),
                      ["a", "b", "c"], False)
    grown = listing.with_class_keys(["c", "x", "a", "b"])
    assert [grown.class_keys[i] for i in grown.labels_m] == ["a", "b", "b", "c"]
    assert grown.digest() == listing.digest()


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """v1 (6 classes) <- v2 (+3) <- v3 (+2) by synthetic --grow-from, and an unrelated one.
    Tests that change them work on a copy (`copied`)."""
    tmp_path = tmp_path_factory.mktemp("versions")
    generate(tmp_path / "v1", PARAMS, 6, progress=False)
    for old, new, more in (("v1", "v2", 3), ("v2", "v3", 2)):
        assert main(["--out", str(tmp_path / new), "--grow-from", str(tmp_path / old),
                     "--new-classes", str(more)]) == 0
    # Unrelated: other counts. (With v1's keys and counts its classes.tsv would be v1's, and a
    # version is identified by its classes.tsv: it would count as v1.)
    generate(tmp_path / "other", SyntheticParams(dim=8, per_class=3, val_per_class=1), 6,
             progress=False)
    generate(tmp_path / "twin", PARAMS, 6, progress=False)
    return tmp_path


def test_synthetic_growth_records_the_lineage(versions):
    infos = {v: load_dataset_info(versions / v) for v in ("v1", "v2", "v3")}
    assert infos["v1"].lineage == ()
    assert infos["v3"].lineage == (
        Ancestor(str(versions / "v2"), sha256_file(versions / "v2/classes.tsv"), 9),
        Ancestor(str(versions / "v1"), sha256_file(versions / "v1/classes.tsv"), 6))
    for v, info in infos.items():
        assert info.classes_sha256 == sha256_file(versions / v / "classes.tsv")
        inspect_dataset(versions / v)


def test_descends_from_child_and_grandchild_only(versions):
    info = {v: load_dataset_info(versions / v) for v in ("v1", "v2", "v3", "other")}
    old = {v: ancestor_of(versions / v) for v in info}
    ok, why = descends_from(info["v2"], old["v1"])
    assert ok and why == f"grown from {versions / 'v1'} (its parent): its 6 classes are ids " \
                         "0..5 of the 9"
    ok, why = descends_from(info["v3"], old["v1"])
    assert ok and "ancestor, 2 versions back" in why
    assert descends_from(info["v3"], old["v2"])[0]
    for new, of in (("v1", "v2"), ("v2", "v3"), ("v2", "v2"), ("v3", "other"), ("other", "v1")):
        ok, why = descends_from(info[new], old[of])
        assert not ok and why, (new, of)
    assert descends_from(info["v1"], old["v2"])[1] == \
        "it has no lineage (it was not built with --grow-from)"
    assert "does not hold" in descends_from(info["v3"], old["other"])[1]
    assert descends_from(info["v2"], ancestor_of(versions / "twin"))[0]   # v1's classes.tsv


@pytest.fixture
def copied(versions, tmp_path):
    """A copy of `versions` (the lineage paths still name the originals)."""
    shutil.copytree(versions, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_a_moved_ancestor_is_recognised_by_its_classes(copied):
    versions = copied
    generate(versions / "v1b", PARAMS, 6, progress=False)
    assert main(["--out", str(versions / "v2b"), "--grow-from", str(versions / "v1b"),
                 "--new-classes", "1"]) == 0
    (versions / "v1b").rename(versions / "moved")
    info = load_dataset_info(versions / "v2b")
    assert descends_from(info, ancestor_of(versions / "moved"))[0]
    line = inspect_dataset(versions / "v2b").lines("v2b")[-1]
    assert line.startswith(f"lineage: grown from {versions / 'v1b'}") and "not found there" in line


def test_inspect_names_every_ancestor(versions):
    lines = inspect_dataset(versions / "v3").lines("v3")
    assert lines[-2] == (f"lineage: grown from {versions / 'v2'} (9 classes, classes.tsv sha256 "
                         f"{sha256_file(versions / 'v2/classes.tsv')[:12]}..., present there)")
    assert lines[-1].startswith(f"  which grew from {versions / 'v1'} (6 classes")
    assert inspect_dataset(versions / "v1").lines("v1")[-1] == \
        "lineage: none (not grown from another version)"


def test_an_edited_classes_tsv_is_caught(copied):
    versions = copied
    path = versions / "v2" / "classes.tsv"
    path.write_text(path.read_text().replace("c0000001", "c000000x"))
    with pytest.raises(DatasetError, match="differs from dataset.json's classes_sha256"):
        ancestor_of(versions / "v2")
    with pytest.raises(DatasetError, match="classes.tsv: sha256 .* does not match"):
        inspect_dataset(versions / "v2")


def test_grow_classes_reads_the_old_version(versions):
    grown = grow_classes(versions / "v1", ["c0000005", "new", "c0000000", "c0000001", "c0000002",
                                           "c0000003", "c0000004"], "INPUT", False)
    assert grown.keys == read_classes(versions / "v1", 6)[0] + ["new"] and grown.num_old == 6
    assert grown.lineage == (ancestor_of(versions / "v1"),)
    assert grown.summary() == (f"grown from {versions / 'v1'}: its 6 classes keep ids 0..5, "
                               "1 new classes get ids 6..6")


@pytest.mark.parametrize("lineage, problem", [
    ("x", "'lineage' must be a list"),
    ([{"path": "/a", "classes_sha256": "0" * 63, "num_classes": 2}],
     "'lineage[0].classes_sha256' must be 64 lowercase hex digits"),
    ([{"path": "/a", "classes_sha256": "0" * 64, "num_classes": 99}],
     "'lineage[0].num_classes' is 99, more than the 6 classes of the version grown from it"),
    ([{"path": "/a", "classes_sha256": "0" * 64, "num_classes": 2},
      {"path": "/b", "classes_sha256": "1" * 64, "num_classes": 3}],
     "'lineage[1].num_classes' is 3, more than the 2 classes"),
    ([{"classes_sha256": "0" * 64, "num_classes": 2}], "'lineage[0]' must hold 'path'"),
])
def test_lineage_schema_is_checked(copied, lineage, problem):
    versions = copied
    path = versions / "v1" / "dataset.json"
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({**obj, "lineage": lineage}))
    with pytest.raises(DatasetError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_dataset_info(versions / "v1")


def test_duplicate_old_keys_are_named(copied):
    versions = copied
    path = versions / "v1" / "classes.tsv"
    path.write_text(path.read_text().replace("c0000004", "c0000001"))
    with pytest.raises(DatasetError, match="not unique: 'c0000001' is class 1 and class 4"):
        grow_classes(versions / "v1", ["c0000001"], "INPUT", True)
