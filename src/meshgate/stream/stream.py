"""A request's stream: its route, its filters, then its exchange.

`ProxyStream` is what a listener's `ServerState.streams` makes for every
request head a connection parses (a `protocol.api.StreamFactory`). It owns
the request's filter manager, as Envoy's `ActiveStream` does:

- `on_request_head` routes the head (the route cache, then the router),
  builds the upstream request target, and runs the route's filter chain:
  request hooks in order, each going on, answering (`LocalReply`), or
  waiting (a coroutine: the chain resumes in a task, `await_filters`);
- a local reply is one call (`reply_local`), answered in its turn;
- what the filters decided for the response (header lines, the transform's
  status and header edits, headers the route owns) is the response phase,
  applied to the upstream's head in reverse order of the request hooks by
  the exchange (`ProxyExchange.on_upstream_head`).

The upstream half (tries, bodies, the response, timeouts) is
`exchange.ProxyExchange`, its base class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from time import monotonic
from typing import TYPE_CHECKING, Any

import httptools

from meshgate.filters import FilterRequest, LocalReply
from meshgate.handlers import BufferedRequest, Handler, HandlerResponse
from meshgate.http.headers import REQUEST_OWN, REQUEST_WRITTEN
from meshgate.http.paths import normalize_path
from meshgate.observability.tracecontext import TRACE_HEADERS
from meshgate.protocol.api import PAUSE_BUFFER, PAUSE_DONE, Framing, RequestHead
from meshgate.stream.exchange import ProxyExchange
from meshgate.stream.heads import (
    COLON_SP,
    CRLF,
    REQUEST_TAIL,
    REQUEST_TAIL_NO_HOST,
    VIA_TOKEN,
    forward_pairs,
    header_pairs,
    whole_response,
)

if TYPE_CHECKING:
    from meshgate.engine.runtime import RouteTarget
    from meshgate.upstream.cluster import Cluster

__all__ = ["ProxyStream"]

log = logging.getLogger("meshgate.proxy")

# Routing decisions remembered per runtime, by (method, Host, request target),
# as Kong's router cache does; cleared when full. Off when a route matches on
# headers (the key would not capture them).
ROUTE_CACHE_SIZE = 4096
ROUTE_CACHE_MAX_TARGET = 256  # longer targets (or Hosts) are routed every time

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
# Host header value -> lowercase host without port; bounded, cleared when full.
_HOSTS: dict[bytes, str] = {}


def _split_host(value: bytes) -> str:
    """The lowercase host of a Host header value, without its port."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0]


def _unsent_body(expect: bytes | None, complete: bool) -> bool:
    """A refused request whose client waits for `100 Continue` before sending
    its body: close after the answer, rather than wait for a body that may
    or may not come (as Go's server does)."""
    return expect == b"100-continue" and not complete


class _Head:
    """What `ProxyStream.set_target` needs from a request head, kept while
    the route's filters wait (the connection moves on to the next head)."""

    __slots__ = (
        "chunked_in",
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
        chunked_in: bool,
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
        self.chunked_in = chunked_in
        self.length = length
        self.has_length = has_length
        self.expect = expect
        self.xff = xff
        self.via = via

    def apply(self, ex: ProxyStream, req: FilterRequest) -> None:
        """Build the upstream request head with what the filters decided."""
        ex.consumer = req.consumer
        headers = self.headers
        drop: frozenset[bytes] | set[bytes] | None = self.drop
        if req.drop:
            drop = req.drop if drop is None else req.drop | drop
        if drop is not None:
            headers = [h for h in headers if h[0] not in drop]
        added = req.add
        if req.response_extra:
            ex.response_extra = req.response_extra
        phase = ex.response_phase = req.response_edits
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
                    + [h for h in added if h[0].lower() not in REQUEST_WRITTEN]
                    + ex.trace_pairs(),
                    forward=ex.forward_pairs(self.host, self.xff, self.via),
                    body=b"",
                    client=req.client,
                    request_id=ex.request_id,
                    params=req.params,
                    consumer=req.consumer,
                    claims=req.claims,
                    response_edits=phase,
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
            self,
            headers,
            added,
            None,
            self.host,
        )


