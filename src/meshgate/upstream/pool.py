"""Keep-alive connections to one endpoint, and the pool that holds them.

`EndpointPool` keeps idle connections in a deque of most recently used last,
as aiohttp's connector does: `take_idle()` pops the warmest one and drops
any that the peer closed or that sat idle past `idle_timeout`. The number of
open connections is capped by `max_connections`; past it, a request waits on
`acquire()` (a FIFO of futures) until one is released or closed, for at most
`acquire_timeout`.

`UpstreamConnection` is an `asyncio.Protocol` that parses responses with
httptools and hands every event to the attempt currently bound to it (its
`ResponseSink`, an `upstream.attempt.UpstreamAttempt`). It carries no request
logic of its own: the attempt decides framing, reuse and errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any, Protocol, cast

import httptools

from meshgate.http.batch import BatchedWriter, WriteBatcher
from meshgate.http.headers import CONNECTION_IGNORED, HOP_BY_HOP, connection_tokens
from meshgate.tls.identity import peer_spiffe_id

if TYPE_CHECKING:
    from meshgate.tls.holder import IdentityContexts

MAX_CONNECTING = 8
"""Connections one endpoint pool opens at once, at most."""
DEFAULT_HEAD_LIMIT = 60 * 1024
"""The header lines of one response head, in bytes, at most
(`limits.max_response_header_bytes`)."""

log = logging.getLogger("meshgate.upstream")

# Response headers never copied to the client: hop-by-hop ones, and the
# request id, which meshgate sets itself.
_NOT_FORWARDED = HOP_BY_HOP | {b"x-request-id"}


class PeerIdentityError(OSError):
    """An endpoint's TLS peer is not the identity it must be (or this proxy
    has no certificate to reach it): a connect failure."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.strerror = message


class ResponseSink(Protocol):
    """What an `UpstreamConnection` reports to (an `upstream.attempt.UpstreamAttempt`)."""

    def on_upstream_head(self, conn: UpstreamConnection) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def flush_out(self) -> None: ...
    def on_upstream_end(self, conn: UpstreamConnection) -> None: ...
    def on_upstream_error(self, conn: UpstreamConnection, reason: str) -> None: ...
    def on_upstream_lost(self, conn: UpstreamConnection) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


