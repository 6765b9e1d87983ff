"""Sparse exchange of the backbone gradients (`comm.gradients: sparse`): Deep Gradient
Compression (Lin et al., ICLR 2018) on our own (index, value) exchange (mpi/sparse.py).

Legend: L = entries of all sparse tensors together (one flat index space, int32), n = entries
this rank sends in a step.

Per step, per backbone tensor with at least `comm.dense_below` entries (a "sparse tensor"), on
every rank, with g the rank's local gradient (its samples' share of the global-mean loss):

    without momentum correction:  v <- v + g
    with momentum correction:     u <- m u + (g + wd/P w);  v <- v + u
    send the entries of v whose magnitude is in the top `ratio` share (a sampled threshold,
    below), set them to 0 in v (residual accumulation: what is not sent stays in v and joins
    the next step's gradient) and, with momentum correction, in u too (momentum factor masking)

The pairs of all ranks are summed into one dense gradient (Horovod's summed-gradient
convention, data_parallel.py), written into `.grad`, and the plain optimizer steps. Tensors
under `comm.dense_below` entries (biases, norm parameters) are summed densely with one
allreduce of their concatenation: with momentum correction they send u (local momentum, no
masking), without it g.

Momentum and the optimizer. Without momentum correction any `optim.name` works and applies its
own momentum, moments and weight decay to the exchanged sum: at ratio 1.0 everything is sent
every step, v is g, and the optimizer sees exactly what a dense step would (bit for bit at 2
ranks; at 3 and more the float sum may round differently from Horovod's reduction order).
With momentum correction (DGC's) the momentum is the local u: `optim.momentum` is its m, and
`optim.weight_decay` is added to the local gradient as wd/P w before u (the P ranks' shares add
up to wd w), so the backbone optimizer is plain SGD without momentum and without weight decay
applied to the exchanged velocity (w <- w - lr sum_r v_r). Only `optim.name=sgd` takes it
(app/config.py). Note that masking zeroes u wherever v was sent, so at ratio 1.0 the sparse
tensors get no momentum at all (the paper's behaviour), while the dense tensors keep theirs.

Ratio warm-up: over the first `comm.sparse_warmup_steps` steps the share sent falls
geometrically from 1 to `comm.sparse_ratio`: ratio_t = sparse_ratio ** ((t + 1) / W).

Sampled threshold: the k-th largest magnitude (k = ratio x entries) of a random sample of the
entries (at least SAMPLE_MIN_SELECTED / ratio entries, and SAMPLE_SHARE of them) estimates the
top-k threshold; the entries at or above it are sent, cut to an exact top-k when more than
2 k pass. Exact top-k over every tensor is several times slower on the CPU. The sample is drawn
from a generator seeded by (seed, step, rank, tensor), so a resumed run selects as the original
did, whatever the order the tensors are compressed in.

State (per rank, saved in the checkpoint): v per sparse tensor and, with momentum correction,
u per tensor. Resumed on another number of ranks, new rank r takes the sum of the old ranks
r' = r mod P: the sum over ranks of what is still unsent (and of the momentum) is kept.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mpi import collectives
from mpi.sparse import MAX_LENGTH, sparse_allreduce
from mpi.world import Traffic

SAMPLE_MIN_SELECTED = 64  # expected sampled entries above the threshold
SAMPLE_SHARE = 0.01


def select(v_L: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Indices (int64, ascending) of about the top `ratio` share of |v_L| (a flat tensor): all
    of them at ratio 1; otherwise those at or above a threshold estimated on a random sample,
    at most 2 k (an exact top-k cuts the rest)."""
    n = v_L.numel()
    k = max(1, math.ceil(ratio * n))
    if k >= n:
        return torch.arange(n)
    mag_L = v_L.abs()
    num_samples = max(math.ceil(SAMPLE_MIN_SELECTED / ratio), math.ceil(SAMPLE_SHARE * n))
    if num_samples >= n:
        return torch.topk(mag_L, k, sorted=False).indices.sort().values
    sample = mag_L[torch.randint(n, (num_samples,), generator=gen)]
    threshold = torch.topk(sample, max(1, math.ceil(ratio * num_samples))).values[-1]
    index = (mag_L >= threshold).nonzero().squeeze(1)
    if index.numel() > 2 * k:
        index = index[torch.topk(mag_L[index], k, sorted=False).indices].sort().values
    return index


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(p.shape, dtype=p.dtype, device=p.device)  # contiguous, whatever p is


