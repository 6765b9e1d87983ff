"""ShardedReader (data_prep/reader.py): the rank/batch contract, positions, prefetch, errors.

Datasets come from write_dataset: sample i has inputs i (every dim) and label i % 7, so each
batch can be checked against its own indices.
"""

import itertools
import threading

import h5py
import numpy as np
import pytest

from data_prep.batch_schedule import epoch_permutation
from data_prep.format import DatasetError
from data_prep.reader import ShardedReader
from tests.unit.test_dataset_format import (BROKEN_CASES, DIM, NUM_CLASSES, break_dataset,
                                            known_inputs, rewrite_shard, write_dataset)

NUM_TRAIN = 103


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"), num_train=NUM_TRAIN, shard_size=10)


def take(reader, num_batches):
    return list(itertools.islice(reader, num_batches))


def assert_consistent(batch):
    """inputs and labels are those of the batch's global indices."""
    assert batch.inputs.dtype == np.float32 and batch.labels.dtype == np.int64
    np.testing.assert_array_equal(batch.inputs[:, 0], batch.indices.astype(np.float32))
    np.testing.assert_array_equal(batch.labels, batch.indices % NUM_CLASSES)


@pytest.mark.parametrize("cache_bytes, prefetch", [(0, 2), (0, 0), (1 << 20, 2)])
def test_batches_follow_the_epoch_permutation(dataset, cache_bytes, prefetch):
    with ShardedReader(dataset, "train", 0, 1, 8, seed=5, prefetch=prefetch,
                       cache_bytes=cache_bytes) as reader:
        assert reader.batches_per_epoch == NUM_TRAIN // 8
        batches = take(reader, 2 * reader.batches_per_epoch + 1)
        assert reader.epoch == 2
    for e in range(2):
        perm = epoch_permutation(NUM_TRAIN, 5, e, shuffle=True)
        np.testing.assert_array_equal(perm, np.random.default_rng([5, e]).permutation(NUM_TRAIN))
        got = np.concatenate([b.indices for b in batches[e * 12:(e + 1) * 12]])
        np.testing.assert_array_equal(got, perm[:96])
    assert not np.array_equal(batches[0].indices, batches[12].indices)
    for batch in batches:
        assert batch.inputs.shape == (8, DIM)
        assert_consistent(batch)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_ranks_together_see_what_one_rank_sees(dataset, num_ranks):
    batch_size, num_batches = 3, 20   # crosses epoch boundaries for every num_ranks
    with ShardedReader(dataset, "train", 0, 1, num_ranks * batch_size, seed=11,
                       cache_bytes=0) as single:
        expected = take(single, num_batches)
    readers = [ShardedReader(dataset, "train", r, num_ranks, batch_size, seed=11, cache_bytes=0)
               for r in range(num_ranks)]
    per_rank = [take(reader, num_batches) for reader in readers]
    for j in range(num_batches):
        for field in ("inputs", "labels", "indices"):
            got = np.concatenate([getattr(per_rank[r][j], field) for r in range(num_ranks)])
            np.testing.assert_array_equal(got, getattr(expected[j], field))
    assert readers[0].state_dict() == single.state_dict()
    for reader in readers:
        reader.close()


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_evaluation_covers_every_sample_once(dataset, num_ranks):
    batch_size = 4
    readers = [ShardedReader(dataset, "train", r, num_ranks, batch_size, seed=0, shuffle=False,
                             drop_last=False, cache_bytes=0) for r in range(num_ranks)]
    per_rank = [list(reader.one_epoch()) for reader in readers]
    expected_batches = -(-NUM_TRAIN // (num_ranks * batch_size))
    assert all(len(batches) == expected_batches for batches in per_rank)
    seen = np.concatenate([b.indices for j in range(expected_batches)
                           for b in (per_rank[r][j] for r in range(num_ranks))])
    np.testing.assert_array_equal(seen, np.arange(NUM_TRAIN))   # shuffle=False: in order
    last_sizes = [len(per_rank[r][-1].labels) for r in range(num_ranks)]
    assert max(last_sizes) - min(last_sizes) <= 1
    assert sum(last_sizes) == NUM_TRAIN - (expected_batches - 1) * num_ranks * batch_size
    for batches in per_rank:
        for batch in batches:
            assert batch.inputs.shape[1:] == (DIM,)
            assert_consistent(batch)
    for reader in readers:
        assert reader.state_dict()["epoch"] == 1 and reader.state_dict()["batch"] == 0
        reader.close()


def test_chunked_compressed_shards_are_read_through_h5py(tmp_path):
    out = write_dataset(tmp_path / "ds")
    path = out / "train/shard-00001.h5"
    with h5py.File(path, "r") as h5:
        inputs, labels = h5["inputs"][:], h5["labels"][:]
    with h5py.File(path, "w") as h5:
        h5.create_dataset("inputs", data=inputs, chunks=(3, DIM), compression="gzip")
        h5.create_dataset("labels", data=labels, chunks=(3,))
    with ShardedReader(out, "train", 0, 1, 32, seed=1, cache_bytes=0) as reader:
        for batch in take(reader, 6):
            assert_consistent(batch)


def test_last_batch_may_be_empty_on_some_ranks(tmp_path):
    out = write_dataset(tmp_path / "ds", num_train=9, num_val=2)
    readers = [ShardedReader(out, "val", r, 4, 2, seed=0, drop_last=False) for r in range(4)]
    sizes = [[len(b.labels) for b in reader.one_epoch()] for reader in readers]
    assert sizes == [[0], [1], [0], [1]]   # L = 2 over 4 ranks: [floor(r*L/P), floor((r+1)*L/P))
    empty = ShardedReader(out, "val", 0, 4, 2, seed=0, drop_last=False)
    batch = next(empty.one_epoch())
    assert batch.inputs.shape == (0, DIM) and batch.labels.dtype == np.int64
    for reader in readers + [empty]:
        reader.close()


@pytest.mark.parametrize("new_ranks", [1, 2, 4])
def test_state_restores_the_next_batch_at_any_world_size(dataset, new_ranks):
    global_batch, taken = 8, 15          # 12 batches per epoch: stop inside epoch 1
    with ShardedReader(dataset, "train", 0, 1, global_batch, seed=3) as reference:
        expected = take(reference, taken + 10)[taken:]
    old = [ShardedReader(dataset, "train", r, 2, global_batch // 2, seed=3, prefetch=3)
           for r in range(2)]
    for reader in old:
        take(reader, taken)
    state = old[0].state_dict()   # the prefetch thread has read ahead; the state must not
    assert state["epoch"] == 1 and state["batch"] == 3 and state["seed"] == 3
    assert old[1].state_dict() == state
    for reader in old:
        reader.close()
    new = [ShardedReader(dataset, "train", r, new_ranks, global_batch // new_ranks, seed=3)
           for r in range(new_ranks)]
    for reader in new:
        reader.load_state_dict(state)
    per_rank = [take(reader, 10) for reader in new]
    for j in range(10):
        got = np.concatenate([per_rank[r][j].indices for r in range(new_ranks)])
        np.testing.assert_array_equal(got, expected[j].indices)
    for reader in new:
        reader.close()


def test_load_state_mid_iteration_restarts_prefetch(dataset):
    with ShardedReader(dataset, "train", 0, 1, 8, seed=3) as reader:
        first = take(reader, 5)
        state = reader.state_dict()
        take(reader, 4)
        reader.load_state_dict({**state, "batch": 1})
        np.testing.assert_array_equal(next(reader).indices, first[1].indices)


@pytest.mark.parametrize("change, match", [
    ({"global_batch_size": 16}, "global_batch_size = 16"),
    ({"seed": 4}, "seed = 4"),
    ({"batch": 12}, "0 <= batch < 12"),
])
def test_load_state_refuses_a_different_order(dataset, change, match):
    with ShardedReader(dataset, "train", 0, 1, 8, seed=3) as reader:
        with pytest.raises(ValueError, match=match):
            reader.load_state_dict({**reader.state_dict(), **change})


def test_one_epoch_then_infinite_iteration(dataset):
    with ShardedReader(dataset, "val", 0, 1, 10, seed=0, shuffle=False, drop_last=False) as reader:
        assert reader.batches_per_epoch == 4
        assert [len(b.labels) for b in reader.one_epoch()] == [10, 10, 10, 7]
        assert [len(b.labels) for b in reader.one_epoch()] == [10, 10, 10, 7]
        assert reader.epoch == 2
        np.testing.assert_array_equal(next(reader).indices, np.arange(10))


def test_close_stops_the_prefetch_thread(dataset):
    before = threading.active_count()
    reader = ShardedReader(dataset, "train", 0, 1, 8, seed=0, prefetch=2, cache_bytes=0)
    next(reader)
    assert threading.active_count() == before + 1
    reader.close()
    reader.close()
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="closed"):
        next(reader)


def test_properties(dataset):
    with ShardedReader(dataset, "train", 1, 2, 4, seed=0) as reader:
        assert (reader.num_samples, reader.num_classes) == (NUM_TRAIN, NUM_CLASSES)
        assert reader.input_shape == (DIM,) and reader.kind == "vectors"
        assert reader.batches_per_epoch == NUM_TRAIN // 8


def test_bad_arguments(dataset):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedReader(dataset, "train", 0, 4, 26, seed=0)
    with pytest.raises(ValueError, match="rank < size"):
        ShardedReader(dataset, "train", 2, 2, 4, seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        ShardedReader(dataset, "test", 0, 1, 4, seed=0)


@pytest.mark.parametrize("case", sorted(set(BROKEN_CASES) - {"corrupt_middle"}))
def test_broken_dataset_raises_dataset_error_naming_the_file(tmp_path, case):
    out = write_dataset(tmp_path / "ds")
    break_dataset(out, case)
    with pytest.raises(DatasetError) as info:
        with ShardedReader(out, "train", 0, 1, 8, seed=0) as reader:   # cached: labels at start
            next(reader)
    assert str(info.value).startswith(str(out / BROKEN_CASES[case]) + ": ")
    assert "\n" not in str(info.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("label", [-1, NUM_CLASSES])
def test_bad_label_in_prefetch_thread_is_raised_by_the_consumer(tmp_path, label):
    out = write_dataset(tmp_path / "ds")
    labels = np.arange(90, 100) % NUM_CLASSES
    labels[4] = label
    rewrite_shard(out, "train/shard-00009.h5", labels=labels)
    with ShardedReader(out, "train", 0, 1, 10, seed=0, shuffle=False, cache_bytes=0) as reader:
        take(reader, 9)
        with pytest.raises(DatasetError, match=f"label {label} at row 4 is outside"):
            next(reader)
        assert reader.state_dict()["batch"] == 9
        with pytest.raises(DatasetError, match="at row 4"):   # raised again, not a hang
            next(reader)


def test_resume_with_a_new_global_batch_skips_nothing_twice(tmp_path):
    from data_prep.reader import ShardedReader
    from tests.unit.test_dataset_format import write_dataset

    path = write_dataset(tmp_path / "d")
    with ShardedReader(path, "train", 0, 1, 4, seed=3, prefetch=0) as old:
        taken = [next(old).indices for _ in range(3)]
        state = old.state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedReader(path, "train", 0, 1, 5, seed=3, prefetch=0).load_state_dict(state)
    with ShardedReader(path, "train", 0, 1, 5, seed=3, prefetch=0) as new:
        new.load_state_dict(state, allow_new_batch_size=True)
        nxt = next(new).indices
    seen = set(np.concatenate(taken).tolist())
    assert not seen & set(nxt.tolist())
    assert new.state_dict()["batch"] == 4  # ceil(12 / 5) = 3 was the resume point, then one read


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("cache_bytes, prefetch", [(0, 2), (0, 0), (1 << 20, 0)])
def test_non_finite_input_is_an_error_naming_shard_row_and_sample(tmp_path, split, cache_bytes,
                                                                  prefetch):
    """A NaN in a shard: the cached split refuses it at start, a memory-mapped one when the
    batch holding it is read (with or without read-ahead), naming the shard, the row in it
    and the sample's index in the split."""
    out = write_dataset(tmp_path / "ds", shard_size=10)
    inputs = known_inputs(10, 20)
    inputs[4, 2] = np.nan   # row 4 of shard 1: sample 14 of the split
    rewrite_shard(out, f"{split}/shard-00001.h5", inputs=inputs)
    shard = out / f"{split}/shard-00001.h5"
    expected = (f"{shard}: input row 4 (row in this shard; sample 14 of the {split} split) holds "
                f"a non-finite value (nan); rebuild the shard or drop the row "
                f"(python -m data_prep.inspect {out} counts every bad row)")
    with pytest.raises(DatasetError) as info:
        with ShardedReader(out, split, 0, 1, 4, seed=0, shuffle=False, drop_last=False,
                           prefetch=prefetch, cache_bytes=cache_bytes) as reader:
            assert cache_bytes == 0, "a cached split is checked at start"
            batches = take(reader, 3)  # samples 0..11: clean
            assert [int(b.indices[-1]) for b in batches] == [3, 7, 11]
            next(reader)   # samples 12..15
    assert str(info.value) == expected


def test_huge_finite_inputs_pass_the_reader(tmp_path):
    out = write_dataset(tmp_path / "ds", shard_size=10)
    rewrite_shard(out, "train/shard-00000.h5", inputs=np.full((10, DIM), 3e38, np.float32))
    for cache_bytes in (0, 1 << 20):
        with ShardedReader(out, "train", 0, 1, 10, seed=0, shuffle=False,
                           cache_bytes=cache_bytes) as reader:
            assert (next(reader).inputs == np.float32(3e38)).all()
