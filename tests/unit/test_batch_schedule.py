"""BatchSchedule (data_prep/batch_schedule.py): which samples each rank takes, as pure arithmetic,
at simulated world sizes larger than we launch; positions and their restore."""

import itertools

import numpy as np
import pytest

from data_prep.batch_schedule import BatchSchedule, epoch_permutation, rank_bounds


def epoch_of(schedule, epoch=0):
    """This rank's index arrays of one whole epoch."""
    return [idx for _, _, idx in schedule.batches_from(epoch, 0, end_epoch=epoch + 1)]


@pytest.mark.parametrize("num_samples, size, batch_size", [
    (103, 1, 8), (103, 4, 3), (103, 64, 1), (10, 16, 1), (1000, 7, 9), (5, 3, 4)])
def test_evaluation_sees_every_sample_exactly_once_across_ranks(num_samples, size, batch_size):
    ranks = [BatchSchedule(num_samples, "val", r, size, batch_size, seed=2, drop_last=False)
             for r in range(size)]
    per_rank = [epoch_of(s, epoch=3) for s in ranks]
    assert len({len(batches) for batches in per_rank}) == 1   # all ranks stay in step
    assert len(per_rank[0]) == ranks[0].batches_per_epoch == -(-num_samples // (size * batch_size))
    seen = np.concatenate([idx for batches in per_rank for idx in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(num_samples))


@pytest.mark.parametrize("size, batch_size", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_training_drops_only_the_incomplete_last_batch(size, batch_size):
    num_samples = 103
    ranks = [BatchSchedule(num_samples, "train", r, size, batch_size, seed=5)
             for r in range(size)]
    per_rank = [epoch_of(s) for s in ranks]
    assert all(len(idx) == batch_size for batches in per_rank for idx in batches)
    seen = np.concatenate([idx for batches in per_rank for idx in batches])
    assert len(np.unique(seen)) == len(seen) == (num_samples // 8) * 8
    perm = epoch_permutation(num_samples, 5, 0, shuffle=True)
    np.testing.assert_array_equal(np.sort(seen), np.sort(perm[:len(seen)]))


@pytest.mark.parametrize("size", [2, 3, 4, 32])
def test_ranks_concatenated_are_one_rank_with_the_global_batch(size):
    single = BatchSchedule(200, "train", 0, 1, size * 3, seed=11, drop_last=False)
    ranks = [BatchSchedule(200, "train", r, size, 3, seed=11, drop_last=False)
             for r in range(size)]
    expected = list(itertools.islice(single.batches_from(0, 0), 40))   # crosses epochs
    got = [list(itertools.islice(s.batches_from(0, 0), 40)) for s in ranks]
    for j, (epoch, batch, idx) in enumerate(expected):
        assert all(g[j][:2] == (epoch, batch) for g in got)
        np.testing.assert_array_equal(np.concatenate([g[j][2] for g in got]), idx)


def test_rank_bounds_split_a_short_batch_evenly():
    assert [rank_bounds(2, r, 4) for r in range(4)] == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert [rank_bounds(12, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_advance_counts_batches_and_epochs():
    schedule = BatchSchedule(103, "train", 0, 1, 8, seed=0)
    assert schedule.batches_per_epoch == 12 and schedule.position == (0, 0)
    for _ in range(12 + 3):
        schedule.advance()
    assert schedule.position == (1, 3)
    assert schedule.state_dict() == {"epoch": 1, "batch": 3, "seed": 0, "split": "train",
                                      "shuffle": True, "drop_last": True,
                                      "global_batch_size": 8, "num_samples": 103}


@pytest.mark.parametrize("new_size", [1, 2, 4, 8])
def test_resume_at_another_world_size_continues_the_same_order(new_size):
    old = BatchSchedule(103, "train", 0, 2, 4, seed=3)
    for _ in range(15):
        old.advance()
    reference = BatchSchedule(103, "train", 0, 1, 8, seed=3)
    expected = list(itertools.islice(reference.batches_from(0, 0), 15 + 20))[15:]
    new = [BatchSchedule(103, "train", r, new_size, 8 // new_size, seed=3)
           for r in range(new_size)]
    for schedule in new:
        schedule.load_state_dict(old.state_dict())
        assert schedule.position == (1, 3)
    got = [list(itertools.islice(s.batches_from(*s.position), 20)) for s in new]
    for j, (epoch, batch, idx) in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([g[j][2] for g in got]), idx)


def test_resume_with_a_new_global_batch_repeats_nothing():
    old = BatchSchedule(103, "train", 0, 1, 4, seed=3)
    taken = [idx for _, _, idx in itertools.islice(old.batches_from(0, 0), 3)]
    for _ in range(3):
        old.advance()
    new = BatchSchedule(103, "train", 0, 1, 5, seed=3)
    with pytest.raises(ValueError, match="global_batch_size = 4"):
        new.load_state_dict(old.state_dict())
    new.load_state_dict(old.state_dict(), allow_new_batch_size=True)
    assert new.position == (0, 3)   # ceil(12 / 5)
    _, _, nxt = next(new.batches_from(*new.position))
    assert not set(np.concatenate(taken).tolist()) & set(nxt.tolist())


@pytest.mark.parametrize("change, match", [
    ({"seed": 4}, "seed = 4"), ({"split": "val"}, "split = 'val'"),
    ({"shuffle": False}, "shuffle = False"), ({"num_samples": 104}, "num_samples = 104"),
    ({"batch": 12}, "0 <= batch < 12"), ({"epoch": -1}, "epoch >= 0")])
def test_a_refused_state_leaves_the_position(change, match):
    schedule = BatchSchedule(103, "train", 0, 1, 8, seed=3)
    schedule.advance()
    with pytest.raises(ValueError, match=match):
        schedule.load_state_dict({**schedule.state_dict(), "batch": 5, **change})
    assert schedule.position == (0, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank < size"):
        BatchSchedule(10, "train", 2, 2, 1, seed=0)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        BatchSchedule(10, "train", 0, 1, 0, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch of 12"):
        BatchSchedule(10, "train", 0, 4, 3, seed=0)
    assert BatchSchedule(10, "val", 0, 4, 3, seed=0, drop_last=False).batches_per_epoch == 1
