"""The World: one explicit object for the communicator, rank, size, local rank, device and Horovod.

`init_world()` is called once from an entry point's main() and the World is passed to whoever
needs it. Launched under mpirun/srun it wraps mpi4py's COMM_WORLD and initialises Horovod on the
same communicator; launched as a plain `python` process (a laptop, one GPU) with neither mpi4py nor
Horovod importable it still returns a working one-rank World. `fake_world()` is that one-rank World
for unit tests.

An uncaught exception on any rank must not leave the other ranks hanging at their next
collective: `init_world()` installs an excepthook that prints the traceback tagged with the rank
and then calls MPI Abort, which makes the launcher kill the whole job.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Environment variables that only exist when a process was started by an MPI/PMI launcher.
_LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


@dataclass
class Traffic:
    """What this rank sent and how long it waited in collectives, since the last `reset()`.

    `by_kind` splits `bytes_sent` by what was sent (KINDS): the backbone-gradient exchange
    counts under GRADIENTS (the `grad_bytes_sent` metric); the classifier's allgather of the
    batch's features under FEATURES, its reverse (the reduce-scatter of their gradients) under
    FEATURE_GRADIENTS, the labels' allgather under LABELS, the softmax's exchanges of logit
    statistics (full/sampled: row max and row sums) and of pair similarities and their
    gradients (knn) under LOGITS; the synchronized batch norm's statistics (an allgather of
    1 + 2 C values per layer forward, an allreduce of 2 C backward) under BATCHNORM; a KNN
    graph build's ring passes, and the whole of a
    background build (added at its swap), under KNN_GRAPH; everything else (batch sizes, the
    loss, stop flags, a synchronous build's other collectives) under OTHER.

    Time: `seconds` is the time communication took (a blocking call's duration; a non-blocking
    exchange's time in flight, from its start until it was seen complete, mpi/nonblocking.py)
    and `exposed` the part of it this thread spent blocked (blocking calls, starts and waits):
    the `comm_time_s` and `exposed_comm_s` metrics. Blocking calls add to both alike."""

    GRADIENTS = "backbone_gradients"
    FEATURES = "features"
    FEATURE_GRADIENTS = "feature_gradients"
    LOGITS = "logits"
    LABELS = "labels"
    BATCHNORM = "batchnorm"
    KNN_GRAPH = "knn_graph"
    OTHER = "other"
    KINDS = (FEATURES, LOGITS, FEATURE_GRADIENTS, GRADIENTS, LABELS, BATCHNORM, KNN_GRAPH,
             OTHER)

    bytes_sent: int = 0
    seconds: float = 0.0
    exposed: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def timed(self, nbytes: int, kind: str = "other"):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.exposed += elapsed
            self.count(nbytes, kind)

    def count(self, nbytes: int, kind: str = "other") -> None:
        """Add `nbytes` sent without timing them (a send whose wait is timed by its caller,
        e.g. Horovod's allreduce in app/training/data_parallel.py)."""
        self.bytes_sent += int(nbytes)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + int(nbytes)

    def reset(self) -> tuple[int, float]:
        """Return (bytes_sent, seconds) so far and start counting again (`by_kind` and
        `exposed` too: read them before)."""
        out = (self.bytes_sent, self.seconds)
        self.bytes_sent, self.seconds, self.exposed, self.by_kind = 0, 0.0, 0.0, {}
        return out


@dataclass
class World:
    """Who this process is in the job. `comm` is an mpi4py communicator, or None for one rank
    without MPI. `hvd` is the initialised `horovod.torch` module, or None where Horovod is not
    used (one rank without Horovod installed, unit tests)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    threads: int
    comm: Any = None
    hvd: Any = None
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End the whole job now (all ranks). Used after an uncaught exception on this rank."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        os._exit(code)

    def duplicate(self) -> World:
        """Collective: this World on a duplicate of its communicator (MPI_Comm_dup), with its
        own traffic counters and no Horovod, for a thread of this rank that communicates
        beside the main thread (the background KNN graph build): messages on the duplicate
        never match those of the main thread. Needs MPI_THREAD_MULTIPLE (`thread_multiple`).
        One rank without MPI: a copy that shares nothing mutable."""
        comm = self.comm.Dup() if self.comm is not None else None
        return replace(self, comm=comm, hvd=None, traffic=Traffic())

    def shutdown(self) -> None:
        """Orderly end: stop Horovod's background thread before MPI finalises at exit."""
        if self.hvd is not None:
            self.hvd.shutdown()
            self.hvd = None


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in _LAUNCHER_ENV)


def thread_multiple(world: World) -> str | None:
    """None if threads of this rank may call MPI concurrently (MPI_THREAD_MULTIPLE, what
    mpi4py requests and Horovod also needs), else the thread level the library provides, in
    words. Local (no communication)."""
    if world.comm is None or world.size == 1:
        return None
    from mpi4py import MPI  # noqa: PLC0415

    provided = MPI.Query_thread()
    if provided == MPI.THREAD_MULTIPLE:
        return None
    names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
             MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
    return names.get(provided, str(provided))


def _threads_per_rank(local_size: int) -> int:
    # Ranks on one node share its cores; without this two ranks on two cores each start two
    # torch threads and every step slows down. cpu_count ignores the launcher's core binding,
    # the affinity mask respects it (mpirun binds to one core per rank for small jobs).
    cores = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores // max(local_size, 1), affinity))


# glibc mallopt parameters: allocations below M_MMAP_THRESHOLD come from the heap, and freed heap
# memory is returned to the system only above M_TRIM_THRESHOLD at its top.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def _keep_freed_memory() -> bool:
    """Let freed blocks of up to KEEP_FREED_BYTES be reused instead of going back to the kernel.

    By default glibc serves every block above 32 MB with a fresh mmap and unmaps it on free, so
    a loop that allocates the same large buffers (a step's logits, a graph build's candidate
    lists) pays a page fault per 4 KiB page every time; on our VMs a fault costs microseconds
    and a 1M-class graph build spent a fifth of its time in the kernel. Measured: the same build
    takes 16% less time with this setting. A no-op (False) where the C library is not glibc.
    """
    import ctypes  # noqa: PLC0415

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False


def _pick_device(local_rank: int, device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(device)


def _install_abort_hook(world: World) -> None:
    """Uncaught exception on this rank: print it tagged with the rank, then abort the job."""

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        prefix = f"[rank {world.rank}] "
        sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip().splitlines()))
        sys.stderr.write(f"[rank {world.rank}] uncaught {exc_type.__name__}: aborting all "
                         f"{world.size} ranks\n")
        world.abort(1)

    def thread_hook(args):
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thread_hook


def init_world(use_horovod: bool = True, device: str = "auto", abort_on_error: bool = True) -> World:
    """Create the World of this process.

    Under a launcher: mpi4py COMM_WORLD, local rank from a shared-memory split, torch threads set
    to the node's cores divided by the ranks on it, and (if `use_horovod`) Horovod initialised on
    the same communicator. Horovod missing under a multi-rank launch is an error; for a single
    process it is optional.
    """
    comm = None
    if launched_by_mpi():
        from mpi4py import MPI  # noqa: PLC0415 - MPI must not start at import time

        comm = MPI.COMM_WORLD
    else:
        try:
            from mpi4py import MPI  # noqa: PLC0415

            comm = MPI.COMM_WORLD
        except ImportError:
            comm = None
    if comm is not None:
        rank, size = comm.Get_rank(), comm.Get_size()
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
        node_comm.Free()
    else:
        rank, size, local_rank, local_size = 0, 1, 0, 1

    threads = _threads_per_rank(local_size)
    torch.set_num_threads(threads)
    _keep_freed_memory()
    world = World(rank=rank, size=size, local_rank=local_rank, local_size=local_size,
                  device=_pick_device(local_rank, device), threads=threads, comm=comm)
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if abort_on_error:
        _install_abort_hook(world)
    if use_horovod:
        world.hvd = _init_horovod(comm, size)
    return world


def _init_horovod(comm, size: int):
    try:
        import horovod.torch as hvd  # noqa: PLC0415 - optional on one rank
    except ImportError as exc:
        if size > 1:
            raise RuntimeError("Horovod is not importable but the job has several ranks; "
                               "run 'make setup' (it builds horovod 0.28.1)") from exc
        return None
    hvd.init(comm=comm) if comm is not None else hvd.init()
    assert hvd.size() == size, f"Horovod sees {hvd.size()} ranks, MPI {size}"
    return hvd


def fake_world(device: str = "cpu") -> World:
    """A one-rank World without MPI or Horovod, for unit tests and single-process tools."""
    return World(rank=0, size=1, local_rank=0, local_size=1, device=torch.device(device),
                 threads=torch.get_num_threads(), comm=None, hvd=None)
