"""A buffered upstream client: one whole request to a cluster, one whole response back.

Request aggregation and body-transforming routes need the whole response
before they can answer, so they cannot stream through a request's stream
(`stream.exchange.ProxyExchange`). `send()` gives them the same upstream
layer the streaming proxy uses, the same tries (`upstream.attempt`), with
the same semantics:

- the cluster's balancer picks the endpoint; a retry goes to another one;
- a keep-alive connection is taken from the endpoint's pool, or a new one is
  opened (waiting for room when the pool is full, within `max_pending`);
- circuit breakers (`max_requests`, `max_pending`, `max_retries`), the retry
  policy and budget, outlier detection, 429/503 shunning and peak-EWMA
  latency are fed exactly as the exchange feeds them;
- the Host policy and `x-meshgate-deadline` (the milliseconds left) are sent
  as the exchange sends them;
- a pooled connection found closed by its peer is retried once, at once, on
  a fresh connection.

No task is made per call: the caller's coroutine awaits a future that the
connection's callbacks (the `ResponseSink` protocol) settle, and a
`loop.call_at` timer enforces the total, per-try and read-idle timeouts
while the request is on a connection. Waiting for a connection runs under
`asyncio.timeout_at`. Cancelling the caller resets the bound connection (the
upstream must not take a half-sent request as complete) and gives every
counter back.

A 5xx or 429 answer is returned as a `Response` unless the retry policy
retries it; what the gateway itself would answer with a problem (no
connection, a reset, a timeout, a malformed or too large response, a
circuit breaker) is raised as `UpstreamFailure`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshgate.http.headers import IDEMPOTENT
from meshgate.upstream.attempt import UpstreamAttempt, UpstreamFailure
from meshgate.upstream.pool import UpstreamConnection

if TYPE_CHECKING:
    from meshgate.upstream.balancer import Endpoint
    from meshgate.upstream.cluster import Cluster
    from meshgate.upstream.retry import RetryPolicy

__all__ = ["Response", "UpstreamFailure", "send"]

log = logging.getLogger("meshgate.upstream")

NO_BODY_STATUS = frozenset({204, 304})
# Methods sent without a Content-Length when their body is empty.
_BODYLESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
# Request headers this client writes itself; the caller's are dropped.
_OWN = frozenset({b"host", b"content-length", b"transfer-encoding", b"x-meshgate-deadline"})
# Bytes that never appear in a method, a request target or a Host.
_CTL_SP = bytes(range(0x21)) + b"\x7f"
CRLF = b"\r\n"
COLON_SP = b": "
DEFAULT_MAX_BODY = 8 * 1024 * 1024


class Response:
    """A whole upstream response. Header names are lower case; hop-by-hop
    headers (and those the upstream's Connection named) and framing
    (content-length, transfer-encoding) are not kept."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.headers)} headers {len(self.body)} bytes>"


class _Retry:
    """A try failed and is retried: after `delay`, on another endpoint than
    `failed`; or (`endpoint` set) at once on a fresh connection to it."""

    __slots__ = ("delay", "endpoint", "failed")

    def __init__(
        self, delay: float, failed: Endpoint | None, endpoint: Endpoint | None = None
    ) -> None:
        self.delay = delay
        self.failed = failed
        self.endpoint = endpoint


_Outcome = Response | UpstreamFailure | _Retry


async def send(
    cluster: Cluster,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    host: bytes,
    timeout: float,
    retry: RetryPolicy | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Response:
    """Send one request to `cluster` and return its whole response.

    `headers` are sent as given, except host, content-length,
    transfer-encoding and x-meshgate-deadline, which this client writes (the
    caller has removed hop-by-hop headers). `host` is sent when the cluster
    preserves the client's Host. `timeout` bounds the whole call, retries
    included; `retry` defaults to the cluster's policy. Raises
    `UpstreamFailure`, and `ValueError` for a head that cannot be sent (a
    control character in the method, target, Host or a header)."""
    call = _Call(cluster, method, target, headers, body, host, timeout, retry, max_body)
    return await call.run()


class _Call(UpstreamAttempt):
    """One `send()`: its tries (`UpstreamAttempt`), and the `ResponseSink` of
    the connection it is on."""

    __slots__ = (
        "attempt",
        "blame_total",
        "body",
        "chunks",
        "cluster",
        "conn",
        "deadline",
        "endpoint",
        "fut",
        "head_rest",
        "head_seen",
        "head_start",
        "host_line",
        "in_cluster",
        "last_activity",
        "last_ep",
        "loop",
        "max_body",
        "method",
        "policy",
        "read_limit",
        "refused",
        "resp_headers",
        "retry_counted",
        "size",
        "stale_retried",
        "status",
        "target",
        "timeout",
        "timer",
        "timer_when",
        "tried",
        "try_deadline",
        "try_started",
    )
    logger = log
    cluster: Cluster

    def __init__(
        self,
        cluster: Cluster,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        host: bytes,
        timeout: float,
        retry: RetryPolicy | None,
        max_body: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.cluster = cluster
        self.method = method
        self.target = target
        self.body = body
        self.timeout = timeout
        self.max_body = max_body
        self.policy = retry if retry is not None else cluster.retry
        # A deadline the caller chose shorter than the upstream's own total
        # says nothing about the endpoint (as a client's deadline in a stream).
        self.blame_total = timeout >= cluster.total_timeout
        self.read_limit = cluster.read_timeout
        self.deadline = 0.0
        self.try_deadline = 0.0
        self.try_started = 0.0
        self.last_activity = 0.0
        self.attempt = 1
        self.retry_counted = False
        self.in_cluster = False
        self.stale_retried = False
        self.tried: tuple[Endpoint, ...] = ()  # endpoints whose try failed, in order
        self.refused = False  # by a circuit breaker (logged once a second, not per call)
        self.conn: UpstreamConnection | None = None
        self.endpoint: Endpoint | None = None
        self.fut: asyncio.Future[_Outcome] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        # The response of the current try.
        self.status = 0
        self.head_seen = False
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self._build_head(headers, host)

    def _build_head(self, headers: Sequence[tuple[bytes, bytes]], host: bytes) -> None:
        """The head, built once: the request line, the Host line (None when
        it is the endpoint's, filled in per try), and the rest but the deadline."""
        method, target = self.method, self.target
        if (
            not method
            or not target
            or len(method.translate(None, _CTL_SP)) != len(method)
            or len(target.translate(None, _CTL_SP)) != len(target)
        ):
            raise ValueError(f"cannot send the request line {method!r} {target!r}")
        self.head_start = method + b" " + target + b" HTTP/1.1\r\n"
        hv = self.cluster.host_value
        if hv is None:
            if len(host.translate(None, _CTL_SP)) != len(host):
                raise ValueError(f"cannot send the Host {host!r}")
            self.host_line: bytes | None = b"host: " + host + CRLF
        elif hv:
            self.host_line = b"host: " + hv + CRLF
        else:
            self.host_line = None  # the endpoint's authority
        parts: list[bytes] = []
        lines = 0
        for name, value in headers:
            if name.lower() not in _OWN:
                parts += (name, COLON_SP, value, CRLF)
                lines += 1
        body = self.body
        if body or method not in _BODYLESS:
            parts.append(b"content-length: %d\r\n" % len(body))
            lines += 1
        rest = b"".join(parts)
        # One line per header: a CR, LF or NUL inside a name or value would
        # let it write headers (or a request) of its own.
        if rest.count(b"\n") != lines or rest.count(b"\r") != lines or b"\0" in rest:
            raise ValueError("a header name or value contains CR, LF or NUL")
        self.head_rest = rest

    # -- the call --------------------------------------------------------------------

    async def run(self) -> Response:
        first = self._begin(self.loop.time(), self.timeout)  # (raises a refusal)
        try:
            outcome = await self._tries(first)
        finally:
            # Also when the caller cancels: reset what is bound, count off.
            self._drop_upstream()
            self._leave_cluster()
        if isinstance(outcome, UpstreamFailure):
            if not self.refused:
                self._log_failure(outcome.status, outcome.detail)
            raise outcome
        return outcome

    async def _tries(self, ep: Endpoint) -> Response | UpstreamFailure:
        fresh = False
        while True:
            outcome = await self._try(ep, fresh)
            if not isinstance(outcome, _Retry):
                return outcome
            if outcome.endpoint is not None:
                # A stale pooled connection: at once, on a new connection.
                ep = outcome.endpoint
                fresh = True
                continue
            if outcome.delay > 0:
                await asyncio.sleep(outcome.delay)
            ep = self._next_try()
            fresh = False

    async def _try(self, ep: Endpoint, fresh: bool) -> _Outcome:
        """One try on `ep`: on an idle pooled connection, or a new one."""
        self.try_started = self.loop.time()
        conn = None if fresh else ep.pool.take_idle()
        if conn is None:
            got = await self._connect(ep)
            if not isinstance(got, UpstreamConnection):
                return got
            conn = got
        fut: asyncio.Future[_Outcome] = self.loop.create_future()
        self.fut = fut
        try:
            self._attach(ep, conn)
            self._arm()
            return await fut
        finally:
            self.fut = None
            timer = self.timer
            if timer is not None:
                self.timer = None
                timer.cancel()

    async def _connect(self, ep: Endpoint) -> UpstreamConnection | UpstreamFailure | _Retry:
        """A connection to `ep` (`_open`), bounded by the total and per-try
        deadlines."""
        end = self.deadline
        if self.try_deadline and self.try_deadline < end:
            end = self.try_deadline
        scope = asyncio.timeout_at(end)
        try:
            async with scope:
                got = await self._open(ep)
        except TimeoutError:
            if scope.expired():
                return self._timeout_connecting(ep, end)
            raise
        if isinstance(got, float):
            return _Retry(got, ep)
        return got

    def _timeout_connecting(self, ep: Endpoint, end: float) -> UpstreamFailure | _Retry:
        """The total or the per-try deadline passed before a connection was
        ready (nothing was sent; no endpoint is blamed)."""
        if end >= self.deadline:
            return UpstreamFailure(
                504,
                "upstream-timeout",
                f"the upstream exchange took longer than {self.timeout:g}s",
            )
        self.try_deadline = 0.0
        delay = self._retry_delay("timeout", ep, sent=False)
        if delay is not None:
            return _Retry(delay, ep)
        return UpstreamFailure(504, "upstream-timeout", self._per_try_detail())

    def _attach(self, ep: Endpoint, conn: UpstreamConnection) -> None:
        now = self.last_activity = self.loop.time()
        left = self._bind(ep, conn, now)
        self.status = 0
        self.head_seen = False
        self.resp_headers = []
        self.chunks = []
        self.size = 0
        host_line = self.host_line
        if host_line is None:
            host_line = b"host: " + ep.authority + CRLF
        head = b"".join(
            (
                self.head_start,
                host_line,
                self.head_rest,
                b"x-meshgate-deadline: %d\r\n\r\n" % left,
            )
        )
        if self.body:
            conn.writelines([head, self.body])
        else:
            conn.write(head)

    # -- ResponseSink (called by the connection) -------------------------------------

    def on_upstream_head(self, conn: UpstreamConnection) -> None:
        status = self.status = conn.status
        ep = self.endpoint
        delay = self._judge_head(conn, conn.drop)
        if delay is not None:
            # This answer is dropped: the connection goes, mid-response.
            self._drop_upstream()
            self._settle(_Retry(delay, ep))
            return
        # The forwardable lines the connection collected, framing left out.
        parts = conn.parts
        drop = conn.drop
        headers: list[tuple[bytes, bytes]] = []
        length: bytes | None = None
        for i in range(1, len(parts), 4):
            name = parts[i]
            if name == b"content-length":
                length = parts[i + 2]
            elif drop is None or name not in drop:
                headers.append((name, parts[i + 2]))
        self.head_seen = True
        self.last_activity = self.loop.time()
        self.resp_headers = headers
        if conn.no_body or status in NO_BODY_STATUS:
            return
        if length is not None:
            value = length.strip()
            if value.isdigit() and int(value) > self.max_body:
                self._too_large()
        elif not conn.chunked:
            # Neither length nor chunked: the body ends when the upstream
            # closes (RFC 9112 section 6.3, rule 8).
            conn.close_delimited = True
            conn.keep_alive = False

    def on_upstream_body(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.size += len(data)
        if self.size > self.max_body:
            self._too_large()
            return
        self.chunks.append(data)

    def flush_out(self) -> None:
        return None  # the body is kept until the end

    def on_upstream_end(self, conn: UpstreamConnection) -> None:
        self.conn = None
        self._end_try()
        transport = conn.transport
        if conn.wbuf or (transport is not None and transport.get_write_buffer_size()):
            # Answered before the request was all sent: the rest would be
            # taken as the next request.
            conn.keep_alive = False
        conn.pool.release(conn)
        self._settle(self._response())

    def on_upstream_error(self, conn: UpstreamConnection, reason: str) -> None:
        failed = self._broken(conn)
        delay = self._retry_delay("reset", failed, sent=True)
        if delay is not None:
            self._settle(_Retry(delay, failed))
        else:
            self._settle(UpstreamFailure(502, "upstream-bad-response", reason))

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        conn_ep = self.endpoint
        self._release_endpoint()
        if self.head_seen:
            if conn.close_delimited and conn.clean_close:
                self._settle(self._response())
            else:
                self._settle(
                    UpstreamFailure(
                        502,
                        "upstream-reset",
                        f"{conn.pool.address} closed the connection mid-response",
                    )
                )
            return
        fresh = self._stale(conn)
        if fresh is not None:
            self._settle(_Retry(0.0, None, fresh))
            return
        delay = self._reset_retry(conn_ep)
        if delay is not None:
            self._settle(_Retry(delay, conn_ep))
            return
        self._settle(
            UpstreamFailure(
                502,
                "upstream-reset",
                f"{conn.pool.address} closed the connection before answering",
            )
        )

    def _replayable(self) -> bool:
        return self.method in IDEMPOTENT or not self.body

    def on_upstream_pause_writing(self) -> None:
        return None  # the whole request is in the transport's buffer already

    def on_upstream_resume_writing(self) -> None:
        return None

    # -- timeouts --------------------------------------------------------------------

    def _arm(self) -> None:
        """Time the earliest of the deadlines that hold while on a connection."""
        when = self.deadline
        t = self.try_deadline
        if t and t < when and not self.head_seen:
            when = t
        idle = self.last_activity + self.read_limit
        if idle < when:
            when = idle
        self.timer_when = when
        self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        fut = self.fut
        if fut is None or fut.done():
            return
        # (A timer may run a hair before its time.)
        now = max(self.loop.time(), self.timer_when)
        if now >= self.deadline:
            self._timeout(
                f"the upstream exchange took longer than {self.timeout:g}s",
                blame=self.blame_total,
            )
        elif self.try_deadline and now >= self.try_deadline and not self.head_seen:
            self.try_deadline = 0.0
            self._gateway_failure()
            failed = self.endpoint
            self._drop_upstream()
            delay = self._retry_delay("timeout", failed, sent=True)
            if delay is not None:
                self._settle(_Retry(delay, failed))
            else:
                self._settle(UpstreamFailure(504, "upstream-timeout", self._per_try_detail()))
        elif self.conn is not None and now - self.last_activity >= self.read_limit:
            self._timeout(f"the upstream was silent for {self.read_limit:g}s")
        else:
            self._arm()

    def _timeout(self, detail: str, *, blame: bool = True) -> None:
        if blame and not self.head_seen:
            # Only the gateway's own timeouts, before the answer began.
            self._gateway_failure()
        self._drop_upstream()
        self._settle(UpstreamFailure(504, "upstream-timeout", detail))

    # -- endings ---------------------------------------------------------------------

    def _settle(self, outcome: _Outcome) -> None:
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def _response(self) -> Response:
        chunks = self.chunks
        body = b"" if not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        return Response(self.status, self.resp_headers, body)

    def _too_large(self) -> None:
        conn = self.conn
        address = conn.pool.address if conn is not None else self.cluster.name
        self._drop_upstream()
        self._settle(
            UpstreamFailure(
                502,
                "upstream-body-too-large",
                f"the response of {address} is larger than {self.max_body} bytes",
            )
        )

    def _drop_upstream(self) -> None:
        """Reset the bound connection, if any: the upstream must not take a
        half-sent request as complete, nor this one read a dropped answer."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self._release_endpoint()
