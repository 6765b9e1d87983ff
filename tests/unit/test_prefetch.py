"""Prefetcher (data_prep/prefetch.py): order, errors handed to the consumer, a clean stop."""

import itertools
import threading

import pytest

from data_prep.prefetch import Prefetcher


def test_items_arrive_in_order_then_stop():
    assert list(Prefetcher(iter(range(50)), depth=3)) == list(range(50))


@pytest.mark.timeout(30)
def test_an_error_in_the_thread_is_raised_by_the_consumer():
    def items():
        yield 1
        raise KeyError("broken")

    prefetcher = Prefetcher(items(), depth=2)
    assert next(prefetcher) == 1
    with pytest.raises(KeyError, match="broken"):
        next(prefetcher)
    prefetcher.close()


@pytest.mark.timeout(30)
def test_close_stops_a_producer_blocked_on_a_full_queue():
    before = threading.active_count()
    prefetcher = Prefetcher(itertools.count(), depth=1)
    assert next(prefetcher) == 0
    prefetcher.close()
    assert threading.active_count() == before
