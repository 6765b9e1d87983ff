"""A bounded read-ahead thread: the next batches are read while the trainer computes."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator


class Prefetcher:
    """Runs an iterator in a daemon thread, at most `depth` items ahead of the consumer.
    An exception in the thread is re-raised by the consumer's next(); close() stops the thread
    even when it is blocked on a full queue."""

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int,
                 name: str = "ShardedReader-prefetch") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name=name)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer, who re-raises it
            self._put(err)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        # Poll so that close() can stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
