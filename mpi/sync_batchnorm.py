"""Batch norm whose statistics are those of the GLOBAL batch, over mpi4py (CPU or GPU tensors).

Horovod's SyncBatchNorm only runs on GPUs; this one is the same algorithm on our collectives, so
P ranks with batch b normalise exactly as one rank with batch P*b (float tolerance).

forward: one allgather of each rank's (count, per-channel mean, per-channel sum of squared
deviations), combined with Chan's parallel formula (E[x^2] - E[x]^2 loses digits when the mean is
large against the spread, which made 2-rank runs drift from 1-rank runs);
backward: one allreduce of the per-channel sums of dy*w and dy*w*xhat. The weight and bias
gradients are this rank's partial sums; the data-parallel optimizer sums them over ranks
(app/training/data_parallel.py uses op=Sum).
"""
from __future__ import annotations

import torch
from torch import nn

from mpi import collectives
from mpi.world import Traffic


def _channels_last_2d(x: torch.Tensor) -> torch.Tensor:
    """(n, C) or (n, C, ...) -> (n * ..., C) view or copy."""
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def _per_channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class _SyncBatchNormFn(torch.autograd.Function):
    """forward: (x - global mean) / sqrt(global var + eps) * w + b; backward: the exact gradient
    of that global normalisation for this rank's x (statistics' gradients summed over ranks),
    and this rank's partial sums for w and b."""

    @staticmethod
    def forward(ctx, x, weight, bias, world, eps, stats_out):
        flat = _channels_last_2d(x)
        channels = x.shape[1]
        local_mean = flat.mean(0)
        local = torch.cat([torch.tensor([flat.shape[0]], dtype=flat.dtype), local_mean,
                           ((flat - local_mean) ** 2).sum(0)]).unsqueeze(0)
        per_rank = collectives.allgather(world, local, [1] * world.size, Traffic.BATCHNORM)
        counts = per_rank[:, :1]
        count = counts.sum()
        means, m2s = per_rank[:, 1:1 + channels], per_rank[:, 1 + channels:]
        mean = (counts * means).sum(0) / count
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / count
        invstd = torch.rsqrt(var + eps)
        shape = _per_channel_shape(x)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, count)
        ctx.world = world
        stats_out.extend([mean, var, count])
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad_y):
        xhat, weight, invstd, count = ctx.saved_tensors
        shape = _per_channel_shape(xhat)
        dxhat = grad_y * weight.view(shape)
        flat_d, flat_dx = _channels_last_2d(dxhat), _channels_last_2d(dxhat * xhat)
        sums = collectives.allreduce(ctx.world, torch.cat([flat_d.sum(0), flat_dx.sum(0)]),
                                     kind=Traffic.BATCHNORM)
        channels = xhat.shape[1]
        mean_d, mean_dx = sums[:channels] / count, sums[channels:] / count
        grad_x = (dxhat - mean_d.view(shape) - xhat * mean_dx.view(shape)) * invstd.view(shape)
        grad_w = _channels_last_2d(grad_y * xhat).sum(0)
        grad_b = _channels_last_2d(grad_y).sum(0)
        return grad_x, grad_w, grad_b, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d (affine, running stats) with global-batch statistics."""

    def __init__(self, num_features: int, world, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True,
                         track_running_stats=True)
        self.world = world

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected (n, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # Under bfloat16 autocast (train.precision=bf16) the statistics are taken in the
        # parameters' precision, as torch's BatchNorm takes them in float32 for a bf16 input.
        x = x.to(self.weight.dtype)
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                            self.bias, False, 0.0, self.eps)
        stats: list = []
        y = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.world, self.eps, stats)
        mean, var, count = stats
        with torch.no_grad():  # running stats as torch's BatchNorm: unbiased variance
            self.num_batches_tracked += 1
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return y


def convert_sync_batchnorm(module: nn.Module, world) -> nn.Module:
    """Replace every affine BatchNorm in `module` by SyncBatchNorm (state kept). A no-op on one
    rank, where torch's own BatchNorm already sees the whole batch."""
    if world.size == 1:
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine:
            sync = SyncBatchNorm(child.num_features, world, child.eps, child.momentum)
            sync.load_state_dict(child.state_dict())
            sync.to(child.weight.dtype)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, world)
    return module
