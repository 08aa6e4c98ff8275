"""Finished spans handed to a process of their own for export
(`offload.Offload`, `offload_main`'s `trace`), where the OpenTelemetry SDK
(`spans.SpanSink`: its batch processor and OTLP/HTTP exporter) runs.

Made into SDK spans and encoded as OTLP protobuf, a span cost the event
loop and the exporter's thread, which fights it for the GIL, some 150 µs:
at 1% sampling, more than a request's whole cost every hundred requests.
Here, `SpanShipper.emit` (the same arguments as `SpanSink.emit`) appends
ten values to a list; every 100 ms (sooner past `max_batch` spans) they
go over in one `marshal` frame. The SDK is not imported in the proxy.

Spans waiting here and in the frames not yet written are bounded by the
batch's `max_queue`: past it, a span is dropped and counted, as the SDK's
full queue would. `SpanCounts` adds up, for `meshgate_trace_spans_total`,
what every shipper of a proxy exported and dropped (its own drops, the
SDK's, failed exports, and spans lost with a process that died), across
reloads.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from meshgate.observability.offload import Offload, frame

__all__ = ["INTERVAL", "SPAN", "SpanCounts", "SpanShipper"]

INTERVAL = 0.1
"""Seconds between two hand-overs of the finished spans."""
SPAN = 10
"""Values per span (`SpanSink.emit`'s arguments)."""


class SpanCounts:
    """Spans exported and dropped, across reloads (one per proxy). In the
    export process, the SDK pipeline's own counts (`spans.SpanSink`); in the
    proxy, those plus every live shipper's."""

    def __init__(self) -> None:
        self.queue_dropped = 0  # pushed out of a full queue, or after shutdown
        self.exported = 0
        self.failed = 0
        self.live: set[SpanShipper] = set()

    def totals(self) -> tuple[int, int]:
        """Spans exported, and dropped."""
        exported = self.exported
        dropped = self.failed + self.queue_dropped
        for shipper in list(self.live):
            e, d = shipper.counts()
            exported += e
            dropped += d
        return exported, dropped

    def samples(self) -> dict[str, list[Any]]:
        exported, dropped = self.totals()
        return {
            "meshgate_trace_spans_total": [
                [("exported",), exported],
                [("dropped",), dropped],
            ]
        }


class SpanShipper:
    """One tracing config's spans, to its export process (see the module)."""

    def __init__(
        self,
        settings: dict[str, Any],
        counts: SpanCounts,
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
    ) -> None:
        """`settings`: `spans.SpanSink`'s arguments (counts aside). OSError
        when the export process cannot be started."""
        self.bound = max_queue
        self.batch = max_batch
        self.values: list[Any] = []
        self.spans = 0
        self.dropped = 0
        self.closed = False
        self.counts_ = counts
        self._lock = threading.Lock()  # emit (the loop) and close (a thread)
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # (handed over at close only)
        self.offload = Offload("trace")
        self.offload.configure(("trace", settings))
        self.offload.start()
        counts.live.add(self)

    def counts(self) -> tuple[int, int]:
        """Spans exported, and dropped, by this shipper and its process."""
        o = self.offload
        exported = o.count("exported")
        return exported, self.dropped + o.lost + o.count("failed") + o.count("dropped")

    def emit(
        self,
        name: str,
        server: bool,
        trace_id: int,
        span_id: int,
        parent_id: int,
        remote_parent: bool,
        attributes: dict[str, Any],
        start_ns: int,
        end_ns: int,
        error: str | None,
    ) -> None:
        """One finished span: queued for the export process."""
        with self._lock:
            if self.closed or self.spans + self.offload.backlog >= self.bound:
                self.dropped += 1
                return
            self.spans += 1
            self.values.extend(
                (
                    name,
                    server,
                    trace_id,
                    span_id,
                    parent_id,
                    remote_parent,
                    attributes,
                    start_ns,
                    end_ns,
                    error,
                )
            )
            n = self.spans
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # (no loop: handed over at close)
        if self._timer is None:
            self._timer = loop.call_later(INTERVAL, self.flush)
        elif n == self.batch:
            self._timer.cancel()
            self._timer = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the queued spans over, in one frame."""
        self._timer = None
        with self._lock:
            n = self.spans
            if not n:
                return
            values = self.values
            self.values = []
            self.spans = 0
        try:
            data = frame(("spans", values))
        except ValueError:  # an attribute marshal cannot write: the batch is lost
            self.dropped += n
            return
        self.offload.send(data, n)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, and let the export process send it (for
        `timeout` seconds at most), then stop. Blocking: run it off the loop."""
        with self._lock:
            self.closed = True
        self.flush()  # (a timer still set finds nothing: not cancelled from this thread)
        self.offload.stop(timeout + 1.0)
        counts = self.counts_
        exported, dropped = self.counts()
        counts.live.discard(self)
        counts.exported += exported
        counts.queue_dropped += dropped
