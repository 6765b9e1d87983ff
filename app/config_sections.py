"""The run configuration's sections for the distributed classifier and its communication
(`softmax`, `knn`, `comm`) and the value checks every section uses. app/config.py assembles them
into `Config`; import them from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{key}: {value!r} out of range, must be {allowed}")


def _check_not_empty(key: str, value: str) -> None:
    if not value:
        raise ValueError(f"{key}: must not be empty")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} not one of {'|'.join(choices)}")


def _check_at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        _fail(key, value, f">= {low}")


def _check_fraction(key: str, value: float, *, zero_ok: bool = False) -> None:
    """value in (0, 1], or [0, 1] with zero_ok."""
    if not ((0.0 <= value if zero_ok else 0.0 < value) and value <= 1.0):
        _fail(key, value, f"in {'[' if zero_ok else '('}0, 1]")


def _check_momentum(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        _fail(key, value, "in [0, 1)")



@dataclass(frozen=True)
class SoftmaxConfig:
    """The classifier's softmax over the sharded weight (docs/design.md, "One step").

    mode: `full` (exact softmax over all C classes), `sampled` (positives plus uniform random
        negatives per shard, as Partial FC), or `knn` (the label's K graph neighbours).
    k: neighbours per label in knn mode, the label itself included (column 0).
    random_negatives: extra uniform random classes per sample in knn mode.
    sample_rate: share of each shard's classes kept as negatives in sampled mode.
    logit: `cosine` (normalised features and weights) or `dot` (raw products, used as they are).
    scale: multiplies cosine logits, which lie in [-1, 1]: it sets the softmax temperature.
    margin, margin_type: margin on the positive cosine logit only: `cosface` subtracts it from
        the cosine, `arcface` adds it to the angle. 0 = no margin; dot logits take none.
    """

    mode: str = "full"
    k: int = 64
    random_negatives: int = 0
    sample_rate: float = 0.1
    logit: str = "cosine"
    scale: float = 30.0
    margin: float = 0.0
    margin_type: str = "cosface"

    def __post_init__(self) -> None:
        _check_choice("softmax.mode", self.mode, ("full", "sampled", "knn"))
        _check_at_least("softmax.k", self.k, 1)
        _check_at_least("softmax.random_negatives", self.random_negatives, 0)
        _check_fraction("softmax.sample_rate", self.sample_rate)
        _check_choice("softmax.logit", self.logit, ("cosine", "dot"))
        if not self.scale > 0:
            _fail("softmax.scale", self.scale, "> 0")
        _check_at_least("softmax.margin", self.margin, 0.0)
        _check_choice("softmax.margin_type", self.margin_type, ("cosface", "arcface"))
        if self.margin > 0 and self.logit != "cosine":
            raise ValueError(
                f"softmax.margin: {self.margin!r} needs softmax.logit=cosine (margins act on the "
                f"positive cosine), got {self.logit!r}"
            )


@dataclass(frozen=True)
class KnnConfig:
    """The KNN graph over the class weights (knn softmax mode only).

    refresh_every: steps between refreshes of the graph as the weights move.
    rebuild_every: every how many refreshes the graph is searched from scratch; the refreshes
        between refine the graph in use instead (its rows rescored under the current weights,
        then neighbours-of-neighbours passes): cheaper, and enough while the weights move
        little between refreshes. 1 = always rebuild.
    index: faiss index (`flat` exact, `ivf`, `hnsw`; `auto` picks by class count), or `torch`:
        the exact search of `flat` in torch on the device of the classifier rows (a GPU
        without faiss-gpu; on the CPU a reference for the faiss indexes).
    nprobe: IVF lists searched per query.
    init: the graph before the first rebuild: from the classes' mean features (`centres`) or
        from the random initial weights (`random`).
    refresh_mode: how a refresh builds from its snapshot of the rows (taken at the boundary
        before its step s): `sync` in the loop, which stops for the whole build; `background`
        in a thread of each rank beside the loop (needs knn.refresh_lag >= 1).
    refresh_lag: the refresh of step s is swapped in by every rank before step s + lag,
        waiting there for a build that has not finished (`graph_wait_s` in metrics.jsonl).
        0 = at once (sync only); at most knn.refresh_every. Both modes train identically
        for the same lag.
    """

    refresh_every: int = 100
    rebuild_every: int = 1
    index: str = "auto"
    nprobe: int = 16
    init: str = "centres"
    refresh_mode: str = "sync"
    refresh_lag: int = 0

    def __post_init__(self) -> None:
        _check_at_least("knn.refresh_every", self.refresh_every, 1)
        _check_at_least("knn.rebuild_every", self.rebuild_every, 1)
        _check_choice("knn.index", self.index, ("flat", "ivf", "hnsw", "torch", "auto"))
        _check_at_least("knn.nprobe", self.nprobe, 1)
        _check_choice("knn.init", self.init, ("centres", "random"))
        _check_choice("knn.refresh_mode", self.refresh_mode, ("sync", "background"))
        if not 0 <= self.refresh_lag <= self.refresh_every:
            _fail("knn.refresh_lag", self.refresh_lag, "in [0, knn.refresh_every]")
        if self.refresh_mode == "background" and self.refresh_lag < 1:
            raise ValueError("knn.refresh_lag: 0 leaves a background build no steps to run "
                             "beside; set knn.refresh_lag >= 1 or knn.refresh_mode=sync")


@dataclass(frozen=True)
class CommConfig:
    """Backbone-gradient communication (app/training/data_parallel.py).

    gradients: `dense` (Horovod's allreduce of every backbone gradient) or `sparse` (Deep
        Gradient Compression on our own (int32 index, value) exchange: per tensor the top
        `sparse_ratio` share of the accumulated gradient is sent, the rest stays in a per-rank
        residual for later steps; app/training/sparse_grad.py). On one rank nothing is
        exchanged but the selection and the residuals still shape the update.
    sparse_ratio: share of each sparse tensor's entries a rank sends per step (sparse only).
        1.0 sends everything: the same step as dense.
    sparse_warmup_steps: over these first steps the share falls geometrically from 1 to
        sparse_ratio (DGC's warm-up; 0 = none; sparse only).
    dense_below: tensors with fewer entries (biases, norm parameters) are summed densely in
        sparse mode (one allreduce of their concatenation).
    momentum_correction: DGC's momentum correction and masking (sparse only, optim.name=sgd):
        each rank accumulates its own momentum (optim.momentum, with optim.weight_decay added
        to its gradient) before the selection, and the optimizer applies plain SGD to the
        exchanged sum. Off: residuals accumulate gradients and the optimizer's own momentum
        acts on the exchanged sum.
    overlap: the overlapping step pipeline (app/training/pipeline.py): the classifier's
        exchanges are non-blocking and run per micro-batch, each overlapping the next one's
        compute; the backbone's gradient exchange starts per tensor during backward (dense:
        Horovod's hooks; sparse: ours) and overlaps the classifier's row update. The same
        losses and weights as without (float rounding aside).
    micro_batches: the classifier's micro-batches per step with overlap (each rank's batch in
        parts whose sizes differ by at most one; at most train.batch_size; overlap only).
    """

    gradients: str = "dense"
    sparse_ratio: float = 0.01
    sparse_warmup_steps: int = 0
    dense_below: int = 1024
    momentum_correction: bool = False
    overlap: bool = False
    micro_batches: int = 2

    def __post_init__(self) -> None:
        _check_choice("comm.gradients", self.gradients, ("dense", "sparse"))
        _check_fraction("comm.sparse_ratio", self.sparse_ratio)
        _check_at_least("comm.sparse_warmup_steps", self.sparse_warmup_steps, 0)
        _check_at_least("comm.dense_below", self.dense_below, 0)
        if self.gradients == "dense":
            for key, default in (("sparse_ratio", 0.01), ("sparse_warmup_steps", 0),
                                 ("dense_below", 1024), ("momentum_correction", False)):
                if getattr(self, key) != default:
                    raise ValueError(f"comm.{key}: set, but it only acts with "
                                     f"comm.gradients=sparse (gradients is 'dense')")
        _check_at_least("comm.micro_batches", self.micro_batches, 1)
        if not self.overlap and self.micro_batches != 2:
            raise ValueError("comm.micro_batches: set, but it only acts with comm.overlap=true")
