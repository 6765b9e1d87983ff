"""SyncBatchNorm on P ranks equals torch's BatchNorm on the concatenated batch (float64)."""
import pytest
import torch
from torch import nn

from mpi import collectives
from mpi.sync_batchnorm import SyncBatchNorm


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 2)])
def test_matches_batchnorm_on_the_global_batch(world, shape):
    gen = torch.Generator().manual_seed(1)
    per_rank = shape[0]
    x_all = torch.randn((per_rank * world.size,) + shape[1:], generator=gen, dtype=torch.float64)
    w_all = torch.randn(x_all.shape, generator=gen, dtype=torch.float64)
    ref = (nn.BatchNorm1d(3) if len(shape) == 2 else nn.BatchNorm2d(3)).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=gen)
        ref.bias.uniform_(-1, 1, generator=gen)
    sync = SyncBatchNorm(3, world).double()
    sync.load_state_dict(ref.state_dict())

    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * w_all).sum().backward()
    lo = world.rank * per_rank
    x = x_all[lo:lo + per_rank].clone().requires_grad_()
    out = sync(x)
    (out * w_all[lo:lo + per_rank]).sum().backward()

    torch.testing.assert_close(out, y_ref[lo:lo + per_rank], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad[lo:lo + per_rank], rtol=1e-9, atol=1e-12)
    # Parameter gradients are per-rank partial sums; summed over ranks they equal torch's.
    torch.testing.assert_close(collectives.allreduce(world, sync.weight.grad), ref.weight.grad)
    torch.testing.assert_close(collectives.allreduce(world, sync.bias.grad), ref.bias.grad)
    torch.testing.assert_close(sync.running_mean, ref.running_mean)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x.detach()), ref(x_all)[lo:lo + per_rank].detach())
