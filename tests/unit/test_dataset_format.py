"""The dataset format: DatasetWriter output (data_prep/writer.py), dataset.json and shard checks
(data_prep/format.py).

Also holds the helpers that build small datasets with known contents and break them in each
way the tools must report; test_reader.py and test_inspect.py import them.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.format import (CLASSES_HEADER, DatasetError, load_dataset_info, open_shard,
                              read_classes, sha256_file)
from data_prep.writer import DatasetWriter

DIM = 4
NUM_CLASSES = 7
# Each case: the file that must be named in the error (relative to the dataset directory).
BROKEN_CASES = {
    "missing_dataset_json": "dataset.json",
    "missing_shard": "train/shard-00001.h5",
    "truncated_shard": "train/shard-00001.h5",
    "corrupt_header": "train/shard-00001.h5",
    "corrupt_middle": "train/shard-00001.h5",
    "label_negative": "train/shard-00001.h5",
    "label_too_large": "train/shard-00001.h5",
    "shape_mismatch": "train/shard-00001.h5",
    "dtype_mismatch": "train/shard-00001.h5",
}


def known_inputs(start, stop, dim=DIM):
    """float32 (n, dim): every element of row i is the global sample index i."""
    return np.repeat(np.arange(start, stop, dtype=np.float32)[:, None], dim, axis=1)


def write_dataset(out_dir, num_train=103, num_val=37, shard_size=10, **writer_kwargs):
    """A vectors dataset whose sample i has inputs i (every dim) and label i % NUM_CLASSES."""
    with DatasetWriter(out_dir, "vectors", (DIM,), NUM_CLASSES,
                       [f"k{i}" for i in range(NUM_CLASSES)], shard_size=shard_size,
                       generator={"name": "test"}, **writer_kwargs) as writer:
        for split, n in (("train", num_train), ("val", num_val)):
            for start in range(0, n, 16):   # several writes, not aligned with shards
                stop = min(start + 16, n)
                writer.write(split, known_inputs(start, stop), np.arange(start, stop) % NUM_CLASSES)
    return Path(out_dir)


def rewrite_shard(dataset_dir, rel, inputs=None, labels=None):
    """Replaces a shard's arrays and updates its checksum, so only the intended problem remains."""
    path = Path(dataset_dir) / rel
    with h5py.File(path, "r") as h5:
        inputs = h5["inputs"][:] if inputs is None else inputs
        labels = h5["labels"][:] if labels is None else labels
    with h5py.File(path, "w") as h5:
        h5["inputs"], h5["labels"] = inputs, labels
    info_path = Path(dataset_dir) / "dataset.json"
    obj = json.loads(info_path.read_text())
    for shard in obj["splits"]["train"]["shards"] + obj["splits"]["val"]["shards"]:
        if shard["path"] == rel:
            shard["sha256"] = sha256_file(path)
    info_path.write_text(json.dumps(obj))


