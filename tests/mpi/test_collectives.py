"""Every collective under mpirun -np 2|3|4, with expected values derived from rank and size."""
import numpy as np
import pytest
import torch

from mpi import collectives
from mpi.autograd import exchange_rows, gather_rows
from mpi.partition import class_counts

DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8]


def rows_of(rank, n, width, dtype):
    """Deterministic rows that encode (rank, row, column) so misplaced data is visible."""
    r = torch.arange(n, dtype=torch.float64).reshape(-1, 1)
    c = torch.arange(width, dtype=torch.float64).reshape(1, -1)
    return ((rank * 37 + r * 3 + c) % 120).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather_equal(world, dtype):
    x = rows_of(world.rank, 5, 3, dtype)
    out = collectives.allgather(world, x)
    expect = torch.cat([rows_of(r, 5, 3, dtype) for r in range(world.size)])
    assert out.dtype == dtype and torch.equal(out, expect)


@pytest.mark.parametrize("known", [False, True])
def test_allgather_unequal_including_empty(world, known):
    sizes = [(r * 2) % 5 for r in range(world.size)]  # rank 0 sends nothing
    x = rows_of(world.rank, sizes[world.rank], 4, torch.float32)
    out = collectives.allgather(world, x, sizes if known else None)
    expect = torch.cat([rows_of(r, sizes[r], 4, torch.float32) for r in range(world.size)])
    assert torch.equal(out, expect)


def test_allgather_3d_and_int64_labels(world):
    x = torch.full((2, 3, 2), world.rank, dtype=torch.int64)
    out = collectives.allgather(world, x)
    assert out.shape == (2 * world.size, 3, 2)
    assert out[:, 0, 0].tolist() == [r for r in range(world.size) for _ in range(2)]


def test_allgather_mismatch_is_a_clear_error_on_every_rank(world):
    if world.size == 1:
        pytest.skip("needs several ranks")
    x = torch.zeros(2, 3 if world.rank == 0 else 4)
    with pytest.raises(ValueError, match="trailing shape"):
        collectives.allgather(world, x)
    y = torch.zeros(2, dtype=torch.float32 if world.rank == 0 else torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        collectives.allgather(world, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_alltoallv_uneven_with_silent_ranks(world, dtype):
    # Rank s sends (s + d) % 3 rows to rank d; the last rank sends nothing at all.
    def count(src, dst):
        return 0 if src == world.size - 1 else (src + dst) % 3

    send_counts = [count(world.rank, d) for d in range(world.size)]
    chunks = [torch.full((send_counts[d], 2), world.rank * 100 + d, dtype=dtype)
              for d in range(world.size)]
    out, recv_counts = collectives.alltoallv(world, torch.cat(chunks), send_counts)
    assert recv_counts == [count(s, world.rank) for s in range(world.size)]
    expect = torch.cat([torch.full((count(s, world.rank), 2), s * 100 + world.rank, dtype=dtype)
                        for s in range(world.size)])
    assert torch.equal(out, expect)
    back = collectives.alltoallv_known(world, out, recv_counts, send_counts)
    assert torch.equal(back, torch.cat(chunks))


def test_alltoallv_row_mismatch_is_clear(world):
    if world.size == 1:
        pytest.skip("needs several ranks")
    width = 2 if world.rank == 0 else 3
    with pytest.raises(ValueError, match="alltoallv: rank"):
        collectives.alltoallv(world, torch.zeros(world.size, width), [1] * world.size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_allreduce_sum_and_max(world, dtype):
    x = torch.arange(6, dtype=dtype) + world.rank
    total = collectives.allreduce(world, x, "sum")
    expect = torch.arange(6, dtype=dtype) * world.size + sum(range(world.size))
    assert torch.equal(total, expect)
    assert torch.equal(x, torch.arange(6, dtype=dtype) + world.rank), "input modified"
    assert torch.equal(collectives.allreduce(world, x, "max"),
                       torch.arange(6, dtype=dtype) + world.size - 1)
    y = x.clone()
    assert collectives.allreduce_(world, y, "sum") is y and torch.equal(y, expect)


@pytest.mark.parametrize("rows", [7, 12])
def test_reduce_scatter_sum(world, rows):
    x = rows_of(world.rank, rows, 3, torch.float64)
    out = collectives.reduce_scatter(world, x)
    total = sum(rows_of(r, rows, 3, torch.float64) for r in range(world.size))
    start = sum(class_counts(rows, world.size)[:world.rank])
    torch.testing.assert_close(out, total[start:start + out.shape[0]], rtol=0, atol=0)
    counts = [world.size - r for r in range(world.size)]
    x2 = torch.ones(sum(counts), 2) * (world.rank + 1)
    out2 = collectives.reduce_scatter(world, x2, counts)
    assert out2.shape == (counts[world.rank], 2)
    assert torch.all(out2 == world.size * (world.size + 1) / 2)


def test_gather_rows_backward_sums_over_ranks(world):
    # Loss on rank q: sum((q + 1) * gathered); d/dx on rank r = sum_q (q + 1) = P(P+1)/2.
    sizes = [r + 1 for r in range(world.size)]
    x = torch.randn(sizes[world.rank], 3, dtype=torch.float64, requires_grad=True)
    gathered = gather_rows(world, x, sizes)
    assert gathered.shape == (sum(sizes), 3)
    ((world.rank + 1) * gathered).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, world.size * (world.size + 1) / 2))


def test_exchange_rows_backward_routes_back(world):
    send_counts = [(world.rank + d) % 2 + 1 for d in range(world.size)]
    recv_counts = [(s + world.rank) % 2 + 1 for s in range(world.size)]
    x = torch.randn(sum(send_counts), 2, dtype=torch.float64, requires_grad=True)
    y = exchange_rows(world, x, send_counts, recv_counts)
    # The receiver weights each row by (its source rank + 1) * (its own rank + 1), so every row
    # of x must get back exactly (rank + 1) * (destination + 1).
    source = torch.repeat_interleave(torch.arange(world.size), torch.tensor(recv_counts))
    (y * ((source + 1) * (world.rank + 1)).unsqueeze(1)).sum().backward()
    dest = torch.repeat_interleave(torch.arange(world.size), torch.tensor(send_counts))
    expect = ((world.rank + 1) * (dest + 1)).to(torch.float64).unsqueeze(1).expand_as(x)
    torch.testing.assert_close(x.grad, expect)


def test_objects(world):
    assert collectives.allgather_object(world, world.rank * 2) == [2 * r for r in range(world.size)]
    assert collectives.broadcast_object(world, {"r": world.rank})["r"] == 0


def test_traffic_is_counted(world):
    world.traffic.reset()
    collectives.allgather(world, torch.zeros(10, dtype=torch.float64), [10] * world.size)
    sent, seconds = world.traffic.reset()
    assert sent == 80 * (world.size - 1) and seconds >= 0.0


def test_world_facts(world):
    import os
    assert world.size == int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    assert 0 <= world.local_rank < world.local_size <= world.size
    assert world.threads >= 1
    ranks = collectives.allgather(world, torch.tensor([world.rank]))
    assert ranks.tolist() == list(range(world.size))
    assert np.all(np.diff(ranks.numpy()) == 1)
