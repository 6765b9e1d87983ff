"""The KNN graph of a training run: the initial graph, its refresh as the weights move, the
files under `out_dir/knn/`, and the graph the classifier uses (swapped at step boundaries).

Legend: c = this rank's classes, D = embedding dim, b = samples in a batch.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mpi import collectives
from mpi.partition import class_owner


@torch.no_grad()
def class_centres(world, backbone, reader, classifier, dtype) -> torch.Tensor:
    """Mean feature of each of this rank's classes under the current backbone (one distributed
    pass over `reader`'s epoch): every (label, feature) goes to its class owner by alltoallv and
    is summed there. A class without samples keeps its current weight row as its centre."""
    from app.evaluate import as_input  # noqa: PLC0415

    start, num_local, dim = classifier.start, classifier.num_local, classifier.dim
    sums_cD = torch.zeros(num_local, dim, dtype=torch.float64)
    counts_c = torch.zeros(num_local, dtype=torch.float64)
    was_training = backbone.training
    backbone.eval()
    for batch in reader.one_epoch():
        feat_bD = backbone(as_input(batch.inputs, dtype)).to(torch.float64)
        labels_b = torch.from_numpy(batch.labels)
        owner_b = torch.from_numpy(class_owner(batch.labels, classifier.num_classes, world.size))
        order = torch.sort(owner_b, stable=True).indices
        counts = torch.bincount(owner_b, minlength=world.size).tolist()
        # One message per destination: [label, feature...] rows, in float64.
        rows_bE = torch.cat([labels_b[order].unsqueeze(1).to(torch.float64), feat_bD[order]], 1)
        recv, _ = collectives.alltoallv(world, rows_bE, counts)
        local = recv[:, 0].long() - start
        sums_cD.index_add_(0, local, recv[:, 1:])
        counts_c.index_add_(0, local, torch.ones_like(recv[:, 0]))
    backbone.train(was_training)
    centres_cD = classifier.weight_cD.to(torch.float64).clone()
    seen = counts_c > 0
    centres_cD[seen] = sums_cD[seen] / counts_c[seen].unsqueeze(1)
    return centres_cD.to(classifier.weight_cD.dtype)


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


def train_centres(world, cfg, backbone, classifier, dtype) -> torch.Tensor:
    """This rank's class centres under the current backbone, from one pass over the train
    split (`class_centres`)."""
    from data_prep.reader import ShardedReader  # noqa: PLC0415

    with ShardedReader(cfg.data.path, "train", world.rank, world.size, cfg.train.eval_batch_size,
                       cfg.seed, shuffle=False, drop_last=False, prefetch=cfg.data.prefetch) as r:
        return class_centres(world, backbone, r, classifier, dtype)


def imprints(cfg) -> bool:
    """Whether the classifier rows start at the class centres (`model.classifier_init`)."""
    init = cfg.model.classifier_init
    return init == "centres" or (init == "auto" and cfg.softmax.mode == "knn"
                                 and cfg.knn.init == "centres")


def imprint(classifier, centres_cD: torch.Tensor) -> None:
    """Classifier rows := the class centres at unit norm (`model.classifier_init=centres`); a
    class without samples (its centre is its own row) keeps its row."""
    norm_c1 = centres_cD.norm(dim=1, keepdim=True)
    fresh = (centres_cD != classifier.weight_cD).any(dim=1, keepdim=True) & (norm_c1 > 0)
    rows_cD = torch.where(fresh, centres_cD / norm_c1.clamp_min(1e-30), classifier.weight_cD)
    classifier.weight_cD.copy_(rows_cD.to(classifier.weight_cD.dtype))
