"""The one-rank World: collectives are identities, errors are clear, no MPI needed."""
import pytest
import torch

from mpi import collectives
from mpi.autograd import exchange_rows, gather_rows
from mpi.world import fake_world


def test_fake_world_identity_collectives():
    world = fake_world()
    assert (world.rank, world.size, world.local_rank, world.is_root) == (0, 1, 0, True)
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert collectives.allgather(world, x) is x
    out, counts = collectives.alltoallv(world, x, [4])
    assert out is x and counts == [4]
    torch.testing.assert_close(collectives.allreduce(world, x, "max"), x)
    torch.testing.assert_close(collectives.reduce_scatter(world, x), x)
    assert collectives.allgather_object(world, {"a": 1}) == [{"a": 1}]


def test_autograd_wrappers_are_identity_on_one_rank():
    world = fake_world()
    x = torch.randn(3, 2, requires_grad=True)
    y = gather_rows(world, x, [3]) * 2 + exchange_rows(world, x, [3], [3])
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 2), 3.0))


def test_clear_errors():
    world = fake_world()
    with pytest.raises(ValueError, match="dtype torch.float16 not supported"):
        collectives.allgather(world, torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="send_counts sum to 3"):
        collectives.alltoallv(world, torch.zeros(2), [3])
    with pytest.raises(ValueError, match="op 'prod'"):
        collectives.allreduce(world, torch.zeros(2), "prod")
    with pytest.raises(ValueError, match="counts"):
        collectives.reduce_scatter(world, torch.zeros(4), [1, 2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        collectives.allgather(world, [1, 2])


def test_freed_memory_is_kept_for_reuse_on_glibc():
    import platform

    from mpi import world as world_mod

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert world_mod._keep_freed_memory() is True
