"""Tracing: W3C Trace Context and B3 in, spans out over OTLP/HTTP.

A listener with tracing on (`ServerState.tracing`, one `Tracing` per
process) looks at each request head once (`Tracing.begin`):

- its trace context (`tracecontext.incoming`), and the sampling decision,
  made here, before the SDK is called at all: parent-based (the caller's
  sampled flag, when it gave one), else `sample_ratio` on the trace id (as
  the SDK's TraceIdRatioBased, so hops that share a ratio agree);
- not sampled, with a caller's context: nothing is done, and its headers go
  on as they came (the next hop reads the same decision);
- not sampled, and no valid context: one `traceparent` with flags `00` is
  written on the upstream request (`ProxyExchange.trace_head`), so the hops
  after this one follow the decision instead of making their own;
- sampled: the request gets a `Trace`. The caller's trace headers are not
  forwarded; each try writes its own (`Trace.inject`): `traceparent` naming
  the try's client span, the caller's `tracestate`, and B3 in the form the
  caller used, if it used B3.

Spans are made when they end, with the ids already sent and explicit times
(`spanship.SpanShipper.emit`, exported by `spans.SpanSink` in a process
of its own): a client span per try (a try that failed and was
retried ends there, `Trace.try_failed`; the last one ends with the
exchange), then the server span (`Trace.end`, from the listener's
observer, `RequestSeries.record`). Attributes follow the OpenTelemetry HTTP
semantic conventions, plus meshgate's own (`meshgate.*`).

A request that is not sampled costs the scan of its header names and, at
most, one header line; with tracing off, it costs one attribute read.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref
from binascii import hexlify
from random import getrandbits
from time import monotonic, time_ns
from typing import TYPE_CHECKING, Any

from meshgate.observability.hub import HUB, MetricsHub
from meshgate.observability.tracecontext import (
    B3_MULTI,
    B3_SINGLE,
    TRACE_HEADERS,
    Incoming,
    incoming,
)

if TYPE_CHECKING:
    from meshgate.config.tracing import TracingConfig
    from meshgate.observability.spanship import SpanCounts, SpanShipper

__all__ = ["TRACE_HEADERS", "Trace", "Tracing"]

log = logging.getLogger("meshgate.tracing")

_LOW64 = (1 << 64) - 1
# The methods the HTTP conventions know; any other is `_OTHER`.
_METHODS = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}
_PATH_MAX = 1024  # of url.path (the request line may be longer)

_counts: weakref.WeakKeyDictionary[MetricsHub, SpanCounts] = weakref.WeakKeyDictionary()


def _span_counts(hub: MetricsHub) -> SpanCounts:
    """A proxy's span counts (one across reloads), reported to its hub."""
    counts = _counts.get(hub)
    if counts is None:
        from meshgate.observability.spanship import SpanCounts

        counts = _counts[hub] = SpanCounts()
        hub.register("tracing", counts.samples)
    return counts


def _new_id() -> int:
    return getrandbits(64) or 1


