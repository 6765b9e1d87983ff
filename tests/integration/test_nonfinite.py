"""Non-finite values through the real launcher (mpirun -np 2): bad input rows are one error
line naming the shard and row with exit 2, found at start (a cached split) or by one rank
mid-training (a memory-mapped split, the job ends promptly); a non-finite loss from finite
inputs (a row of 3e38 overflows the float32 forward pass) stops every rank at the same step
(`train.on_nonfinite=stop`) or is skipped with nothing changed on any rank (`skip`)."""
import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.batch_schedule import epoch_permutation
from data_prep.writer import DatasetWriter
from tests.integration.launch import mpirun_cmd, run
from tests.integration.test_train import train
from tests.unit.test_dataset_format import rewrite_shard
from tests.unit.test_nonfinite_training import (BAD_STEP, GLOBAL_BATCH, assert_same_state,
                                                assert_state_moved, poisoned_copy)

PER_RANK = GLOBAL_BATCH // 2
FLOAT32 = ["train.dtype=float32", "train.checkpoint_every=1", "train.keep_checkpoints=20"]
KNN = ["softmax.mode=knn", "softmax.k=8", "softmax.random_negatives=4", "knn.index=flat",
       "knn.refresh_every=4", "knn.init=random", "model.classifier_init=random"]


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def checkpoint(out, step):
    return Path(out) / f"checkpoints/step-{step:08d}"


@pytest.fixture(scope="module")
def overflowing(vectors_dataset, tmp_path_factory):
    """vectors60 with one train sample of 3e38s, read by rank 0 in step BAD_STEP."""
    out = tmp_path_factory.mktemp("overflow") / "data"
    poisoned_copy(vectors_dataset, out, (BAD_STEP - 1) * GLOBAL_BATCH + 3)
    return out


@pytest.mark.parametrize("mode", [[], KNN], ids=["full", "knn"])
def test_skip_changes_nothing_on_any_rank_and_the_run_completes(overflowing, tmp_path, mode):
    out = tmp_path / "skip"
    proc = train(2, overflowing, out, 10, PER_RANK, *FLOAT32, *mode, "train.on_nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both ranks' classifier shards, the backbone, its optimizer and batch-norm statistics
    # after the skipped step are those before it; the next step trains again.
    assert len(list((checkpoint(out, BAD_STEP) / "classifier").glob("rows-*.h5"))) == 2
    assert_same_state(checkpoint(out, BAD_STEP - 1), checkpoint(out, BAD_STEP))
    assert_state_moved(checkpoint(out, BAD_STEP), checkpoint(out, BAD_STEP + 1))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("nonfinite_skipped")] == [BAD_STEP]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert f"[rank 0/2] WARNING non-finite loss (nan) at step {BAD_STEP}: skipped" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and np.isfinite(summary["final_loss"])


def test_stop_ends_every_rank_with_one_line_naming_the_step(overflowing, tmp_path):
    out = tmp_path / "stop"
    start = time.monotonic()
    proc = train(2, overflowing, out, 10, PER_RANK, *FLOAT32)   # stop is the default
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 120
    errors = error_lines(proc)
    assert len(errors) == 1 and f"non-finite loss (nan) at step {BAD_STEP}," in errors[0], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-1] == checkpoint(out, BAD_STEP - 1).name, names
    assert not (out / "summary.json").exists()


@pytest.fixture(scope="module")
def nan_datasets(vectors_dataset, tmp_path_factory):
    """Copies of vectors60 with a NaN in train row 7 / an inf in val row 5 (one shard each)."""
    import shutil

    root = tmp_path_factory.mktemp("nan")
    for split, value in (("train", np.nan), ("val", np.inf)):
        shutil.copytree(vectors_dataset, root / split)
        with h5py.File(root / split / f"{split}/shard-00000.h5") as h5:
            inputs = h5["inputs"][:]
        inputs[7 if split == "train" else 5, 3] = value
        rewrite_shard(root / split, f"{split}/shard-00000.h5", inputs=inputs)
    return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_non_finite_row_at_start_is_one_line_exit_2(nan_datasets, tmp_path, split):
    data = nan_datasets / split
    proc = train(2, data, tmp_path / "run", 4, PER_RANK)
    assert proc.returncode == 2, proc.stderr[-3000:]
    row = 7 if split == "train" else 5
    assert error_lines(proc) == [
        f"error: {data}/{split}/shard-00000.h5: input row {row} (row in this shard; sample "
        f"{row} of the {split} split) holds a non-finite value "
        f"({'nan' if split == 'train' else 'inf'}); rebuild the shard or drop the row "
        f"(python -m data_prep.inspect {data} counts every bad row)"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_val_split_with_a_non_finite_row(vectors_dataset, nan_datasets,
                                                           tmp_path):
    out = tmp_path / "run"
    ok = train(2, vectors_dataset, out, 2, PER_RANK)
    assert ok.returncode == 0, ok.stderr[-3000:]
    proc = run(mpirun_cmd(2, "-m", "app.evaluate", "--run", str(out), "--set",
                          f"data.path={nan_datasets / 'val'}"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and "val/shard-00000.h5: input row 5 " in errors[0], proc.stderr


def test_non_finite_row_found_by_one_rank_mid_training_ends_the_job(tmp_path):
    """A train split above the reader's 256 MiB cache is read batch by batch from memory-mapped
    shards, so the NaN is found when rank 1 reads the batch of step 5 while rank 0 goes on into
    the step's collectives: the job must end at once, exit 2, with the one line."""
    dim, num_train, classes = 65536, 22 * GLOBAL_BATCH, 16   # 277 MB of train inputs
    data = tmp_path / "big"
    rng = np.random.default_rng(0)
    with DatasetWriter(data, "vectors", (dim,), classes, [f"c{i}" for i in range(classes)],
                       generator={"name": "test"}) as writer:
        for split, n in (("train", num_train), ("val", 32)):
            for start in range(0, n, 96):
                stop = min(start + 96, n)
                writer.write(split, rng.standard_normal((stop - start, dim), np.float32),
                             np.arange(start, stop) % classes)
    sample = int(epoch_permutation(num_train, 0, 0, True)[4 * GLOBAL_BATCH + PER_RANK + 5])
    shard, row = divmod(sample, 256)   # 64 MiB shards of 256 rows
    with h5py.File(data / f"train/shard-{shard:05d}.h5", "r+") as h5:
        h5["inputs"][row, 17] = np.nan
    start = time.monotonic()
    proc = train(2, data, tmp_path / "run", 10, PER_RANK, "model.mlp_hidden=8",
                 "model.embedding_dim=8", "model.mlp_layers=1", "train.dtype=float32",
                 timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
    assert error_lines(proc) == [
        f"error: {data}/train/shard-{shard:05d}.h5: input row {row} (row in this shard; sample "
        f"{sample} of the train split) holds a non-finite value (nan); rebuild the shard or "
        f"drop the row (python -m data_prep.inspect {data} counts every bad row)"], \
        proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2, 3, 4], "the error must come from the batch of step 5"
