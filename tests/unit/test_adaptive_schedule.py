"""schedule.decay=adaptive (app/training/adaptive.py through LRSchedule) on synthetic loss
sequences: cuts on a plateau and not on a falling loss, warm-up ignored, the floor, the stop,
and a checkpoint round trip mid-window that gives the uninterrupted run's future decisions."""
import io
import json
import math

import numpy as np
import pytest
import torch

from app.config import ScheduleConfig, load_config
from app.training.schedule import LRSchedule

BASE_LR = 0.4


def adaptive(**kw):
    return ScheduleConfig(decay="adaptive", **{"adaptive_window": 10, **kw})


def noisy(values, seed=0, rel=0.002):
    """`values` times seeded noise of +-rel (relative), as a real loss trace wobbles."""
    rng = np.random.default_rng(seed)
    return [float(v * (1 + rng.uniform(-rel, rel))) for v in values]


def feed(schedule, losses, start=0):
    """(decision records by step count, lr of every step), feeding `losses` from step `start`."""
    decisions, lrs = {}, []
    for step, loss in enumerate(losses, start):
        lrs.append(schedule(step))
        record = schedule.observe(step, loss)
        if record is not None:
            decisions[step + 1] = record
    return decisions, lrs


def test_a_plateau_is_cut_after_the_baseline_window():
    schedule = LRSchedule(BASE_LR, adaptive(), 1000)
    decisions, lrs = feed(schedule, noisy([2.0] * 25))
    # Window 1 (steps 0-9) is the baseline; window 2 is flat: cut after step 20.
    assert list(decisions) == [20]
    record = decisions[20]
    assert record["lr_decision"] == "cut" and record["cuts"] == 1
    assert record["old_lr"] == BASE_LR and record["new_lr"] == BASE_LR * 0.5
    assert record["window"] == 10 and record["threshold"] == 0.01 and record["min_lr"] == 0.0
    losses = noisy([2.0] * 25)
    assert record["smoothed_loss"] == pytest.approx(np.mean(losses[10:20]), rel=1e-12)
    assert record["best_smoothed_loss"] == pytest.approx(np.mean(losses[:10]), rel=1e-12)
    assert lrs[:20] == [BASE_LR] * 20 and lrs[20:] == [BASE_LR * 0.5] * 5
    json.dumps(record)  # a metrics.jsonl line


def test_a_loss_falling_2_percent_per_window_is_not_cut_at_threshold_1_percent():
    falling = noisy([3.0 * 0.98 ** (s / 10) for s in range(300)], rel=0.002)
    decisions, lrs = feed(LRSchedule(BASE_LR, adaptive(adaptive_threshold=0.01), 300), falling)
    assert decisions == {} and set(lrs) == {BASE_LR}
    # The same trace at threshold 3% is a plateau: cut after the 2nd window, and on.
    decisions, _ = feed(LRSchedule(BASE_LR, adaptive(adaptive_threshold=0.03), 300), falling)
    assert list(decisions)[:2] == [20, 30]


def test_a_loss_that_drops_after_a_cut_is_not_cut_again():
    losses = [2.0] * 20 + [1.5] * 10 + [1.2] * 10
    decisions, lrs = feed(LRSchedule(BASE_LR, adaptive(), 100), losses)
    assert list(decisions) == [20] and lrs[-1] == BASE_LR * 0.5


def test_warmup_losses_are_ignored_and_the_lr_warms_up():
    schedule = LRSchedule(BASE_LR, adaptive(warmup_steps=5, adaptive_window=4), 100)
    decisions, lrs = feed(schedule, [9.0, 8.0, 7.0, 6.0, 5.0] + [1.0] * 9)
    # Windows start after warm-up: steps 5-8 the baseline, 9-12 flat -> cut after step 13.
    assert list(decisions) == [13]
    assert lrs[:6] == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4, 0.4])
    assert lrs[13] == pytest.approx(0.2)


def test_the_floor_is_respected_and_reported():
    cfg = adaptive(adaptive_factor=0.5, min_lr_ratio=0.2)
    decisions, lrs = feed(LRSchedule(BASE_LR, cfg, 1000), noisy([1.0] * 100))
    kinds = {step: r["lr_decision"] for step, r in decisions.items()}
    assert kinds == {20: "cut", 30: "cut", 40: "floor"}
    assert decisions[40]["old_lr"] == pytest.approx(0.1)
    assert decisions[40]["new_lr"] == pytest.approx(0.08) == decisions[40]["min_lr"]
    assert min(lrs) == pytest.approx(0.08) and lrs[-1] == pytest.approx(0.08)


def test_without_a_floor_the_lr_keeps_halving():
    decisions, lrs = feed(LRSchedule(BASE_LR, adaptive(), 1000), noisy([1.0] * 60))
    assert [r["lr_decision"] for r in decisions.values()] == ["cut"] * 5  # windows 2-6
    assert lrs[-1] == pytest.approx(BASE_LR / 16)  # the 5th cut applies from step 60 on


