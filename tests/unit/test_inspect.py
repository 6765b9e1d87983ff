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


# What each broken case's error line must say after "error: PATH: " (write_dataset's shards
# hold float32 inputs of 4 values and labels in [0, 7); break_dataset damages row 3 of the
# labels and the inputs of train/shard-00001.h5).
EXPECTED_MESSAGES = {
    "missing_dataset_json": ["missing", "has no dataset.json"],
    "missing_shard": ["shard listed in dataset.json is missing"],
    "truncated_shard": ["cannot be opened as HDF5", "truncated"],
    "corrupt_header": ["cannot be opened as HDF5", "corrupt"],
    "corrupt_middle": ["sha256", "does not match", "in dataset.json", "corrupt"],
    "label_negative": ["label -1 at row 3 is outside [0, 7)"],
    "label_too_large": ["label 7 at row 3 is outside [0, 7)"],
    "shape_mismatch": ["/inputs is float32 [5] per sample but dataset.json says float32 [4]"],
    "dtype_mismatch": ["/inputs is float64 [4] per sample but dataset.json says float32 [4]"],
}


def test_every_broken_case_has_an_expected_message():
    assert set(EXPECTED_MESSAGES) == set(BROKEN_CASES), \
        "each case of BROKEN_CASES needs the words its error must say in EXPECTED_MESSAGES"


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_broken_dataset_exits_2_naming_the_file(tmp_path, case):
    out = write_dataset(tmp_path / "ds")
    break_dataset(out, case)
    result = run_inspect(out)
    assert_one_line_error(result, out / BROKEN_CASES[case])
    message = result.stderr[len(f"error: {out / BROKEN_CASES[case]}: "):]
    for words in EXPECTED_MESSAGES[case]:
        assert words in message, (case, result.stderr)
    # The file or key at fault is named: the shard (or dataset.json) in the path, the array key
    # in the message where one array is at fault.
    assert Path(BROKEN_CASES[case]).name == Path(result.stderr.split(": ")[1]).name
    key = {"label_negative": "label", "label_too_large": "label", "shape_mismatch": "/inputs",
           "dtype_mismatch": "/inputs"}.get(case)
    assert key is None or key in message


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
