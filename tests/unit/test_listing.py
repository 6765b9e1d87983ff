"""The input of build_shards (data_prep/listing.py, data_prep/images.py): folder and manifest
listings, the per-class train/val split, the skip reasons of unusable files. No decoding of
real images, no MPI: the end-to-end runs are in tests/integration/test_build_shards.py."""

import numpy as np
import pytest

from data_prep.format import DatasetError
from data_prep.images import UnreadableImage, load_image
from data_prep.listing import Listing, list_input, split_indices


def test_split_is_per_class_and_independent_of_listing_order():
    names = [f"c{c}/{i}.jpg" for c in range(3) for i in range(5 + 5 * c)]
    labels = np.array([int(n[1]) for n in names])
    listing = Listing("in", "in", names, labels, ["c0", "c1", "c2"], False)
    splits = split_indices(listing, seed=3, val_fraction=0.2)
    val_names = {names[i] for i in splits["val"]}
    assert [sum(n.startswith(f"c{c}/") for n in val_names) for c in range(3)] == [1, 2, 3]
    assert sorted(np.concatenate([splits["train"], splits["val"]])) == list(range(len(names)))
    order = np.random.default_rng(0).permutation(len(names))
    shuffled = Listing("in", "in", [names[i] for i in order], labels[order], ["c0", "c1", "c2"],
                       False)
    again = split_indices(shuffled, seed=3, val_fraction=0.2)
    for split in ("train", "val"):  # the same files in the same sample order
        assert [shuffled.names[i] for i in again[split]] == [names[i] for i in splits[split]]
    other_seed = split_indices(listing, seed=4, val_fraction=0.2)
    assert {names[i] for i in other_seed["val"]} != val_names


def test_a_folder_and_its_manifest_list_the_same_files(tmp_path):
    root = tmp_path / "root"
    for name in ("b/2.jpg", "b/sub/1.png", "a/x.jpg", "a/.hidden.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "stray.jpg").write_bytes(b"")
    folder = list_input(str(root), None, None)
    assert folder.names == ["a/x.jpg", "b/2.jpg", "b/sub/1.png"]
    assert folder.labels_m.tolist() == [0, 1, 1] and folder.class_keys == ["a", "b"]
    assert folder.skipped == [(str(root / "stray.jpg"), "not inside a class sub-folder")]
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,label\nroot/b/sub/1.png,b\nroot/a/x.jpg,a\n\nroot/b/2.jpg,b\n")
    listed = list_input(str(manifest), None, None)
    assert listed.from_manifest and listed.class_keys == ["a", "b"]
    assert [listed.path(i) for i in range(3)] == [str(tmp_path / "root" / n)
                                                  for n in folder.names]


@pytest.mark.parametrize("text, match", [
    ("path,class\na.jpg,x\na.jpg,y\n", "line 3 lists 'a.jpg' again"),
    ("path,kind\na.jpg,x\n", "has no class column named class, label or key"),
    ("path,class\na.jpg,\n", "line 2 has an empty class"),
    ("path,class\n", "lists no images"),
])
def test_bad_manifests_name_the_line_or_column(tmp_path, text, match):
    manifest = tmp_path / "list.csv"
    manifest.write_text(text)
    with pytest.raises(DatasetError, match=match) as err:
        list_input(str(manifest), None, None)
    assert err.value.path == str(manifest)


@pytest.mark.parametrize("content, reason", [
    (None, "missing"), (b"", "empty file"), (b"not an image\n", "not an image")])
def test_unusable_files_raise_the_skip_reason(tmp_path, content, reason):
    path = tmp_path / "f.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=f"^{reason}"):
        load_image(str(path), 8)
