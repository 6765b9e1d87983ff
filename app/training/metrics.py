"""Per-step figures folded into one `metrics.jsonl` line per log interval (host numbers only:
the loss is already a Python float on logging steps)."""
from __future__ import annotations

from app.runlog import peak_rss_mb
from mpi.world import Traffic


class MetricsWindow:
    """Accumulates steps between two metrics lines; `flush` returns the line and starts over."""

    def __init__(self, extra: dict | None = None):
        self.extra = dict(extra or {})  # written on every line as it is (e.g. micro_batches)
        self.steps, self.seconds, self.loss, self.rows, self.hvd_wait = 0, 0.0, 0.0, 0, 0.0
        self.knn_build_s = 0.0  # seconds of the KNN graph builds finished in the window
        self.graph_wait_s = 0.0  # seconds the loop waited for a KNN graph

    def add(self, seconds: float, loss: float, rows: int, hvd_wait: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.loss += loss
        self.rows += rows
        self.hvd_wait += hvd_wait

    def flush(self, world, *, step: int, epoch: int, lr: float, global_batch: int) -> dict:
        """The metrics line (units in the key names) for the steps since the last flush; reads
        and resets this rank's traffic counters. `bytes_sent` (all of this rank's traffic) and
        `grad_bytes_sent` (its backbone-gradient part) are means per step, as counted by the
        code that sends (mpi/collectives.py, mpi/sparse.py, data_parallel.step);
        `bytes_by_kind` splits `bytes_sent` by Traffic.KINDS (kinds with no bytes absent; each
        a mean per step rounded down, so the values may sum to a few bytes under
        `bytes_sent`).

        Time per step: `comm_time_s` is the time communication took (blocking calls, the time
        in flight of non-blocking exchanges, Horovod's wait), `exposed_comm_s` the part the
        step waited for (blocking calls, starts and waits of non-blocking ones, Horovod's wait;
        equal to comm_time_s when everything blocks), `compute_s` the rest of `step_time_s`.
        Exchanges in flight at the same time each count their own time, so with overlap
        comm_time_s may exceed step_time_s. Horovod's allreduces run in its background thread:
        only the wait for them is known, so they count as exposed in full."""
        n = max(self.steps, 1)
        by_kind = {k: v // n for k, v in sorted(world.traffic.by_kind.items())}
        grad_sent = world.traffic.by_kind.get(Traffic.GRADIENTS, 0)
        exposed = world.traffic.exposed + self.hvd_wait
        sent, comm_s = world.traffic.reset()
        step_s = self.seconds / n
        record = {
            "step": step, "epoch": epoch, "loss": self.loss / n, "lr": lr,
            "samples_per_s": global_batch * self.steps / max(self.seconds, 1e-9),
            "step_time_s": step_s, "comm_time_s": (comm_s + self.hvd_wait) / n,
            "exposed_comm_s": exposed / n, "compute_s": max(step_s - exposed / n, 0.0),
            "bytes_sent": sent // n, "grad_bytes_sent": grad_sent // n,
            "bytes_by_kind": by_kind,
            "rows_updated": self.rows // n, "peak_rss_mb": round(peak_rss_mb(), 1),
            "knn_build_s": self.knn_build_s, "graph_wait_s": self.graph_wait_s, **self.extra,
        }
        self.__init__(self.extra)
        return record
