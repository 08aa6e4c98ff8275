"""The admin listener: `/healthz`, `/readyz`, `/config` (and its generations,
`POST /config/rollback`), `/upstreams`, `/routes`, `/ratelimits`,
`/identity`, `/explain`, `/metrics`, and the dashboard under `/ui`
(`admin.gateway_ui`, its own access rules: those of the control plane's).

It is a separate listener, on loopback by default, so that probes and
operators never share a port (or a route table) with clients. Requests are
tiny and rare, so this protocol favours plainness over speed; answers go
out in the order the requests came, and a connection closes when its client
asks.

Access: with an admin token configured (its digest), every path but
`/healthz` and `/readyz` needs `Authorization: Bearer <token>` (401
otherwise). Without one the listener is on loopback, and a request naming
another host (`Host:`, a DNS rebinding) is refused. A request with `Origin:`
comes from a browser page and is refused, so that no web page can roll the
config back. Only `POST /config/rollback` changes anything; request bodies
are read and dropped, up to a small limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import httptools
import orjson

from meshgate import __version__
from meshgate.admin import views
from meshgate.admin.gateway_ui import EventStream, Reply, is_dashboard_path
from meshgate.admin.hooks import HOOKS
from meshgate.admin.views import AdminRequest
from meshgate.config.schema import is_loopback
from meshgate.http.headers import status_line
from meshgate.observability.exposition import render
from meshgate.observability.peers import gather

if TYPE_CHECKING:
    from meshgate.protocol.h1 import ServerState

log = logging.getLogger("meshgate.admin")

MAX_BODY = 64 * 1024
MAX_HEADERS = 64 * 1024
OPEN_PATHS = frozenset({b"/healthz", b"/readyz"})
_WANTED = frozenset({b"authorization", b"host", b"origin"})

Handler = Callable[["ServerState", AdminRequest], Any]
Answer = tuple[int, Any] | Reply | EventStream


def _no_token() -> str | None:
    return None


def bearer_matches(header: bytes | None, digest: str) -> bool:
    """Whether `Authorization: Bearer <token>` names the token whose digest
    (`sha256:<hex>`) is configured; compared in constant time."""
    scheme, _, token = (header or b"").strip().partition(b" ")
    got = "sha256:" + hashlib.sha256(token.strip()).hexdigest()
    ok = hmac.compare_digest(got.encode(), digest.encode())
    return ok and scheme.lower() == b"bearer" and bool(token.strip())


def _header_matches(header: str | None, digest: str) -> bool:
    return bearer_matches(header.encode("latin-1") if header is not None else None, digest)


def _loopback_host(value: bytes) -> bool:
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback(host)


class AdminProtocol(asyncio.Protocol):
    __slots__ = (
        "body_size",
        "closed",
        "head_size",
        "headers",
        "keep_alive",
        "last",
        "method",
        "parser",
        "state",
        "streaming",
        "token",
        "transport",
        "url",
    )

    def __init__(self, state: ServerState, token: Callable[[], str | None] = _no_token) -> None:
        self.state = state
        self.token = token
        """The admin token's digest in force now (None: none, loopback only)."""
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.method = b""
        self.keep_alive = True
        self.headers: dict[bytes, bytes] = {}
        self.head_size = 0
        self.body_size = 0
        self.last: asyncio.Task[None] | None = None
        """The newest answer still being made: the next one waits for it."""
        self.closed = asyncio.Event()
        self.streaming = False
        """An event stream is this connection's last answer: what the client
        sends after its request is read and dropped."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        if self.streaming:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # (An Upgrade or CONNECT request raises the latter, which is not
            # an HttpParserError: the admin API upgrades to nothing.)
            self._answer((400, {"error": "malformed request"}), close=True)
            if self.transport is not None:
                self.transport.pause_reading()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.head_size = 0
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 4096:
            raise ValueError("url too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEADERS:
            raise ValueError("headers too large")
        name = name.lower()
        if name in _WANTED:
            # A repeated one is refused below rather than picked from.
            self.headers[name] = value if name not in self.headers else b"\0"

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            # Upgrade or CONNECT: the admin API switches to nothing, and what
            # follows the head would not be HTTP (a 400, and the connection
            # closes).
            raise ValueError("upgrade")
        self.method = self.parser.get_method()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_BODY:
            raise ValueError("body too large")

    def on_message_complete(self) -> None:
        if self.streaming:
            return
        got = self._route()
        if isinstance(got, EventStream):
            self.streaming = True
        self._answer(got)

    def _query(self, raw_query: bytes) -> dict[str, list[str]] | None:
        try:
            return urllib.parse.parse_qs(
                raw_query.decode("latin-1"), keep_blank_values=True, max_num_fields=64
            )
        except ValueError:
            return None

    def _route(self) -> Answer | Awaitable[Answer]:
        raw_path, _, raw_query = self.url.partition(b"?")
        path = raw_path
        if len(path) > 1:
            path = path.rstrip(b"/")
        headers = self.headers
        if is_dashboard_path(raw_path):
            return self._dashboard(raw_path, raw_query)
        if path not in OPEN_PATHS:
            if b"origin" in headers:
                return 403, {"error": "the admin API does not answer requests from web pages"}
            digest = self.token()
            if digest is not None:
                if not bearer_matches(headers.get(b"authorization"), digest):
                    return 401, {"error": "this admin API needs its bearer token"}
            elif b"host" in headers and not _loopback_host(headers[b"host"]):
                return 403, {
                    "error": "the admin API without a token answers only loopback names "
                    "(127.0.0.1, [::1], localhost); set admin_token: to reach it by others"
                }
        entry = ROUTES.get(path)
        if entry is None:
            return 404, {"error": "not found", "paths": sorted(p.decode() for p in ROUTES)}
        methods, handler = entry
        if self.method not in methods:
            allow = sorted(m.decode() for m in methods)
            return 405, {"error": f"{path.decode()} answers {', '.join(allow)}", "allow": allow}
        query = self._query(raw_query)
        if query is None:
            return 400, {"error": "malformed query"}
        got: Answer | Awaitable[Answer] = handler(
            self.state, AdminRequest(self.method, path, query)
        )
        return got

    def _dashboard(self, raw_path: bytes, raw_query: bytes) -> Answer | Awaitable[Answer]:
        """`/ui...`: the dashboard's own rules (`gateway_ui`), the path as
        sent (a file name is looked up in an allow-list, never joined)."""
        board = HOOKS.dashboard
        if board is None:
            return 404, {"error": "not found"}
        query = self._query(raw_query)
        if query is None:
            return 400, {"error": "malformed query"}
        path = urllib.parse.unquote_to_bytes(raw_path)
        got: Answer | Awaitable[Answer] = board.handle(
            self.state, self.method, path, query, self.headers, self.token(), _header_matches
        )
        return got

    def _answer(self, got: Answer | Awaitable[Answer], *, close: bool = False) -> None:
        method = self.method
        keep_alive = self.keep_alive and not close
        if self.last is None and not inspect.isawaitable(got):
            self._send(got, method, keep_alive)
            return
        task = asyncio.get_running_loop().create_task(
            self._later(self.last, got, method, keep_alive)
        )
        self.last = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if self.last is task:
            self.last = None

    async def _later(
        self,
        before: asyncio.Task[None] | None,
        got: Answer | Awaitable[Answer],
        method: bytes,
        keep_alive: bool,
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
        try:
            answer = await got if inspect.isawaitable(got) else got
        except Exception:
            log.exception("admin request failed")
            answer = 500, {"error": "internal error"}
        self._send(answer, method, keep_alive)

    def _send(self, answer: Answer, method: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            if isinstance(answer, EventStream):
                answer.release()
            return
        if isinstance(answer, EventStream):
            task = asyncio.get_running_loop().create_task(self._stream(answer, transport))
            self.last = task
            task.add_done_callback(self._done)
            return
        if isinstance(answer, Reply):
            self._send_reply(answer, method, keep_alive, transport)
            return
        status, doc = answer
        if isinstance(doc, str):
            body = doc.encode()
            ctype = b"text/plain; version=0.0.4; charset=utf-8"
        else:
            body = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
            ctype = b"application/json"
        head = [
            status_line(status),
            b"content-type: " + ctype + b"\r\n",
            b"cache-control: no-store\r\n",
            b"content-length: %d\r\n" % len(body),
        ]
        if status == 401:
            head.append(b'www-authenticate: Bearer realm="meshgate-admin"\r\n')
        elif status == 405:
            allow = ", ".join(doc.get("allow", ())) if isinstance(doc, dict) else ""
            head.append(b"allow: " + allow.encode() + b"\r\n")
        head.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        transport.write(b"".join(head) + (b"" if method == b"HEAD" else body))
        if not keep_alive:
            transport.close()

    def _send_reply(
        self, reply: Reply, method: bytes, keep_alive: bool, transport: asyncio.Transport
    ) -> None:
        head = [
            status_line(reply.status),
            b"content-type: " + reply.content_type.encode("latin-1") + b"\r\n",
            b"content-length: %d\r\n" % len(reply.body),
            *(f"{k}: {v}\r\n".encode("latin-1") for k, v in reply.headers),
            b"\r\n" if keep_alive else b"connection: close\r\n\r\n",
        ]
        transport.write(b"".join(head) + (b"" if method == b"HEAD" else reply.body))
        if not keep_alive:
            transport.close()

    async def _stream(self, stream: EventStream, transport: asyncio.Transport) -> None:
        """An event stream: the head (no length: the body ends with the
        connection), the stream's events, then the connection closes."""
        try:
            head = [
                status_line(200),
                b"content-type: text/event-stream\r\n",
                b"cache-control: no-store\r\n",
                b"connection: close\r\n",
                *(f"{k}: {v}\r\n".encode("latin-1") for k, v in stream.headers),
                b"\r\n",
            ]
            transport.write(b"".join(head))
            await stream.run(transport, self.closed)
        except Exception:
            log.exception("dashboard event stream failed")
        finally:
            stream.release()
            transport.close()


