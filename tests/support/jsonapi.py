"""`JsonApi`: a tiny real HTTP/1.1 server answering canned JSON, for tests of
routes that call several backends (`aggregate:`).

Like `support.upstream.UpstreamServer` it shares no code with meshgate and
runs its own event loop in a background thread, on 127.0.0.1:0, with
keep-alive; it is much simpler: each request's path (without the query) is
looked up in `routes`, `{"/orders/o-1": (200, {...})}`, or `routes` is a
callable given the `JsonRequest` that returns `(status, body)`. A body is
sent as JSON (`application/json`), unless it is a `Raw`, which is sent as is
with its own content type (a backend answering HTML). A path not in the
table gets 404 `{"error": "not found"}`.

`delays={"/customers/c-42": 1.5}` waits that many seconds before answering
that path (the request is recorded when its head arrives, before the wait).
Every request is recorded (`requests`): method, target, path, headers, the
body, and when it arrived (`time.monotonic()`, comparable with the test's).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Raw:
    """A body sent byte for byte, with this content type (None: no such header)."""

    body: bytes
    content_type: str | None = "text/plain"


@dataclass(frozen=True)
class JsonRequest:
    """One request as the server received it."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    """As received: original case and order, duplicates kept."""
    body: bytes
    received_at: float
    """`time.monotonic()` when the head had arrived."""
    conn_id: int

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def header_names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


Answer = tuple[int, Any]
Routes = Mapping[str, Answer] | Callable[[JsonRequest], Answer]


class JsonApi:
    """A canned-JSON HTTP/1.1 server on 127.0.0.1:0, on its own thread and loop."""

    def __init__(
        self,
        routes: Routes,
        *,
        name: str = "jsonapi",
        delays: Mapping[str, float] | None = None,
    ) -> None:
        self.routes = routes
        self.name = name
        self.delays = dict(delays or {})
        self._lock = threading.Lock()
        self._requests: list[JsonRequest] = []
        self._conn_count = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> JsonApi:
        self._thread = threading.Thread(target=self._run, name=f"jsonapi-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"json api {self.name} did not start")
        if self._error is not None:
            raise RuntimeError(f"json api {self.name} failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=128)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        """Close the listener and every connection (the port then refuses)."""
        loop = self._loop
        if loop is None or self._thread is None or loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> JsonApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read -----------------------------------------------------

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, as an endpoint in the proxy's config."""
        return f"127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[JsonRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def paths(self) -> list[str]:
        """The request targets received, in order."""
        return [r.target for r in self.requests]

    @property
    def connection_count(self) -> int:
        with self._lock:
            return self._conn_count

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[JsonRequest]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests
            if len(got) >= n:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"json api {self.name}: {len(got)} of {n} request(s) after {timeout}s: "
                    f"{[r.target for r in got]}"
                )
            time.sleep(0.01)

    # -- serving (on the server's loop) ---------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with self._lock:
            conn_id = self._conn_count
            self._conn_count += 1
        try:
            while await self._one(reader, writer, conn_id):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except (TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_id: int
    ) -> bool:
        """Serve one request; return whether the connection stays open."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT)
        except asyncio.IncompleteReadError:
            return False
        if len(head) > _MAX_HEAD:
            return False
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            await self._write(writer, "HEAD", 400, {"error": "bad request line"}, close=True)
            return False
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip(" \t")))
        lowered = {k.lower(): v for k, v in headers}
        if "transfer-encoding" in lowered:
            await self._write(writer, method, 501, {"error": "no chunked bodies here"}, close=True)
            return False
        length = int(lowered.get("content-length", "0") or "0")
        received_at = time.monotonic()
        body = await reader.readexactly(length) if length else b""
        req = JsonRequest(method, target, tuple(headers), body, received_at, conn_id)
        with self._lock:
            self._requests.append(req)
        delay = self.delays.get(req.path)
        if delay:
            await asyncio.sleep(delay)
        if callable(self.routes):
            status, doc = self.routes(req)
        else:
            status, doc = self.routes.get(req.path, (404, {"error": "not found"}))
        close = "close" in lowered.get("connection", "").lower() or version == "HTTP/1.0"
        await self._write(writer, method, status, doc, close=close)
        return not close

    async def _write(
        self, writer: asyncio.StreamWriter, method: str, status: int, doc: Any, *, close: bool
    ) -> None:
        if isinstance(doc, Raw):
            body, ctype = doc.body, doc.content_type
        else:
            body, ctype = json.dumps(doc).encode(), "application/json"
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
        if ctype is not None:
            head.append(f"Content-Type: {ctype}")
        head.append(f"X-Served-By: {self.name}")
        if close:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if method != "HEAD" and status not in (204, 304):
            data += body
        writer.write(data)
        await writer.drain()
