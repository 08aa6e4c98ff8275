"""HTTP/1.1 server side of a client connection, and the proxied exchange.

`ServerProtocol` is one `asyncio.Protocol` per client connection, driven by
httptools (llhttp) callbacks as in uvicorn. It parses, enforces the limits
and strict-parsing rules, routes the request, and queues one `Exchange` per
request. Pipelined requests are answered in order: only the head of the
queue talks to an upstream; the others buffer their (bounded) bodies.

`Exchange` proxies one request. On the common path, a keep-alive connection
is taken from the endpoint's pool and everything runs in protocol callbacks,
with no task or coroutine per request. A task is made only to open a new
upstream connection or to wait for a full pool.

Bodies stream in both directions. Back-pressure is the transports' own:
when the upstream's write buffer fills, reading from the client pauses, and
when the client's write buffer fills, reading from the upstream pauses.

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
from collections.abc import Callable, Coroutine
from random import getrandbits as _getrandbits
from typing import TYPE_CHECKING, Any, cast

import httptools

from meshgate.filters import FilterRequest, LocalReply
from meshgate.handlers import BufferedRequest, Handler, HandlerResponse
from meshgate.http.batch import BatchedWriter
from meshgate.http.headers import HOP_BY_HOP, IDEMPOTENT, connection_drop, status_line
from meshgate.http.problem import problem_response
from meshgate.http.router import normalize_path
from meshgate.tls.identity import peer_spiffe_id
from meshgate.upstream.attempt import UpstreamAttempt, UpstreamFailure
from meshgate.upstream.pool import UpstreamConnection

if TYPE_CHECKING:
    from meshgate.engine.runtime import RouteTarget, Runtime
    from meshgate.upstream.balancer import Endpoint
    from meshgate.upstream.cluster import Cluster, PoolRegistry
    from meshgate.upstream.retry import RetryPolicy

log = logging.getLogger("meshgate.proxy")
access_log = logging.getLogger("meshgate.access")

# Request body bytes held while no upstream connection is ready (or while a
# pipelined request waits its turn) before reading from the client pauses.
BUFFER_LIMIT = 64 * 1024
# Body bytes kept to replay a request when a reused connection proves stale.
REPLAY_LIMIT = 64 * 1024
# Routing decisions remembered per runtime, by (method, Host, request target),
# as Kong's router cache does; cleared when full. Off when a route matches on
# headers (the key would not capture them).
ROUTE_CACHE_SIZE = 4096
ROUTE_CACHE_MAX_TARGET = 256  # longer targets (or Hosts) are routed every time
# Queued pipelined requests on one connection before reading pauses.
PIPELINE_LIMIT = 16

# What ServerProtocol.deadline is for.
DEADLINE_HEAD = 1  # the request head must arrive by then (408)
DEADLINE_KEEPALIVE = 2  # an idle keep-alive connection closes then
DEADLINE_CLOSING = 3  # a closing connection whose client stopped reading is reset

# Reasons for which reading from the client is paused (a bitmask).
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_BUFFER = 2  # body buffered while waiting for an upstream connection
PAUSE_PIPELINE = 4  # too many queued pipelined requests
PAUSE_DONE = 8  # the connection is closing: read nothing more

# Request headers that meshgate writes itself instead of copying through:
# the framing (Content-Length or chunked, for the body it forwards), Host and
# the forwarding headers.
REQUEST_WRITTEN = HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"via",
    b"x-meshgate-deadline",
    b"grpc-timeout",
}
# Forwarding headers a client could forge and that upstream frameworks believe
# (a URL's scheme, port and prefix, the client's address or certificate):
# never copied from a client. A route's own transform may still set them.
CLIENT_FORGEABLE = frozenset(
    {
        b"forwarded",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-uri",
        b"x-forwarded-method",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-forwarded-client-cert",
        b"x-real-ip",
    }
)
# What is never copied from the client's own header lines.
REQUEST_OWN = REQUEST_WRITTEN | CLIENT_FORGEABLE
# Request headers looked at while parsing.
REQUEST_SPECIAL = REQUEST_OWN

CRLF = b"\r\n"
COLON_SP = b": "
# What meshgate adds to every forwarded request and response, as one format.
_REQUEST_TAIL = (
    b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n"
    b"x-request-id: %s\r\nvia: %s\r\n%s"
)
_REQUEST_TAIL_NO_HOST = (
    b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\n%sx-request-id: %s\r\nvia: %s\r\n%s"
)
_RESPONSE_TAIL = b"x-request-id: %s\r\nvia: 1.1 meshgate\r\n%s"
# Response headers a whole response does not copy from a handler's answer.
_NOT_FORWARDED_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-request-id", b"via"}
CHUNK_END = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
VIA_TOKEN = b"1.1 meshgate"
NO_BODY_STATUS = frozenset({204, 304})
_BAD_HOST = re.compile(rb"[\x00-\x20\x7f]")
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=")


class ServerState:
    """What every connection of one worker shares: the current runtime,
    the open connections (for drain), and the pools."""

    __slots__ = (
        "access_log",
        "batcher",
        "connections",
        "draining",
        "loop",
        "registry",
        "role",
        "route_host",
        "runtime",
        "scheme",
    )

    def __init__(
        self,
        runtime: Runtime,
        registry: PoolRegistry,
        *,
        loop: asyncio.AbstractEventLoop,
        scheme: bytes = b"http",
        role: str = "gateway",
        route_host: Callable[[asyncio.BaseTransport], bytes | None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.registry = registry
        self.batcher = registry.batcher
        self.loop = loop
        self.scheme = scheme
        self.role = role
        """The listener's role: gateway, sidecar-inbound, sidecar-outbound."""
        self.route_host = route_host
        """For a listener that captures connections: the host to route a new
        connection's requests by (its original destination's service), or
        None to route by each request's Host."""
        self.connections: set[ServerProtocol] = set()
        self.draining = False
        self.access_log = runtime.config.access_log

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


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
# Host header value -> lowercase host without port; bounded, cleared when full.
_HOSTS: dict[bytes, str] = {}


