"""A graph build that runs beside the training loop (`knn.refresh_mode=background`), and the
same interface for a build that already ran in the loop (`sync`), so that `GraphRefresher` swaps
either at the same step.

The background build runs in one thread of each rank, on a duplicate of the World's
communicator (`World.duplicate`): its ring messages and collectives never match the main
thread's, and both may be in MPI at once (MPI_THREAD_MULTIPLE, checked by the refresher). The
thread's OpenMP pools (faiss, and torch's, which share one libgomp here) run one thread, so
the build takes one core's share and the loop keeps the rank's torch threads; numpy, faiss and
mpi4py release the GIL while they work, so the loop's Python runs between them.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def _single_threaded() -> None:
    """This thread's OpenMP parallel regions (faiss; torch, after its per-thread lazy init that
    would otherwise restore the process-wide count) run on one thread. The main thread's
    settings are untouched: OpenMP's thread count is a per-thread setting."""
    import faiss  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.get_num_threads()  # torch's per-thread initialisation first, then the override
    faiss.omp_set_num_threads(1)


class DoneBuild:
    """A build that ran in the loop (`sync`) when this was made: the caller timed it."""

    def __init__(self, work: Callable[[], Any]):
        self.value = work()

    def done(self) -> bool:
        return True

    def result(self) -> tuple[Any, float]:
        """(the built value, 0.0: no more waiting)."""
        return self.value, 0.0


class BackgroundBuild:
    """`work()` in a daemon thread (started now); `result()` waits for it. An exception of the
    build is raised again by `result()` in the caller's thread (under mpirun the World's
    excepthook then ends the job)."""

    def __init__(self, work: Callable[[], Any], name: str):
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self.thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        _single_threaded()
        try:
            self.value = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by result()
            self.error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self) -> tuple[Any, float]:
        """(the built value, seconds this call waited for the build to finish)."""
        started = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - started
        if self.error is not None:
            raise RuntimeError(f"the background KNN graph build failed: "
                               f"{type(self.error).__name__}: {self.error}") from self.error
        return self.value, waited
