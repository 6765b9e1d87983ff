"""The KNN graph of a training run: the initial graph, its refresh as the weights move, the
files under `out_dir/knn/` (docs/design.md "Contracts: Run directory"), and the graph the
classifier uses (swapped at step boundaries).

A refresh every `knn.refresh_every` steps either searches from scratch (every
`knn.rebuild_every`-th refresh, counted from step 0) or refines the graph in use: its rows are
rescored under the current weights, then improved by neighbours-of-neighbours passes.

Legend: c = this rank's classes (rows), D = embedding dim.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from app.knn.graph_file import GraphFile, write_graph
from app.knn.random_graph import random_graph
from app.knn.recall import recall_at_k
from app.knn.search import LocalGraph, build_graph
from mpi.agree import SetupError, agree, decide_on_root


class GraphRefresher:
    """Builds, writes, opens and swaps the graph of a run. `build` and `load_state_dict` are
    collective; `state_dict` and `due` give the same answer on every rank."""

    def __init__(self, world, knn_cfg, k: int, run_dir: Path, num_classes: int, seed: int,
                 keep: int, log):
        self.world, self.cfg, self.k, self.log = world, knn_cfg, k, log
        self.dir = Path(run_dir) / "knn"
        self.num_classes, self.seed, self.keep = num_classes, seed, keep
        self.path: Path | None = None   # the graph in use
        self.built_at = -1              # the step whose weights it was built from
        self.recall = float("nan")
        self.from_weights = False       # built from the classifier rows (not centres, random)

    def state_dict(self) -> dict:
        return {"path": self.path.name if self.path else None, "built_at": self.built_at,
                "recall": self.recall, "from_weights": self.from_weights}

    def load_state_dict(self, state: dict | None, classifier) -> bool:
        """Collective: reopen the graph a checkpoint was using and swap it into `classifier`.

        Rank 0 decides, from its own `state` and its own view of the file system, whether the
        file is still usable (`GraphFile.open` succeeds on it); every rank follows. Then every
        rank opens it, and if any rank cannot, no rank uses it. So the answer is the same on
        every rank, even where ranks see the file system differently: True with the graph
        swapped in, or False with nothing changed (no graph in `state`, or its file is gone or
        unusable) and the caller builds a new one."""
        kept = decide_on_root(self.world, lambda: self._usable(state))
        if kept is None:
            return False
        path = self.dir / kept["path"]
        try:
            graph = agree(self.world, lambda: GraphFile.open(path, self.num_classes))
        except SetupError as exc:
            self.log.warning("knn graph: not every rank can read %s (%s)", path, exc)
            return False
        self.path, self.built_at = path, int(kept["built_at"])
        self.recall = float(kept["recall"])
        self.from_weights = bool(kept.get("from_weights", False))
        classifier.set_graph(graph)
        return True

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
        write it as knn/graph-step-NNNNNNNN.h5 and swap it in. `why` (logged): "initial" for
        a graph that is not of the weights (class centres, random), "refresh" for a scheduled
        refresh (which may refine the graph in use), anything else for a graph of the weights.
        Returns the seconds it took."""
        started = time.perf_counter()
        k = min(self.k, self.num_classes)
        graph, recall = self._new_graph(step, classifier, rows_cD, why, k)
        if self.world.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.world.barrier()
        path = self.dir / f"graph-step-{step:08d}.h5"
        write_graph(self.world, path, graph, self.num_classes, k, step, recall)
        self.path, self.built_at, self.recall = path, step, recall
        self.from_weights = why != "initial"
        classifier.set_graph(GraphFile.open(self.path, self.num_classes))
        self._prune()
        seconds = time.perf_counter() - started
        self.log.info("knn graph %s at step %d (%s): K=%d, index %s, recall@k %.3f, %.1fs", why,
                      step, path.name, k, getattr(graph, "index", "random"), recall, seconds)
        return seconds

    def _new_graph(self, step: int, classifier, rows_cD, why: str,
                   k: int) -> tuple[LocalGraph, float]:
        """Collective (unless random): this rank's rows of the new graph and its recall."""
        if rows_cD is None:
            graph = random_graph(classifier.start, classifier.stop, self.num_classes, k,
                                 self.seed + step)
            return graph, float("nan")
        previous = self._previous(classifier, k) if self._refines(step, why) else None
        graph = build_graph(self.world, rows_cD, classifier.start, self.num_classes, k,
                            index=self.cfg.index, nprobe=self.cfg.nprobe, seed=self.seed,
                            init=previous)
        recall = recall_at_k(self.world, rows_cD, classifier.start, self.num_classes, graph,
                             seed=self.seed + step)
        return graph, recall

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
        for old in graphs[:-(self.keep + 1)]:
            old.unlink(missing_ok=True)

    def due(self, step: int) -> bool:
        """Whether a refresh is due at `step` (every knn.refresh_every steps, once)."""
        return step > 0 and step % self.cfg.refresh_every == 0 and step != self.built_at
