"""Learning-rate schedules as pure functions of the step, and the adaptive one.

The lr of a step depends only on (step, base_lr, schedule config, total steps), never on what
ran before, so a run resumed at step s gets exactly the lr of an uninterrupted run, whatever the
world size. Steps are 0-based: `lr_at(s, ...)` is the lr of the s-th optimizer update.
The exception is `decay: adaptive` (app/training/adaptive.py): lr_at gives its warm-up part and
LRSchedule multiplies it by a factor that the training losses move (`observe`); that state is
in `state_dict()`, so a resumed run still gets the uninterrupted run's lrs.

    lr(s) = base_lr * warmup(s) * decay(s)
    warmup(s) = (s + 1) / warmup_steps   for s < warmup_steps, else 1
    decay(s)  = constant: 1
                cosine:   r + (1 - r) * (1 + cos(pi * p)) / 2,  r = min_lr_ratio, with
                          p = 0 during warm-up, 1 from total_steps on (also when warm-up
                          fills the run), else (s - warmup_steps) / (total_steps - warmup_steps)
                step:     gamma ** (number of milestones <= s)
                adaptive: 1 (LRSchedule applies the adaptive factor)

Cosine reaches base_lr * min_lr_ratio at s = total_steps (so the last step, total_steps - 1,
is just above it) and stays there if a run goes longer.
"""
from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from typing import Any

from app.config import ScheduleConfig
from app.training.adaptive import AdaptiveDecay


def lr_at(step: int, base_lr: float, sched_cfg: ScheduleConfig, total_steps: int) -> float:
    """The lr of 0-based optimizer step `step` (see the module docstring for the formula)."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    warmup = sched_cfg.warmup_steps
    warmup_factor = (step + 1) / warmup if step < warmup else 1.0
    if sched_cfg.decay == "step":
        decay_factor = sched_cfg.gamma ** bisect_right(sched_cfg.milestones, step)
    elif sched_cfg.decay == "cosine":
        if step < warmup:
            progress = 0.0
        elif step >= total_steps:  # also covers warmup_steps >= total_steps
            progress = 1.0
        else:
            progress = (step - warmup) / (total_steps - warmup)
        ratio = sched_cfg.min_lr_ratio
        decay_factor = ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # "constant" or "adaptive"; ScheduleConfig admits nothing else
        decay_factor = 1.0
    return base_lr * warmup_factor * decay_factor


class LRSchedule:
    """`lr_at` bound to one optimizer's base lr: `schedule(step) -> lr`.

    It holds no state beyond its construction arguments, except under decay=adaptive the
    `AdaptiveDecay` that `observe(step, loss)` feeds; `state_dict()` records them (plain
    JSON-able numbers) so a checkpoint shows which schedule produced its lrs, and
    `load_state_dict()` restores them, as torch's schedulers do. Whether a resumed run may
    change them is the caller's decision (`load_progress` restores only the adaptive state).
    """

    def __init__(self, base_lr: float, sched_cfg: ScheduleConfig, total_steps: int) -> None:
        if not base_lr > 0 or total_steps < 1:
            raise ValueError(
                f"LRSchedule: need base_lr > 0 and total_steps >= 1, got {base_lr}, {total_steps}"
            )
        self.base_lr = base_lr
        self.sched_cfg = sched_cfg
        self.total_steps = total_steps
        self.adaptive = (AdaptiveDecay(base_lr, sched_cfg) if sched_cfg.decay == "adaptive"
                         else None)

    def __call__(self, step: int) -> float:
        lr = lr_at(step, self.base_lr, self.sched_cfg, self.total_steps)
        return lr * self.adaptive.factor if self.adaptive is not None else lr

    @property
    def stop_step(self) -> int | None:
        """The step count at which decay=adaptive with adaptive_stop ended the run, or None."""
        return self.adaptive.stop_step if self.adaptive is not None else None

    def observe(self, step: int, loss: float) -> dict[str, Any] | None:
        """Feed the finite global-batch loss of 0-based step `step`; returns the decision record
        of decay=adaptive when one was taken (it applies from step + 1 on), else None. Losses
        of warm-up steps and of other decays are ignored."""
        if self.adaptive is None or step < self.sched_cfg.warmup_steps:
            return None
        return self.adaptive.observe(step + 1, loss)

    def state_dict(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps,
                "schedule": dataclasses.asdict(self.sched_cfg),
                "adaptive": self.adaptive.state_dict() if self.adaptive is not None else None}

    def load_progress(self, state: dict[str, Any] | None) -> bool:
        """Restore only the adaptive state of a checkpoint's `state_dict()`, keeping this run's
        config. False when this run is adaptive and the checkpoint holds no adaptive state (the
        adaptive schedule then starts afresh from the resumed step)."""
        if self.adaptive is None:
            return True
        saved = (state or {}).get("adaptive")
        if saved is None:
            return False
        self.adaptive.load_state_dict(saved)
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the schedule section is validated as a ScheduleConfig."""
        try:
            sched_cfg = ScheduleConfig(**state["schedule"])
        except TypeError as e:  # a key this version does not know
            raise ValueError(f"LRSchedule state: bad schedule section ({e})") from None
        restored = LRSchedule(float(state["base_lr"]), sched_cfg, int(state["total_steps"]))
        restored.load_progress(state)
        self.base_lr = restored.base_lr
        self.sched_cfg = restored.sched_cfg
        self.total_steps = restored.total_steps
        self.adaptive = restored.adaptive
