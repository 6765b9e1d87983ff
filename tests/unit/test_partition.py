"""Class partition: contiguous, balanced, covering, at world sizes far beyond what we launch."""
import numpy as np
import pytest

from mpi.partition import class_counts, class_owner, class_range

SIZES = [1, 2, 3, 4, 7, 64, 1000, 4096]
CLASS_COUNTS = [0, 1, 5, 4095, 4096, 4097, 100_003, 10**8]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_ranges_are_contiguous_balanced_and_cover(num_classes, size):
    ranges = [class_range(num_classes, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
        assert a1 == b0 and a0 <= a1
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == class_counts(num_classes, size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("num_classes", [1, 5, 4097, 100_003, 10**8])
def test_owner_matches_ranges(num_classes, size):
    rng = np.random.default_rng(size)
    ids = np.concatenate([rng.integers(0, num_classes, 2000), [0, num_classes - 1]])
    # Also every range boundary, where off-by-one errors live.
    for r in range(min(size, 50)):
        start, stop = class_range(num_classes, r, size)
        ids = np.concatenate([ids, [i for i in (start, stop - 1) if start < stop]])
    owners = class_owner(ids, num_classes, size)
    for cid, owner in zip(ids.tolist(), owners.tolist()):
        start, stop = class_range(num_classes, owner, size)
        assert start <= cid < stop


def test_owner_exhaustive_small():
    for num_classes in range(1, 40):
        for size in range(1, 12):
            owners = class_owner(np.arange(num_classes), num_classes, size)
            expect = np.concatenate([np.full(class_range(num_classes, r, size)[1]
                                             - class_range(num_classes, r, size)[0], r)
                                     for r in range(size)])
            np.testing.assert_array_equal(owners, expect)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        class_range(10, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        class_owner([10], 10, 2)
    with pytest.raises(ValueError, match="outside"):
        class_owner([-1], 10, 2)
