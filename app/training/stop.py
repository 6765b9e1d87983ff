"""Stopping early with a checkpoint: SIGUSR1 (Slurm's warning before the time limit), SIGTERM
(preemption, `scancel --signal=TERM`, a wrapper script) or SIGINT on any rank asks every rank to
stop after the current step, write a checkpoint and exit 3.

`app.train` installs the handlers before it does anything else (before MPI starts), so a signal
during set-up is kept and honoured after the first step.

Open MPI's mpirun, on SIGTERM or Ctrl-C, does not pass the signal on: it sends the ranks SIGCONT,
waits `odls_base_sigkill_timeout` seconds (T, default 1), sends SIGTERM, waits T again, then
SIGKILL (and exits 1 after the 2T seconds, whatever the ranks returned). Under mpirun the ranks
therefore take a SIGCONT sent by mpirun itself (their parent) as the stop request, which gives
the checkpoint 2T seconds instead of T. A SIGCONT from anyone else (Slurm resuming a suspended
job) is not a stop request; one from mpirun resuming a job suspended with Ctrl-Z is (mpirun turns
SIGTSTP into SIGSTOP, so the ranks cannot tell): that run stops with a checkpoint, exit 3.
README "Exit codes" says what a user should send."""
from __future__ import annotations

import os
import signal
import threading

# Open MPI's mpirun waits this many seconds between SIGCONT and SIGTERM, and between SIGTERM and
# SIGKILL, when it ends a job because it got SIGTERM or SIGINT (default 1).
SIGKILL_TIMEOUT_PARAM = "odls_base_sigkill_timeout"


class StopRequest:
    """Installs the handlers on creation; `restore()` puts the previous ones back. The flag is
    combined over ranks by one scalar allreduce per step (`agreed`), so all ranks stop at the
    same step even when the signal reached only some of them. A second SIGINT on the same rank
    interrupts at once (KeyboardInterrupt), for a process that no longer answers."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, environ=os.environ):
        self.name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self._watching = False
        if under_mpirun(environ) and threading.active_count() == 1:
            self._watch_sigcont()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.name == "SIGINT":
            raise KeyboardInterrupt
        self.name = self.name or signal.Signals(signum).name  # the first reason is the one

    def _watch_sigcont(self) -> None:
        """SIGCONT is blocked in every thread (threads started later inherit the mask) and read
        by one thread with `sigwaitinfo`, which tells who sent it. Blocking it does not stop it
        from resuming a stopped process: that happens when it is sent."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCONT})
        self._watching = True
        threading.Thread(target=self._read_sigcont, name="sigcont", daemon=True).start()

    def _read_sigcont(self) -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGCONT})
            if self._watching and info.si_pid == os.getppid():
                self.name = self.name or "SIGCONT from mpirun (it got SIGTERM or Ctrl-C)"

    def agreed(self, world) -> bool:
        """Collective: whether any rank received a stop signal."""
        import torch  # noqa: PLC0415 - the module is imported before torch, to install handlers

        from mpi import collectives  # noqa: PLC0415
        flag = torch.tensor([0 if self.name is None else 1], dtype=torch.int32)
        if collectives.allreduce(world, flag, "max")[0] == 0:
            return False
        self.name = self.name or "a signal on another rank"
        return True

    def restore(self) -> None:
        self._watching = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def under_mpirun(environ=os.environ) -> bool:
    """Started by Open MPI's mpirun (or its orted), which sets these for every rank; srun
    does not."""
    return "OMPI_MCA_orte_hnp_uri" in environ


def mpirun_sigterm_warning(environ=os.environ) -> str | None:
    """Under mpirun started without `--mca odls_base_sigkill_timeout`, the line that tells the
    user how to stop the run without losing its checkpoint; None elsewhere. mpirun passes
    `--mca` parameters to the ranks as OMPI_MCA_* variables."""
    if not under_mpirun(environ) or f"OMPI_MCA_{SIGKILL_TIMEOUT_PARAM}" in environ:
        return None
    return (f"mpirun gives the ranks 2 s to write a checkpoint after it gets SIGTERM or Ctrl-C "
            f"({SIGKILL_TIMEOUT_PARAM}=1): stop this run with 'kill -USR1 <mpirun pid>' "
            f"(checkpoint, exit 3, no time limit), or start mpirun with '--mca "
            f"{SIGKILL_TIMEOUT_PARAM} N' to give them 2N s (mpirun then also takes up to 2N s to "
            f"exit after any early stop)")
