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


def poison(out, rows_by_shard):
    """NaN/inf in the given rows of the given shards of a write_dataset dataset (checksums
    updated, so only the values are wrong)."""
    import numpy as np

    from tests.unit.test_dataset_format import known_inputs, rewrite_shard

    for rel, rows in rows_by_shard.items():
        split, index = rel.split("/")[0], int(rel[-8:-3])
        inputs = known_inputs(10 * index, 10 * index + 10)
        inputs[rows, 1] = np.inf if split == "val" else np.nan
        rewrite_shard(out, rel, inputs=inputs)


def run_inspect_args(*args):
    return subprocess.run([sys.executable, "-m", "data_prep.inspect", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_non_finite_values_are_counted_and_the_first_is_named(tmp_path):
    out = write_dataset(tmp_path / "ds")
    poison(out, {"train/shard-00003.h5": [2, 7], "val/shard-00001.h5": [0]})
    result = run_inspect(out)
    assert_one_line_error(result, out / "train/shard-00003.h5")
    assert ("input row 2 (row in this shard; sample 32 of the train split) holds a non-finite "
            "value (nan), the first of 3 non-finite rows in 2 shard(s) among all 140 rows; "
            "rebuild the shard or drop the row") in result.stderr


def test_valid_dataset_summary_states_the_value_check(tmp_path):
    out = write_dataset(tmp_path / "ds")
    full = run_inspect(out)
    assert full.returncode == 0
    assert full.stdout.splitlines()[4] == "values: all 140 input rows finite"
    quick = run_inspect_args(out, "--quick")
    assert quick.returncode == 0, quick.stderr
    # Shards of 10 rows of 16 bytes fit one chunk: --quick reads every row here, no hashes.
    assert quick.stdout.splitlines()[4] == (
        "values: 140 of 140 input rows checked (--quick: the first and one random chunk of "
        "every shard), all finite; sha256 not checked")


def test_quick_checks_the_first_and_one_random_chunk_of_each_shard(tmp_path, monkeypatch):
    """With 2-row chunks, --quick reads rows 0-1 and one other pair of each 10-row shard: a
    NaN in row 0 is found, one in a chunk it does not read is not; the full check finds both."""
    from data_prep import inspect

    out = write_dataset(tmp_path / "ds")
    monkeypatch.setattr(inspect, "QUICK_CHUNK_BYTES", 2 * 16)
    poison(out, {"train/shard-00005.h5": [0]})
    with pytest.raises(inspect.DatasetError, match="sample 50 of the train split.*--quick"):
        inspect.inspect_dataset(out, quick=True)
    out2 = write_dataset(tmp_path / "ds2")
    # The random chunk of train shard 5 (position 5) under the seeded generator:
    import numpy as np

    chunk = int(np.random.default_rng([5]).integers(1, 5))
    missed = [2 * c for c in range(1, 5) if c != chunk][0]
    poison(out2, {"train/shard-00005.h5": [missed]})
    summary = inspect.inspect_dataset(out2, quick=True)
    assert "checked" in summary.lines(out2)[4] and "sha256 not checked" in summary.lines(out2)[4]
    with pytest.raises(inspect.DatasetError, match=f"input row {missed} "):
        inspect.inspect_dataset(out2)


def test_help_describes_the_value_check_and_quick():
    result = run_inspect_args("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "finite" in text and "--quick" in text and "random chunk" in text
