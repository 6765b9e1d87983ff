"""Stopping early with a checkpoint: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM
(preemption, scancel) on any rank asks every rank to stop after the current step."""
from __future__ import annotations

import signal

import torch

from mpi import collectives


class StopRequest:
    """Installs the handlers on creation, `restore()` puts the previous ones back. The flag is
    combined over ranks by one scalar allreduce per step (`agreed`), so all ranks stop at the
    same step even when the signal reached only some of them."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, world):
        self.world, self.name = world, None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Collective: whether any rank received a stop signal."""
        flag = torch.tensor([0 if self.name is None else 1], dtype=torch.int32)
        if collectives.allreduce(self.world, flag, "max")[0] == 0:
            return False
        self.name = self.name or "a signal on another rank"
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
