"""Per-component latency of Haystack pipeline runs, read from Haystack's own tracing spans."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
from haystack import tracing
from haystack.tracing import Span, Tracer
from haystack.tracing.tracer import NullTracer

#: Haystack opens one span with this name around every component run (`PipelineBase._create_component_span`),
#: tagged with the component's name.
COMPONENT_SPAN = "haystack.component.run"
COMPONENT_NAME_TAG = "haystack.component.name"


class StageTimer(Tracer):
    """
    A Haystack tracer that records how long each component run takes, passing every span on to the tracer
    that was active before (so an OpenTelemetry/Datadog/logging tracer keeps working while it records).

    The time of a component is the wall time of Haystack's `haystack.component.run` span: the component's `run`
    plus Haystack's per-call bookkeeping around it (a copy of the inputs, output validation). Only spans opened
    by the thread that created the timer are recorded, and only while `recording` is true.

    Use it as a context manager: it installs itself as Haystack's global tracer and restores the previous one.

    ```python
    with StageTimer() as timer:
        pipeline.run(...)
    timer.durations  # {"retriever": [0.0031], "ranker": [0.012], ...} in seconds
    ```
    """

    def __init__(self) -> None:
        """Create a timer (nothing is installed until the `with` block)."""
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.recording = True
        self._thread = threading.get_ident()
        self._previous: Tracer | None = None

    @contextlib.contextmanager
    def trace(
        self, operation_name: str, tags: dict[str, Any] | None = None, parent_span: Span | None = None
    ) -> Iterator[Span]:
        """
        Open a span on the previous tracer and time it.

        :param operation_name: The span's operation.
        :param tags: The span's tags (the component name for component runs).
        :param parent_span: The parent span.
        :returns: The previous tracer's span.
        """
        inner = self._previous if self._previous is not None else NullTracer()
        start = time.perf_counter()
        try:
            with inner.trace(operation_name, tags=tags, parent_span=parent_span) as span:
                yield span
        finally:
            elapsed = time.perf_counter() - start
            if (
                self.recording
                and operation_name == COMPONENT_SPAN
                and threading.get_ident() == self._thread
                and tags is not None
                and COMPONENT_NAME_TAG in tags
            ):
                self.durations[str(tags[COMPONENT_NAME_TAG])].append(elapsed)

    def current_span(self) -> Span | None:
        """
        The previous tracer's current span.

        :returns: The span, or `None`.
        """
        return self._previous.current_span() if self._previous is not None else None

    def __enter__(self) -> StageTimer:
        self._previous = tracing.tracer.actual_tracer
        tracing.enable_tracing(self)
        return self

    def __exit__(self, *exc: object) -> None:
        tracing.enable_tracing(self._previous if self._previous is not None else NullTracer())
        self._previous = None


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """
    Summarise durations in milliseconds.

    :param seconds: Durations in seconds.
    :returns: `{"p50": ..., "p95": ..., "mean": ..., "n": ...}` (ms; numpy's linear-interpolation percentiles).
    """
    if not seconds:
        return {"p50": 0.0, "p95": 0.0, "mean": 0.0, "n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "mean": float(ms.mean()),
        "n": len(seconds),
    }