_UNAVAILABLE = LocalReply(
    503, "filter-unavailable", "the gateway could not finish checking this request"
)
_FAILED = LocalReply(500, "filter-error", "the gateway failed to process this request")


class ProxyStream(ProxyExchange):
    """One request: routed, filtered, then proxied (or answered locally)."""

    # -- the request head: routing and the request hooks ---------------------------

    def on_request_head(self, parsed: RequestHead) -> None:
        """Resolve the route and the upstream request target, or a local
        reply, and run the route's filters (request hooks, in order)."""
        tracing = self.proto.state.tracing
        if tracing is not None:
            tracing.begin(self, parsed)
        if parsed.host_count > 1:
            self.reply_local(400, "bad-host", "more than one Host header", close=True)
            return
        url = parsed.url
        host = self.authority = parsed.host
        # A captured connection routes by where it was going, not by Host.
        by = host if parsed.route_host is None else parsed.route_host
        runtime = self.proto.state.runtime
        cache = runtime.route_cache
        if (
            cache is not None
            and host is not None
            and by is not None
            and len(by) <= ROUTE_CACHE_MAX_TARGET
        ):
            hit = cache.get((self.method, by, url))
            if hit is not None:
                if parsed.expect is not None and parsed.expect != b"100-continue":
                    self.reply_local(
                        417, "expectation-failed", "only 'Expect: 100-continue' is supported"
                    )
                    return
                self._set_target(parsed, hit[0], hit[1], host, hit[2])
                return
        if url[:1] == b"/":
            path_b, _, query_b = url.partition(b"?")
        elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            try:
                absolute = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self.reply_local(
                    400, "bad-target", "the request target is not a valid URL", close=True
                )
                return
            host = self.authority = absolute.host + (
                b":%d" % absolute.port if absolute.port else b""
            )
            path_b = absolute.path or b"/"
            query_b = absolute.query or b""
        elif url == b"*" and self.method == b"OPTIONS":
            self.reply_local(
                200, "", "", extra=((b"allow", b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),)
            )
            return
        else:
            self.reply_local(
                400, "bad-target", "the request target must be a path or a URL", close=True
            )
            return
        if host is None:
            if not self.http10:
                self.reply_local(
                    400, "missing-host", "HTTP/1.1 requests must carry a Host header", close=True
                )
                return
            host = b""
        raw_path = path_b.decode("latin-1")
        path = normalize_path(raw_path)
        if path is None:
            self.reply_local(400, "bad-path", "the request path is not valid", close=True)
            return
        method = _METHODS.get(self.method) or self.method.decode("latin-1")
        by = host if parsed.route_host is None else parsed.route_host
        host_s = _HOSTS.get(by)
        if host_s is None:
            host_s = _split_host(by)
            if len(_HOSTS) >= 1024:
                _HOSTS.clear()
            _HOSTS[by] = host_s
        match = runtime.router.match(method, host_s, path, parsed.headers)
        if match is None:
            self.reply_local(404, "no-route", f"no route for {method} {path}")
            return
        if parsed.expect is not None and parsed.expect != b"100-continue":
            self.reply_local(417, "expectation-failed", "only 'Expect: 100-continue' is supported")
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
            cache[(self.method, by, url)] = (rt, target, match.params)
        self._set_target(parsed, rt, target, host, match.params)

    def _set_target(
        self,
        parsed: RequestHead,
        rt: RouteTarget,
        target: bytes,
        host: bytes,
        params: dict[str, str],
    ) -> None:
        drop = parsed.drop
        identity = rt.drop
        if identity is not None:
            drop = identity if drop is None else drop | identity
            for name, _ in parsed.headers:
                # `X_Consumer`, `x-user_id`: CGI-style servers (WSGI, PHP)
                # read these as the identity headers themselves.
                if b"_" in name and name.replace(b"_", b"-") in identity:
                    drop = drop | {name}
        trace = self.trace
        if trace is not None:
            trace.route = rt
        if parsed.trace_headers is not None and (trace is not None or self.trace_head):
            # meshgate writes the trace context each try sends (`_attach`).
            drop = TRACE_HEADERS if drop is None else drop | TRACE_HEADERS
        self.route_retry = rt.retry
        self.route_path = rt.path
        self.budget = parsed.budget
        self.grpc = parsed.grpc
        self.route_total = rt.total_timeout
        self.route_read = rt.read_timeout
        chain = rt.chain
        handler = rt.handler
        if rt.max_body and handler is None and self._over_limit(parsed, rt):
            return
        if chain is None and handler is None:
            splitter = rt.splitter
            self.set_target(
                rt.cluster
                if splitter is None
                else splitter.pick(parsed.headers, parsed.client, None, None),
                rt.label,
                target,
                parsed,
                parsed.headers,
                None,
                drop,
                host,
            )
            return
        req = FilterRequest(
            self.method, target, parsed.headers, parsed.client, params, self.request_id
        )
        req.peer = parsed.peer
        if parsed.drop is not None:
            # Headers the client's Connection named are hop-by-hop, gone:
            # filters that rename or set headers must not revive them.
            req.drop.update(parsed.drop)
        self.route_label = rt.label
        if handler is not None:
            # The whole body is read (up to this) before the handler runs,
            # and must arrive by the route's (or its upstream's) total timeout.
            self.max_body = rt.max_body  # (the handler's, or the route's if smaller)
            self.deadline = self.loop.time() + (rt.total_timeout or rt.cluster.total_timeout)
            if parsed.has_length and int(parsed.length) > self.max_body:
                self._refuse_body(self.max_body)
                return
        head = _Head(
            rt,
            host,
            parsed.headers,
            drop,
            parsed.chunked_in,
            parsed.length,
            parsed.has_length,
            parsed.expect,
            parsed.xff,
            parsed.via,
        )
        try:
            result = chain.run(req) if chain is not None else None
        except Exception:
            log.exception("route %s: a filter failed", rt.label)
            self.reply_local(500, "filter-error", "the gateway failed to process this request")
            return
        if result is None:
            head.apply(self, req)
        elif isinstance(result, LocalReply):
            self.consumer = req.consumer  # (a rate limit's refusal knows who)
            self.reply_local(
                result.status,
                result.kind,
                result.detail,
                close=result.close or _unsent_body(parsed.expect, False),
                extra=result.headers + header_pairs(req.response_extra),
            )
        elif isinstance(result, asyncio.Future):
            # A decision another party settles (a Redis rate limit): no
            # task, its callback goes on.
            self.pending = result
            result.add_done_callback(lambda fut: self._filter_future_done(fut, head, req))
        else:
            self.pending = self.loop.create_task(self.await_filters(result, head, req))

    def _over_limit(self, parsed: RequestHead, rt: RouteTarget) -> bool:
        """A streamed route's `max_body`: a larger Content-Length is refused
        now; a chunked body is counted as it streams (`on_request_body`)."""
        if parsed.has_length:
            if int(parsed.length) > rt.max_body:
                self.route_label = rt.label
                self._refuse_body(rt.max_body)
                return True
        elif parsed.chunked_in:
            self.body_limit = rt.max_body
        return False

    def _stream_too_large(self) -> None:
        """A chunked body grew past the route's `max_body`: the bytes that
        crossed it never go upstream, whose request is reset (413 if the
        answer has not begun, else the client's connection is reset too)."""
        limit = self.body_limit
        self.body_limit = 0
        self.body_buf = []
        self.proto.pause_reading(PAUSE_DONE)
        self.abort_request(
            413, "body-too-large", f"the request body is larger than this route's {limit} bytes"
        )

    def _refuse_body(self, limit: int) -> None:
        # Refused before a byte of it is read (and before any `100 Continue`
        # invites it).
        self.reply_local(
            413,
            "body-too-large",
            f"the request body is larger than this route's {limit} bytes",
            close=True,
        )
        self.proto.pause_reading(PAUSE_DONE)

    # -- set-up of the exchange ---------------------------------------------------

    def set_target(
        self,
        cluster: Cluster,
        label: str,
        target: bytes,
        head: Framing,
        headers: list[tuple[bytes, bytes]],
        added: list[tuple[bytes, bytes]] | None,
        drop: frozenset[bytes] | None,
        host: bytes,
    ) -> None:
        """The upstream request: its cluster, target and head (the client's
        `headers` but those in `drop`, plus what the filters `added`), framed
        as `head` says the body comes. Positional: this is the hot path."""
        self.cluster = cluster
        self.route_label = label
        self.target = target
        chunked = self.chunked_in = head.chunked_in
        length = head.length
        body = self.has_body = chunked or head.has_length
        self.expect_continue = head.expect == b"100-continue" and body and not self.http10
        xff = head.xff
        via = head.via
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
            (REQUEST_TAIL if host else REQUEST_TAIL_NO_HOST)
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
            reply = _UNAVAILABLE
        except Exception:
            log.exception("route %s: a filter failed", head.rt.label)
            reply = _FAILED
        finally:
            self.pending = None
        self._filters_decided(reply, head, req)

    def _filter_future_done(
        self, fut: asyncio.Future[LocalReply | None], head: _Head, req: FilterRequest
    ) -> None:
        """`await_filters` for a filter that answered with a future."""
        if self.pending is not fut:
            return  # dropped meanwhile (whoever cancelled it moved on)
        self.pending = None
        if fut.cancelled():
            reply: LocalReply | None = _UNAVAILABLE
        elif fut.exception() is not None:
            log.error("route %s: a filter failed", head.rt.label, exc_info=fut.exception())
            reply = _FAILED
        else:
            reply = fut.result()
        self._filters_decided(reply, head, req)

    def _filters_decided(self, reply: LocalReply | None, head: _Head, req: FilterRequest) -> None:
        if self.finished:
            return
        if self.local_reply is not None:
            pass  # decided meanwhile (a body past the route's max_body)
        elif reply is None:
            head.apply(self, req)
        else:
            self.consumer = req.consumer
            # Body bytes that arrived meanwhile are not going anywhere.
            self.body_buf = []
            self.body_buffered = 0
            self.reply_local(
                reply.status,
                reply.kind,
                reply.detail,
                close=reply.close or _unsent_body(head.expect, self.request_complete),
                extra=reply.headers + header_pairs(req.response_extra),
            )
            proto = self.proto
            if proto.pause_reasons & PAUSE_BUFFER:
                proto.resume_reading(PAUSE_BUFFER)
        if self.proto.is_head(self):
            self.start()

    # -- buffered routes (aggregation, body transforms) --------------------------

    def trace_pairs(self) -> list[tuple[bytes, bytes]]:
        """The trace context a buffered route's handler sends its calls: the
        server span's when sampled, the unsampled decision's, or none."""
        trace = self.trace
        if trace is not None:
            return trace.server_pairs()
        if self.trace_head:
            name, _, value = self.trace_head.rstrip().partition(b": ")
            return [(name, value)]
        return []

    def forward_pairs(
        self, host: bytes, xff: bytes | None, via: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        """What `set_target` adds to an upstream request, as header pairs."""
        proto = self.proto
        return forward_pairs(proto.client, proto.state.scheme, host, self.request_id, xff, via)

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
        if self.proto.is_head(self):
            self.start()

    def _run_handler(self) -> None:
        """The whole body is in: the handler answers, in a task."""
        req = self.buffered
        handler = self.handler
        assert req is not None and handler is not None
        req.body = b"".join(self.body_buf)
        self.body_buf = []
        self.body_buffered = 0
        now = self.started = self.loop.time()
        self.try_t0 = monotonic()  # the handler's time is the upstream part
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
        if self.proto.is_head(self):
            self.start()

    def _reply_whole(self, resp: HandlerResponse) -> None:
        """A handler's answer, framed as a whole response."""
        self.status = resp.status
        if self.proto.state.draining:
            self.keep_alive = False
        self.local_reply = whole_response(
            resp,
            method=self.method,
            request_id=self.request_id,
            keep_alive=self.keep_alive,
            http10=self.http10,
            response_extra=self.response_extra,
            response_drop=self.response_drop,
        )