class UpstreamConnection(BatchedWriter, asyncio.Protocol):
    """One TCP connection to an endpoint, reused for sequential requests."""

    __slots__ = (
        "batcher",
        "bytes_in",
        "chunked",
        "clean_close",
        "close_delimited",
        "closed",
        "drop",
        "has_length",
        "head_limit",
        "head_size",
        "idle_since",
        "in_body",
        "keep_alive",
        "no_body",
        "parser",
        "parts",
        "pool",
        "reused",
        "sink",
        "status",
        "transport",
        "unmetered",
        "wbuf",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.batcher = pool.batcher
        self.wbuf: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.status = 0
        self.parts: list[bytes] = [b""]
        self.keep_alive = True
        self.no_body = False
        self.close_delimited = False
        self.bytes_in = 0
        self.reused = False
        self.closed = False
        self.clean_close = False
        self.idle_since = 0.0
        self.has_length = False
        self.chunked = False
        self.in_body = False
        self.drop: frozenset[bytes] | None = None
        # The response head's size is counted per read, as the client side
        # counts request heads (`protocol.h1`): exactly only past the limit.
        self.head_limit = pool.head_limit
        self.head_size = 0
        self.unmetered = False

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the peer is out of sync with us
            # (a late response, or garbage). The connection can't be trusted,
            # and what it sent goes to no one.
            log.warning(
                "%s sent a response nobody asked for (on an idle connection); closing",
                self.pool.address,
            )
            self.abort()
            return
        self.bytes_in += len(data)
        if not self.in_body:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # (HttpParserUpgrade is not an HttpParserError: a 101 nobody asked
            # for escaped to the event loop, which closed the transport.)
            self.keep_alive = False
            if isinstance(exc, httptools.HttpParserUpgrade):
                reason = "the upstream switched protocols unasked"
            elif isinstance(exc.__context__, HeadTooLarge):
                reason = self._too_large()
            elif isinstance(exc.__context__, UnknownCoding):
                reason = "the upstream used a transfer coding other than chunked"
            elif isinstance(exc.__context__, UnexpectedResponse):
                log.warning("%s sent a response nobody asked for; closing", self.pool.address)
                reason = "unexpected response from upstream"
            elif isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__:
                log.error("internal error on an upstream response", exc_info=exc.__context__)
                reason = "internal error while reading the upstream's response"
            else:
                reason = f"invalid response from upstream: {exc}"
            sink = self.sink
            if sink is not None:
                self.sink = None
                sink.on_upstream_error(self, reason)
            else:
                self.close()  # bytes after a complete response: out of sync
            return
        sink = self.sink
        if sink is not None:
            if not self.in_body and self.head_size > self.head_limit:
                # Still in the head, and more of it than the limit (llhttp
                # would keep buffering it): the upstream is cut off.
                self.keep_alive = False
                self.sink = None
                sink.on_upstream_error(self, self._too_large())
                return
            sink.flush_out()

    def _too_large(self) -> str:
        log.warning(
            "%s sent a response head larger than %d bytes; closing",
            self.pool.address,
            self.head_limit,
        )
        return f"the upstream's response head is larger than {self.head_limit} bytes"

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.clean_close = exc is None
        self.keep_alive = False
        self.pool.on_closed(self)
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.on_upstream_lost(self)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_resume_writing()

    # -- httptools callbacks ---------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # Forwardable lines are collected as they come, ready to be joined;
        # hop-by-hop headers (RFC 9110 7.6.1) and framing are noted, not kept.
        if self.in_body:
            return  # trailer fields of a chunked response: not forwarded
        name = name.lower()
        if name not in _NOT_FORWARDED:
            self.parts += (name, b": ", value, b"\r\n")
            if name == b"content-length":
                self.has_length = True
        elif name == b"transfer-encoding":
            if value != b"chunked" and value.strip().lower() != b"chunked":
                # A coding meshgate would not undo (gzip, chunked): re-chunked,
                # the client would get its bytes with nothing saying so.
                raise UnknownCoding
            self.chunked = True
        elif name == b"connection":
            tokens = connection_tokens(value)
            if b"close" in tokens:
                self.keep_alive = False
            # Never the framing: the client's is written from what was parsed.
            tokens = tokens - CONNECTION_IGNORED
            if tokens:
                self.drop = tokens if self.drop is None else self.drop | tokens

    def on_headers_complete(self) -> None:
        status = self.status = self.parser.get_status_code()
        self.in_body = True
        if 100 <= status < 200:
            # Interim responses (103 Early Hints, a 100 we did not ask for)
            # are not forwarded; llhttp reports them as complete messages.
            # (Per-message state is reset by the exchange that binds the
            # connection, and here after an interim one: no on_message_begin.)
            self.parts = [b""]
            self.has_length = self.chunked = self.in_body = False
            self.drop = None
            # The next head is counted afresh; what follows this one in the
            # same read was not counted per read.
            self.head_size = 0
            self.unmetered = True
            return
        if self.head_size > self.head_limit or self.unmetered:
            # The reads held more than the limit (body bytes may be among
            # them), or followed an interim head: count the lines exactly.
            self.unmetered = False
            size = 0
            for part in self.parts:
                size += len(part)
            if size > self.head_limit:
                self.keep_alive = False
                raise HeadTooLarge
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        sink = self.sink
        if sink is None:
            # A second response in the same read as a complete one: the
            # upstream is out of step with the requests it was sent.
            self.keep_alive = False
            raise UnexpectedResponse
        sink.on_upstream_head(self)
        if self.no_body and self.sink is not None:
            # A response to HEAD has no body whatever its Content-Length says.
            # llhttp can't be told so through httptools, so this parser is
            # retired and the next response gets a fresh one.
            self.parser = httptools.HttpResponseParser(self)
            self._finish()

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and not self.no_body:
            sink.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 or self.no_body:
            return
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.on_upstream_end(self)

    def _finish(self) -> None:
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.on_upstream_end(self)

    # -- used by the exchange ------------------------------------------------

    def bind(self, sink: ResponseSink, *, no_body: bool) -> None:
        """Take the next request's response for `sink` (per-message state is
        reset here: httptools has no on_message_begin callback)."""
        self.sink = sink
        self.no_body = no_body
        self.close_delimited = False
        self.bytes_in = 0
        self.parts = [b""]
        self.has_length = self.chunked = self.in_body = False
        self.drop = None
        self.head_size = 0

    def close(self) -> None:
        """Close gracefully (buffered request bytes are still flushed)."""
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.flush_writes()
            self.transport.close()

    def abort(self) -> None:
        """Reset now: the peer must never see a complete request."""
        self.keep_alive = False
        self.sink = None
        self.wbuf = []
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UnexpectedResponse(Exception):
    """Response bytes arrived with no request waiting for them."""


class UnknownCoding(Exception):
    """A response's Transfer-Encoding is other than `chunked` alone."""


class HeadTooLarge(Exception):
    """A response head's header lines add up to more than the limit."""


class PoolTimeout(Exception):
    """No connection became free within the acquire timeout."""


class EndpointPool:
    """Connections to one endpoint: at most `max_connections` open, up to
    `max_idle` of them kept alive between requests."""

    __slots__ = (
        "address",
        "batcher",
        "connect_timeout",
        "connecting",
        "head_limit",
        "host",
        "identity",
        "idle",
        "idle_timeout",
        "loop",
        "max_connections",
        "max_idle",
        "open_count",
        "port",
        "retired",
        "tls",
        "waiters",
    )

    def __init__(
        self,
        *,
        host: str,
        port: int,
        max_connections: int,
        max_idle: int,
        idle_timeout: float,
        connect_timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
        batcher: WriteBatcher | None = None,
        identity: str | None = None,
        tls: IdentityContexts | None = None,
        head_limit: int = DEFAULT_HEAD_LIMIT,
    ) -> None:
        self.host = host
        self.head_limit = head_limit
        """The largest response head its connections take, in bytes."""
        self.port = port
        self.identity = identity
        """The SPIFFE ID the endpoint must present (mutual TLS), or None
        for plain TCP."""
        self.tls = tls
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.loop = loop or asyncio.get_event_loop()
        self.batcher = batcher or WriteBatcher(self.loop)
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        self.open_count = 0
        self.connecting = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.retired = False

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used live idle connection, or None."""
        idle = self.idle
        if not idle:
            return None
        expire_before = self.loop.time() - self.idle_timeout
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or not conn.keep_alive or transport is None or transport.is_closing():
                continue
            if conn.idle_since < expire_before:
                # The rest are older still.
                conn.close()
                self.close_idle()
                return None
            conn.reused = True
            return conn
        return None

    def has_capacity(self) -> bool:
        """Room for one more connection, and few enough being opened: past
        MAX_CONNECTING, a request waits for one of them (or for a pooled
        one), so that a burst on a cold pool does not open a connection (a
        TLS handshake, in the mesh) per request."""
        return self.open_count < self.max_connections and self.connecting < MAX_CONNECTING

    def full(self) -> bool:
        return self.open_count >= self.max_connections

    async def connect(self) -> UpstreamConnection:
        """Open a new connection (the caller checked `has_capacity`)."""
        self.open_count += 1
        self.connecting += 1
        made: list[UpstreamConnection] = []

        def factory() -> UpstreamConnection:
            conn = UpstreamConnection(self)
            made.append(conn)
            return conn

        try:
            if self.identity is None:
                connecting = self.loop.create_connection(factory, self.host, self.port)
            else:
                if self.tls is None or not self.tls.ready:
                    raise PeerIdentityError(
                        f"{self.address} is in the mesh ({self.identity}), "
                        "and this proxy has no mesh certificate"
                    )
                connecting = self.loop.create_connection(
                    factory,
                    self.host,
                    self.port,
                    ssl=self.tls.client(),
                    server_hostname="",
                    ssl_handshake_timeout=self.connect_timeout,
                )
            _, conn = await asyncio.wait_for(connecting, self.connect_timeout)
            if self.identity is not None:
                assert conn.transport is not None
                presented = peer_spiffe_id(conn.transport)
                if presented != self.identity:
                    # The chain verified, but it is another service's
                    # certificate: a spoofed (or misrouted) endpoint.
                    conn.abort()
                    log.warning(
                        "%s presented %s, expected %s: refused",
                        self.address,
                        presented or "no SPIFFE ID",
                        self.identity,
                    )
                    raise PeerIdentityError(
                        f"{self.address} presented {presented or 'no SPIFFE ID'}, "
                        f"not {self.identity}"
                    )
        except BaseException:
            # A connection that got its transport is counted off by its own
            # connection_lost (on_closed); only one that never did is undone here.
            if not made or made[0].transport is None:
                self.open_count -= 1
                self._wake_one()
            raise
        finally:
            self.connecting -= 1
            if self.waiters:
                self._wake_one()  # a connect slot is free
        return conn

    async def wait_for_capacity(self, timeout: float) -> None:
        """Wait until a connection is released or closed; PoolTimeout past `timeout`."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PoolTimeout from None
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)

    def _wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose exchange is over."""
        if (
            conn.keep_alive
            and not conn.closed
            and not self.retired
            and len(self.idle) < self.max_idle
            and conn.transport is not None
            and not conn.transport.is_closing()
        ):
            conn.idle_since = self.loop.time()
            self.idle.append(conn)
            if self.waiters:
                self._wake_one()
        else:
            conn.close()  # on_closed wakes a waiter

    def on_closed(self, conn: UpstreamConnection) -> None:
        self.open_count -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._wake_one()

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than `idle_timeout`."""
        expire_before = now - self.idle_timeout
        idle = self.idle
        while idle and idle[0].idle_since < expire_before:
            idle.popleft().close()

    def retire(self) -> None:
        """No new requests will come: close idle connections. Requests already
        waiting for a connection keep waiting here (as connections in use are
        released, they are closed and make room) rather than failing because
        a reload changed the pool's settings."""
        self.retired = True
        self.close_idle()

    def close_idle(self) -> None:
        """Close every idle connection (each leaves the deque in on_closed)."""
        idle = self.idle
        while idle:
            idle.popleft().close()

    def stats(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "open": self.open_count,
            "idle": len(self.idle),
            "connecting": self.connecting,
            "waiting": len(self.waiters),
        }