def _healthz(state: ServerState, req: AdminRequest) -> Answer:
    return 200, {"status": "ok", "version": __version__}


def _readyz(state: ServerState, req: AdminRequest) -> Answer:
    if state.draining:
        return 503, {"status": "draining"}
    return 200, {"status": "ready", "config": state.runtime.source}


async def _metrics(state: ServerState, req: AdminRequest) -> Answer:
    """Every worker's samples, added up (`observability.peers`)."""
    return 200, render(await gather(state.hub))


def _upstreams(state: ServerState, req: AdminRequest) -> Answer:
    out: dict[str, Any] = {}
    now = state.loop.time()
    for name, cluster in state.runtime.clusters.items():
        health = cluster.health
        serving = set(map(id, cluster.balancer.endpoints))
        out[name] = {
            "balancer": cluster.config.balancer,
            "in_flight": cluster.active,
            "waiting_for_connection": cluster.pending,
            "overloaded": cluster.overloaded,
            "retried": cluster.retried,
            "retries_in_flight": cluster.retries_active,
            "retry_budget_exhausted": cluster.budget.exhausted,
            "health_check": (
                {"path": health.cfg.path, "interval_s": health.cfg.interval}
                if health is not None
                else None
            ),
            "endpoints": [
                {
                    **ep.pool.stats(),
                    "active": ep.active,
                    "ewma_ms": round(ep.ewma * 1000, 3),
                    "state": (
                        "ejected"
                        if ep.ejected_until
                        else "down"
                        if ep.health_down
                        else "unreachable"
                        if ep.unreachable
                        else "serving"
                    ),
                    # False only while it is out (when all are out, all serve).
                    "in_service": id(ep) in serving,
                    "ejected_for_s": round(max(ep.ejected_until - now, 0.0), 3),
                    "ejections": ep.ejections,
                    "consecutive_failures": ep.failures_5xx,
                    **(
                        health.report(ep, now)
                        if health is not None
                        else {"health": "unchecked", "last_check": None}
                    ),
                }
                for ep in cluster.endpoints
            ],
        }
    return 200, out


