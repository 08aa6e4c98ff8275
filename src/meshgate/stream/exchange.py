"""The proxied exchange: one request and its response, streamed to an
upstream or answered by the gateway.

`ProxyExchange` is the upstream half of a request's stream (the stream,
`stream.ProxyStream`, routes it and runs its filters first). On the common
path a keep-alive connection is taken from the endpoint's pool and
everything runs in protocol callbacks, with no task or coroutine per
request; a task is made only to open a new upstream connection, to wait for
a full pool or to back off before a retry. What a try is (the breaker, the
pool, the retry decision, outlier detection) is `upstream.attempt`'s.

Bodies stream in both directions. Back-pressure is the transports' own:
when the upstream's write buffer fills, reading from the client pauses, and
when the client's write buffer fills, reading from the upstream pauses. The
client connection is reached only through its `protocol.api.StreamSink`.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import TYPE_CHECKING, Any

from meshgate.handlers import BufferedRequest, Handler
from meshgate.http.batch import FLUSH_AT
from meshgate.http.headers import IDEMPOTENT, status_line
from meshgate.protocol.api import PAUSE_BUFFER, PAUSE_DONE, PAUSE_UPSTREAM, StreamSink
from meshgate.stream.heads import (
    CHUNK_END,
    CONTINUE_100,
    CRLF,
    NO_BODY_STATUS,
    RESPONSE_TAIL,
    header_pairs,
    local_reply,
)
from meshgate.upstream.attempt import UpstreamAttempt, UpstreamFailure
from meshgate.upstream.pool import UpstreamConnection

if TYPE_CHECKING:
    from meshgate.filters import ResponseHook
    from meshgate.observability.tracing import Trace
    from meshgate.upstream.balancer import Endpoint
    from meshgate.upstream.cluster import Cluster
    from meshgate.upstream.retry import RetryPolicy

__all__ = ["BUFFER_LIMIT", "REPLAY_LIMIT", "ProxyExchange"]

log = logging.getLogger("meshgate.proxy")

# Request body bytes held while no upstream connection is ready (or while a
# pipelined request waits its turn) before reading from the client pauses.
BUFFER_LIMIT = 64 * 1024
# Body bytes kept to replay a request when a reused connection proves stale.
REPLAY_LIMIT = 64 * 1024


class ProxyExchange(UpstreamAttempt):
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
    pending: asyncio.Future[Any] | None = None  # filters waiting (a task or a future)
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
    # The response phase: the filters' response hooks as one (run in reverse
    # order of the request hooks that registered them), or None.
    response_phase: ResponseHook | None = None
    response_drop: frozenset[bytes] | None = None  # upstream headers the route owns
    max_body = 0  # a buffered route: the largest body read (0: streamed)
    body_limit = 0  # a streamed chunked body: the route's max_body (0: none)
    body_seen = 0
    handler: Handler | None = None
    buffered: BufferedRequest | None = None
    response_started = False
    head_sent = False  # part of the upstream's response was handed to the client
    chunked_out = False
    finished = False
    replay: list[bytes] | None = None
    sent_body = 0
    # Where a streamed body's batched bytes go to the transport at once
    # (`http.batch.FLUSH_AT`): the request's, by `sent_body`, and the
    # response's, by the upstream connection's `bytes_in`.
    send_next = FLUSH_AT
    recv_next = FLUSH_AT
    stale_retried = False
    status = 0
    started = 0.0
    deadline = 0.0
    last_activity = 0.0
    # What the observers (`observability`) read once the exchange ends.
    kind = ""  # the problem type of a local answer ("" for the upstream's own)
    consumer: str | None = None  # who the route's auth found the client was
    authority: bytes | None = None  # the request's Host (or absolute-form authority)
    route_path = ""  # the matched route's configured path pattern
    last_ep: Endpoint | None = None  # the endpoint of the latest try
    bytes_out = 0  # response bytes from the upstream (a local answer's: its length)
    trace: Trace | None = None  # this request's spans, when it is sampled
    try_t0 = 0.0  # when the current try began (`t_start`'s clock)
    trace_head = b""  # not sampled: the traceparent every try sends (or none)

    def __init__(
        self,
        proto: StreamSink,
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
        # The request's clock for what it reports (metrics, logs, spans):
        # the monotonic clock itself, as the loop's time is that of the
        # start of the current loop turn, in whole milliseconds.
        self.t_start = monotonic()

    # -- set-up: the stream (`stream.ProxyStream`) fills in the rest ------------

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
        self.kind = kind
        self.local_reply = local_reply(
            status,
            kind,
            detail,
            keep_alive=self.keep_alive,
            method=self.method,
            request_id=self.request_id,
            extra=extra,
        )

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
        try:
            ep = self._begin(now, total)
        except UpstreamFailure as refused:
            self._reply_overloaded(refused)
            return
        self.started = self.last_activity = now
        self.read_limit = self.route_read or cluster.read_timeout
        # `self._go(ep)`, inlined: this is the hot path.
        self.try_started = now
        self.try_t0 = monotonic()
        conn = ep.pool.take_idle()
        if conn is not None:
            self._attach(ep, conn, now)
        else:
            self.task = self.loop.create_task(self._connect(ep))

    def _go(self, ep: Endpoint) -> None:
        """Send this try to `ep`: on an idle pooled connection, or a new one."""
        self.try_started = self.loop.time()
        self.try_t0 = monotonic()
        conn = ep.pool.take_idle()
        if conn is not None:
            self._attach(ep, conn, self.try_started)
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
        trace = self.trace
        if trace is not None:
            trace.try_failed(self, cause, failed, delay is not None)
        if delay is None:
            return None
        if self.replay is not None:
            self.body_buf = self.replay + self.body_buf
        self.replay = None
        self.sent_body = 0
        self.send_next = FLUSH_AT
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
                self._attach(ep, got, self.loop.time())
        elif isinstance(got, UpstreamFailure):
            if self.refused:
                self._reply_overloaded(got)
            else:
                self.fail(got.status, got.kind, got.detail)
        else:
            self.task = self.loop.create_task(self._retry(got))

    def _attach(self, ep: Endpoint, conn: UpstreamConnection, now: float) -> None:
        left = self._bind(ep, conn, now)
        transport = conn.transport
        assert transport is not None
        head = self.head
        if not head:
            parts = self.head_parts
            assert parts is not None
            parts[4] = b"host: " + ep.authority + CRLF
            head = b"".join(parts)
        # What is left of this request's deadline goes to the next hop, and
        # the trace context (a sampled try's own, or the unsampled decision).
        trace = self.trace
        context = self.trace_head if trace is None else trace.inject(self)
        if self.grpc:
            head = head[:-2] + b"%sx-meshgate-deadline: %d\r\ngrpc-timeout: %dm\r\n\r\n" % (
                context,
                left,
                left,
            )
        else:
            head = head[:-2] + b"%sx-meshgate-deadline: %d\r\n\r\n" % (context, left)
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
        if self.body_limit:
            self.body_seen += len(data)
            if self.body_seen > self.body_limit:
                self._stream_too_large()
                return
        conn = self.conn
        if conn is not None and conn.transport is not None:
            if self.chunked_in:
                conn.writelines([b"%x\r\n" % len(data), data, CRLF])
            else:
                conn.write(data)
            sent = self.sent_body = self.sent_body + len(data)
            if self.replay is not None:
                if sent <= REPLAY_LIMIT:
                    self.replay.append(data)
                else:
                    self.replay = None
            self.last_activity = self.loop.time()
            if sent >= self.send_next:
                # A large body: to the transport now, whose flow control then
                # pauses reading from the client within this turn's reads.
                self.send_next = sent + FLUSH_AT
                conn.flush_writes()
        elif self.local_reply is None:
            self.body_buf.append(data)
            self.body_buffered += len(data)
            if self.max_body:
                if self.body_buffered > self.max_body:
                    self._body_too_large()
                elif self.body_buffered > BUFFER_LIMIT and not self.proto.is_head(self):
                    # Pipelined behind another request: read the rest when
                    # this one's turn comes (`start`), so that one connection
                    # never holds many whole bodies.
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
            extra=header_pairs(self.response_extra),
        )
        self.proto.pause_reading(PAUSE_DONE)
        self.local_reply_now()

    def _stream_too_large(self) -> None:
        """A chunked body grew past `body_limit` (`ProxyStream`)."""
        raise NotImplementedError

    def _run_handler(self) -> None:
        """The whole body is in: the route's handler answers (`ProxyStream`)."""
        raise NotImplementedError

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
        if not self.finished and self.proto.is_head(self):
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
        # The response phase, after the headers the route owns are gone and
        # before the framing and the lines every answer gets (`response_extra`).
        phase = self.response_phase
        if phase is not None:
            # The filters' status and header edits (the framing below keeps
            # to the upstream's status: a mapping never adds or drops a body).
            self.status = phase.status(status)
            parts[0] = status_line(self.status)
            parts = phase.apply_parts(parts)
        if conn.no_body or status in NO_BODY_STATUS:
            if status == 204 and conn.has_length:
                # RFC 9110 8.6: a 204 has no Content-Length. Forwarded, it
                # would have a client that believes it wait for a body that
                # is the next response (the upstream's bytes are dropped).
                kept = [parts[0]]
                for i in range(1, len(parts), 4):
                    if parts[i] != b"content-length":
                        kept += parts[i : i + 4]
                parts = kept
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
        # `heads.response_tail`, inlined: this is the hot path.
        if self.response_extra:
            parts.append(self.response_extra)
        parts.append(
            RESPONSE_TAIL
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
            proto = self.proto
            proto.writelines(out)
            conn = self.conn
            if conn is not None and conn.bytes_in >= self.recv_next:
                # A large body: to the client's transport now, not at the end
                # of the turn, so that its high-water mark pauses reading from
                # the upstream before libuv's next read in this turn.
                self.recv_next = conn.bytes_in + FLUSH_AT
                proto.flush_writes()

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
        # `self._end_try()`, inlined: this is the hot path.
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            ep.active -= 1
            balancer = ep.balancer
            if balancer.needs_latency:
                now = self.loop.time()
                balancer.observe(ep, now - self.try_started, now)
        if not self.request_complete:
            conn.keep_alive = False
        if proto.write_paused and conn.transport is not None:
            conn.transport.resume_reading()
        self.bytes_out = conn.bytes_in
        conn.pool.release(conn)
        self._leave_cluster()
        self.finished = True
        if proto.pause_reasons & PAUSE_UPSTREAM:
            proto.resume_reading(PAUSE_UPSTREAM)
        observe = proto.state.observe
        if observe is not None:
            observe(self)
        proto.stream_done(self)

    def on_upstream_error(self, conn: UpstreamConnection, reason: str) -> None:
        failed = self._broken(conn)
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
        fresh = self._stale(conn)
        if fresh is not None:
            # What was sent goes again, from `replay`, on a new connection.
            replay = self.replay
            assert replay is not None
            self.replay = None
            self.body_buf = replay + self.body_buf
            self.sent_body = 0
            self.send_next = FLUSH_AT
            self.task = self.loop.create_task(self._connect(fresh))
            return
        delay = self._reset_retry(conn_ep)
        if delay is not None:
            self.task = self.loop.create_task(self._retry(delay))
            return
        self.fail(
            502,
            "upstream-reset",
            f"{conn.pool.address} closed the connection before answering",
        )

    def _replayable(self) -> bool:
        return (
            self.replay is not None
            and (self.request_complete or not self.has_body)
            and (self.method in IDEMPOTENT or self.sent_body == 0)
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
        if not self.response_started:
            # nginx's 499: the client closed the connection before the answer.
            self.status = 499
            self.kind = "client-closed"
        observe = self.proto.state.observe
        if observe is not None:
            observe(self)

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
            self.kind = "upstream-timeout"
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
        self.bytes_out = len(reply)
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
        observe = proto.state.observe
        if observe is not None:
            observe(self)
        proto.stream_done(self)

    def _abort_client(self) -> None:
        """The answer broke after part of it reached the client: the client's
        connection is reset, so that a truncated response looks truncated."""
        self._leave_cluster()
        was_finished = self.finished
        self.finished = True
        self.keep_alive = False
        if not self.kind:
            self.kind = "upstream-reset"
        self.proto.abort()
        if not was_finished:
            observe = self.proto.state.observe
            if observe is not None:
                observe(self)