class SparseGradients:
    """The per-rank DGC state of the backbone and the step's exchange; see the module
    docstring. `exchange(step)` is collective: every rank calls it once per optimizer step,
    after backward, and every parameter's `.grad` then holds the sum over ranks."""

    def __init__(self, world, named_params, comm_cfg, optim_cfg, seed: int):
        self.world, self.seed = world, seed
        self.ratio_final, self.warmup = comm_cfg.sparse_ratio, comm_cfg.sparse_warmup_steps
        named = [(name, p) for name, p in named_params if p.requires_grad]
        self.sparse = [(name, p) for name, p in named if p.numel() >= comm_cfg.dense_below]
        self.dense = [(name, p) for name, p in named if p.numel() < comm_cfg.dense_below]
        self.length = sum(p.numel() for _, p in self.sparse)
        if self.length > MAX_LENGTH:
            raise ValueError(f"comm.gradients: sparse: the backbone's {self.length} entries "
                             f"exceed int32 indices; raise comm.dense_below or use dense")
        self.correction = comm_cfg.momentum_correction
        self.momentum = optim_cfg.momentum if self.correction else 0.0
        self.decay = optim_cfg.weight_decay / world.size if self.correction else 0.0
        self.residual = {name: _zeros(p) for name, p in self.sparse}
        self.velocity = ({name: _zeros(p) for name, p in named}
                         if self.correction else {})

    def ratio(self, step: int) -> float:
        """The share of each sparse tensor's entries sent at `step` (warm-up, then the ratio)."""
        if step >= self.warmup:
            return self.ratio_final
        return self.ratio_final ** ((step + 1) / self.warmup)

    def _local(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """What this rank contributes for `p` before selection: g, or with momentum correction
        u <- m u + (g + wd/P w) (u updated in place and returned)."""
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if not self.correction:
            return g
        return self.velocity[name].mul_(self.momentum).add_(g).add_(p.detach(), alpha=self.decay)

    def _generator(self, step: int, tensor: int) -> torch.Generator:
        """The threshold sample's generator of sparse tensor number `tensor` at `step`: one per
        tensor, so the selection does not depend on the order the tensors are compressed in
        (the overlapping pipeline compresses each as its gradient becomes ready)."""
        return torch.Generator().manual_seed(int(np.random.default_rng(
            [self.seed, step, self.world.rank, 13, tensor]).integers(2**62)))

    @torch.no_grad()
    def compress_tensor(self, tensor: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate sparse tensor number `tensor`'s gradient into its residual and take out
        what is sent this step: (index int32 into the tensor's flat entries, value). Local."""
        name, p = self.sparse[tensor]
        v = self.residual[name].add_(self._local(name, p)).view(-1)
        chosen = select(v, self.ratio(step), self._generator(step, tensor))
        values = v[chosen]  # a copy: v is cleared next
        v[chosen] = 0
        if self.correction:
            self.velocity[name].view(-1)[chosen] = 0
        return chosen.to(torch.int32), values

    @torch.no_grad()
    def compress(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`compress_tensor` of every sparse tensor: (index_n int32 into the flat space of the
        sparse tensors, value_n). Local."""
        indices, values, offset = [], [], 0
        for tensor, (_, p) in enumerate(self.sparse):
            index, value = self.compress_tensor(tensor, step)
            indices.append(index + offset)
            values.append(value)
            offset += p.numel()
        if not indices:
            return torch.zeros(0, dtype=torch.int32), torch.zeros(0)
        return torch.cat(indices), torch.cat(values)

    @torch.no_grad()
    def exchange(self, step: int) -> None:
        """Collective: every parameter's `.grad` becomes the sum over ranks of what the ranks
        sent for it this step (sparse tensors) or of their local contribution (dense ones)."""
        if self.sparse:
            index_n, value_n = self.compress(step)
            summed_L = sparse_allreduce(self.world, index_n, value_n, self.length,
                                        Traffic.GRADIENTS)
            self._write(self.sparse, summed_L)
        if self.dense:
            flat = torch.cat([self._local(name, p).reshape(-1) for name, p in self.dense])
            collectives.allreduce_(self.world, flat, kind=Traffic.GRADIENTS)
            self._write(self.dense, flat)

    @staticmethod
    def _write(named, flat: torch.Tensor) -> None:
        offset = 0
        for _, p in named:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def state_dict(self) -> dict:
        """This rank's residuals and (momentum correction) local momenta, by parameter name."""
        return {"residual": dict(self.residual), "velocity": dict(self.velocity)}

    def load_states(self, states: list[dict]) -> None:
        """Set this rank's state to the sum of `states` (this rank's own saved state, or the
        old ranks' mapped onto it on a world-size change); none: zeros. ValueError when a
        saved tensor does not fit the backbone."""
        for part in ("residual", "velocity"):
            mine = getattr(self, part)
            for name, tensor in mine.items():
                tensor.zero_()
                for state in states:
                    saved = state.get(part, {}).get(name)
                    if saved is None:
                        continue
                    if saved.shape != tensor.shape:
                        raise ValueError(f"sparse gradient {part} of {name}: saved shape "
                                         f"{tuple(saved.shape)}, the backbone's "
                                         f"{tuple(tensor.shape)}")
                    tensor.add_(saved.to(tensor.dtype))