def _routes(state: ServerState, req: AdminRequest) -> Answer:
    """Every route in config order; a route with `split:` also shows its
    weights and how many requests each backend got from this worker since
    the config was loaded (the admin port is shared by every worker: each
    answer is one worker's, named by `worker`)."""
    out = []
    for route in sorted(state.runtime.router.routes, key=lambda r: r.index):
        rt = route.target
        doc: dict[str, Any] = {
            "route": rt.label,
            "path": route.config.path,
            "target": route.config.target_label(),
        }
        if rt.splitter is not None:
            doc["split"] = rt.splitter.stats()
        out.append(doc)
    return 200, {"worker": os.getpid(), "routes": out}


_READ = frozenset({b"GET", b"HEAD"})
_POST = frozenset({b"POST"})

ROUTES: dict[bytes, tuple[frozenset[bytes], Handler]] = {
    b"/healthz": (_READ, _healthz),
    b"/readyz": (_READ, _readyz),
    b"/config": (_READ, views.config_doc),
    b"/config/generations": (_READ, views.generations),
    b"/config/rollback": (_POST, views.rollback),
    b"/upstreams": (_READ, _upstreams),
    b"/routes": (_READ, _routes),
    b"/ratelimits": (_READ, views.ratelimits),
    b"/identity": (_READ, views.identity),
    b"/explain": (_READ, views.explain),
    b"/metrics": (_READ, _metrics),
}
