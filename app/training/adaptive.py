"""`schedule.decay: adaptive`: cut the learning rate when the training loss stops improving.

After warm-up the steps with a finite loss fall into consecutive windows of
`schedule.adaptive_window` steps (a step skipped under train.on_nonfinite=skip is not counted).
The smoothed loss is the mean loss of a window. At the end of each window:

- the first window sets the best smoothed loss and decides nothing;
- a window whose mean is below best x (1 - adaptive_threshold) improved: nothing happens;
- otherwise the loss is flat: the lr factor is multiplied by `adaptive_factor` ("cut"), but not
  below the floor `min_lr_ratio` (the cut that lands on it is "floor"); a flat window when the
  factor is already at the floor ends the run under `adaptive_stop: true` ("stop"), and does
  nothing otherwise;
- then best = min(best, mean): windows are counted since the last decision or improvement.

The lr of step s is base_lr x warmup(s) x factor (factor 1 during warm-up). The loss fed in is
the global-batch mean, identical on every rank (it comes out of the same allreduce), so every
rank takes the same decision at the same step without a collective. The state (factor, the
running window, best, number of cuts, the stop step) is plain numbers for trainer.pt; restoring
it mid-window gives the decisions of an uninterrupted run.
"""
from __future__ import annotations

from typing import Any

from app.config import ScheduleConfig

STATE_KEYS = ("factor", "window_sum", "window_steps", "best", "cuts", "stop_step")


class AdaptiveDecay:
    """The adaptive lr factor of one run: `observe(done, loss)` after each post-warm-up step."""

    def __init__(self, base_lr: float, sched_cfg: ScheduleConfig) -> None:
        self.base_lr, self.cfg = base_lr, sched_cfg
        self.factor = 1.0
        self.window_sum, self.window_steps = 0.0, 0
        self.best: float | None = None
        self.cuts = 0
        self.stop_step: int | None = None  # the step count the run stopped at (adaptive_stop)

    @property
    def stopped(self) -> bool:
        return self.stop_step is not None

    def observe(self, done: int, loss: float) -> dict[str, Any] | None:
        """Adds the finite `loss` of the step that made `done` steps; at a window's end returns
        the decision record (lr_decision cut|floor|stop with the values behind it) or None."""
        if self.stopped:
            return None
        self.window_sum += loss
        self.window_steps += 1
        if self.window_steps < self.cfg.adaptive_window:
            return None
        mean = self.window_sum / self.window_steps
        self.window_sum, self.window_steps = 0.0, 0
        best = self.best
        self.best = mean if best is None else min(best, mean)
        if best is None or mean < best * (1.0 - self.cfg.adaptive_threshold):
            return None
        old, floor = self.factor, self.cfg.min_lr_ratio
        if floor > 0 and old <= floor:
            if not self.cfg.adaptive_stop:
                return None
            self.stop_step, kind = done, "stop"
        else:
            self.factor = max(old * self.cfg.adaptive_factor, floor)
            self.cuts += 1
            kind = "floor" if floor > 0 and self.factor <= floor else "cut"
        return {"lr_decision": kind, "old_lr": self.base_lr * old,
                "new_lr": self.base_lr * self.factor, "smoothed_loss": mean,
                "best_smoothed_loss": best, "window": self.cfg.adaptive_window,
                "threshold": self.cfg.adaptive_threshold, "min_lr": self.base_lr * floor,
                "cuts": self.cuts}

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`. A floor raised since is applied at once; a stop is kept only
        while adaptive_stop is still true (a resume with it false trains on)."""
        try:
            values = {key: state[key] for key in STATE_KEYS}
        except (KeyError, TypeError):
            raise ValueError(f"adaptive schedule state: expected the keys {STATE_KEYS}, "
                             f"got {state!r}") from None
        self.factor = max(float(values["factor"]), self.cfg.min_lr_ratio)
        self.window_sum = float(values["window_sum"])
        self.window_steps = int(values["window_steps"])
        self.best = None if values["best"] is None else float(values["best"])
        self.cuts = int(values["cuts"])
        stop = values["stop_step"]
        self.stop_step = int(stop) if stop is not None and self.cfg.adaptive_stop else None

    def describe(self, done: int, record: dict[str, Any]) -> str:
        """One log line for a decision record."""
        kind = record["lr_decision"]
        why = (f"window mean loss {record['smoothed_loss']:.6g} not below "
               f"{1 - record['threshold']:.4g} x best {record['best_smoothed_loss']:.6g} over "
               f"the last {record['window']} steps")
        if kind == "stop":
            return (f"step {done}: stopping the run (schedule.adaptive_stop): lr at its floor "
                    f"{record['new_lr']:.6g} and {why}")
        floor = " (the floor, schedule.min_lr_ratio)" if kind == "floor" else ""
        return (f"step {done}: lr cut {record['old_lr']:.6g} -> {record['new_lr']:.6g}{floor} "
                f"(schedule.decay=adaptive, cut {record['cuts']}): {why}")
