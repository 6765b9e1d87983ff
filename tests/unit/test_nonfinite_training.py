"""train.on_nonfinite (app/config.py, app/training/trainer.py) in one process: a finite input
row so large that the float32 forward pass overflows gives a NaN loss at a known step.
`skip` must leave every weight, momentum and batch-norm statistic as it was before that step;
`stop` must end the run there with an error naming the step and no checkpoint of that step.
The same checks on 2 ranks through mpirun are in tests/integration/test_nonfinite.py."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from app.config import load_config
from app.training.trainer import MAX_CONSECUTIVE_SKIPS, NonFiniteLoss, Trainer
from data_prep.batch_schedule import epoch_permutation
from data_prep.format import load_dataset_info
from data_prep.synthetic import SyntheticParams, generate
from mpi.world import fake_world
from tests.unit.test_dataset_format import rewrite_shard

HUGE = np.float32(3e38)   # finite, passes the reader; x @ W overflows float32
GLOBAL_BATCH, BAD_STEP = 48, 6   # the poisoned sample is in the 6th batch of epoch 0
RUN = ["train.dtype=float32", "train.steps=10", "train.log_every=1", "train.checkpoint_every=1",
       "train.keep_checkpoints=20", "train.eval_batch_size=64", "model.embedding_dim=8",
       "model.mlp_hidden=16", "schedule.warmup_steps=0", "optim.classifier_lr=1.0"]


def poisoned_copy(src: Path, dst: Path, position: int, seed: int = 0) -> int:
    """A copy of dataset `src` in `dst` whose train sample at `position` of epoch 0's order
    (seed `seed`) has every input value HUGE; returns that sample's index in the split."""
    shutil.copytree(src, dst)
    info = load_dataset_info(dst)
    train = info.splits["train"]
    sample = int(epoch_permutation(train.num_samples, seed, 0, shuffle=True)[position])
    s = int(np.searchsorted(train.offsets(), sample, side="right") - 1)
    rel = train.shards[s].path
    with h5py.File(dst / rel) as h5:
        inputs = h5["inputs"][:]
    inputs[sample - int(train.offsets()[s])] = HUGE
    rewrite_shard(dst, rel, inputs=inputs)
    return sample


def checkpoint_state(directory: Path) -> dict[str, np.ndarray]:
    """Every array that a step may change: classifier rows and momentum of every rank's file,
    backbone parameters and batch-norm buffers, backbone optimizer state."""
    arrays = {}
    for path in sorted((directory / "classifier").glob("rows-*.h5")):
        with h5py.File(path) as h5:
            for key in ("weight", "momentum"):
                arrays[f"{path.name}/{key}"] = h5[key][:]
    state = torch.load(directory / "trainer.pt", weights_only=True)
    for name, value in state["backbone"].items():
        arrays[f"backbone/{name}"] = value.numpy()
    for index, entry in state["optimizer"]["state"].items():
        for name, value in entry.items():
            arrays[f"optimizer/{index}/{name}"] = np.asarray(value)
    return arrays


def assert_same_state(a: Path, b: Path) -> None:
    state_a, state_b = checkpoint_state(a), checkpoint_state(b)
    assert sorted(state_a) == sorted(state_b) and len(state_a) > 10
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)


def assert_state_moved(a: Path, b: Path) -> None:
    state_a, state_b = checkpoint_state(a), checkpoint_state(b)
    assert any(not np.array_equal(state_a[k], state_b[k]) for k in state_a if "rows" in k)
    assert any(not np.array_equal(state_a[k], state_b[k]) for k in state_a if "backbone" in k)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    generate(root / "clean", SyntheticParams(seed=0, dim=16, kind="vectors", per_class=16,
                                             val_per_class=2), 60, progress=False)
    poisoned_copy(root / "clean", root / "poisoned", (BAD_STEP - 1) * GLOBAL_BATCH + 3)
    return root / "poisoned"


def trainer(data: Path, out: Path, *extra: str) -> Trainer:
    cfg = load_config(None, [f"data.path={data}", f"out_dir={out}",
                             f"train.batch_size={GLOBAL_BATCH}", *RUN, *extra])
    return Trainer(fake_world(), cfg, False, logging.getLogger("test_nonfinite"))


def test_skip_leaves_the_state_of_the_bad_step_untouched(poisoned, tmp_path, caplog):
    out = tmp_path / "skip"
    with caplog.at_level(logging.WARNING, logger="test_nonfinite"):
        summary = trainer(poisoned, out, "train.on_nonfinite=skip").run()
    assert summary["steps"] == 10 and np.isfinite(summary["final_loss"])
    before, bad, after = (out / f"checkpoints/step-{s:08d}" for s in
                          (BAD_STEP - 1, BAD_STEP, BAD_STEP + 1))
    assert_same_state(before, bad)
    assert_state_moved(bad, after)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if r.get("nonfinite_skipped")]
    assert [(r["step"], r["consecutive_skipped"]) for r in skips] == [(BAD_STEP, 1)]
    assert not [r for r in records if "loss" in r and r["step"] == BAD_STEP]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert f"non-finite loss (nan) at step {BAD_STEP}: skipped" in caplog.text


def test_stop_raises_at_the_bad_step_before_any_weight_changed(poisoned, tmp_path):
    out = tmp_path / "stop"
    run = trainer(poisoned, out)   # the default is stop
    with pytest.raises(NonFiniteLoss) as info:
        run.run()
    message = str(info.value)
    assert "\n" not in message and f"non-finite loss (nan) at step {BAD_STEP}," in message
    assert "train.on_nonfinite=skip" in message and str(poisoned) in message
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-1] == f"step-{BAD_STEP - 1:08d}"
    last = checkpoint_state(out / "checkpoints" / names[-1])
    ((key, weight),) = [(k, v) for k, v in last.items() if k.endswith("/weight")]
    np.testing.assert_array_equal(run.classifier.weight_cD.numpy(), weight)
    np.testing.assert_array_equal(run.classifier.optimizer.momentum_cD.numpy(),
                                  last[key.replace("/weight", "/momentum")])
    for name, value in run.backbone.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), last[f"backbone/{name}"], err_msg=name)


def test_skip_stops_after_too_many_bad_steps_in_a_row(poisoned, tmp_path):
    """lr 1e30 makes every loss after the first step NaN: the 10th skip in a row stops."""
    run = trainer(poisoned.parent / "clean", tmp_path / "diverged", "train.on_nonfinite=skip",
                  "optim.lr=1e30", "train.steps=15", "train.checkpoint_every=0")
    with pytest.raises(NonFiniteLoss, match=f"at step {MAX_CONSECUTIVE_SKIPS + 1}, the "
                                            f"{MAX_CONSECUTIVE_SKIPS}th step in a row"):
        run.run()
    records = [json.loads(x) for x in (tmp_path / "diverged/metrics.jsonl").read_text()
               .splitlines()]
    assert sum(bool(r.get("nonfinite_skipped")) for r in records) == MAX_CONSECUTIVE_SKIPS - 1
