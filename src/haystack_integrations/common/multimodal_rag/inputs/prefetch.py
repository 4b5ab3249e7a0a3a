"""Overlap input work (decoding, PDF rendering, preprocessing) with the model's forward pass.

`prefetch(batches)` runs the producer in one background thread and keeps at most `depth` finished items
ahead of the consumer, so batch i+1 is decoded while batch i is on the GPU, and memory stays bounded by
`depth + 1` batches. Decoding in Pillow and rendering in pdfium release the GIL for most of their work, so a
thread is enough; no process pool, no pickling of images.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from haystack_integrations.common.multimodal_rag.validation import check_positive_int

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], *, depth: int = 1) -> Iterator[T]:
    """
    Iterate over `items`, producing them in a background thread at most `depth` items ahead.

    The order is kept. An exception raised by the producer is re-raised at the consumer, at the position where
    it happened. Closing the returned generator early (a `break`, an exception in the consumer) stops the
    producer after the item it is working on.

    :param items: Any iterable; typically a generator of decoded batches.
    :param depth: Finished items kept ahead of the consumer (>= 1). `depth + 1` items are alive at most.
    :returns: An iterator over the same items.
    :raises ValueError: When `depth` < 1.
    """
    check_positive_int("depth", depth)
    return _prefetch(items, depth)


def _prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # re-raised in the consumer
            put(_Failure(e))
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="multimodal-rag-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            value = slots.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value
    finally:
        stop.set()
        worker.join()
