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
    """Backbone-gradient communication. Only the defaults are available in this version: the
    backbone gradients go through Horovod's dense allreduce and nothing overlaps; other values
    are refused (the sparse exchange and the overlapping pipeline are planned, not built).

    gradients: `dense` (Horovod allreduce); `sparse` (top-k with residual accumulation,
        exchanged as (index, value) pairs) is not available yet.
    sparse_ratio: share of gradient entries each rank sends per step in sparse mode (not
        available yet: only the default 0.01 is accepted).
    overlap: overlap the communication of one micro-batch with the compute of the next (not
        available yet: only false is accepted).
    """

    gradients: str = "dense"
    sparse_ratio: float = 0.01
    overlap: bool = False

    def __post_init__(self) -> None:
        _check_choice("comm.gradients", self.gradients, ("dense", "sparse"))
        _check_fraction("comm.sparse_ratio", self.sparse_ratio)
        for key, value, default in (("gradients", self.gradients, "dense"),
                                    ("sparse_ratio", self.sparse_ratio, 0.01),
                                    ("overlap", self.overlap, False)):
            if value != default:
                raise ValueError(f"comm.{key}: {value!r} is not available in this version "
                                 f"(only {default!r}: backbone gradients use Horovod's dense "
                                 f"allreduce without overlap); remove the key")
