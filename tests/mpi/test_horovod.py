"""Horovod on the same communicator as mpi4py: allreduce, allgather, alltoall agree with mpi4py."""
import pytest
import torch

from mpi import collectives


@pytest.fixture()
def hvd(world):
    if world.hvd is None:
        pytest.skip("Horovod not installed (a one-rank run without it is allowed)")
    return world.hvd


def test_same_ranks(world, hvd):
    assert (hvd.rank(), hvd.size(), hvd.local_rank()) == (world.rank, world.size, world.local_rank)
    assert hvd.mpi_enabled()


def test_allreduce_matches_mpi4py(world, hvd):
    x = torch.arange(8, dtype=torch.float64) * (world.rank + 1)
    summed = hvd.allreduce(x, op=hvd.Sum, name="sum")
    torch.testing.assert_close(summed, collectives.allreduce(world, x, "sum"))
    averaged = hvd.allreduce(x, name="avg")
    torch.testing.assert_close(averaged, summed / world.size)


def test_allgather_unequal(world, hvd):
    x = torch.full((world.rank + 1, 2), float(world.rank))
    out = hvd.allgather(x, name="gather")
    torch.testing.assert_close(out, collectives.allgather(world, x))


def test_alltoall_int32_splits(world, hvd):
    splits = torch.tensor([(world.rank + d) % 2 + 1 for d in range(world.size)], dtype=torch.int32)
    x = torch.cat([torch.full((int(n), 3), world.rank * 10 + d, dtype=torch.float32)
                   for d, n in enumerate(splits)])
    out, recv_splits = hvd.alltoall(x, splits=splits, name="a2a")
    ref, ref_counts = collectives.alltoallv(world, x, splits.tolist())
    assert recv_splits.tolist() == ref_counts
    torch.testing.assert_close(out, ref)
