"""The alpha-beta model of one training step's communication, for the projection of
`python -m app.bench comm` to P ranks that one machine cannot run.

A message of n bytes costs alpha + n beta (alpha: latency in seconds, beta = 1 / bandwidth in
seconds per byte). With P ranks, the collectives cost (ring algorithms; n is what ONE rank
contributes, N = P n where stated):

    allgather(v) of n bytes per rank:      (P-1) alpha + (P-1) n beta
    reduce-scatter of an N-byte buffer:    (P-1) alpha + (P-1)/P N beta
    allreduce of an N-byte buffer:         2 (P-1) alpha + 2 (P-1)/P N beta

One step of the demo's classifier (softmax.mode full or sampled; app/classifier/sharded.py and
softmax.py), with b samples per rank, embedding dim D, float32 features and int64 labels:

    batch sizes (allgather, 8 bytes):      (P-1) alpha + (P-1) 8 beta            [other]
    labels (allgather, 8 b bytes):         (P-1) alpha + (P-1) 8 b beta           [labels]
    features (allgather, 4 b D bytes):     (P-1) alpha + (P-1) 4 b D beta         [features]
    row max (allreduce, N = 4 P b):        2 (P-1) alpha + 2 (P-1) 4 b beta       [logits]
    row sums and positive (allreduce, N = 8 P b):
                                           2 (P-1) alpha + 2 (P-1) 8 b beta       [logits]
    feature gradients (reduce-scatter, N = 4 P b D):
                                           (P-1) alpha + (P-1) 4 b D beta         [feature_gradients]

and the backbone's synchronized batch norm (mpi/sync_batchnorm.py), per layer of C channels:

    statistics (allgather, 4 (1 + 2 C) bytes) and their gradients (allreduce, N = 8 C):
        (P-1) alpha + (P-1) 4 (1 + 2 C) beta + 2 (P-1) alpha + 2 (P-1)/P 8 C beta  [batchnorm]

The backbone gradients (G bytes of float32 gradients):

    dense (Horovod's fused ring allreduce): 2 (P-1) alpha + 2 (P-1)/P G beta
    sparse (mpi/sparse.py: a count header, then the int32 indices and the float32 values, three
    allgathers of k_bytes = 16 + 8 k bytes in all per rank, k the pairs a rank sends), plus one
    allreduce of the S bytes of the small tensors (comm.dense_below):
                                           3 (P-1) alpha + (P-1) k_bytes beta
                                           + 2 (P-1) alpha + 2 (P-1)/P S beta

The classifier's logit exchanges grow with P at a fixed per-rank batch (their buffers hold the
global batch), the sparse gradients too (every rank receives every other rank's pairs), the
dense allreduce does not: with P large enough dense wins again, and the projection shows where.

Projected step time: T(P) = compute + the sum of the collectives above, with compute the
measured step time less the measured communication time (per rank it does not change with P at
a fixed per-rank batch: N = P b samples against C / P classes). No overlap of communication
with compute is modelled (every collective's time adds to the step, as with comm.overlap off;
comm.overlap is measured, not projected: `app.bench comm --part overlap`), no contention, no
hierarchy (one rank per node).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    """alpha (seconds per message) and beta (seconds per byte) of the links."""

    alpha: float
    beta: float

    @classmethod
    def of(cls, bandwidth_gbps: float, latency_us: float) -> Network:
        return cls(latency_us * 1e-6, 8.0 / (bandwidth_gbps * 1e9))


def allgather_s(net: Network, p: int, nbytes: float) -> float:
    """Ring allgather, `nbytes` from each rank."""
    return (p - 1) * net.alpha + (p - 1) * nbytes * net.beta


def reduce_scatter_s(net: Network, p: int, nbytes: float) -> float:
    """Ring reduce-scatter of an `nbytes` buffer (each rank keeps 1/P of it)."""
    return (p - 1) * net.alpha + (p - 1) / p * nbytes * net.beta


def allreduce_s(net: Network, p: int, nbytes: float) -> float:
    """Ring allreduce of an `nbytes` buffer: reduce-scatter then allgather."""
    return 2 * (p - 1) * net.alpha + 2 * (p - 1) / p * nbytes * net.beta


def classifier_s(net: Network, p: int, batch: int, dim: int) -> dict[str, float]:
    """Seconds per step of the classifier's exchanges (full/sampled softmax), by kind."""
    return {
        "other": allgather_s(net, p, 8),
        "labels": allgather_s(net, p, 8 * batch),
        "features": allgather_s(net, p, 4 * batch * dim),
        "logits": allreduce_s(net, p, 4 * p * batch) + allreduce_s(net, p, 8 * p * batch),
        "feature_gradients": reduce_scatter_s(net, p, 4 * p * batch * dim),
    }


def batchnorm_s(net: Network, p: int, channels: list[int]) -> float:
    """Seconds per step of the synchronized batch norm's layers of `channels` channels."""
    return sum(allgather_s(net, p, 4 * (1 + 2 * c)) + allreduce_s(net, p, 8 * c)
               for c in channels)


def dense_gradients_s(net: Network, p: int, grad_bytes: float) -> float:
    return allreduce_s(net, p, grad_bytes)


def sparse_gradients_s(net: Network, p: int, pair_bytes: float, small_bytes: float) -> float:
    """`pair_bytes`: the header, indices and values one rank sends (k_bytes above);
    `small_bytes`: the small tensors' dense allreduce buffer (0: none)."""
    out = 3 * allgather_s(net, p, 0) + (p - 1) * pair_bytes * net.beta
    return out + (allreduce_s(net, p, small_bytes) if small_bytes else 0.0)


def step_s(net: Network, p: int, *, compute_s: float, batch: int, dim: int,
           grad_bytes: float, pair_bytes: float | None = None, small_bytes: float = 0.0,
           bn_channels: tuple[int, ...] = ()) -> dict[str, float]:
    """The projected step at P ranks: compute, each kind's seconds and their total. Sparse
    gradients where `pair_bytes` is given, dense otherwise."""
    out = {"compute": compute_s, **classifier_s(net, p, batch, dim),
           "batchnorm": batchnorm_s(net, p, list(bn_channels))}
    if pair_bytes is None:
        out["backbone_gradients"] = dense_gradients_s(net, p, grad_bytes)
    else:
        out["backbone_gradients"] = sparse_gradients_s(net, p, pair_bytes, small_bytes)
    out["total"] = sum(out.values())
    return out