def _new_request_id() -> bytes:
    # 128 random bits from the Mersenne Twister: unique enough for tracing,
    # and no syscall per request (random reseeds itself in forked workers).
    return b"%032x" % _getrandbits(128)


def _split_host(value: bytes) -> str:
    """The lowercase host of a Host header value, without its port."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0]


class ServerProtocol(BatchedWriter, asyncio.Protocol):
    """One client connection."""

    __slots__ = (
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
        "route_host",
        "state",
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
        self.queue: collections.deque[Exchange] = collections.deque()
        self.current: Exchange | None = None
        self.pause_reasons = 0
        self.write_paused = False
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

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)
        self.state.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client = str(peer[0]).encode()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = self.state
        if state.scheme == b"https":
            # Read once: the handshake is over, and the identity it verified
            # holds for every request on this connection.
            self.peer = peer_spiffe_id(transport)
        if state.route_host is not None:
            self.route_host = state.route_host(transport)
        # A new connection must send its request head within header_timeout.
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_kind = DEADLINE_HEAD

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
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

    def on_headers_complete(self) -> None:
        self.deadline = 0.0
        self.in_head = False
        self.trailer_size = 0
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
        http10 = parser.get_http_version() == "1.0"
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
        ex = Exchange(self, method, http10, parser.should_keep_alive(), request_id)
        self.current = ex
        self._route(ex)
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

    # -- routing ----------------------------------------------------------------

    def _route(self, ex: Exchange) -> None:
        """Resolve the route and the upstream request target, or a local reply."""
        if self.host_count > 1:
            ex.reply_local(400, "bad-host", "more than one Host header", close=True)
            return
        url = self.url
        host = self.host
        # A captured connection routes by where it was going, not by Host.
        by = host if self.route_host is None else self.route_host
        runtime = self.state.runtime
        cache = runtime.route_cache
        if (
            cache is not None
            and host is not None
            and by is not None
            and len(by) <= ROUTE_CACHE_MAX_TARGET
        ):
            hit = cache.get((ex.method, by, url))
            if hit is not None:
                if self.expect is not None and self.expect != b"100-continue":
                    ex.reply_local(
                        417, "expectation-failed", "only 'Expect: 100-continue' is supported"
                    )
                    return
                self._set_target(ex, hit[0], hit[1], host, hit[2])
                return
        if url[:1] == b"/":
            path_b, _, query_b = url.partition(b"?")
        elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                ex.reply_local(
                    400, "bad-target", "the request target is not a valid URL", close=True
                )
                return
            host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            path_b = parsed.path or b"/"
            query_b = parsed.query or b""
        elif url == b"*" and ex.method == b"OPTIONS":
            ex.reply_local(
                200, "", "", extra=((b"allow", b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),)
            )
            return
        else:
            ex.reply_local(
                400, "bad-target", "the request target must be a path or a URL", close=True
            )
            return
        if host is None:
            if not ex.http10:
                ex.reply_local(
                    400, "missing-host", "HTTP/1.1 requests must carry a Host header", close=True
                )
                return
            host = b""
        raw_path = path_b.decode("latin-1")
        path = normalize_path(raw_path)
        if path is None:
            ex.reply_local(400, "bad-path", "the request path is not valid", close=True)
            return
        method = _METHODS.get(ex.method) or ex.method.decode("latin-1")
        by = host if self.route_host is None else self.route_host
        host_s = _HOSTS.get(by)
        if host_s is None:
            host_s = _split_host(by)
            if len(_HOSTS) >= 1024:
                _HOSTS.clear()
            _HOSTS[by] = host_s
        match = runtime.router.match(method, host_s, path, self.headers)
        if match is None:
            ex.reply_local(404, "no-route", f"no route for {method} {path}")
            return
        if self.expect is not None and self.expect != b"100-continue":
            ex.reply_local(417, "expectation-failed", "only 'Expect: 100-continue' is supported")
            return
        route = match.route
        rt = route.target
        if rt.passthrough and path is raw_path:
            target = url if url[:1] == b"/" else path_b + (b"?" + query_b if query_b else b"")
        else:
            query = "?" + query_b.decode("latin-1") if query_b else ""
            target = route.upstream_path(path, query, match.params, match.rest).encode("latin-1")
        if (
            cache is not None
            and url[:1] == b"/"
            and len(url) <= ROUTE_CACHE_MAX_TARGET
            and len(by) <= ROUTE_CACHE_MAX_TARGET
        ):
            if len(cache) >= ROUTE_CACHE_SIZE:
                cache.clear()
            cache[(ex.method, by, url)] = (rt, target, match.params)
        self._set_target(ex, rt, target, host, match.params)

    def _set_target(
        self,
        ex: Exchange,
        rt: RouteTarget,
        target: bytes,
        host: bytes,
        params: dict[str, str],
    ) -> None:
        drop = self.drop
        identity = rt.drop
        if identity is not None:
            drop = identity if drop is None else drop | identity
            for name, _ in self.headers:
                # `X_Consumer`, `x-user_id`: CGI-style servers (WSGI, PHP)
                # read these as the identity headers themselves.
                if b"_" in name and name.replace(b"_", b"-") in identity:
                    drop = drop | {name}
        ex.route_retry = rt.retry
        ex.budget = self.budget
        ex.grpc = self.grpc
        ex.route_total = rt.total_timeout
        ex.route_read = rt.read_timeout
        chain = rt.chain
        handler = rt.handler
        if chain is None and handler is None:
            splitter = rt.splitter
            ex.set_target(
                rt.cluster
                if splitter is None
                else splitter.pick(self.headers, self.client, None, None),
                rt.label,
                target,
                headers=self.headers,
                drop=drop,
                host=host,
                chunked=self.chunked_in,
                length=self.length,
                body=self.chunked_in or self.has_length,
                expect_continue=self.expect == b"100-continue",
                xff=self.xff,
                via=self.via,
            )
            return
        req = FilterRequest(ex.method, target, self.headers, self.client, params, ex.request_id)
        req.peer = self.peer
        if self.drop is not None:
            # Headers the client's Connection named are hop-by-hop, gone:
            # filters that rename or set headers must not revive them.
            req.drop.update(self.drop)
        ex.route_label = rt.label
        if handler is not None:
            # The whole body is read (up to this) before the handler runs,
            # and must arrive by the route's (or its upstream's) total timeout.
            ex.max_body = handler.max_body
            ex.deadline = self.loop.time() + (rt.total_timeout or rt.cluster.total_timeout)
            if self.has_length and int(self.length) > handler.max_body:
                # Refused before a byte of it is read (and before any
                # `100 Continue` invites it).
                ex.reply_local(
                    413,
                    "body-too-large",
                    f"the request body is larger than this route's {handler.max_body} bytes",
                    close=True,
                )
                self.pause_reading(PAUSE_DONE)
                return
        head = _Head(
            rt,
            host,
            self.headers,
            drop,
            self.chunked_in,
            self.length,
            self.has_length,
            self.expect,
            self.xff,
            self.via,
        )
        try:
            result = chain.run(req) if chain is not None else None
        except Exception:
            log.exception("route %s: a filter failed", rt.label)
            ex.reply_local(500, "filter-error", "the gateway failed to process this request")
            return
        if result is None:
            head.apply(ex, req)
        elif isinstance(result, LocalReply):
            ex.reply_local(
                result.status,
                result.kind,
                result.detail,
                close=result.close or _unsent_body(self.expect, False),
                extra=result.headers + _header_pairs(req.response_extra),
            )
        else:
            ex.pending = self.loop.create_task(ex.await_filters(result, head, req))

    # -- the queue of exchanges -----------------------------------------------------

    def _enqueue(self, ex: Exchange) -> None:
        """Queue a routed exchange; it starts now if nothing is ahead of it."""
        queue = self.queue
        queue.append(ex)
        if len(queue) == 1 and self.transport is not None and not self.transport.is_closing():
            ex.start()
        elif len(queue) >= PIPELINE_LIMIT:
            self.pause_reading(PAUSE_PIPELINE)

    def exchange_done(self, ex: Exchange) -> None:
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
        ex = Exchange(self, b"GET", False, False, _new_request_id())
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
        if self.queue:
            self.queue[0].check_timeout(now)

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


def _header_pairs(raw: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """Header lines filters added for the response (CORS), for a local reply."""
    if not raw:
        return ()
    pairs = []
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep:
            pairs.append((name, value))
    return tuple(pairs)


def _unsent_body(expect: bytes | None, complete: bool) -> bool:
    """A refused request whose client waits for `100 Continue` before sending
    its body: close after the answer, rather than wait for a body that may
    or may not come (as Go's server does)."""
    return expect == b"100-continue" and not complete


class _Head:
    """What `Exchange.set_target` needs from a request head, kept while the
    route's filters wait (the protocol object moves on to the next head)."""

    __slots__ = (
        "chunked",
        "drop",
        "expect",
        "has_length",
        "headers",
        "host",
        "length",
        "rt",
        "via",
        "xff",
    )

    def __init__(
        self,
        rt: RouteTarget,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        drop: frozenset[bytes] | None,
        chunked: bool,
        length: bytes,
        has_length: bool,
        expect: bytes | None,
        xff: bytes | None,
        via: bytes | None,
    ) -> None:
        self.rt = rt
        self.host = host
        self.headers = headers
        self.drop = drop
        self.chunked = chunked
        self.length = length
        self.has_length = has_length
        self.expect = expect
        self.xff = xff
        self.via = via

    def apply(self, ex: Exchange, req: FilterRequest) -> None:
        """Build the upstream request head with what the filters decided."""
        headers = self.headers
        drop: frozenset[bytes] | set[bytes] | None = self.drop
        if req.drop:
            drop = req.drop if drop is None else req.drop | drop
        if drop is not None:
            headers = [h for h in headers if h[0] not in drop]
        added = req.add
        if req.response_extra:
            ex.response_extra = req.response_extra
        ex.response_edits = req.response_edits
        rt = self.rt
        if rt.response_drop is not None:
            ex.response_drop = rt.response_drop
        splitter = rt.splitter
        if rt.handler is not None:
            ex.set_handler(
                rt.handler,
                BufferedRequest(
                    method=ex.method,
                    target=req.target,
                    host=self.host,
                    # (its framing is new: Content-Length too)
                    headers=[h for h in headers if h[0] not in REQUEST_OWN]
                    + [h for h in added if h[0].lower() not in REQUEST_WRITTEN],
                    forward=ex.forward_pairs(self.host, self.xff, self.via),
                    body=b"",
                    client=req.client,
                    request_id=ex.request_id,
                    params=req.params,
                    consumer=req.consumer,
                    claims=req.claims,
                    response_edits=req.response_edits,
                    cluster=rt.cluster
                    if splitter is None
                    else splitter.pick(self.headers, req.client, req.consumer, req.subject),
                ),
                expect_continue=self.expect == b"100-continue",
            )
            return
        ex.set_target(
            # The client's headers as sent (canary and sticky keys), and who
            # the filters found it was.
            rt.cluster
            if splitter is None
            else splitter.pick(self.headers, req.client, req.consumer, req.subject),
            rt.label,
            req.target,
            headers=headers,
            added=added,
            drop=None,
            host=self.host,
            chunked=self.chunked,
            length=self.length,
            body=self.chunked or self.has_length,
            expect_continue=self.expect == b"100-continue",
            xff=self.xff,
            via=self.via,
        )


class Exchange(UpstreamAttempt):
    """One request and its response, proxied to an upstream or answered locally."""

    logger = log

    # No __slots__: the many fields that start at a default live on the class,
    # so a request stores only the handful it sets (CPython 3.11 keeps such
    # instance attributes inline; this halves the cost of creating one).
    local_reply: bytes | None = None
    cluster: Cluster | None = None
    route_label = ""
    target = b""
    head = b""
    head_parts: list[bytes] | None = None
    chunked_in = False
    has_body = False
    expect_continue = False
    body_buffered = 0
    request_complete = False
    conn: UpstreamConnection | None = None
    endpoint: Endpoint | None = None
    task: asyncio.Task[None] | None = None
    pending: asyncio.Task[None] | None = None  # the route's filters are waiting
    begun = False  # start() ran
    in_cluster = False  # counted in its cluster's requests in flight
    refused = False  # by a circuit breaker
    route_retry: RetryPolicy | None = None  # the route's own retry policy
    budget = 0.0  # the client's own deadline, in seconds from its request (0: none)
    grpc = False  # send grpc-timeout on, too
    try_started = 0.0
    route_total = 0.0  # the route's own timeouts (0: the upstream's)
    route_read = 0.0
    read_limit = 0.0
    policy: RetryPolicy | None = None  # the one in force (route's, else upstream's)
    attempt = 1
    tried: tuple[Endpoint, ...] = ()  # endpoints whose try failed, in order
    try_deadline = 0.0
    retry_counted = False
    response_extra = b""  # header lines the filters add to the response
    response_edits: Any = None  # the transform filter's status and header edits
    response_drop: frozenset[bytes] | None = None  # upstream headers the route owns
    max_body = 0  # a buffered route: the largest body read (0: streamed)
    handler: Handler | None = None
    buffered: BufferedRequest | None = None
    response_started = False
    head_sent = False  # part of the upstream's response was handed to the client
    chunked_out = False
    finished = False
    replay: list[bytes] | None = None
    sent_body = 0
    retried = False
    status = 0
    started = 0.0
    deadline = 0.0
    last_activity = 0.0

    def __init__(
        self,
        proto: ServerProtocol,
        method: bytes,
        http10: bool,
        keep_alive: bool,
        request_id: bytes,
    ) -> None:
        self.proto = proto
        self.loop = proto.loop
        self.method = method
        self.http10 = http10
        self.keep_alive = keep_alive
        self.request_id = request_id
        self.body_buf: list[bytes] = []
        self.out: list[bytes] = []

    # -- set-up (at headers complete) ----------------------------------------------

    def set_target(
        self,
        cluster: Cluster,
        label: str,
        target: bytes,
        *,
        headers: list[tuple[bytes, bytes]],
        added: list[tuple[bytes, bytes]] | None = None,
        drop: frozenset[bytes] | None,
        host: bytes,
        chunked: bool,
        length: bytes,
        body: bool,
        expect_continue: bool,
        xff: bytes | None,
        via: bytes | None,
    ) -> None:
        self.cluster = cluster
        self.route_label = label
        self.target = target
        self.chunked_in = chunked
        self.has_body = body
        self.expect_continue = expect_continue and body and not self.http10
        # The whole head is built once, here. Only a Host rewritten to the
        # endpoint's authority waits for the endpoint (`_attach`).
        parts = [self.method, b" ", target, b" HTTP/1.1\r\n"]
        hv = cluster.host_value
        if hv is None:
            parts.append(b"host: " + host + CRLF)
        elif hv:
            parts.append(b"host: " + hv + CRLF)
        else:
            parts.append(b"")  # replaced per endpoint
        if drop is None:
            for name, value in headers:
                if name not in REQUEST_OWN:
                    parts += (name, COLON_SP, value, CRLF)
        else:
            for name, value in headers:
                if name not in REQUEST_OWN and name not in drop:
                    parts += (name, COLON_SP, value, CRLF)
        if added:
            # What the route's filters set (identity, transform edits): the
            # forwarding headers a client may not send are theirs to set.
            for name, value in added:
                if name.lower() not in REQUEST_WRITTEN:
                    parts += (name, COLON_SP, value, CRLF)
        proto = self.proto
        parts.append(
            (_REQUEST_TAIL if host else _REQUEST_TAIL_NO_HOST)
            % (
                proto.client if xff is None else xff + b", " + proto.client,
                proto.state.scheme,
                host,
                self.request_id,
                VIA_TOKEN if via is None else via + b", " + VIA_TOKEN,
                # The framing is meshgate's own, for the body it forwards.
                b"transfer-encoding: chunked\r\n\r\n"
                if chunked
                else b"content-length: " + length + b"\r\n\r\n"
                if length
                else CRLF,
            )
        )
        if hv == b"":
            self.head_parts = parts
        else:
            self.head = b"".join(parts)

    def reply_local(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        close: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer from the gateway itself, once this exchange's turn comes."""
        if close:
            self.keep_alive = False
        self.status = status
        if status < 300 and not kind:
            head = [status_line(status)]
            for name, value in extra:
                head.append(name + b": " + value + CRLF)
            if status != 204:  # a 204 has no Content-Length (RFC 9110 8.6)
                head.append(b"content-length: 0\r\n")
            if not self.keep_alive:
                head.append(b"connection: close\r\n")
            head.append(CRLF)
            self.local_reply = b"".join(head)
        else:
            self.local_reply = problem_response(
                status,
                kind,
                detail,
                request_id=self.request_id.decode("latin-1"),
                close=not self.keep_alive,
                head_only=self.method == b"HEAD",
                extra_headers=extra,
            )

    async def await_filters(
        self,
        pending: Coroutine[Any, Any, LocalReply | None],
        head: _Head,
        req: FilterRequest,
    ) -> None:
        """The route's filters had to wait; go on once they have decided."""
        try:
            reply = await pending
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this exchange was dropped (the client left)
            # Something the filter awaited was cancelled under it (a JWKS
            # fetch closed by a reload): answer rather than hang.
            reply = LocalReply(
                503, "filter-unavailable", "the gateway could not finish checking this request"
            )
        except Exception:
            log.exception("route %s: a filter failed", head.rt.label)
            reply = LocalReply(500, "filter-error", "the gateway failed to process this request")
        finally:
            self.pending = None
        if self.finished:
            return
        if self.local_reply is not None:
            pass  # decided meanwhile (a body past the route's max_body)
        elif reply is None:
            head.apply(self, req)
        else:
            # Body bytes that arrived meanwhile are not going anywhere.
            self.body_buf = []
            self.body_buffered = 0
            self.reply_local(
                reply.status,
                reply.kind,
                reply.detail,
                close=reply.close or _unsent_body(head.expect, self.request_complete),
                extra=reply.headers + _header_pairs(req.response_extra),
            )
            proto = self.proto
            if proto.pause_reasons & PAUSE_BUFFER:
                proto.resume_reading(PAUSE_BUFFER)
        queue = self.proto.queue
        if queue and queue[0] is self:
            self.start()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """This exchange is now the head of its connection's queue. It may be
        called again (its filters finished in the same turn as the exchange
        ahead of it): only the first call counts."""
        if self.finished or self.pending is not None or self.begun:
            return
        if self.max_body and self.local_reply is None:
            # A buffered route: its handler has not answered yet.
            if self.proto.pause_reasons & PAUSE_BUFFER:
                self.proto.resume_reading(PAUSE_BUFFER)
            if self.expect_continue and not self.request_complete and not self.body_buffered:
                self.expect_continue = False
                self.proto.write(CONTINUE_100)
            return
        self.begun = True
        if self.local_reply is not None:
            self._send_local()
            return
        cluster = self.cluster
        assert cluster is not None
        now = self.loop.time()
        total = self.route_total or cluster.total_timeout
        if self.budget and self.budget < total:
            total = self.budget  # the caller's deadline is sooner
        policy = self.route_retry or cluster.retry
        if policy is not None:
            self.policy = policy
        first = self._begin(now, total)
        if isinstance(first, UpstreamFailure):
            self._reply_overloaded(first)
            return
        self.started = self.last_activity = now
        self.read_limit = self.route_read or cluster.read_timeout
        self._go(first)

    def _go(self, ep: Endpoint) -> None:
        """Send this try to `ep`: on an idle pooled connection, or a new one."""
        self.try_started = self.loop.time()
        conn = ep.pool.take_idle()
        if conn is not None:
            self._attach(ep, conn)
        else:
            self.task = self.loop.create_task(self._connect(ep))

    # -- retries ---------------------------------------------------------------------

    def _retry_delay(
        self,
        cause: str,
        failed: Endpoint | None,
        *,
        sent: bool,
        retry_after: float | None = None,
    ) -> float | None:
        """`UpstreamAttempt._retry_delay`, once nothing of the answer reached
        the client and the body can be sent again; a retry allowed resets
        what the failed try left (its body goes out again from `replay`)."""
        if self.finished or self.head_sent:
            return None
        if sent and self.has_body and self.replay is None:
            return None  # the body is too large to send again
        delay = UpstreamAttempt._retry_delay(
            self, cause, failed, sent=sent, retry_after=retry_after
        )
        if delay is None:
            return None
        if self.replay is not None:
            self.body_buf = self.replay + self.body_buf
        self.replay = None
        self.sent_body = 0
        self.response_started = False
        self.chunked_out = False
        self.out = []
        self.status = 0
        self.last_activity = self.loop.time()
        return delay

    def _maybe_retry(
        self,
        cause: str,
        failed: Endpoint | None,
        *,
        sent: bool,
        retry_after: float | None = None,
    ) -> bool:
        """Retry after a failed try, if `_retry_delay` allows it; True when a
        retry is scheduled (the caller then answers nothing)."""
        delay = self._retry_delay(cause, failed, sent=sent, retry_after=retry_after)
        if delay is None:
            return False
        self.task = self.loop.create_task(self._retry(delay))
        return True

    async def _retry(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self.task = None
        if self.finished:
            return
        self._go(self._next_try())

    async def _connect(self, ep: Endpoint) -> None:
        got = await self._open(ep)
        self.task = None
        if isinstance(got, UpstreamConnection):
            if self.finished:
                ep.pool.release(got)
            else:
                self._attach(ep, got)
        elif isinstance(got, UpstreamFailure):
            if self.refused:
                self._reply_overloaded(got)
            else:
                self.fail(got.status, got.kind, got.detail)
        else:
            self.task = self.loop.create_task(self._retry(got))

    def _attach(self, ep: Endpoint, conn: UpstreamConnection) -> None:
        left = self._bind(ep, conn, self.loop.time())
        transport = conn.transport
        assert transport is not None
        head = self.head
        if not head:
            parts = self.head_parts
            assert parts is not None
            parts[4] = b"host: " + ep.authority + CRLF
            head = b"".join(parts)
        # What is left of this request's deadline goes to the next hop.
        if self.grpc:
            head = head[:-2] + b"x-meshgate-deadline: %d\r\ngrpc-timeout: %dm\r\n\r\n" % (
                left,
                left,
            )
        else:
            head = head[:-2] + b"x-meshgate-deadline: %d\r\n\r\n" % left
        # Keep what is needed to replay on a fresh connection if this pooled
        # one turns out to be stale (closed by the peer while idle).
        self.replay = (
            [] if (conn.reused or self.policy is not None) and self.sent_body == 0 else None
        )
        if self.body_buf:
            body = self.body_buf
            self.body_buf = []
            self.body_buffered = 0
            self.proto.resume_reading(PAUSE_BUFFER)
            out = [head]
            if self.chunked_in:
                for chunk in body:
                    if chunk is CHUNK_END:
                        out.append(chunk)
                    else:
                        out += (b"%x\r\n" % len(chunk), chunk, CRLF)
            else:
                out += body
            self._note_sent(body)
            conn.writelines(out)
        else:
            conn.write(head)
        if self.proto.write_paused:
            transport.pause_reading()
        if self.expect_continue and not self.request_complete and self.sent_body == 0:
            self.expect_continue = False
            self.proto.write(CONTINUE_100)

    def _note_sent(self, chunks: list[bytes]) -> None:
        n = 0
        for c in chunks:
            n += len(c)
        self.sent_body += n
        replay = self.replay
        if replay is not None:
            if self.sent_body <= REPLAY_LIMIT:
                replay += chunks
            else:
                self.replay = None

    # -- request body (from the client) ----------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        if self.finished:
            return
        conn = self.conn
        if conn is not None and conn.transport is not None:
            if self.chunked_in:
                conn.writelines([b"%x\r\n" % len(data), data, CRLF])
            else:
                conn.write(data)
            self.sent_body += len(data)
            if self.replay is not None:
                if self.sent_body <= REPLAY_LIMIT:
                    self.replay.append(data)
                else:
                    self.replay = None
            self.last_activity = self.loop.time()
        elif self.local_reply is None:
            self.body_buf.append(data)
            self.body_buffered += len(data)
            if self.max_body:
                if self.body_buffered > self.max_body:
                    self._body_too_large()
                elif self.body_buffered > BUFFER_LIMIT:
                    queue = self.proto.queue
                    if queue and queue[0] is not self:
                        # Pipelined behind another request: read the rest
                        # when this one's turn comes (`start`), so that one
                        # connection never holds many whole bodies.
                        self.proto.pause_reading(PAUSE_BUFFER)
            elif self.body_buffered > BUFFER_LIMIT:
                self.proto.pause_reading(PAUSE_BUFFER)

    def on_request_end(self) -> None:
        self.request_complete = True
        if self.max_body:
            if self.handler is not None and not self.finished and self.local_reply is None:
                self._run_handler()
            return
        if self.finished or not self.chunked_in:
            return
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.write(CHUNK_END)
            if self.replay is not None:
                self.replay.append(CHUNK_END)
        elif self.local_reply is None:
            self.body_buf.append(CHUNK_END)

    # -- buffered routes (aggregation, body transforms) ------------------------------

    def forward_pairs(
        self, host: bytes, xff: bytes | None, via: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        """What `set_target` adds to an upstream request, as header pairs."""
        proto = self.proto
        pairs = [
            (b"x-forwarded-for", proto.client if xff is None else xff + b", " + proto.client),
            (b"x-forwarded-proto", proto.state.scheme),
        ]
        if host:
            pairs.append((b"x-forwarded-host", host))
        pairs.append((b"x-request-id", self.request_id))
        pairs.append((b"via", VIA_TOKEN if via is None else via + b", " + VIA_TOKEN))
        return pairs

    def set_handler(self, handler: Handler, req: BufferedRequest, *, expect_continue: bool) -> None:
        """The route's filters passed: the handler answers once the body is in."""
        self.handler = handler
        self.buffered = req
        if self.request_complete:
            self._run_handler()
            return
        if self.proto.pause_reasons & PAUSE_BUFFER:
            self.proto.resume_reading(PAUSE_BUFFER)
        # `100 Continue` goes out when this exchange heads the queue (start):
        # before that, it would land inside an earlier request's response.
        self.expect_continue = expect_continue and not self.http10 and not self.body_buffered
        queue = self.proto.queue
        if queue and queue[0] is self:
            self.start()

    def _body_too_large(self) -> None:
        self.body_buf = []
        self.body_buffered = 0
        if self.pending is not None and self.handler is None:
            self.pending.cancel()  # the filters' verdict no longer matters
            self.pending = None
        self.reply_local(
            413,
            "body-too-large",
            f"the request body is larger than this route's {self.max_body} bytes",
            close=True,
            extra=_header_pairs(self.response_extra),
        )
        self.proto.pause_reading(PAUSE_DONE)
        self.local_reply_now()

    def _run_handler(self) -> None:
        req = self.buffered
        handler = self.handler
        assert req is not None and handler is not None
        req.body = b"".join(self.body_buf)
        self.body_buf = []
        self.body_buffered = 0
        now = self.started = self.loop.time()
        total = self.route_total or 3600.0
        if self.budget and self.budget < total:
            total = self.budget  # the caller's deadline is sooner
        deadline = now + total
        self.deadline = deadline + 1.0  # the backstop (`_check_buffered`)
        self.pending = self.loop.create_task(self._handle(handler, req, deadline))

    async def _handle(self, handler: Handler, req: BufferedRequest, deadline: float) -> None:
        try:
            resp = await handler.handle(req, deadline)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("route %s: the handler failed", self.route_label)
            self.pending = None
            self.reply_local(500, "handler-error", "the gateway failed to answer this request")
        else:
            self.pending = None
            self._reply_whole(resp)
        if self.finished:
            return
        queue = self.proto.queue
        if queue and queue[0] is self:
            self.start()

    def _end_head(self, parts: list[bytes]) -> None:
        """What meshgate adds to every response head, and its blank line."""
        if self.response_extra:
            parts.append(self.response_extra)
        parts.append(
            _RESPONSE_TAIL
            % (
                self.request_id,
                b"connection: close\r\n\r\n"
                if not self.keep_alive
                else b"connection: keep-alive\r\n\r\n"
                if self.http10
                else CRLF,
            )
        )

    def _reply_whole(self, resp: HandlerResponse) -> None:
        """A handler's answer, framed as a whole response."""
        status = self.status = resp.status
        parts = [status_line(status)]
        skip = _NOT_FORWARDED_RESPONSE
        if self.response_drop is not None:
            skip = skip | self.response_drop
        for name, value in resp.headers:
            if name not in skip:
                parts += (name, COLON_SP, value, CRLF)
        body = resp.body
        if status in NO_BODY_STATUS:
            body = b""
        elif body or self.method != b"HEAD":
            # A HEAD answered from upstream has no body to count: its length
            # is unknown here, and a Content-Length must be the GET's or none
            # (RFC 9110 section 8.6).
            parts.append(b"content-length: %d\r\n" % len(body))
        if self.method == b"HEAD":
            body = b""
        if self.proto.state.draining:
            self.keep_alive = False
        self._end_head(parts)
        parts.append(body)
        self.local_reply = b"".join(parts)

    def abort_request(self, status: int, kind: str, detail: str) -> None:
        """The client's body broke mid-stream: reset the upstream request."""
        self.keep_alive = False
        self.request_complete = True
        self._drop_upstream()
        if self.finished:
            self.proto.close()  # its answer (and earlier ones) may still be buffered
        elif self.response_started:
            self._abort_client()
        else:
            self.reply_local(status, kind, detail, close=True)
            self.local_reply_now()

    def local_reply_now(self) -> None:
        queue = self.proto.queue
        if queue and queue[0] is self and not self.finished:
            self._send_local()

    # -- response (from the upstream) ------------------------------------------------

    def on_upstream_head(self, conn: UpstreamConnection) -> None:
        status = self.status = conn.status
        delay = self._judge_head(conn, None)
        if delay is not None:
            # This answer is dropped: the connection goes, mid-response.
            conn.sink = None
            conn.keep_alive = False
            self.conn = None
            self._release_endpoint()
            conn.abort()
            self.task = self.loop.create_task(self._retry(delay))
            return
        self.last_activity = self.loop.time()
        # The connection collected the forwardable header lines while parsing
        # (parts[0] is kept for the status line).
        parts = conn.parts
        parts[0] = status_line(status)
        drop = conn.drop
        owned = self.response_drop
        if owned is not None:
            drop = owned if drop is None else drop | owned
        if drop is not None:
            # Rare: Connection named more headers to remove.
            kept = [parts[0]]
            for i in range(1, len(parts), 4):
                if parts[i] not in drop:
                    kept += parts[i : i + 4]
            parts = kept
        edits = self.response_edits
        if edits is not None:
            # The route's status and header edits (the framing below keeps
            # to the upstream's status: a mapping never adds or drops a body).
            self.status = edits.status(status)
            parts[0] = status_line(self.status)
            parts = edits.apply_parts(parts)
        if conn.no_body or status in NO_BODY_STATUS:
            pass
        elif not conn.has_length:
            if not conn.chunked:
                # Neither length nor chunked: the body ends when the upstream
                # closes (RFC 9112 section 6.3, rule 8).
                conn.close_delimited = True
                conn.keep_alive = False
            if self.http10:
                self.keep_alive = False
            else:
                self.chunked_out = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if not self.request_complete:
            # The response came before the whole request: the rest of the
            # body will be read and dropped, so this connection ends here.
            self.keep_alive = False
        if self.proto.state.draining:
            self.keep_alive = False
        # `_end_head(parts)`, inlined: this is the hot path.
        if self.response_extra:
            parts.append(self.response_extra)
        parts.append(
            _RESPONSE_TAIL
            % (
                self.request_id,
                b"connection: close\r\n\r\n"
                if not self.keep_alive
                else b"connection: keep-alive\r\n\r\n"
                if self.http10
                else CRLF,
            )
        )
        self.response_started = True
        # Held until the end of this read, so that the head and the first
        # body bytes leave in one write (one syscall for a small response).
        self.out.append(b"".join(parts))

    def on_upstream_body(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(data), data, CRLF)
        else:
            self.out.append(data)

    def flush_out(self) -> None:
        """Write what this read of the upstream produced for the client."""
        out = self.out
        if out:
            self.out = []
            self.head_sent = True
            self.proto.writelines(out)

    def on_upstream_end(self, conn: UpstreamConnection) -> None:
        # The common ending, kept flat: flush, free the endpoint, pool the
        # connection, finish.
        out = self.out
        if self.chunked_out:
            out.append(CHUNK_END)
        proto = self.proto
        if out:
            proto.writelines(out)
            self.out = []
        self.conn = None
        self._end_try()
        if not self.request_complete:
            conn.keep_alive = False
        if proto.write_paused and conn.transport is not None:
            conn.transport.resume_reading()
        conn.pool.release(conn)
        self._leave_cluster()
        self.finished = True
        if proto.pause_reasons & PAUSE_UPSTREAM:
            proto.resume_reading(PAUSE_UPSTREAM)
        if proto.state.access_log:
            self._log_access()
        proto.exchange_done(self)

    def on_upstream_error(self, conn: UpstreamConnection, reason: str) -> None:
        self.conn = None
        self._gateway_failure()
        failed = self.endpoint
        self._release_endpoint()
        conn.abort()
        if self.head_sent:
            self._abort_client()  # bytes already went to the client
        elif self._maybe_retry("reset", failed, sent=True):
            return
        else:
            # Whatever this read produced is still held: a 502 is still possible.
            self.out = []
            self.response_started = False
            self.chunked_out = False
            self.fail(502, "upstream-bad-response", reason)

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        conn_ep = self.endpoint
        self._release_endpoint()
        if self.response_started:
            if conn.close_delimited and conn.clean_close:
                if self.chunked_out:
                    self.out.append(CHUNK_END)
                self.flush_out()
                self._finish()
            else:
                self._abort_client()  # a truncated response must look truncated
            return
        if (
            conn.reused
            and conn.bytes_in == 0
            and not self.retried
            and self.replay is not None
            and (self.request_complete or not self.has_body)
            and (self.method in IDEMPOTENT or self.sent_body == 0)
        ):
            # A pooled connection the upstream had closed while it sat idle.
            # Its other idle connections are likely stale as well.
            self.retried = True
            replay = self.replay
            self.replay = None
            self.body_buf = replay + self.body_buf
            self.sent_body = 0
            conn.pool.close_idle()
            cluster = self.cluster
            assert cluster is not None
            self.task = self.loop.create_task(self._connect(cluster.balancer.pick()))
            return
        if self.cluster is not None and self.cluster.outlier is not None and conn_ep is not None:
            self.cluster.outlier.failure(conn_ep, gateway=True)
        if self._maybe_retry("reset", conn_ep, sent=True):
            return
        self.fail(
            502,
            "upstream-reset",
            f"{conn.pool.address} closed the connection before answering",
        )

    def on_upstream_pause_writing(self) -> None:
        self.proto.pause_reading(PAUSE_UPSTREAM)

    def on_upstream_resume_writing(self) -> None:
        self.proto.resume_reading(PAUSE_UPSTREAM)

    def on_client_pause_writing(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def on_client_resume_writing(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

    def on_client_lost(self) -> None:
        """The client went away: stop everything this exchange started."""
        if self.finished:
            return
        self._leave_cluster()
        self.finished = True
        self.keep_alive = False
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        """Stop connecting, and reset the upstream connection if one is bound:
        the upstream must not take a half-sent request as complete."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        conn = self.conn
        if conn is not None:
            self.conn = None
            self._release_endpoint()
            conn.abort()

    # -- timeouts --------------------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """The total and read-idle timeouts, checked on the sweep's tick."""
        if self.max_body:
            self._check_buffered(now)
            return
        cluster = self.cluster
        if self.finished or not self.started or cluster is None:
            return
        if now >= self.deadline:
            total = self.route_total or cluster.total_timeout
            if self.budget and self.budget < total:
                # The client's own deadline: nothing to blame the endpoint for.
                self._timeout(f"the client's deadline of {self.budget:g}s passed", blame=False)
            else:
                self._timeout(f"the upstream exchange took longer than {total:g}s")
        elif self.try_deadline and now >= self.try_deadline and not self.response_started:
            self.try_deadline = 0.0
            self._gateway_failure()
            failed = self.endpoint
            sent = self.conn is not None  # still connecting: nothing was sent
            self._drop_upstream()
            if not self._maybe_retry("timeout", failed, sent=sent):
                policy = self.policy
                per_try = policy.per_try_timeout if policy is not None else 0.0
                self.fail(504, "upstream-timeout", f"the try took longer than {per_try:g}s")
        elif self.conn is not None and now - self.last_activity >= self.read_limit:
            # (Not while connecting or backing off before a retry: those have
            # their own limits.)
            self._timeout(f"the upstream was silent for {self.read_limit:g}s")

    def _check_buffered(self, now: float) -> None:
        """A buffered route: its body must arrive in time (a client that stops
        sending is cut off with 408), and its handler must answer by a second
        past its own deadline (a backstop: handlers keep their deadlines)."""
        if self.finished or self.local_reply is not None or not self.deadline:
            return
        if now < self.deadline:
            return
        if not self.request_complete:
            self.abort_request(408, "request-timeout", "the request body did not arrive in time")
        elif self.pending is not None and self.handler is not None:
            self.pending.cancel()
            self.pending = None
            log.error("route %s: the handler overran its deadline", self.route_label)
            self.fail(504, "handler-timeout", "the gateway could not answer in time")

    def _timeout(self, detail: str, *, blame: bool = True) -> None:
        if blame and not self.response_started and not self.proto.write_paused:
            # Only the gateway's own timeouts, before the answer began, and
            # not while a slow client held the upstream's reading paused.
            self._gateway_failure()
        self._drop_upstream()
        if self.response_started:
            self._abort_client()
        else:
            self.fail(504, "upstream-timeout", detail)

    # -- endings ---------------------------------------------------------------------

    def fail(self, status: int, kind: str, detail: str) -> None:
        """Answer with a problem instead of the upstream's response."""
        if self.finished:
            return
        self._log_failure(status, detail)
        if not self.request_complete:
            self.keep_alive = False
        self.reply_local(status, kind, detail)
        self._send_local()

    def _send_local(self) -> None:
        reply = self.local_reply
        assert reply is not None
        self.response_started = True
        self.proto.write(reply)
        self._finish()

    def _reply_overloaded(self, refused: UpstreamFailure) -> None:
        """A circuit breaker limit is reached: 503 at once, marked as such."""
        if not self.request_complete:
            self.keep_alive = False  # the body is not coming (no 100 Continue)
        self.reply_local(
            refused.status,
            refused.kind,
            refused.detail,
            extra=((b"x-meshgate-overloaded", b"1"),),
        )
        self._send_local()

    def _finish(self) -> None:
        if self.finished:
            return
        self._leave_cluster()
        self.finished = True
        proto = self.proto
        if proto.pause_reasons & (PAUSE_UPSTREAM | PAUSE_BUFFER):
            # The upstream this exchange was writing to is gone: whatever
            # paused reading on its behalf no longer holds.
            proto.resume_reading(PAUSE_UPSTREAM | PAUSE_BUFFER)
        if proto.state.access_log:
            self._log_access()
        proto.exchange_done(self)

    def _abort_client(self) -> None:
        self._leave_cluster()
        self.finished = True
        self.keep_alive = False
        proto = self.proto
        proto.wbuf = []
        if proto.transport is not None:
            proto.transport.abort()

    def _log_access(self) -> None:
        elapsed = (self.loop.time() - self.started) * 1000 if self.started else 0.0
        access_log.info(
            '%s "%s %s" %d %s %.1fms id=%s',
            self.proto.client.decode(),
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            self.status,
            self.route_label or "-",
            elapsed,
            self.request_id.decode("latin-1"),
        )
