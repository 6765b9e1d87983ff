"""python -m data_prep.inspect: a valid dataset passes; each kind of damage exits 2 with one line
naming the file."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_dataset_format import BROKEN_CASES, break_dataset, write_dataset

REPO = Path(__file__).resolve().parents[2]


def run_inspect(dataset_dir):
    return subprocess.run([sys.executable, "-m", "data_prep.inspect", str(dataset_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def assert_one_line_error(result, path):
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {path}: ")


def test_valid_dataset_prints_summary(tmp_path):
    out = write_dataset(tmp_path / "ds")
    result = run_inspect(out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{out}: valid dataset (format 1)"
    assert lines[1] == "kind vectors, input shape [4] float32, 7 classes"
    assert lines[2].startswith("train 103 samples in 11 shards, val 37 samples in 4 shards, ")
    assert lines[2].endswith(" MiB on disk")
    assert lines[3] == "train samples per class: min 14, mean 14.71, max 15"


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_broken_dataset_exits_2_naming_the_file(tmp_path, case):
    out = write_dataset(tmp_path / "ds")
    break_dataset(out, case)
    result = run_inspect(out)
    assert_one_line_error(result, out / BROKEN_CASES[case])
    expected = {"corrupt_middle": "does not match", "label_negative": "label -1 at row 3",
                "label_too_large": "label 7 at row 3", "truncated_shard": "truncated"}
    assert expected.get(case, "") in result.stderr


def test_class_counts_must_match_train_labels(tmp_path):
    out = write_dataset(tmp_path / "ds")
    tsv = out / "classes.tsv"
    tsv.write_text(tsv.read_text().replace("2\tk2\t15", "2\tk2\t16"))
    result = run_inspect(out)
    assert_one_line_error(result, tsv)
    assert "class 2 (k2) has count 16 but the train shards hold 15" in result.stderr


def test_missing_directory_and_help(tmp_path):
    assert_one_line_error(run_inspect(tmp_path / "nope"), tmp_path / "nope" / "dataset.json")
    assert run_inspect("--help").returncode == 0
