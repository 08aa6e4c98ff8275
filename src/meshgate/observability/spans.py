"""The OpenTelemetry SDK's pipeline, as meshgate feeds it: a
BatchSpanProcessor and an OTLP/HTTP exporter (`SpanSink`).

The sampling decision is made before anything here is called
(`tracing.Tracing.begin`), and the ids too: a try's span id goes out in its
`traceparent` before the span exists, and a span is known only once it has
ended. So no Tracer makes spans here: each finished span is an SDK
`ReadableSpan` made at once, with meshgate's ids, its explicit parent, start
and end times, and handed to the processor (`SpanSink.emit`). The Tracer's
path (a live Span, its attributes cleaned one by one, a lock, the span
processors' dispatch) cost about 60 µs per span, on the event loop.

It runs in the export process (`offload_main`'s `trace`), fed by the
proxy's `spanship.SpanShipper`. The exporter runs on the processor's own
thread; `SpanCounts` counts what it sent and what was dropped (export
failures, a full queue, spans ended after shutdown), which that process
reports to the proxy. Each count is written by one thread only.

This module imports the SDK: a proxy never does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from meshgate.observability.spanship import SpanCounts

log = logging.getLogger("meshgate.tracing")

__all__ = ["SpanCounts", "SpanSink"]

SERVER = SpanKind.SERVER
CLIENT = SpanKind.CLIENT
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# Attributes come partly from the client (path, Host): bounded per span
# (their number is meshgate's own, a dozen or so).
_MAX_VALUE = 1024
_OK = Status(StatusCode.UNSET)


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
        self.resource = Resource.create(dict(resource))
        self.scope = InstrumentationScope("meshgate")
        exporter = OTLPSpanExporter(
            endpoint=endpoint,
            timeout=timeout,
            compression=Compression.Gzip if compression == "gzip" else Compression.NoCompression,
            headers=dict(headers or {}),
        )
        self.exporter = _CountingExporter(exporter, counts)
        # The exporter's encoding, made from cached pieces where it can be
        # (`otlp_encode`): checked against the SDK's own first.
        try:
            from meshgate.observability import otlp_encode
        except ImportError:  # (an SDK without the protobuf classes it writes)
            log.warning("the fast span encoder cannot be used; the SDK's encodes")
        else:
            otlp_encode.install(self._samples())
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=max_queue,
            schedule_delay_millis=schedule_delay * 1000,
            max_export_batch_size=max_batch,
        )

    def emit(self, *span: Any) -> None:
        """One finished span: `span`'s arguments (a server span, else a
        client one, with its ids, parent (0: none) and times)."""
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
        self.processor.on_end(self.span(*span))

    def span(
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
    ) -> ReadableSpan:
        """The SDK's span for `emit`'s arguments."""
        context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)
        parent = (
            SpanContext(trace_id, parent_id, is_remote=remote_parent, trace_flags=_SAMPLED)
            if parent_id
            else None
        )
        for key, value in attributes.items():
            # Some values come from the client (path, Host): bounded, as the
            # SDK's span limits would.
            if type(value) is str and len(value) > _MAX_VALUE:
                attributes[key] = value[:_MAX_VALUE]
        return ReadableSpan(
            name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SERVER if server else CLIENT,
            status=_OK if error is None else Status(StatusCode.ERROR, error),
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )

    def _samples(self) -> list[ReadableSpan]:
        """Spans as `emit` makes them, for `otlp_encode.install`'s check."""
        attrs: dict[str, Any] = {
            "http.request.method": "GET",
            "url.path": "/api/é/" + "x" * 200,
            "server.port": 8080,
            "meshgate.try": 2,
            "meshgate.sampled": True,
            "meshgate.ratio": 0.5,
        }
        return [
            self.span("GET /a/**", True, 1 << 100, 7, 9, True, dict(attrs), 1, 2**63, None),
            self.span("GET", False, 1 << 100, 8, 7, False, dict(attrs), 3, 4, "timeout"),
            self.span("", True, 5, 6, 0, False, {}, 0, 0, None),
        ]

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most `timeout` seconds), then stop.
        Blocking: run it off the event loop."""
        if self.closed:
            return
        self.closed = True
        self.processor.force_flush(int(timeout * 1000))
        self.processor.shutdown()  # type: ignore[no-untyped-call]
