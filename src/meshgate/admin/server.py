"""The admin listener: `/healthz`, `/readyz`, `/config`, `/upstreams`, `/routes`, `/metrics`.

It is a separate listener on loopback so that probes and operators never
share a port (or a route table) with clients. Requests are tiny and rare, so
this protocol favours plainness over speed: one request per read, answered
and closed when the client asks for it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import httptools
import orjson

from meshgate import __version__
from meshgate.config.schema import redact_url
from meshgate.http.headers import status_line
from meshgate.observability.exposition import render
from meshgate.observability.peers import gather

if TYPE_CHECKING:
    from meshgate.protocol.h1 import ServerState

log = logging.getLogger("meshgate.admin")


class AdminProtocol(asyncio.Protocol):
    __slots__ = ("keep_alive", "method", "parser", "pending", "state", "transport", "url")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.method = b""
        self.keep_alive = True
        self.pending: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, {"error": "malformed request"}, close=True)

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 4096:
            raise ValueError("url too long")

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        path = self.url.partition(b"?")[0]
        if self.method not in (b"GET", b"HEAD"):
            self._send(405, {"error": "method not allowed"})
            return
        handler = ROUTES.get(path)
        if handler is None:
            self._send(404, {"error": "not found", "paths": sorted(p.decode() for p in ROUTES)})
            return
        got = handler(self.state)
        if inspect.isawaitable(got):
            self.pending = asyncio.get_running_loop().create_task(self._later(got))
            return
        status, doc = got
        self._send(status, doc)

    async def _later(self, got: Awaitable[tuple[int, Any]]) -> None:
        try:
            status, doc = await got
        except Exception:
            log.exception("admin request failed")
            status, doc = 500, {"error": "internal error"}
        self.pending = None
        self._send(status, doc)

    def _send(self, status: int, doc: Any, *, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if isinstance(doc, str):
            body = doc.encode()
            ctype = b"text/plain; version=0.0.4; charset=utf-8"
        else:
            body = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
            ctype = b"application/json"
        close = close or not self.keep_alive
        head = [
            status_line(status),
            b"content-type: " + ctype + b"\r\n",
            b"cache-control: no-store\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n" if close else b"\r\n",
        ]
        transport.write(b"".join(head) + (b"" if self.method == b"HEAD" else body))
        if close:
            transport.close()


def _healthz(state: ServerState) -> tuple[int, Any]:
    return 200, {"status": "ok", "version": __version__}


def _readyz(state: ServerState) -> tuple[int, Any]:
    if state.draining:
        return 503, {"status": "draining"}
    return 200, {"status": "ready", "config": state.runtime.source}


_SECRET_FIELDS = frozenset({"secret", "password"})


def _redact(doc: Any) -> Any:
    """The config without its secrets: HMAC secrets, and the credentials and
    query of every URL (Redis, JWKS)."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k in _SECRET_FIELDS and v is not None:
                out[k] = "<redacted>"
            elif k.endswith("url") and isinstance(v, str):
                out[k] = redact_url(v)
            else:
                out[k] = _redact(v)
        return out
    if isinstance(doc, list):
        return [_redact(v) for v in doc]
    return doc


def _config(state: ServerState) -> tuple[int, Any]:
    return 200, _redact(state.runtime.config.model_dump(mode="json"))


async def _metrics(state: ServerState) -> tuple[int, Any]:
    """Every worker's samples, added up (`observability.peers`)."""
    return 200, render(await gather())


def _upstreams(state: ServerState) -> tuple[int, Any]:
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


def _routes(state: ServerState) -> tuple[int, Any]:
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


ROUTES: dict[bytes, Callable[[ServerState], Any]] = {
    b"/healthz": _healthz,
    b"/readyz": _readyz,
    b"/config": _config,
    b"/upstreams": _upstreams,
    b"/routes": _routes,
    b"/metrics": _metrics,
}
