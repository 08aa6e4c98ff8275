"""HTTP/1.1 server side of a client connection: the wire, and nothing more.

`ServerProtocol` is one `asyncio.Protocol` per client connection, driven by
httptools (llhttp) callbacks as in uvicorn. It parses, enforces the limits,
the strict-parsing rules and the connection's timeouts, and queues one
stream per request. It knows no router, filter or upstream (as aiohttp's
`web_protocol` is handed its request handler): its listener's
`ServerState.streams` makes each request's stream, and the two see each
other only through `protocol.api` (`Stream`, `StreamSink`, `RequestHead`).
Pipelined requests are answered in order: only the head of the queue
talks to an upstream; the others buffer their (bounded) bodies.

Why llhttp's strictness is enough for most refusals: it already rejects
Content-Length with Transfer-Encoding, duplicate Content-Length, obs-fold,
whitespace before the colon, bare LF, and a Transfer-Encoding whose final
coding is not chunked. meshgate adds what it leaves: any coding other than
plain `chunked` (`gzip, chunked` has no defined meaning for a proxy that
re-frames bodies), size limits, a missing or repeated Host, and timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
from collections.abc import Callable
from random import getrandbits as _getrandbits
from typing import TYPE_CHECKING, Any, cast

import httptools

from meshgate.http.batch import BatchedWriter
from meshgate.http.headers import REQUEST_OWN, connection_drop
from meshgate.http.problem import problem_response
from meshgate.observability.hub import DIRECTIONS, HUB, MetricsHub
from meshgate.observability.tracecontext import TRACE_HEADERS
from meshgate.protocol.api import (
    PAUSE_BUFFER,
    PAUSE_DONE,
    PAUSE_PIPELINE,
    PAUSE_UPSTREAM,
    Stream,
    StreamFactory,
)
from meshgate.protocol.limits import Admission, SlowClientTimeouts
from meshgate.tls.identity import peer_spiffe_id

if TYPE_CHECKING:
    from meshgate.engine.runtime import Runtime
    from meshgate.observability.tracing import Tracing
    from meshgate.upstream.cluster import PoolRegistry

__all__ = [
    "PAUSE_BUFFER",
    "PAUSE_DONE",
    "PAUSE_PIPELINE",
    "PAUSE_UPSTREAM",
    "ServerProtocol",
    "ServerState",
]

log = logging.getLogger("meshgate.proxy")

# Queued pipelined requests on one connection before reading pauses.
PIPELINE_LIMIT = 16

# What ServerProtocol.deadline is for.
DEADLINE_HEAD = 1  # the request head must arrive by then (408)
DEADLINE_KEEPALIVE = 2  # an idle keep-alive connection closes then
DEADLINE_CLOSING = 3  # a closing connection whose client stopped reading is reset

# Request headers looked at while parsing: those meshgate writes itself, and
# the trace context (collected for the tracer, so that it never scans them).
REQUEST_SPECIAL = REQUEST_OWN | TRACE_HEADERS

_BAD_HOST = re.compile(rb"[\x00-\x20\x7f]")
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=")


class ServerState:
    """What every connection of one listener shares: the current runtime,
    the stream factory its requests get (`streams`), the open connections
    (for drain), and the pools."""

    __slots__ = (
        "admission",
        "batcher",
        "conn_counts",
        "connections",
        "direction",
        "draining",
        "hub",
        "loop",
        "observe",
        "registry",
        "require_peer",
        "role",
        "route_host",
        "runtime",
        "scheme",
        "series",
        "streams",
        "tracing",
    )

    def __init__(
        self,
        runtime: Runtime,
        registry: PoolRegistry,
        *,
        loop: asyncio.AbstractEventLoop,
        streams: StreamFactory,
        scheme: bytes = b"http",
        role: str = "gateway",
        route_host: Callable[[asyncio.BaseTransport], bytes | None] | None = None,
        require_peer: bool = False,
        hub: MetricsHub | None = None,
    ) -> None:
        self.runtime = runtime
        self.registry = registry
        self.batcher = registry.batcher
        self.loop = loop
        self.streams = streams
        """Makes each request's stream (`stream.ProxyStream` for a proxy)."""
        self.scheme = scheme
        self.role = role
        """The listener's role: gateway, sidecar-inbound, sidecar-outbound."""
        self.require_peer = require_peer
        """A TLS listener that serves only peers with a SPIFFE ID (strict
        mTLS): a verified certificate without one is closed at once."""
        self.route_host = route_host
        """For a listener that captures connections: the host to route a new
        connection's requests by (its original destination's service), or
        None to route by each request's Host."""
        self.connections: set[ServerProtocol] = set()
        self.admission = Admission()
        """Open connections in all and by client address, against the
        connection limits."""
        self.draining = False
        tls = scheme == b"https"
        self.direction = DIRECTIONS.get(role, "inbound")
        self.hub = HUB if hub is None else hub
        """The metrics of the proxy this listener is part of (the process's
        `HUB` unless the process runs several proxies); read once, here."""
        self.series = self.hub.series(role, tls)
        """This listener's request series (kept across reloads)."""
        self.observe: Callable[[Any], None] | None = self.series.record
        """Called with every exchange that ends (metrics, then the access
        log and the trace, `RequestSeries.then`)."""
        self.conn_counts = self.hub.connection_counters(role, tls)
        """Connections opened, closed (the hub's, for /metrics)."""
        self.tracing: Tracing | None = None
        """The process's tracing (`observability.tracing`), or None: off."""

    def check_timeouts(self) -> None:
        """One tick of the timeout sweep (see `Worker`)."""
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)

    def drain(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after
        their response."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


def _new_request_id() -> bytes:
    # 128 random bits from the Mersenne Twister: unique enough for tracing,
    # and no syscall per request (random reseeds itself in forked workers).
    return b"%032x" % _getrandbits(128)


class ServerProtocol(BatchedWriter, SlowClientTimeouts, asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "admitted",
        "batcher",
        "budget",
        "chunk_fresh",
        "chunk_pending",
        "chunk_watch",
        "chunked_in",
        "client",
        "current",
        "deadline",
        "deadline_kind",
        "drop",
        "expect",
        "grpc",
        "has_length",
        "head_limit",
        "head_size",
        "headers",
        "host",
        "host_count",
        "in_head",
        "length",
        "limits",
        "loop",
        "parser",
        "pause_reasons",
        "peer",
        "queue",
        "refusal",
        "request_id",
        "requests",
        "route_host",
        "state",
        "trace_headers",
        "trailer_size",
        "transport",
        "unmetered",
        "url",
        "via",
        "wbuf",
        "write_paused",
        "xff",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = state.loop
        self.limits = state.runtime.limits
        self.transport: asyncio.Transport | None = None
        self.batcher = state.batcher
        self.wbuf: list[bytes] = []
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Stream] = collections.deque()
        self.current: Stream | None = None
        self.pause_reasons = 0
        self.write_paused = False
        self.write_since = 0.0
        self.admitted = False  # counted in the listener's `Admission`
        self.requests = 0  # request heads parsed on this connection
        self.body_reads = self.body_mark = 0
        self.body_since = 0.0
        # Timeouts are deadlines checked by `ServerState.check_timeouts` on a
        # coarse tick, not timer handles: a uvloop TimerHandle costs about
        # 4 us to create and cancel, and a request would need three.
        self.deadline = 0.0
        self.deadline_kind = 0
        self.client = b""
        self.peer: str | None = None
        self.route_host: bytes | None = None
        self.refusal: _Refused | None = None
        # Bytes read since the last request ended, while its head is awaited.
        self.in_head = True
        self.head_size = 0
        self.unmetered = False
        self.trailer_size = 0
        self.chunk_watch = self.chunk_fresh = False
        self.chunk_pending = 0
        self.head_limit = self.limits.max_header_bytes + self.limits.max_request_line + 64
        self._reset_head()

    def _reset_head(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.host_count = 0
        self.expect: bytes | None = None
        self.chunked_in = False
        self.has_length = False
        self.length = b""  # the Content-Length, normalised (when there is one)
        self.request_id: bytes | None = None
        self.xff: bytes | None = None
        self.via: bytes | None = None
        self.budget = 0.0  # seconds the client gave (x-meshgate-deadline, grpc-timeout)
        self.grpc = False  # the client sent grpc-timeout: it goes on, renewed
        self.drop: frozenset[bytes] | None = None
        self.trace_headers: list[tuple[bytes, bytes]] | None = None
        """The trace-context headers, in order (`TRACE_HEADERS`), or None."""

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client = str(peer[0]).encode()
        refused = self.state.admission.admit(self.client, self.limits)
        if refused:
            # Over a connection limit: closed unanswered (`protocol.limits`),
            # and counted by the limit's key.
            self.state.conn_counts[refused] += 1
            self.pause_reasons = PAUSE_DONE
            self.transport.abort()
            return
        self.admitted = True
        self.state.connections.add(self)
        counts = self.state.conn_counts
        counts[0] += 1
        counts[2] += 1  # open now: meshgate_tcp_connections_active
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = self.state
        if state.scheme == b"https":
            # Read once: the handshake is over, and the identity it verified
            # holds for every request on this connection.
            self.peer = peer_spiffe_id(transport)
            if self.peer is None and state.require_peer:
                log.info("%s: a client certificate without a SPIFFE ID: closed", state.role)
                self.transport.abort()
                return
        if state.route_host is not None:
            self.route_host = state.route_host(transport)
        # A new connection must send its request head within header_timeout.
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_kind = DEADLINE_HEAD

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.state.admission.leave(self.client)
        self.state.connections.discard(self)
        counts = self.state.conn_counts
        counts[1] += 1
        counts[2] -= 1
        self.deadline = 0.0
        queue = self.queue
        self.queue = collections.deque()
        for ex in queue:
            ex.on_client_lost()
        self.current = None

    def data_received(self, data: bytes) -> None:
        if self.pause_reasons & PAUSE_DONE:
            return
        if self.in_head:
            # The head's size is counted here, per read, not per header: the
            # exact sum is taken only when a head crosses the limit. The first
            # bytes of a head start its clock (no on_message_begin callback:
            # one C-to-Python call per request saved).
            if not self.head_size:
                limits = self.state.runtime.limits
                if limits is not self.limits:
                    # A reload changed the limits: each request is held to
                    # those current when its head starts.
                    self.limits = limits
                    self.head_limit = limits.max_header_bytes + limits.max_request_line + 64
                self.deadline = self.loop.time() + limits.header_timeout
                self.deadline_kind = DEADLINE_HEAD
            self.head_size += len(data)
        else:
            self.body_reads += 1  # (the body-read timeout's clock: `check_body`)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(
                _Refused(501, "upgrade-unsupported", "protocol upgrades are not supported")
            )
        except httptools.HttpParserError as exc:
            refusal = self.refusal
            if refusal is None:
                if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__:
                    log.error("internal error while parsing a request", exc_info=exc.__context__)
                    refusal = _Refused(500, "internal", "internal error")
                else:
                    detail = str(exc) or exc.__class__.__name__
                    refusal = _Refused(400, "bad-request", f"malformed request: {detail}")
            self.refusal = None
            self._refuse(refusal)
            return
        if self.unmetered and not self.url:
            self.unmetered = False  # no next head began in this read
        if self.chunk_watch:
            # Whole reads after the one with the last chunk header, with no
            # body data in them: the trailer section. llhttp keeps a partial
            # trailer line in memory, so it is bounded like a head.
            if self.chunk_fresh:
                self.chunk_fresh = False
            else:
                # A memory guard only, loose on purpose: the exact limit is
                # applied per field in on_header, whatever the reads.
                self.chunk_pending += len(data)
                if self.chunk_pending > 2 * self.limits.max_header_bytes + 1024:
                    self._refuse(self._head_too_large())
                    return
        if self.in_head and self.head_size > self.head_limit:
            self._refuse(self._head_too_large())

    def _head_too_large(self) -> _Refused:
        return _Refused(
            431,
            "headers-too-large",
            f"the request headers are larger than {self.limits.max_header_bytes} bytes",
        )

    def eof_received(self) -> bool | None:
        # A half-close from the client: answer what is in flight, then close.
        # A request whose body is still arriving can never complete.
        self.flush_writes()
        cur = self.current
        if cur is not None and not cur.request_complete:
            cur.abort_request(400, "incomplete-body", "the client closed before its body ended")
        if not self.queue:
            return None
        for ex in self.queue:
            ex.keep_alive = False
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_since = 0.0  # the write timeout's clock starts on the next tick
        if self.queue:
            self.queue[0].on_client_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            self.queue[0].on_client_resume_writing()

    # -- reading control ------------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        if not self.pause_reasons and self.transport is not None:
            self.transport.pause_reading()
        self.pause_reasons |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.pause_reasons & reason:
            return
        self.pause_reasons &= ~reason
        if not self.pause_reasons and self.transport is not None:
            self.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line:
            self.refusal = _Refused(
                414,
                "uri-too-long",
                f"the request target is longer than {self.limits.max_request_line} bytes",
            )
            raise self.refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # Trailer fields of a chunked body (llhttp reports them here too).
            # The body is re-framed upstream without them; they are counted
            # against the header limit and dropped.
            self.trailer_size += len(name) + len(value) + 4
            if self.trailer_size > self.limits.max_header_bytes:
                self.refusal = self._head_too_large()
                raise self.refusal
            return
        name = name.lower()
        self.headers.append((name, value))
        if name in REQUEST_SPECIAL:
            self._own_header(name, value)

    def _own_header(self, name: bytes, value: bytes) -> None:
        if name == b"host":
            if _BAD_HOST.search(value) is not None:
                # RFC 9112 3.2: a Host that is not an authority is a 400.
                self.refusal = _Refused(400, "bad-host", "the Host header is not a valid host")
                raise self.refusal
            self.host = value
            self.host_count += 1
        elif name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                self.refusal = _Refused(
                    400,
                    "bad-transfer-encoding",
                    "only 'Transfer-Encoding: chunked' is accepted",
                )
                raise self.refusal
            self.chunked_in = True
        elif name == b"expect":
            self.expect = value.strip().lower()
        elif name == b"x-request-id":
            self.request_id = value
        elif name == b"x-forwarded-for":
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif name == b"x-meshgate-deadline" or name == b"grpc-timeout":
            if name == b"grpc-timeout":
                self.grpc = True
            budget = _parse_budget(name, value)
            if budget is not None and (not self.budget or budget < self.budget):
                self.budget = budget
        elif name == b"via":
            self.via = value if self.via is None else self.via + b", " + value
        elif name == b"content-length":
            # llhttp has refused anything but digits, and a second one.
            self.length = b"%d" % int(value)
            self.has_length = self.length != b"0"
        elif name == b"connection":
            tokens = connection_drop(value)
            if tokens:
                self.drop = tokens if self.drop is None else self.drop | tokens
        elif name in TRACE_HEADERS:
            found = self.trace_headers
            if found is None:
                self.trace_headers = [(name, value)]
            else:
                found.append((name, value))

    def on_headers_complete(self) -> None:
        self.deadline = 0.0
        self.in_head = False
        self.trailer_size = 0
        self.body_since = 0.0
        if self.pause_reasons & PAUSE_DONE:
            # A request pipelined after one that ends the connection: llhttp
            # is still parsing the same read. It is never answered or sent.
            self._reset_head()
            return
        if self.parser.should_upgrade():
            self.refusal = _Refused(
                501, "upgrade-unsupported", "protocol upgrades (and CONNECT) are not supported"
            )
            raise self.refusal
        if self.head_size > self.limits.max_header_bytes or self.unmetered:
            # The reads so far held more than the limit (body bytes may be
            # among them), or the head followed another request in one read:
            # count exactly, so the limit never depends on how bytes arrived.
            self.unmetered = False
            size = 0
            for name, value in self.headers:
                size += len(name) + len(value) + 4
            if size > self.limits.max_header_bytes:
                self.refusal = self._head_too_large()
                raise self.refusal
        parser = self.parser
        method = parser.get_method()
        version = parser.get_http_version()
        http10 = version == "1.0"
        if not http10 and version != "1.1":
            # llhttp takes `GET /` (HTTP/0.9, headers and all) and `HTTP/2.0`
            # in HTTP/1 syntax; neither can be forwarded as the HTTP/1.1
            # request it is not, and a front end may frame them otherwise.
            self.refusal = _Refused(
                505, "version-not-supported", "only HTTP/1.1 and HTTP/1.0 are served"
            )
            raise self.refusal
        if http10 and self.chunked_in:
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has
            # faulty framing, whatever else it says; it is answered and the
            # connection closed, and nothing of it goes upstream.
            self.refusal = _Refused(
                400,
                "bad-framing",
                "HTTP/1.0 requests cannot use Transfer-Encoding",
            )
            raise self.refusal
        request_id = self.request_id
        if (
            request_id is None
            or len(request_id) > 200
            or not request_id
            or not _ID_CHARS.issuperset(request_id)
        ):
            request_id = _new_request_id()
        keep_alive = parser.should_keep_alive()
        self.requests += 1
        cap = self.limits.max_requests_per_connection
        if cap and self.requests >= cap:
            keep_alive = False  # the last one: its answer says `Connection: close`
        ex = self.state.streams(self, method, http10, keep_alive, request_id)
        self.current = ex
        ex.on_request_head(self)  # routes it, runs its request filters
        self._reset_head()  # ready for the next request on this connection
        self._enqueue(ex)

    def on_chunk_header(self) -> None:
        self.chunk_watch = self.chunk_fresh = True
        self.chunk_pending = 0

    def on_body(self, body: bytes) -> None:
        self.chunk_watch = False
        cur = self.current
        if cur is not None:
            cur.on_request_body(body)

    def on_message_complete(self) -> None:
        self.chunk_watch = False
        self.in_head = True
        self.head_size = 0
        # Bytes of a next head in this same read were not counted per read.
        self.unmetered = True
        cur = self.current
        if cur is not None:
            self.current = None
            cur.on_request_end()
            if not cur.keep_alive:
                # Nothing after a request that ends the connection is read.
                self.pause_reading(PAUSE_DONE)

    # -- the queue of streams (the pipeline) --------------------------------------------

    def _enqueue(self, ex: Stream) -> None:
        """Queue a routed stream; it starts now if nothing is ahead of it."""
        queue = self.queue
        queue.append(ex)
        if len(queue) == 1 and self.transport is not None and not self.transport.is_closing():
            ex.start()
        elif len(queue) >= PIPELINE_LIMIT:
            self.pause_reading(PAUSE_PIPELINE)

    def is_head(self, stream: object) -> bool:
        """`stream` heads the queue: its response is the one being written."""
        queue = self.queue
        return bool(queue) and queue[0] is stream

    def stream_done(self, ex: object) -> None:
        """Called by the head of the queue when its response is complete."""
        queue = self.queue
        if not queue or queue[0] is not ex:
            return
        queue.popleft()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not ex.keep_alive or self.state.draining:
            self.pause_reading(PAUSE_DONE)
            self.close()
            return
        if self.pause_reasons & PAUSE_PIPELINE and len(queue) < PIPELINE_LIMIT:
            self.resume_reading(PAUSE_PIPELINE)
        if queue:
            # Not now: this may run inside the upstream parser's callback,
            # whose connection must not be reused before its read is done.
            self.loop.call_soon(queue[0].start)
        elif not self.deadline:
            self.deadline = self.loop.time() + self.limits.keepalive_timeout
            self.deadline_kind = DEADLINE_KEEPALIVE

    def _refuse(self, refusal: _Refused) -> None:
        """A request that cannot be parsed: answer (in order) and close."""
        self.pause_reading(PAUSE_DONE)
        cur = self.current
        self.current = None
        if cur is not None and not cur.request_complete:
            # The body was already streaming: the upstream must never see it
            # as a complete request.
            cur.abort_request(refusal.status, refusal.kind, refusal.detail)
            if not self.queue and self.transport is not None:
                self.close()
            return
        ex = self.state.streams(self, b"GET", False, False, _new_request_id())
        ex.reply_local(refusal.status, refusal.kind, refusal.detail, close=True)
        self._enqueue(ex)

    # -- timeouts and drain -----------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        """Called on every tick of the worker's timeout sweep."""
        deadline = self.deadline
        if deadline and now >= deadline:
            self.deadline = 0.0
            kind = self.deadline_kind
            if kind == DEADLINE_HEAD:
                self._on_head_timeout()
            elif kind == DEADLINE_KEEPALIVE:
                self._on_keepalive_timeout()
            elif self.transport is not None:
                self.transport.abort()  # DEADLINE_CLOSING
        if self.write_paused:
            self.check_write(now)
        if not self.in_head and self.current is not None:
            self.check_body(now)
        if self.queue:
            self.queue[0].check_timeout(now)

    def body_stalled(self, detail: str) -> None:
        self._refuse(_Refused(408, "body-timeout", detail))

    def _on_head_timeout(self) -> None:
        if self.queue:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.pause_reading(PAUSE_DONE)
            self.write(
                problem_response(
                    408, "request-timeout", "the request head did not arrive in time", close=True
                )
            )
            self.close()

    def _on_keepalive_timeout(self) -> None:
        if not self.queue and self.transport is not None:
            self.close()

    def drain(self) -> None:
        if not self.queue:
            if self.transport is not None:
                self.close()
        else:
            for ex in self.queue:
                ex.keep_alive = False

    # -- writing: write/writelines/flush_writes come from BatchedWriter ------------

    def abort(self) -> None:
        """Drop what is buffered and reset the connection (a response that
        broke mid-way must look truncated)."""
        self.wbuf = []
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Send what is buffered, then close; a client that never reads what
        is left is cut off after keepalive_timeout."""
        self.flush_writes()
        transport = self.transport
        if transport is not None:
            transport.close()
            if transport.get_write_buffer_size():
                self.deadline = self.loop.time() + self.limits.keepalive_timeout
                self.deadline_kind = DEADLINE_CLOSING


_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def _parse_budget(name: bytes, value: bytes) -> float | None:
    """A deadline budget in seconds: `x-meshgate-deadline: <ms>` or gRPC's
    `grpc-timeout: <digits><H|M|S|m|u|n>`; None when malformed (ignored)."""
    value = value.strip()
    if name == b"grpc-timeout":
        digits, unit = value[:-1], value[-1:]
        if not digits.isdigit() or len(digits) > 8 or unit not in _GRPC_UNITS:
            return None
        seconds = int(digits) * _GRPC_UNITS[unit]
    else:
        if not value.isdigit() or len(value) > 12:
            return None
        seconds = int(value) / 1000
    return seconds if seconds > 0 else 0.001
