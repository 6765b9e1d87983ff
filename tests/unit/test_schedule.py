"""app.schedule: lr_at against hand-computed values; LRSchedule is stateless and checkpointable."""
import json

import pytest

from app.config import ScheduleConfig
from app.training.schedule import LRSchedule, lr_at


def test_linear_warmup_then_constant():
    cfg = ScheduleConfig(warmup_steps=4, decay="constant")
    lrs = [lr_at(s, 0.1, cfg, 100) for s in range(6)]
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_cosine_without_warmup():
    cfg = ScheduleConfig(decay="cosine")
    # cos(pi * 5/10) = 0: half way; cos(pi * 5/20) = sqrt(2)/2.
    assert lr_at(0, 0.1, cfg, 10) == pytest.approx(0.1)
    assert lr_at(5, 0.1, cfg, 10) == pytest.approx(0.05)
    assert lr_at(5, 0.1, cfg, 20) == pytest.approx(0.05 * (1 + 2**-0.5))
    assert lr_at(10, 0.1, cfg, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(25, 0.1, cfg, 10) == pytest.approx(0.0, abs=1e-12)


def test_cosine_after_warmup_to_floor():
    cfg = ScheduleConfig(warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    # Steps 2..6 decay over 4 steps: step 4 is half way, 0.1 + 0.9 * 0.5 = 0.55 of base.
    expected = {0: 0.05, 1: 0.1, 2: 0.1, 4: 0.055, 6: 0.01, 9: 0.01}
    assert {s: lr_at(s, 0.1, cfg, 6) for s in expected} == pytest.approx(expected)


def test_cosine_with_no_steps_after_warmup_ends_at_floor():
    cfg = ScheduleConfig(warmup_steps=5, decay="cosine", min_lr_ratio=0.5)
    assert [lr_at(s, 1.0, cfg, 5) for s in (0, 4)] == pytest.approx([0.2, 1.0])
    assert lr_at(3, 1.0, ScheduleConfig(warmup_steps=5), 2) == pytest.approx(0.8)
    assert lr_at(5, 1.0, cfg, 5) == pytest.approx(0.5)


def test_step_decay_at_milestones():
    cfg = ScheduleConfig(decay="step", milestones=[3, 6], gamma=0.1)
    expected = {0: 1.0, 2: 1.0, 3: 0.1, 5: 0.1, 6: 0.01, 50: 0.01}
    assert {s: lr_at(s, 1.0, cfg, 10) for s in expected} == pytest.approx(expected)


def test_step_decay_multiplies_warmup():
    cfg = ScheduleConfig(warmup_steps=4, decay="step", milestones=[2], gamma=0.5)
    assert [lr_at(s, 1.0, cfg, 10) for s in range(5)] == pytest.approx([0.25, 0.5, 0.375, 0.5, 0.5])


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, 0.1, ScheduleConfig(), 10)


def test_schedule_is_stateless_and_restorable():
    cfg = ScheduleConfig(warmup_steps=3, decay="cosine", min_lr_ratio=0.01)
    schedule = LRSchedule(0.4, cfg, 20)
    forward = [schedule(s) for s in range(20)]
    # Any order of calls, e.g. a resume at step 11, gives the same lrs.
    assert [schedule(s) for s in reversed(range(20))] == forward[::-1]
    assert forward == [lr_at(s, 0.4, cfg, 20) for s in range(20)]

    state = json.loads(json.dumps(schedule.state_dict()))  # checkpoint manifests are JSON
    resumed = LRSchedule(1.0, ScheduleConfig(), 5)
    resumed.load_state_dict(state)
    assert [resumed(s) for s in range(11, 20)] == forward[11:]
    assert resumed.state_dict() == schedule.state_dict()


def test_bad_state_and_arguments():
    schedule = LRSchedule(0.1, ScheduleConfig(), 10)
    state = schedule.state_dict()
    with pytest.raises(ValueError, match="schedule.decay"):
        schedule.load_state_dict({**state, "schedule": {**state["schedule"], "decay": "linear"}})
    with pytest.raises(ValueError, match="bad schedule section"):
        schedule.load_state_dict({**state, "schedule": {"warmup": 3}})
    with pytest.raises(ValueError, match="total_steps >= 1"):
        LRSchedule(0.1, ScheduleConfig(), 0)