def break_dataset(dataset_dir, case):
    """Damages a dataset from write_dataset in the way `case` (a BROKEN_CASES key) names."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / BROKEN_CASES[case]
    if case in ("missing_dataset_json", "missing_shard"):
        path.unlink()
    elif case == "truncated_shard":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case in ("corrupt_header", "corrupt_middle"):
        data = bytearray(path.read_bytes())
        at = 0 if case == "corrupt_header" else len(data) // 2
        data[at:at + 64] = b"\xa5" * 64
        path.write_bytes(bytes(data))
    else:
        with h5py.File(path, "r") as h5:
            inputs, labels = h5["inputs"][:], h5["labels"][:]
        if case == "label_negative":
            labels[3] = -1
        elif case == "label_too_large":
            labels[3] = NUM_CLASSES
        elif case == "shape_mismatch":
            inputs = np.zeros((len(labels), DIM + 1), np.float32)
        else:
            inputs = inputs.astype(np.float64)
        rewrite_shard(dataset_dir, BROKEN_CASES[case], inputs, labels)


def read_split(dataset_dir, split):
    info = load_dataset_info(dataset_dir)
    inputs, labels = [], []
    for shard in info.splits[split].shards:
        with open_shard(dataset_dir, info, shard) as h5:
            inputs.append(h5["inputs"][:])
            labels.append(h5["labels"][:])
    return np.concatenate(inputs), np.concatenate(labels)


def test_writer_output_matches_contract(tmp_path):
    out = write_dataset(tmp_path / "ds")
    obj = json.loads((out / "dataset.json").read_text())
    assert obj["format_version"] == 1 and obj["kind"] == "vectors"
    assert obj["input_shape"] == [DIM] and obj["input_dtype"] == "float32"
    assert obj["num_classes"] == NUM_CLASSES and obj["generator"] == {"name": "test"}
    train = obj["splits"]["train"]
    assert train["num_samples"] == 103
    assert [s["num_samples"] for s in train["shards"]] == [10] * 10 + [3]
    assert train["shards"][4]["path"] == "train/shard-00004.h5"
    for shard in train["shards"] + obj["splits"]["val"]["shards"]:
        assert sha256_file(out / shard["path"]) == shard["sha256"]
    inputs, labels = read_split(out, "train")
    np.testing.assert_array_equal(inputs, known_inputs(0, 103))
    assert labels.dtype == np.int64 and list(labels) == [i % NUM_CLASSES for i in range(103)]
    assert read_split(out, "val")[0].shape == (37, DIM)
    keys, counts = read_classes(out, NUM_CLASSES)
    assert keys == [f"k{i}" for i in range(NUM_CLASSES)]
    assert list(counts) == list(np.bincount(np.arange(103) % NUM_CLASSES))
    assert (out / "classes.tsv").read_text().splitlines()[:2] == [CLASSES_HEADER, "0\tk0\t15"]
    assert not list(out.rglob("*.tmp"))


def test_writer_images_and_callable_keys(tmp_path):
    images = np.arange(5 * 6 * 6 * 3, dtype=np.uint8).reshape(5, 6, 6, 3)
    with DatasetWriter(tmp_path, "images", (6, 6, 3), 3, lambda i: f"c{i:07d}") as writer:
        writer.write("train", images, np.array([0, 1, 2, 0, 1]))
    info = load_dataset_info(tmp_path)
    assert info.kind == "images" and info.input_dtype == np.uint8
    assert info.splits["val"].num_samples == 0 and info.splits["val"].shards == ()
    np.testing.assert_array_equal(read_split(tmp_path, "train")[0], images)
    assert read_classes(tmp_path, 3)[0] == ["c0000000", "c0000001", "c0000002"]


def test_writer_refuses_existing_dataset_and_overwrite_replaces_it(tmp_path):
    out = write_dataset(tmp_path / "ds", shard_size=10)
    before = (out / "dataset.json").read_bytes()
    with pytest.raises(DatasetError, match="holds a dataset.*overwrite"):
        write_dataset(out)
    assert (out / "dataset.json").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    write_dataset(out, shard_size=50, overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]   # no stale shards remain
    assert (out / "notes.txt").read_text() == "mine"
    assert load_dataset_info(out).splits["train"].num_samples == 103


def test_writer_refuses_leftover_shards(tmp_path):
    out = write_dataset(tmp_path / "ds")
    (out / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="unfinished dataset"):
        write_dataset(out)


def test_failed_write_leaves_no_dataset_json(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path, "vectors", (DIM,), 2, ["a", "b"], shard_size=2) as writer:
            writer.write("train", known_inputs(0, 5), np.zeros(5, np.int64))
            raise RuntimeError("generator failed")
    assert not (tmp_path / "dataset.json").exists()


@pytest.mark.parametrize("inputs, labels, match", [
    (np.zeros((3, DIM), np.float64), np.zeros(3, np.int64), "float32"),
    (np.zeros((3, DIM + 1), np.float32), np.zeros(3, np.int64), "float32"),
    (np.zeros((3, DIM), np.float32), np.zeros(2, np.int64), "labels must be integers"),
    (np.zeros((3, DIM), np.float32), np.array([0, 1, 2]), r"labels must be in \[0, 2\)"),
    (np.zeros((3, DIM), np.float32), np.array([0, -1, 1]), r"labels must be in \[0, 2\)"),
])
def test_writer_rejects_bad_samples(tmp_path, inputs, labels, match):
    writer = DatasetWriter(tmp_path, "vectors", (DIM,), 2, ["a", "b"])
    with pytest.raises(ValueError, match=match):
        writer.write("train", inputs, labels)


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="images need"):
        DatasetWriter(tmp_path, "images", (8, 8), 2, ["a", "b"])
    with pytest.raises(ValueError, match="2 keys for 3 classes"):
        DatasetWriter(tmp_path, "vectors", (DIM,), 3, ["a", "b"])
    writer = DatasetWriter(tmp_path, "vectors", (DIM,), 2, ["a", "b\tc"])
    writer.write("train", known_inputs(0, 2), np.array([0, 1]))
    with pytest.raises(ValueError, match="tab or newline"):
        writer.finish()


@pytest.mark.parametrize("edit, match", [
    (lambda obj: obj.update(format_version=2), "format_version 2 is not supported"),
    (lambda obj: obj.pop("num_classes"), r"missing key\(s\) \['num_classes'\]"),
    (lambda obj: obj.update(input_dtype="float64"), "input_dtype of vectors must be float32"),
    (lambda obj: obj["splits"]["train"].update(num_samples=5), "splits.train.num_samples' is 5"),
    (lambda obj: obj["splits"]["val"]["shards"][0].update(path="x.h5"),
     r"splits.val.shards\[0\].path' must be 'val/shard-00000.h5'"),
    (lambda obj: obj["splits"]["val"]["shards"][1].update(sha256="abc"), "64 lowercase hex"),
])
def test_dataset_json_schema_errors_name_the_key(tmp_path, edit, match):
    out = write_dataset(tmp_path / "ds")
    obj = json.loads((out / "dataset.json").read_text())
    edit(obj)
    (out / "dataset.json").write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset_info(out)
    assert str(info.value).startswith(str(out / "dataset.json") + ": ")
    assert "\n" not in str(info.value)


def test_dataset_json_that_is_not_json(tmp_path):
    out = write_dataset(tmp_path / "ds")
    (out / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot be read as JSON"):
        load_dataset_info(out)


@pytest.mark.parametrize("case, match", [
    ("missing_shard", "shard listed in dataset.json is missing"),
    ("truncated_shard", "cannot be opened as HDF5, the file is truncated or corrupt"),
    ("corrupt_header", "cannot be opened as HDF5"),
    ("shape_mismatch", r"float32 \[5\] per sample but dataset.json says float32 \[4\]"),
    ("dtype_mismatch", r"float64 \[4\] per sample"),
])
def test_open_shard_errors(tmp_path, case, match):
    out = write_dataset(tmp_path / "ds")
    break_dataset(out, case)
    dataset_info = load_dataset_info(out)
    with pytest.raises(DatasetError, match=match) as info:
        open_shard(out, dataset_info, dataset_info.splits["train"].shards[1])
    assert info.value.path == str(out / "train/shard-00001.h5")
    assert "\n" not in str(info.value)


def test_open_shard_count_mismatch(tmp_path):
    out = write_dataset(tmp_path / "ds")
    rewrite_shard(out, "train/shard-00000.h5", known_inputs(0, 9), np.zeros(9, np.int64))
    dataset_info = load_dataset_info(out)
    with pytest.raises(DatasetError, match="holds 9 inputs and 9 labels but dataset.json says 10"):
        open_shard(out, dataset_info, dataset_info.splits["train"].shards[0])


def test_classes_tsv_errors(tmp_path):
    out = write_dataset(tmp_path / "ds")
    lines = (out / "classes.tsv").read_text().splitlines()
    (out / "classes.tsv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="lists 6 classes but dataset.json says 7"):
        read_classes(out, NUM_CLASSES)
    (out / "classes.tsv").write_text("\n".join(lines[:2] + ["5\tk1\t2"]) + "\n")
    with pytest.raises(DatasetError, match="line 3 must be '1<TAB>key<TAB>count'"):
        read_classes(out, NUM_CLASSES)


def test_dataset_error_is_one_line_value_error():
    err = DatasetError("/d/x.h5", "bad\nthing", "fix it")
    assert isinstance(err, ValueError)
    assert str(err) == "/d/x.h5: bad thing; fix it"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_writer_refuses_non_finite_inputs_naming_the_shard_and_row(tmp_path, bad):
    out = tmp_path / "ds"
    with pytest.raises(DatasetError) as info:
        with DatasetWriter(out, "vectors", (DIM,), NUM_CLASSES,
                           [f"k{i}" for i in range(NUM_CLASSES)], shard_size=10) as writer:
            writer.write("train", known_inputs(0, 16), np.arange(16) % NUM_CLASSES)
            inputs = known_inputs(16, 32)
            inputs[7, 2] = bad   # sample 23 of the split: it would go to shard 2
            writer.write("train", inputs, np.arange(16, 32) % NUM_CLASSES)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{out / 'train/shard-00002.h5'}: input row 7 of this write ")
    assert "sample 23 of the train split" in message and f"({bad})" in message
    # Nothing of the refused write reached a shard, and the dataset was never finished.
    assert not (out / "dataset.json").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-00000.h5"]
    with h5py.File(out / "train/shard-00000.h5") as h5:
        assert np.isfinite(h5["inputs"][:]).all()


def test_synthetic_data_is_finite_and_images_are_not_checked(tmp_path):
    images = np.full((3, 4, 4, 3), 255, dtype=np.uint8)
    with DatasetWriter(tmp_path / "img", "images", (4, 4, 3), 2, ["a", "b"]) as writer:
        writer.write("train", images, np.array([0, 1, 0]))
    from data_prep.format import nonfinite_rows

    assert nonfinite_rows(images).size == 0
    x = known_inputs(0, 5)
    x[[1, 4], 0] = [np.nan, -np.inf]
    assert nonfinite_rows(x).tolist() == [1, 4]
    assert nonfinite_rows(np.float32([[3e38, -3e38]])).size == 0   # huge but finite
