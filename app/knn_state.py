"""The KNN graph of a training run: the initial graph, its refresh as the weights move, the
files under `out_dir/knn/`, and the graph the classifier uses (swapped at step boundaries).

Legend: c = this rank's classes, D = embedding dim, b = samples in a batch.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch



class KnnGraphs:
    """Builds, writes, opens and swaps the graph of a run (all methods collective)."""

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

    def load_state_dict(self, state: dict, classifier) -> bool:
        """Reopen the graph a checkpoint was using; False if its file is gone."""
        if not state or not state.get("path") or not (self.dir / state["path"]).is_file():
            return False
        self.path, self.built_at = self.dir / state["path"], int(state["built_at"])
        self.recall = float(state["recall"])
        self.from_weights = bool(state.get("from_weights", False))
        self._open(classifier)
        return True

    def _open(self, classifier) -> None:
        from app.knn_graph import KnnGraph  # noqa: PLC0415 - faiss is heavy

        classifier.set_graph(KnnGraph.open(self.path, self.num_classes))

    def build(self, step: int, classifier, rows_cD: torch.Tensor | None, why: str) -> float:
        """Build the graph from `rows_cD` (this rank's rows; None = random graph), write it as
        knn/graph-step-NNNNNNNN.h5 and swap it in. Returns the seconds it took."""
        from app import knn_graph  # noqa: PLC0415

        started = time.perf_counter()
        k = min(self.k, self.num_classes)
        if rows_cD is None:
            graph = knn_graph.random_graph(classifier.start, classifier.stop, self.num_classes,
                                           k, self.seed + step)
            recall = float("nan")
        else:
            previous = self._previous(classifier, k) if self._refines(step, why) else None
            graph = knn_graph.build_graph(self.world, rows_cD, classifier.start,
                                          self.num_classes, k, index=self.cfg.index,
                                          nprobe=self.cfg.nprobe, seed=self.seed, init=previous)
            recall = knn_graph.recall_at_k(self.world, rows_cD, classifier.start,
                                           self.num_classes, graph, seed=self.seed + step)
        if self.world.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.world.barrier()
        path = self.dir / f"graph-step-{step:08d}.h5"
        knn_graph.write_graph(self.world, path, graph, self.num_classes, k, step, recall)
        self.path, self.built_at, self.recall = path, step, recall
        self.from_weights = why != "initial"
        self._open(classifier)
        self._prune()
        seconds = time.perf_counter() - started
        self.log.info("knn graph %s at step %d (%s): K=%d, index %s, recall@k %.3f, %.1fs", why,
                      step, path.name, k, getattr(graph, "index", "random"), recall, seconds)
        return seconds

    def _refines(self, step: int, why: str) -> bool:
        """Whether this refresh refines the graph in use instead of rebuilding it: all but every
        `knn.rebuild_every`-th refresh (counted from step 0, so a resumed run keeps the rhythm),
        and only a graph built from the weights (the initial one, of class centres or random,
        says nothing about the neighbours of the rows)."""
        return (why == "refresh" and self.from_weights
                and (step // self.cfg.refresh_every) % self.cfg.rebuild_every != 0)

    @staticmethod
    def _previous(classifier, k: int):
        """This rank's rows of the graph in use, as the starting point of a refinement (None if
        there is none or it has another K: the same answer on every rank, since they all have
        the same file open; a rank without classes passes its empty rows)."""
        from app.knn_graph import LocalGraph  # noqa: PLC0415

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
        return step > 0 and step % self.cfg.refresh_every == 0 and step != self.built_at
