"""schedule.decay=adaptive through the real launcher (mpirun -np 2): an lr far too high (30)
keeps the loss on a plateau, the schedule cuts it, reaches its floor and stops the run (exit 0,
checkpoint, summary); a crash mid-window and --resume reproduce the same loss trace and the
same decisions; --resume of the stopped run trains nothing more."""
import json
from pathlib import Path

import pytest

from tests.integration.test_train import assert_traces_equal, train

STEPS, PER_RANK = 30, 24
# Warm-up 3 steps (test_train.BASE), then windows of 4 steps ending after steps 7, 11, 15, ...
# Floor 30 x 0.25 = 7.5: two cuts reach it.
ADAPTIVE = ["optim.lr=30.0", "optim.classifier_lr=300", "schedule.decay=adaptive",
            "schedule.adaptive_window=4", "schedule.adaptive_threshold=0.02",
            "schedule.adaptive_factor=0.5", "schedule.min_lr_ratio=0.25",
            "schedule.adaptive_stop=true"]
DECIDED = {15: ("cut", 30.0, 15.0), 23: ("floor", 15.0, 7.5), 27: ("stop", 7.5, 7.5)}


def records(out):
    return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]


def decisions(out):
    return [r for r in records(out) if "lr_decision" in r]


def losses(out):
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]


@pytest.fixture(scope="module")
def whole(vectors_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive") / "whole"
    proc = train(2, vectors_dataset, out, STEPS, PER_RANK, *ADAPTIVE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_plateau_is_cut_to_the_floor_then_the_run_stops(whole):
    out, proc = whole
    found = decisions(out)
    assert {r["step"]: (r["lr_decision"], r["old_lr"], r["new_lr"]) for r in found} == DECIDED
    for r in found:
        assert r["window"] == 4 and r["threshold"] == 0.02 and r["min_lr"] == 7.5
        # Flat: the window's mean loss is not 2% below the best window mean before it.
        assert r["smoothed_loss"] >= 0.98 * r["best_smoothed_loss"]
    # The mean of the 4 logged losses before the cut is the smoothed loss of the decision.
    trace = dict(losses(out))
    assert found[0]["smoothed_loss"] == pytest.approx(sum(trace[s] for s in range(12, 16)) / 4)
    # Each lr applies from the step after its decision on; the run ends at the stop.
    lrs = {r["step"]: r["lr"] for r in records(out) if "loss" in r}
    assert lrs[15] == 30.0 and lrs[16] == 15.0 and lrs[23] == 15.0 and lrs[24] == 7.5
    assert max(lrs) == 27
    assert "step 15: lr cut 30 -> 15 (schedule.decay=adaptive, cut 1)" in proc.stderr
    assert "step 27: stopping the run (schedule.adaptive_stop)" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 27 and summary["stopped_by"] == "schedule.adaptive_stop"
    assert (out / "checkpoints/step-00000027/manifest.json").exists()
    assert "after 27 steps" in proc.stdout


def test_crash_mid_window_and_resume_reproduce_the_decisions(whole, vectors_dataset, tmp_path):
    out = tmp_path / "crash"
    # The step-20 checkpoint holds one cut and one step of the window that ends after step 23.
    crashed = train(2, vectors_dataset, out, STEPS, PER_RANK, *ADAPTIVE,
                    "train.checkpoint_every=10", "train.crash_at_step=21")
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    assert (out / "checkpoints/step-00000020/manifest.json").exists()
    resumed = train(2, vectors_dataset, out, STEPS, PER_RANK, *ADAPTIVE,
                    "train.checkpoint_every=10", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_traces_equal(losses(out), losses(whole[0]))
    assert decisions(out) == decisions(whole[0])
    assert "step 23: lr cut 15 -> 7.5 (the floor" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 27

    # The stopped run is over: --resume trains nothing and ends as done.
    before = records(out)
    again = train(2, vectors_dataset, out, STEPS, PER_RANK, *ADAPTIVE,
                  "train.checkpoint_every=10", resume=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert records(out) == before and "step-00000027" in again.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 27