def test_stop_at_the_floor_after_another_flat_window():
    cfg = adaptive(adaptive_factor=0.5, min_lr_ratio=0.25, adaptive_stop=True)
    schedule = LRSchedule(BASE_LR, cfg, 1000)
    decisions, _ = feed(schedule, noisy([1.0] * 100))
    assert {s: r["lr_decision"] for s, r in decisions.items()} == {20: "cut", 30: "floor",
                                                                   40: "stop"}
    stop = decisions[40]
    assert stop["old_lr"] == stop["new_lr"] == pytest.approx(0.1) and stop["cuts"] == 2
    assert schedule.stop_step == 40
    # Improving windows at the floor do not stop the run; a flat one does.
    schedule = LRSchedule(BASE_LR, cfg, 1000)
    decisions, _ = feed(schedule, [1.0] * 30 + [0.8] * 10 + [0.6] * 10 + [0.6] * 10)
    assert schedule.stop_step == 60 and decisions[60]["lr_decision"] == "stop"


def checkpointed(state):
    """`state` through trainer.pt as the trainer writes and reads it (weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("split", [7, 20, 30, 40, 47, 55])  # warm-up, mid-windows, stopped
def test_state_round_trip_mid_window_gives_the_same_future(split):
    cfg = adaptive(adaptive_window=6, warmup_steps=3, min_lr_ratio=0.1, adaptive_stop=True)
    losses = noisy([2.0 - 0.05 * min(s, 12) for s in range(80)], seed=3, rel=0.01)
    whole = LRSchedule(BASE_LR, cfg, 80)
    decisions, lrs = feed(whole, losses)
    assert {s: r["lr_decision"] for s, r in decisions.items()} == {
        27: "cut", 33: "cut", 39: "cut", 45: "floor", 51: "stop"}

    first = LRSchedule(BASE_LR, cfg, 80)
    feed(first, losses[:split])
    state = checkpointed(json.loads(json.dumps(first.state_dict())))
    resumed = LRSchedule(BASE_LR, cfg, 80)
    assert resumed.load_progress(state)
    rest_decisions, rest_lrs = feed(resumed, losses[split:], start=split)
    assert rest_lrs == lrs[split:]
    assert rest_decisions == {s: r for s, r in decisions.items() if s > split}
    assert resumed.state_dict() == whole.state_dict()


def test_load_progress_and_load_state_dict():
    cfg = adaptive(min_lr_ratio=0.1, adaptive_stop=True)
    stopped = LRSchedule(BASE_LR, cfg, 100)
    feed(stopped, [1.0] * 100)
    assert stopped.stop_step is not None
    # A checkpoint of another decay: the adaptive schedule starts afresh.
    fresh = LRSchedule(BASE_LR, cfg, 100)
    assert not fresh.load_progress(LRSchedule(BASE_LR, ScheduleConfig(), 100).state_dict())
    assert fresh(50) == BASE_LR
    # Other decays ignore adaptive state.
    assert LRSchedule(BASE_LR, ScheduleConfig(), 100).load_progress(stopped.state_dict())
    # Resumed with adaptive_stop=false and a higher floor: trains on, at the new floor.
    on = LRSchedule(BASE_LR, adaptive(min_lr_ratio=0.2), 100)
    on.load_progress(stopped.state_dict())
    assert on.stop_step is None and on(99) == pytest.approx(BASE_LR * 0.2)
    # load_state_dict restores config and adaptive state together.
    other = LRSchedule(1.0, ScheduleConfig(), 5)
    other.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    assert other.state_dict() == stopped.state_dict() and other.stop_step == stopped.stop_step
    with pytest.raises(ValueError, match="adaptive schedule state"):
        fresh.load_progress({"adaptive": {"factor": 0.5}})


@pytest.mark.parametrize("sets,message", [
    (["schedule.adaptive_window=5"], "schedule.adaptive_window: set, but it only acts with "
                                     "schedule.decay=adaptive (decay is 'cosine')"),
    (["schedule.decay=step", "schedule.adaptive_stop=true", "schedule.min_lr_ratio=0.1"],
     "schedule.adaptive_stop: set, but"),
    (["schedule.decay=adaptive", "schedule.adaptive_stop=true"],
     "schedule.adaptive_stop: true needs schedule.min_lr_ratio > 0"),
    (["schedule.decay=adaptive", "schedule.adaptive_factor=1.0"], "schedule.adaptive_factor"),
    (["schedule.decay=adaptive", "schedule.adaptive_factor=0"], "schedule.adaptive_factor"),
    (["schedule.decay=adaptive", "schedule.adaptive_threshold=1"], "schedule.adaptive_threshold"),
    (["schedule.decay=adaptive", "schedule.adaptive_threshold=-0.1"],
     "schedule.adaptive_threshold"),
    (["schedule.decay=adaptive", "schedule.adaptive_window=0"], "schedule.adaptive_window"),
])
def test_config_refuses_bad_and_misplaced_adaptive_keys(sets, message):
    with pytest.raises(ValueError) as info:
        load_config(None, sets)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_accepts_the_adaptive_keys():
    cfg = load_config(None, ["schedule.decay=adaptive", "schedule.adaptive_window=20",
                             "schedule.adaptive_factor=0.3", "schedule.adaptive_threshold=0",
                             "schedule.min_lr_ratio=0.01", "schedule.adaptive_stop=true"]).schedule
    assert (cfg.adaptive_window, cfg.adaptive_factor, cfg.adaptive_threshold,
            cfg.adaptive_stop) == (20, 0.3, 0.0, True)
    assert math.isclose(LRSchedule(1.0, cfg, 10)(3), 1.0)
