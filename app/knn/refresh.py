"""The KNN graph of a training run: the initial graph, its refresh as the weights move, the
files under `out_dir/knn/` (docs/design.md "Contracts: Run directory"), and the graph the
classifier uses (swapped at step boundaries).

A refresh every `knn.refresh_every` steps either searches from scratch (every
`knn.rebuild_every`-th refresh, counted from step 0) or refines the graph in use: its rows are
rescored under the current weights, then improved by neighbours-of-neighbours passes.

A refresh due at step s snapshots this rank's rows (a copy) at the boundary before step s and
builds from the snapshot: in the loop (`knn.refresh_mode=sync`) or in a thread beside it
(`background`, `background.py`). Every rank swaps the new graph in at the boundary before step
s + `knn.refresh_lag`, waiting there for a build that has not finished (`graph_wait_s`). The
swap step depends only on the config, so both modes train identically; a step never mixes two
graphs (the swap happens between steps, in the loop's thread). A checkpoint taken between
snapshot and swap waits for the build and records its file as `pending`; a resumed run swaps it
in at the same step.

Legend: c = this rank's classes (rows), D = embedding dim.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from app.knn.background import BackgroundBuild, DoneBuild
from app.knn.graph_file import GraphFile, write_graph
from app.knn.random_graph import random_graph
from app.knn.recall import recall_at_k
from app.knn.search import LocalGraph, build_graph
from mpi.agree import SetupError, agree, decide_on_root
from mpi.world import Traffic, thread_multiple


@dataclass
class Built:
    """A graph file a build wrote: the step of the rows it was built from, its recall, whether
    it is of the weights (not class centres or random), the build's seconds and bytes sent."""

    path: Path
    step: int
    recall: float
    from_weights: bool
    seconds: float = 0.0
    bytes_sent: int = 0


@dataclass
class Pending:
    """A refresh between its snapshot (the rows of step `built_at`) and its swap (before step
    `swap_at`); `job.result()` gives its `Built`."""

    built_at: int
    swap_at: int
    job: DoneBuild | BackgroundBuild


