"""mpi/nonblocking.py under mpirun -np 2|3|4: every non-blocking collective gives exactly what its
blocking twin (mpi/collectives.py, mpi/sparse.py) gives, counts the same bytes under the same
kind, and times itself sanely (time in flight >= exposed time); several in flight at once
complete in any order of waiting."""
import pytest
import torch

from mpi import collectives, nonblocking
from mpi.sparse import sparse_allreduce
from mpi.world import Traffic


def rows(rank, count, width=3):
    return (torch.arange(count * width, dtype=torch.float64).reshape(count, width)
            + 100 * rank) / 7


def both(world, blocking, started):
    """(blocking result, its traffic by kind), (non-blocking result, its traffic by kind), each
    with "sane": whether 0 <= exposed <= time in flight (True for the blocking call)."""
    world.traffic.reset()
    expect = blocking()
    expect_traffic = {**world.traffic.by_kind, "sane": True}
    world.traffic.reset()
    pending = started()
    got = pending.wait()
    traffic = world.traffic
    timing = {"sane": 0 <= traffic.exposed <= traffic.seconds}
    return (expect, expect_traffic), (got, {**traffic.by_kind, **timing})


def test_each_collective_equals_its_blocking_twin(world):
    p, r = world.size, world.rank
    x = rows(r, 4)
    cases = [
        (lambda: collectives.allgather(world, x, [4] * p, Traffic.FEATURES),
         lambda: nonblocking.iallgather(world, x, [4] * p, Traffic.FEATURES)),
        (lambda: collectives.allreduce(world, x, "max", Traffic.LOGITS),
         lambda: nonblocking.iallreduce(world, x, "max", Traffic.LOGITS)),
        (lambda: collectives.allreduce(world, x, kind=Traffic.LOGITS),
         lambda: nonblocking.iallreduce(world, x, kind=Traffic.LOGITS)),
        (lambda: collectives.reduce_scatter(world, rows(0, 2 * p), [2] * p, "other"),
         lambda: nonblocking.ireduce_scatter(world, rows(0, 2 * p), [2] * p, "other")),
    ]
    # Unequal counts, zero included: rank r sends (r + d) % 3 rows to rank d.
    send = [(r + d) % 3 for d in range(p)]
    recv = [(s + r) % 3 for s in range(p)]
    y = rows(r, sum(send))
    cases.append((lambda: collectives.alltoallv_known(world, y, send, recv, Traffic.LOGITS),
                  lambda: nonblocking.ialltoallv(world, y, send, recv, Traffic.LOGITS)))
    # Every rank runs every exchange before any assertion: a failure on one rank cannot leave
    # the others waiting in a collective.
    outcomes = [both(world, blocking, started) for blocking, started in cases]
    for (expect, expect_traffic), (got, traffic) in outcomes:
        assert torch.equal(got, expect)
        assert traffic == expect_traffic


@pytest.mark.parametrize("count_of", [lambda r: (r * 3) % 5, lambda r: 0])
def test_sparse_pairs_equal_the_blocking_exchange(world, count_of):
    count = count_of(world.rank)
    index = torch.tensor([(world.rank * 7 + 3 * i) % 50 for i in range(count)],
                         dtype=torch.int32)
    value = (index.double() + 1) * (world.rank + 1) / 8
    data_comm = world.comm.Dup() if world.size > 1 else None
    (expect, expect_traffic), (got, traffic) = both(
        world, lambda: sparse_allreduce(world, index, value, 50, Traffic.GRADIENTS),
        lambda: nonblocking.isparse_allreduce(world, index, value, 50, Traffic.GRADIENTS,
                                              data_comm))
    if data_comm is not None:
        data_comm.Free()
    assert torch.equal(got, expect)
    assert traffic == expect_traffic


def test_several_in_flight_complete_in_any_waiting_order(world):
    p = world.size
    started = [nonblocking.iallgather(world, rows(world.rank, 2) + k, [2] * p)
               for k in range(4)]
    for k in (3, 1, 0, 2):
        expect = torch.cat([rows(r, 2) + k for r in range(p)])
        assert torch.equal(started[k].wait(), expect)