def _host_only(host: bytes) -> tuple[str, int | None]:
    """A Host value's host and port (None: no port)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end > 0:
            port = text[end + 2 :]
            return text[: end + 1], int(port) if port.isdigit() and len(port) <= 5 else None
        return text, None
    name, _, port = text.partition(":")
    return name, int(port) if port.isdigit() and len(port) <= 5 else None


class Tracing:
    """A process's tracing: the sampling ratio and the span pipeline."""

    def __init__(
        self,
        *,
        endpoint: str,
        service_name: str,
        sample_ratio: float = 1.0,
        namespace: str | None = None,
        compression: str = "none",
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        schedule_delay: float = 5.0,
        max_queue: int = 2048,
        max_batch: int = 512,
        hub: MetricsHub = HUB,
    ) -> None:
        from meshgate.observability.spanship import SpanShipper

        self.ratio = sample_ratio
        self.bound = int(sample_ratio * (1 << 64))
        """A new trace is sampled when the low 64 bits of its id are below it."""
        self.service_name = service_name
        resource = {
            "service.name": service_name,
            "service.instance.id": f"{socket.gethostname()}/{os.getpid()}",
        }
        if namespace:
            resource["service.namespace"] = namespace
        # The SDK runs in the export process (`spanship`), never here.
        self.sink: SpanShipper = SpanShipper(
            {
                "endpoint": endpoint,
                "resource": resource,
                "compression": compression,
                "timeout": timeout,
                "headers": dict(headers or {}),
                "schedule_delay": schedule_delay,
                "max_queue": max_queue,
                "max_batch": max_batch,
                "close_timeout": 5.0,
            },
            _span_counts(hub),
            max_queue=max_queue,
            max_batch=max_batch,
        )
        self.failed_once = False

    @classmethod
    def from_config(cls, cfg: TracingConfig, hub: MetricsHub = HUB) -> Tracing:
        return cls(
            endpoint=cfg.endpoint,
            service_name=cfg.service_name,
            sample_ratio=cfg.sample_ratio,
            compression=cfg.compression,
            timeout=cfg.export_timeout,
            headers=cfg.headers,
            schedule_delay=cfg.batch.schedule_delay,
            max_queue=cfg.batch.max_queue,
            max_batch=cfg.batch.max_batch,
            hub=hub,
        )

    def begin(self, ex: Any, head: Any) -> None:
        """A request head (a `stream.ProxyStream` and its `RequestHead`):
        decide, and set `ex.trace` or `ex.trace_head` (see the module)."""
        found: list[tuple[bytes, bytes]] | None = head.trace_headers  # (the parser's)
        sampled: bool | None = None
        if found is not None:
            ctx = incoming(found)
            sampled = ctx.sampled
            if ctx.trace_id:
                if sampled is None:
                    sampled = (ctx.trace_id & _LOW64) < self.bound
                if sampled:
                    ex.trace = Trace(self, ex, head, ctx.trace_id, ctx)
                return
        # One draw for both ids: the trace id is its high 128 bits, the
        # parent (span) id its low 64 (nonzero: the low bit set), and the
        # unsampled header is their hex, in one C call.
        r = getrandbits(192) | 1
        trace_id = r >> 64
        if not trace_id:
            trace_id = 1
            r |= 1 << 64
        if sampled is None:
            sampled = (trace_id & _LOW64) < self.bound
        if sampled:
            ex.trace = Trace(self, ex, head, trace_id, None)
        else:
            ex.trace_head = b"traceparent: 00-" + hexlify(r.to_bytes(24), b"-", -16) + b"-00\r\n"

    def failed(self) -> None:
        if not self.failed_once:
            self.failed_once = True
            log.exception("a span could not be recorded (logged once)")

    def close(self, timeout: float = 5.0) -> None:
        """Send the spans still queued, then stop (blocking: run it in a thread)."""
        self.sink.close(timeout)