class GraphRefresher:
    """Builds, writes, opens and swaps the graph of a run. `build`, `at_boundary`,
    `load_state_dict` and `close` are collective; `state_dict` and `due` give the same answer
    on every rank."""

    def __init__(self, world, knn_cfg, k: int, run_dir: Path, num_classes: int, seed: int,
                 keep: int, log):
        self.world, self.cfg, self.k, self.log = world, knn_cfg, k, log
        self.dir = Path(run_dir) / "knn"
        self.num_classes, self.seed, self.keep = num_classes, seed, keep
        self.path: Path | None = None   # the graph in use
        self.built_at = -1              # the step whose weights it was built from
        self.recall = float("nan")
        self.from_weights = False       # built from the classifier rows (not centres, random)
        self.pending: Pending | None = None
        self.built_s = self.waited_s = 0.0  # since `take_times`
        self._thread_world = None       # the background build's World (`World.duplicate`)
        level = thread_multiple(world) if knn_cfg.refresh_mode == "background" else None
        if level is not None:
            raise ValueError(f"knn.refresh_mode: background needs MPI_THREAD_MULTIPLE but the "
                             f"MPI library provides {level}; set knn.refresh_mode=sync")

    def state_dict(self) -> dict:
        """The graph in use, and a pending refresh (waiting for its build: the loop's wait)."""
        state = {"path": self.path.name if self.path else None, "built_at": self.built_at,
                 "recall": self.recall, "from_weights": self.from_weights}
        if self.pending is not None:
            built = self._result()
            state["pending"] = {"path": built.path.name, "built_at": built.step,
                                "recall": built.recall, "swap_at": self.pending.swap_at}
        return state

    def load_state_dict(self, state: dict | None, classifier) -> bool:
        """Collective: reopen the graph a checkpoint was using and swap it into `classifier`,
        and the refresh it had pending (swapped in later, at its step).

        Rank 0 decides, from its own `state` and its own view of the file system, whether the
        file is still usable (`GraphFile.open` succeeds on it); every rank follows. Then every
        rank opens it, and if any rank cannot, no rank uses it. So the answer is the same on
        every rank, even where ranks see the file system differently: True with the graph
        swapped in, or False with nothing changed (no graph in `state`, or its file is gone or
        unusable) and the caller builds a new one. A pending file that is gone is dropped with
        a warning (the graph in use stays until the next refresh)."""
        pending = (state or {}).get("pending")
        graph = self._reopen(state)
        if graph is not None:
            self.path, self.built_at = graph.path, int(state["built_at"])
            self.recall = float(state["recall"])
            self.from_weights = bool(state.get("from_weights", False))
            classifier.set_graph(graph)
        if self._reopen(pending) is not None:
            built = Built(self.dir / pending["path"], int(pending["built_at"]),
                          float(pending["recall"]), True)
            self.pending = Pending(built.step, int(pending["swap_at"]), DoneBuild(lambda: built))
        elif pending:
            self.log.warning("knn graph: the refresh of step %s pending in the checkpoint is "
                             "lost; the graph in use stays until the next refresh",
                             pending.get("built_at"))
        return graph is not None

    def _reopen(self, state: dict | None) -> GraphFile | None:
        """Collective: the graph file `state` names, opened on every rank, or None on every
        rank (rank 0 finds it unusable, or some rank cannot open it)."""
        kept = decide_on_root(self.world, lambda: self._usable(state))
        if kept is None:
            return None
        path = self.dir / kept["path"]
        try:
            return agree(self.world, lambda: GraphFile.open(path, self.num_classes))
        except SetupError as exc:
            self.log.warning("knn graph: not every rank can read %s (%s)", path, exc)
            return None

    def _usable(self, state: dict | None) -> dict | None:
        """Rank 0: `state` if it names a graph file that opens, else None."""
        if not state or not state.get("path"):
            return None
        try:
            GraphFile.open(self.dir / state["path"], self.num_classes)
        except ValueError as exc:
            self.log.warning("knn graph: the checkpoint's graph is not usable: %s", exc)
            return None
        return state

    def build(self, step: int, classifier, rows_cD: torch.Tensor | None, why: str) -> float:
        """Collective: build the graph from `rows_cD` (this rank's rows; None = random graph),
        write it as knn/graph-step-NNNNNNNN.h5 and swap it in now. `why` (logged): "initial"
        for a graph that is not of the weights (class centres, random), "refresh" for a
        scheduled refresh (which may refine the graph in use), anything else for a graph of
        the weights. Returns the seconds it took."""
        k = min(self.k, self.num_classes)
        previous = self._previous(classifier, k) if self._refines(step, why) else None
        built = self._make(self.world, step, classifier.start, classifier.stop, rows_cD,
                           previous, why, k)
        self._use(built, classifier)
        return built.seconds

    def _make(self, world, step: int, start: int, stop: int, rows_cD, previous, why: str,
              k: int) -> Built:
        """Collective over `world` (the run's, or the background build's duplicate): this
        rank's rows of the new graph, written to knn/graph-step-NNNNNNNN.h5. Reads only
        settings of `self`, so it may run in the build thread."""
        started, sent = time.perf_counter(), world.traffic.bytes_sent
        if rows_cD is None:
            graph = random_graph(start, stop, self.num_classes, k, self.seed + step)
            recall = float("nan")
        else:
            graph = build_graph(world, rows_cD, start, self.num_classes, k, index=self.cfg.index,
                                nprobe=self.cfg.nprobe, seed=self.seed, init=previous)
            recall = recall_at_k(world, rows_cD, start, self.num_classes, graph,
                                 seed=self.seed + step)
        if world is not self.world:  # the file says how it was made (attribute index_detail)
            graph.detail += "; built beside the training loop (knn.refresh_mode=background)"
        if world.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
        world.barrier()
        path = self.dir / f"graph-step-{step:08d}.h5"
        write_graph(world, path, graph, self.num_classes, k, step, recall)
        seconds = time.perf_counter() - started
        self.log.info("knn graph %s at step %d (%s): K=%d, index %s, recall@k %.3f, %.1fs", why,
                      step, path.name, k, getattr(graph, "index", "random"), recall,
                      seconds)
        return Built(path, step, recall, why != "initial", seconds,
                     world.traffic.bytes_sent - sent)

    def _use(self, built: Built, classifier) -> None:
        """Swap `built` in: the classifier uses it from the next step on."""
        self.path, self.built_at = built.path, built.step
        self.recall, self.from_weights = built.recall, built.from_weights
        classifier.set_graph(GraphFile.open(self.path, self.num_classes))
        self._prune()

    # -- the scheduled refresh ------------------------------------------------------------------
    def at_boundary(self, step: int, classifier) -> None:
        """Collective, at the boundary before step `step` runs: swap in the pending refresh
        whose swap step this is, then start the refresh due at `step` (swapped in at once with
        knn.refresh_lag=0). Times go to `take_times`."""
        if self.pending is not None and step >= self.pending.swap_at:
            self._swap(classifier)
        if self.due(step):
            self._start_refresh(step, classifier)
            if step >= self.pending.swap_at:
                self._swap(classifier)

    def _start_refresh(self, step: int, classifier) -> None:
        """Snapshot this rank's rows and build the refresh's graph from them: now (`sync`, the
        loop waits for all of it) or in the build thread (`background`)."""
        k = min(self.k, self.num_classes)
        # The snapshot: training goes on changing classifier.weight_cD in place.
        rows_cD = classifier.weight_cD.detach().clone()
        previous = self._previous(classifier, k) if self._refines(step, "refresh") else None
        if self.cfg.refresh_mode == "background":
            if self._thread_world is None:  # collective: the first refresh, on every rank
                self._thread_world = self.world.duplicate()
            work = partial(self._make, self._thread_world, step, classifier.start,
                           classifier.stop, rows_cD, previous, "refresh", k)
            job = BackgroundBuild(work, f"knn-build-step-{step}")
        else:
            job = DoneBuild(partial(self._make, self.world, step, classifier.start,
                                    classifier.stop, rows_cD, previous, "refresh", k))
            self.built_s += job.value.seconds
            self.waited_s += job.value.seconds
        self.pending = Pending(step, step + self.cfg.refresh_lag, job)

    def _result(self) -> Built:
        """The pending refresh's graph, waiting for its build if it is still running."""
        built, waited = self.pending.job.result()
        self.waited_s += waited
        return built

    def _swap(self, classifier) -> None:
        background = isinstance(self.pending.job, BackgroundBuild)
        built = self._result()
        if background:  # the build thread's own counters (a sync build's are counted)
            self.built_s += built.seconds
            self.world.traffic.count(built.bytes_sent, Traffic.KNN_GRAPH)
        self.pending = None
        self._use(built, classifier)

    def take_times(self) -> tuple[float, float]:
        """(seconds of the builds finished, seconds the loop waited for a graph) since the
        last call. A `sync` build counts in both; a `background` one waits only for the part
        that outlasted knn.refresh_lag steps (and at a checkpoint between snapshot and swap)."""
        out = (self.built_s, self.waited_s)
        self.built_s = self.waited_s = 0.0
        return out

    def close(self) -> None:
        """Collective, at the end of the run: wait for a build still running (not swapped in:
        the run ends first) and free the build thread's communicator."""
        if self.pending is not None:
            self._result()
        if self._thread_world is not None and self._thread_world.comm is not None:
            self._thread_world.comm.Free()
        self._thread_world = None

    def _refines(self, step: int, why: str) -> bool:
        """Whether this refresh refines the graph in use instead of rebuilding it: all but every
        `knn.rebuild_every`-th refresh (counted from step 0, so a resumed run keeps the rhythm),
        and only a graph built from the weights (the initial one, of class centres or random,
        says nothing about the neighbours of the rows)."""
        return (why == "refresh" and self.from_weights
                and (step // self.cfg.refresh_every) % self.cfg.rebuild_every != 0)

    @staticmethod
    def _previous(classifier, k: int) -> LocalGraph | None:
        """This rank's rows of the graph in use, as the starting point of a refinement (None if
        there is none or it has another K: the same answer on every rank, since they all have
        the same file open; a rank without classes passes its empty rows)."""
        graph = classifier.graph
        if graph is None or graph.k != k:
            return None
        ids = np.arange(classifier.start, classifier.stop)
        return LocalGraph(np.asarray(graph.rows(ids)), np.asarray(graph.similarities(ids)),
                          classifier.start, graph.index)

    def _prune(self) -> None:
        """Keep the newest graphs: those the kept checkpoints refer to are among them."""
        if not self.world.is_root:
            return
        graphs = sorted(self.dir.glob("graph-step-*.h5"))
        # One more with knn.refresh_lag: a checkpoint may name a pending graph beside the one
        # in use.
        for old in graphs[:-(self.keep + 1 + (self.cfg.refresh_lag > 0))]:
            old.unlink(missing_ok=True)

    def due(self, step: int) -> bool:
        """Whether a refresh is due at `step` (every knn.refresh_every steps, once: not if the
        graph in use or the pending one is of that step, e.g. after a resume)."""
        return (step > 0 and step % self.cfg.refresh_every == 0 and step != self.built_at
                and (self.pending is None or self.pending.built_at != step))
