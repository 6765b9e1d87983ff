"""ShardStore (data_prep/shard_store.py): rows by global index, cached or read from the shards,
and errors naming the shard. Datasets come from write_dataset (sample i: inputs i, label i % 7)."""

import numpy as np
import pytest

from data_prep.format import DatasetError, load_dataset_info
from data_prep.shard_store import ShardStore
from tests.unit.test_dataset_format import DIM, NUM_CLASSES, rewrite_shard, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"), num_train=103, shard_size=10)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
@pytest.mark.parametrize("indices", [[57, 3, 102, 10, 9, 11], list(range(20, 35)), []])
def test_rows_come_back_in_the_order_asked(dataset, cache_bytes, indices):
    store = ShardStore(dataset, load_dataset_info(dataset), "train", cache_bytes)
    indices_m = np.asarray(indices, np.int64)
    inputs_mX, labels_m = store.read(indices_m)
    assert inputs_mX.shape == (len(indices), DIM) and inputs_mX.dtype == np.float32
    assert labels_m.dtype == np.int64
    np.testing.assert_array_equal(inputs_mX[:, 0], indices_m.astype(np.float32))
    np.testing.assert_array_equal(labels_m, indices_m % NUM_CLASSES)
    store.close()
    store.close()


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_a_bad_label_names_the_shard_and_row(tmp_path, cache_bytes):
    out = write_dataset(tmp_path / "ds")
    labels = np.arange(30, 40) % NUM_CLASSES
    labels[6] = NUM_CLASSES
    rewrite_shard(out, "train/shard-00003.h5", labels=labels)
    info = load_dataset_info(out)
    with pytest.raises(DatasetError, match="at row 6 is outside") as err:
        ShardStore(out, info, "train", cache_bytes).read(np.arange(30, 40))
    assert err.value.path == str(out / "train/shard-00003.h5")