class Trace:
    """One sampled request's server span and its tries' client spans."""

    __slots__ = (
        "b3",
        "b3_trace",
        "failed_cause",
        "failed_ep",
        "host",
        "parent_id",
        "ref_mono",
        "ref_ns",
        "retry_at",
        "route",
        "span_id",
        "start_ns",
        "trace_id",
        "tracestate",
        "tracing",
        "tries_done",
        "try_attempt",
        "try_span",
        "try_start",
        "url",
    )

    def __init__(
        self, tracing: Tracing, ex: Any, head: Any, trace_id: int, ctx: Incoming | None
    ) -> None:
        now_ns = time_ns()
        mono = monotonic()
        self.tracing = tracing
        self.trace_id = trace_id
        self.span_id = _new_id()
        if ctx is not None:
            self.parent_id = ctx.span_id
            self.tracestate = ctx.tracestate
            self.b3 = ctx.b3
            self.b3_trace = ctx.b3_trace
        else:
            self.parent_id = 0
            self.tracestate = None
            self.b3 = 0
            self.b3_trace = b""
        # The exchange's times (the monotonic clock: `t_start`, `try_t0`)
        # become wall-clock nanoseconds against this one reference.
        self.ref_ns = now_ns
        self.ref_mono = mono
        self.start_ns = self._ns(ex.t_start)
        self.url: bytes = head.url
        self.host: bytes | None = head.host
        self.route: Any = None  # the `engine.runtime.RouteTarget`, once routed
        self.try_attempt = 0  # the try whose span id went out (`inject`)
        self.try_span = 0
        self.try_start = 0
        self.tries_done = 0  # tries whose client span is already made
        self.retry_at = 0.0
        self.failed_cause = ""  # why the latest try failed, when not retried
        self.failed_ep: Any = None

    # -- on the wire -----------------------------------------------------------

    def _ns(self, mono: float) -> int:
        return self.ref_ns + int((mono - self.ref_mono) * 1e9)

    def inject(self, ex: Any) -> bytes:
        """The trace header lines of a try's upstream request (each try has
        its own client span; a stale connection's replay keeps its try's)."""
        attempt = ex.attempt
        if self.try_attempt != attempt:
            self.try_attempt = attempt
            self.try_span = _new_id()
            start = self._ns(ex.try_t0)
            self.try_start = start if start > self.start_ns else self.start_ns
        sid = self.try_span
        out = b"traceparent: 00-%032x-%016x-01\r\n" % (self.trace_id, sid)
        if self.tracestate is not None:
            out += b"tracestate: " + self.tracestate + b"\r\n"
        if self.b3 == B3_SINGLE:
            out += b"b3: %s-%016x-1-%016x\r\n" % (self.b3_trace, sid, self.span_id)
        elif self.b3 == B3_MULTI:
            out += (
                b"x-b3-traceid: %s\r\nx-b3-spanid: %016x\r\nx-b3-parentspanid: %016x\r\n"
                b"x-b3-sampled: 1\r\n" % (self.b3_trace, sid, self.span_id)
            )
        return out

    def server_pairs(self) -> list[tuple[bytes, bytes]]:
        """The context for calls made by the gateway itself on this request's
        behalf (a buffered route's handler): this request's server span."""
        pairs = [(b"traceparent", b"00-%032x-%016x-01" % (self.trace_id, self.span_id))]
        if self.tracestate is not None:
            pairs.append((b"tracestate", self.tracestate))
        return pairs

    # -- spans -------------------------------------------------------------------

    def try_failed(self, ex: Any, cause: str, failed: Any, retried: bool) -> None:
        """A try failed (`cause`: connect-failure, reset, timeout, a status).
        Retried: its client span ends now; else the exchange's end ends it."""
        if not retried:
            self.failed_cause = cause
            self.failed_ep = failed
            return
        try:
            attempt = ex.attempt - 1  # (already counted for the next try)
            now = monotonic()
            self._client(ex, attempt, failed, cause, self._ns(now))
            self.tries_done = attempt
            self.retry_at = now
        except Exception:
            self.tracing.failed()

    def end(self, ex: Any, now: float, reason: str) -> None:
        """The exchange ended: its last try's client span, then its server span."""
        try:
            end_ns = self._ns(now)
            attempt = ex.attempt
            # (Not a try that was still waiting for its backoff.)
            if ex.started and attempt > self.tries_done and ex.try_t0 > self.retry_at:
                cause = ex.kind or self.failed_cause
                if ex.local_reply is None and not ex.kind:
                    cause = str(ex.status) if ex.status >= 400 else ""
                self._client(ex, attempt, self.failed_ep or ex.last_ep, cause, end_ns)
            self._server(ex, reason, end_ns)
        except Exception:
            self.tracing.failed()

    def _client(self, ex: Any, attempt: int, ep: Any, cause: str, end_ns: int) -> None:
        if self.try_attempt == attempt:
            span_id, start = self.try_span, self.try_start
        else:  # the try never sent its request (its connect failed)
            span_id = _new_id()
            start = self._ns(ex.try_t0)
            if start < self.start_ns:
                start = self.start_ns
        method = _METHODS.get(ex.method)
        attrs: dict[str, Any] = {"http.request.method": method or "_OTHER"}
        if method is None:
            attrs["http.request.method_original"] = ex.method.decode("latin-1")
        if ep is not None:
            pool = ep.pool
            attrs["server.address"] = pool.host
            attrs["server.port"] = pool.port
            attrs["network.peer.address"] = pool.host
            if pool.identity:
                attrs["meshgate.peer.identity"] = pool.identity
        if cause.isdigit():
            attrs["http.response.status_code"] = int(cause)
        elif ex.status and ex.local_reply is None:
            attrs["http.response.status_code"] = ex.status
        if cause:
            attrs["error.type"] = cause
        if attempt > 1:
            attrs["http.request.resend_count"] = attempt - 1
        attrs["meshgate.try"] = attempt
        cluster = ex.cluster
        if cluster is not None:
            attrs["meshgate.upstream"] = cluster.name
        self.tracing.sink.emit(
            method or "HTTP",
            False,
            self.trace_id,
            span_id,
            self.span_id,
            False,
            attrs,
            start,
            end_ns if end_ns > start else start,
            cause or None,
        )

    def _server(self, ex: Any, reason: str, end_ns: int) -> None:
        method = _METHODS.get(ex.method)
        proto = ex.proto
        state = proto.state
        attrs: dict[str, Any] = {"http.request.method": method or "_OTHER"}
        if method is None:
            attrs["http.request.method_original"] = ex.method.decode("latin-1")
        url = self.url
        if url[:1] == b"/":
            path = url.partition(b"?")[0]
        else:  # absolute-form: the path after the authority
            rest = url.partition(b"://")[2]
            slash = rest.find(b"/")
            path = rest[slash:].partition(b"?")[0] if slash >= 0 else b"/"
        attrs["url.path"] = path[:_PATH_MAX].decode("latin-1")
        attrs["url.scheme"] = state.scheme.decode("latin-1")
        if self.host:
            host, port = _host_only(self.host[:256])
            attrs["server.address"] = host
            if port is not None:
                attrs["server.port"] = port
        if proto.client:
            attrs["network.peer.address"] = proto.client.decode("latin-1")
        attrs["network.protocol.version"] = "1.0" if ex.http10 else "1.1"
        status = ex.status
        if status:
            attrs["http.response.status_code"] = status
        route = self.route
        if route is not None:
            attrs["http.route"] = route.path
            if route.rate_limited:
                attrs["meshgate.rate_limit"] = "limited" if reason == "ratelimit" else "allowed"
        elif reason == "ratelimit":
            attrs["meshgate.rate_limit"] = "limited"
        if ex.route_label:
            attrs["meshgate.route"] = ex.route_label
        cluster = ex.cluster
        if cluster is not None:
            attrs["meshgate.upstream"] = cluster.name
        if proto.peer:
            attrs["meshgate.peer.identity"] = proto.peer
        if ex.consumer:
            attrs["meshgate.consumer"] = ex.consumer
        attrs["meshgate.request_id"] = ex.request_id.decode("latin-1")
        attrs["meshgate.direction"] = getattr(state, "direction", "inbound")
        if ex.started and ex.attempt > 1:
            attrs["meshgate.retries"] = ex.attempt - 1
        error: str | None = None
        if ex.kind:
            attrs["meshgate.problem"] = ex.kind
            if reason:
                attrs["meshgate.refusal"] = reason
        if status >= 500 or (status == 0 and ex.kind):
            error = ex.kind or str(status)
            attrs["error.type"] = error
        name = method or "HTTP"
        if route is not None:
            name = f"{name} {route.path}"
        self.tracing.sink.emit(
            name,
            True,
            self.trace_id,
            self.span_id,
            self.parent_id,
            True,
            attrs,
            self.start_ns,
            end_ns if end_ns > self.start_ns else self.start_ns,
            error,
        )
