"""The OpenTelemetry SDK's pipeline, as meshgate feeds it: a TracerProvider,
a BatchSpanProcessor and an OTLP/HTTP exporter (`SpanSink`).

The sampling decision is made before anything here is called
(`tracing.Tracing.begin`), and the ids too: a try's span id goes out in its
`traceparent` before the span exists. So the provider samples everything
it is given (`ALWAYS_ON`), its id generator hands out the ids meshgate
chose (`_GivenIds`), and each span is made and ended at once, with its
explicit parent, start and end times (`SpanSink.emit`).

The exporter runs on the processor's own thread; `SpanCounts` counts what
it sent and what was dropped (export failures, a full queue, spans ended
after shutdown), for `meshgate_trace_spans_total`. Each count is written
by one thread only.

This module imports the SDK: `tracing` imports it when tracing is on only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

__all__ = ["SpanCounts", "SpanSink"]

SERVER = SpanKind.SERVER
CLIENT = SpanKind.CLIENT
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_ROOT = Context()
# Attributes come partly from the client (path, Host): bounded per span.
_LIMITS = SpanLimits(max_attributes=64, max_attribute_length=1024, max_events=0, max_links=0)


class SpanCounts:
    """Spans sent and dropped, across reloads (one per process)."""

    def __init__(self) -> None:
        self.queue_dropped = 0  # pushed out of a full queue, or after shutdown (loop thread)
        self.exported = 0  # (exporter thread)
        self.failed = 0  # (exporter thread)

    def samples(self) -> dict[str, list[Any]]:
        return {
            "meshgate_trace_spans_total": [
                [("exported",), self.exported],
                [("dropped",), self.failed + self.queue_dropped],
            ]
        }


class _GivenIds(IdGenerator):
    """Hands the SDK the ids meshgate chose for the span it makes next."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id

    def is_trace_id_random(self) -> bool:
        return True


class _CountingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, counts: SpanCounts) -> None:
        self.inner = inner
        self.counts = counts
        self.taken = 0
        """Spans this exporter was given (written on its thread only)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        counts = self.counts
        n = len(spans)
        self.taken += n
        try:
            result = self.inner.export(spans)
        except Exception:
            counts.failed += n
            raise
        if result is SpanExportResult.SUCCESS:
            counts.exported += n
        else:
            counts.failed += n
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class SpanSink:
    """One TracerProvider and its batch pipeline to the collector."""

    def __init__(
        self,
        *,
        endpoint: str,
        resource: Mapping[str, str],
        counts: SpanCounts,
        compression: str = "none",
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        schedule_delay: float = 5.0,
        max_queue: int = 2048,
        max_batch: int = 512,
    ) -> None:
        self.counts = counts
        self.max_queue = max_queue
        self.closed = False
        self.handed = 0
        """Spans given to the processor (written on the loop's thread only)."""
        self.pushed_out = 0
        self.ids = _GivenIds()
        self.provider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=Resource.create(dict(resource)),
            id_generator=self.ids,
            span_limits=_LIMITS,
            shutdown_on_exit=False,
        )
        exporter = OTLPSpanExporter(
            endpoint=endpoint,
            timeout=timeout,
            compression=Compression.Gzip if compression == "gzip" else Compression.NoCompression,
            headers=dict(headers or {}),
        )
        self.exporter = _CountingExporter(exporter, counts)
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=max_queue,
            schedule_delay_millis=schedule_delay * 1000,
            max_export_batch_size=max_batch,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("meshgate")

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
        """One finished span (a server span, else a client one), with its
        ids, parent (0: none) and times."""
        counts = self.counts
        if self.closed:
            counts.queue_dropped += 1
            return
        # What the processor's queue holds now, as far as this thread knows
        # (the exporter takes batches out on its own thread): when full, the
        # SDK pushes the oldest span out to queue this one.
        if self.handed - self.exporter.taken - self.pushed_out >= self.max_queue:
            self.pushed_out += 1
            counts.queue_dropped += 1
        self.handed += 1
        ids = self.ids
        ids.trace_id = trace_id
        ids.span_id = span_id
        if parent_id:
            parent = SpanContext(trace_id, parent_id, is_remote=remote_parent, trace_flags=_SAMPLED)
            context = set_span_in_context(NonRecordingSpan(parent))
        else:
            context = _ROOT
        span = self.tracer.start_span(
            name,
            context=context,
            kind=SERVER if server else CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most `timeout` seconds), then stop.
        Blocking: run it off the event loop."""
        if self.closed:
            return
        self.closed = True
        self.processor.force_flush(int(timeout * 1000))
        self.provider.shutdown()
