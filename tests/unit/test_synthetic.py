"""python -m data_prep.synthetic: the CLI, determinism, growing, learnability."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.format import load_dataset_info, read_classes
from data_prep.inspect import inspect_dataset
from data_prep.synthetic import (SyntheticGenerator, SyntheticParams, class_key, generate,
                                 main)
from tests.unit.test_dataset_format import read_split

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_prep.synthetic", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_writes_a_valid_dataset(tmp_path):
    out = tmp_path / "ds"
    result = run_cli("--out", out, "--num-classes", 40, "--per-class", 5, "--val-per-class", 2,
                     "--dim", 24, "--shard-size", 64, "--seed", 3, "--family-size", 8)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(f"wrote {out}: vectors")
    summary = inspect_dataset(out)
    info = summary.dataset_info
    assert info.kind == "vectors" and info.input_shape == (24,)
    assert info.num_classes == 40
    assert (info.splits["train"].num_samples, info.splits["val"].num_samples) == (200, 80)
    assert len(info.splits["train"].shards) == 4
    assert list(summary.train_counts_C) == [5] * 40
    assert info.generator["seed"] == 3 and info.generator["family_size"] == 8
    assert read_classes(out, 40)[0][:2] == ["c0000000", "c0000001"]
    inputs, labels = read_split(out, "train")
    assert list(labels[:7]) == [0, 0, 0, 0, 0, 1, 1]   # class-major
    assert inputs.dtype == np.float32 and 0.5 < inputs.std() < 2.0


def test_cli_refuses_existing_output_unless_overwrite(tmp_path):
    args = ["--out", tmp_path, "--num-classes", 3, "--per-class", 2, "--val-per-class", 1,
            "--dim", 8]
    assert run_cli(*args).returncode == 0
    before = (tmp_path / "dataset.json").read_text()
    refused = run_cli(*args[:-1], 16)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/dataset.json:")
    assert "--overwrite" in refused.stderr
    assert (tmp_path / "dataset.json").read_text() == before
    assert run_cli(*args[:-1], 16, "--overwrite").returncode == 0
    assert load_dataset_info(tmp_path).input_shape == (16,)


def test_cli_usage_errors(tmp_path):
    assert run_cli("--help").returncode == 0
    missing = run_cli("--out", tmp_path, "--num-classes", 3)
    assert missing.returncode == 2
    assert "missing --per-class, --val-per-class, --dim" in missing.stderr
    alone = run_cli("--out", tmp_path, "--new-classes", 3)
    assert alone.returncode == 2 and "go together" in alone.stderr


def test_samples_do_not_depend_on_which_classes_are_generated_together():
    generator = SyntheticGenerator(SyntheticParams(seed=7, dim=16, per_class=4))
    all_inputs, all_labels = generator.samples(np.arange(10), "train", 4)
    some_inputs, some_labels = generator.samples(np.array([6, 2]), "train", 4)
    np.testing.assert_array_equal(some_labels, [6] * 4 + [2] * 4)
    np.testing.assert_allclose(some_inputs[:4], all_inputs[24:28], rtol=1e-5, atol=1e-6)
    more, _ = generator.samples(np.array([6, 2]), "train", 9)   # a sample's noise is its own
    np.testing.assert_allclose(more[:4], some_inputs[:4], rtol=1e-5, atol=1e-6)
    val, _ = generator.samples(np.array([6, 2]), "val", 4)
    assert not np.allclose(val, some_inputs)
    other_seed, _ = SyntheticGenerator(SyntheticParams(seed=8, dim=16)).samples(
        np.array([6, 2]), "train", 4)
    assert not np.allclose(other_seed, some_inputs)


def test_grow_keeps_old_classes_bit_for_bit(tmp_path):
    params = SyntheticParams(seed=2, dim=12, per_class=3, val_per_class=2, family_size=4)
    generate(tmp_path / "old", params, 30, shard_size=25, progress=False)
    assert main(["--out", str(tmp_path / "new"), "--grow-from", str(tmp_path / "old"),
                 "--new-classes", "20", "--shard-size", "40", "--dim", "12"]) == 0
    new = load_dataset_info(tmp_path / "new")
    assert new.num_classes == 50 and new.generator["grown_from"] == str(tmp_path / "old")
    for split, per_class in (("train", 3), ("val", 2)):
        old_inputs, old_labels = read_split(tmp_path / "old", split)
        new_inputs, new_labels = read_split(tmp_path / "new", split)
        np.testing.assert_array_equal(new_inputs[:30 * per_class], old_inputs)
        np.testing.assert_array_equal(new_labels[:30 * per_class], old_labels)
        assert sorted(set(new_labels[30 * per_class:])) == list(range(30, 50))
    keys, counts = read_classes(tmp_path / "new", 50)
    assert keys == [class_key(i) for i in range(50)] and list(counts) == [3] * 50
    inspect_dataset(tmp_path / "new")


def test_grow_refuses_disagreeing_flags(tmp_path, capsys):
    generate(tmp_path / "old", SyntheticParams(dim=8, per_class=2), 5, progress=False)
    code = main(["--out", str(tmp_path / "new"), "--grow-from", str(tmp_path / "old"),
                 "--new-classes", "2", "--dim", "9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'old' / 'dataset.json'}: --dim 9 disagrees")
    assert not (tmp_path / "new" / "dataset.json").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "old"), "--grow-from", str(tmp_path / "old"),
              "--new-classes", "2"])


def test_images_kind(tmp_path):
    params = SyntheticParams(kind="images", dim=16, image_size=12, per_class=3, val_per_class=1)
    generate(tmp_path, params, 5, progress=False)
    inputs, labels = read_split(tmp_path, "train")
    assert inputs.shape == (15, 12, 12, 3) and inputs.dtype == np.uint8
    assert inputs.min() < 40 and inputs.max() > 215   # uses the range
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["input_shape"] == [12, 12, 3] and info["input_dtype"] == "uint8"


def nearest_class_mean(params, num_classes, per_class=10, val_per_class=5):
    """(val accuracy, share of errors that pick a class of the true class's family)."""
    generator = SyntheticGenerator(params)
    ids = np.arange(num_classes)
    train, _ = generator.samples(ids, "train", per_class)
    val, val_labels = generator.samples(ids, "val", val_per_class)
    means_CD = train.reshape(num_classes, per_class, -1).astype(np.float64).mean(axis=1)
    val_VD = val.reshape(len(val), -1).astype(np.float64)
    dist_VC = (means_CD ** 2).sum(1)[None, :] - 2 * val_VD @ means_CD.T
    pred = dist_VC.argmin(axis=1)
    wrong = pred != val_labels
    family_pred = pred[wrong] // params.family_size
    family_true = val_labels[wrong] // params.family_size
    return (pred == val_labels).mean(), (family_pred == family_true).mean()


@pytest.mark.parametrize("kind", ["vectors", "images"])
def test_learnable_but_not_trivially_and_families_confuse(kind):
    params = SyntheticParams(seed=1, dim=64, kind=kind, family_size=16)
    accuracy, within_family = nearest_class_mean(params, 200)
    assert 0.4 < accuracy < 0.95           # chance is 0.005
    assert within_family > 0.8             # confusions stay inside the family
