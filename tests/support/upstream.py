"""A real HTTP/1.1 upstream server for integration tests.

It is written on plain asyncio streams and shares no code with meshgate on
purpose: it is the independent witness of what the proxy really sends. It runs
its own event loop in a background thread, listens on 127.0.0.1:0 and records

- every request (method, target, headers in their order and case, the body,
  and whether the body arrived complete) as a `RecordedRequest`, visible from
  the moment its head arrived, its body growing as it streams in;
- every raw byte received, per connection, as a `ConnectionRecord`, so that a
  test can prove that the upstream received nothing at all.

The behaviour is chosen per request by the `x-test-behavior` header, or else
by the first path segment that names one (`/download?size=10`, also behind a
route prefix: `/svc/download`), with parameters in the query:

    echo (default)  200 with a JSON document of what was received (`echo_doc`).
    fixed           200 with FIXED_BODY and a content-length.
    download        size=N mode=length|chunked|close: N bytes of `pattern_bytes`,
                    generated on the fly, never held in memory whole.
    slow            headers_delay=S, then chunks=N chunks of chunk_size=B bytes,
                    chunk_delay=S apart (chunked); "slow\\n" when chunks=0.
    close           reads the whole request, closes without answering.
    close-reused    like `close` on a connection's second and later requests,
                    `echo` on its first: a keep-alive connection gone stale.
    answer-close    `echo`, then closes without saying `connection: close`.
    truncate        size=N mode=length|chunked: promises N bytes, sends half, closes.
    status          /status/<code> or code=N; no body for 204 and 304 (cl=N puts
                    a content-length on a 304, which still has no body);
                    retry_after=S adds a Retry-After.
    hop             `echo` plus hop-by-hop response headers a proxy must drop.
    headers         `echo` plus the response headers in add=Name:Value|Name:Value.
    bad-response    kind=garbage|dup-cl|cl-te|bad-chunk: a malformed response,
                    then closes.
    expect-reject   417 without reading the body, then closes (echo when the
                    request carries no `expect: 100-continue`).

A request with `expect: 100-continue` gets `100 Continue` before its body is
read (except `expect-reject`). HEAD gets the head a GET would get, no body.
Malformed framing from the proxy is answered 400 and recorded as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

FIXED_BODY = b"fixed response body\n"
BEHAVIOURS = frozenset(
    {
        "echo",
        "fixed",
        "download",
        "slow",
        "close",
        "close-reused",
        "answer-close",
        "truncate",
        "status",
        "hop",
        "headers",
        "expect-reject",
        "bad-response",
    }
)
# What `bad-response` sends, by kind; the connection is closed after each.
BAD_RESPONSES = {
    "garbage": b"THIS IS NOT HTTP\r\n\r\n",
    "dup-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
}
# Hop-by-hop headers that the `hop` behaviour sends and a proxy must drop.
HOP_RESPONSE_HEADERS = (
    ("Connection", "X-Resp-Hop"),
    ("X-Resp-Hop", "secret"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Connection", "keep-alive"),
    ("X-Resp-End", "kept"),
)

_MAX_HEAD = 1024 * 1024
_HEAD_TIMEOUT = 30.0  # once a head has started, the rest must come within this
_BODY_TIMEOUT = 60.0  # longest silence inside a body
_RAW_CAP = 1024 * 1024  # raw bytes kept per connection (all are counted)
_BODY_CAP = 64 * 1024 * 1024  # body bytes kept per request (all are hashed)

# ---------------------------------------------------------------------------
# The download pattern: deterministic, never periodic across 64 KiB blocks
# (each block starts with its index), so reordered or repeated blocks show up.

_BLOCK = 64 * 1024
_BASE = random.Random(20240611).randbytes(_BLOCK)


def _pattern_block(index: int) -> bytes:
    return index.to_bytes(8, "big") + _BASE[8:]


def pattern_bytes(offset: int, length: int) -> bytes:
    """`length` bytes of the pattern stream starting at `offset`."""
    out = bytearray()
    while length > 0:
        index, pos = divmod(offset, _BLOCK)
        piece = _pattern_block(index)[pos : pos + length]
        out += piece
        offset += len(piece)
        length -= len(piece)
    return bytes(out)


def iter_pattern(size: int) -> Iterator[bytes]:
    """The first `size` bytes of the pattern, in blocks of at most 64 KiB."""
    index = 0
    while size > 0:
        block = _pattern_block(index)
        yield block[:size]
        size -= len(block)
        index += 1


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for block in iter_pattern(size):
        digest.update(block)
    return digest.hexdigest()


def write_pattern_file(path: Any, size: int) -> str:
    """Write the first `size` pattern bytes to `path`; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for block in iter_pattern(size):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Records


def _header_all(headers: tuple[tuple[str, str], ...], name: str) -> list[str]:
    lname = name.lower()
    return [v for k, v in headers if k.lower() == lname]


@dataclass(frozen=True)
class RecordedRequest:
    """A snapshot of one request as the upstream received it."""

    upstream: str
    conn_id: int
    seq: int
    """Index of this request on its connection (0 for the first)."""
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    """As received: original case and order, duplicates kept."""
    raw_head: bytes
    framing: str
    """How the body was delimited: `none`, `length` or `chunked`."""
    body: bytes
    """The body received so far (at most 64 MiB are kept; all is hashed)."""
    body_len: int
    body_sha256: str
    body_complete: bool
    """True only if the body arrived whole and well framed."""
    finished: bool
    """Reading the body has ended, complete or not."""
    error: str | None
    """`eof`, `reset`, `timeout`, `bad-chunk: ...` or `bad-framing: ...`."""
    trailers: tuple[tuple[str, str], ...]
    sent_continue: bool
    behaviour: str
    response_status: int | None
    response_body_sent: int
    """Response body bytes written and drained so far."""
    response_complete: bool
    received_at: float

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return _header_all(self.headers, name)

    def header_names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}


@dataclass(frozen=True)
class ConnectionRecord:
    """A snapshot of one accepted connection."""

    conn_id: int
    peer: tuple[str, int]
    raw: bytes
    """The first 1 MiB received on this connection (since the last clear)."""
    bytes_received: int
    requests: int
    closed: bool
    opened_at: float


class _LiveRequest:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)
        self.body = bytearray()
        self.body_len = 0
        self.sha = hashlib.sha256()
        self.body_complete = False
        self.finished = False
        self.error: str | None = None
        self.trailers: list[tuple[str, str]] = []
        self.sent_continue = False
        self.response_status: int | None = None
        self.response_body_sent = 0
        self.response_complete = False
        self.received_at = time.monotonic()

    def header_all(self, name: str) -> list[str]:
        return _header_all(self.headers, name)

    def snapshot(self) -> RecordedRequest:
        return RecordedRequest(
            upstream=self.upstream,
            conn_id=self.conn_id,
            seq=self.seq,
            method=self.method,
            target=self.target,
            version=self.version,
            headers=self.headers,
            raw_head=self.raw_head,
            framing=self.framing,
            body=bytes(self.body),
            body_len=self.body_len,
            body_sha256=self.sha.hexdigest(),
            body_complete=self.body_complete,
            finished=self.finished,
            error=self.error,
            trailers=tuple(self.trailers),
            sent_continue=self.sent_continue,
            behaviour=self.behaviour,
            response_status=self.response_status,
            response_body_sent=self.response_body_sent,
            response_complete=self.response_complete,
            received_at=self.received_at,
        )


class _LiveConnection:
    def __init__(self, conn_id: int, peer: tuple[str, int]) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.raw = bytearray()
        self.bytes_received = 0
        self.requests = 0
        self.closed = False
        self.opened_at = time.monotonic()
        self.writer: asyncio.StreamWriter | None = None

    def snapshot(self) -> ConnectionRecord:
        return ConnectionRecord(
            conn_id=self.conn_id,
            peer=self.peer,
            raw=bytes(self.raw),
            bytes_received=self.bytes_received,
            requests=self.requests,
            closed=self.closed,
            opened_at=self.opened_at,
        )


# ---------------------------------------------------------------------------
# Wire helpers


class _Eof(Exception):
    """The peer closed (or reset) the connection."""

    def __init__(self, reason: str = "eof") -> None:
        super().__init__(reason)
        self.reason = reason


class _BadInput(Exception):
    """The peer sent something this server refuses (recorded as the error)."""


class _Stream:
    """A buffered reader over a StreamReader that records every raw byte."""

    def __init__(
        self, reader: asyncio.StreamReader, conn: _LiveConnection, server: UpstreamServer
    ) -> None:
        self.reader = reader
        self.conn = conn
        self.server = server
        self.buf = bytearray()

    async def fill(self, timeout: float | None) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            raise _Eof("timeout") from None
        except (ConnectionResetError, BrokenPipeError):
            raise _Eof("reset") from None
        if not data:
            raise _Eof("eof")
        with self.server._cond:
            self.conn.bytes_received += len(data)
            room = _RAW_CAP - len(self.conn.raw)
            if room > 0:
                self.conn.raw += data[:room]
            self.server._cond.notify_all()
        self.buf += data

    async def read_head(self, idle_timeout: float | None) -> bytes:
        while True:
            # A server ignores empty lines before a request line (RFC 9112 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _BadInput("bad-framing: head larger than 1 MiB")
            await self.fill(idle_timeout if not self.buf else _HEAD_TIMEOUT)

    async def read_some(self, limit: int) -> bytes:
        if not self.buf:
            await self.fill(_BODY_TIMEOUT)
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill(_BODY_TIMEOUT)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self, limit: int = 8192) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > limit:
                raise _BadInput("bad-chunk: line too long")
            await self.fill(_BODY_TIMEOUT)


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadInput(f"bad-framing: request line {lines[0][:100]!r}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        line = raw.decode("latin-1")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise _BadInput(f"bad-framing: header line {line[:100]!r}")
        headers.append((name, value.strip(" \t")))
    return method, target, version, headers


def _tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _framing(headers: tuple[tuple[str, str], ...]) -> tuple[str, int]:
    te = _header_all(headers, "transfer-encoding")
    cl = _header_all(headers, "content-length")
    if te:
        codings = _tokens(te)
        if cl:
            raise _BadInput("bad-framing: both content-length and transfer-encoding")
        if codings != ["chunked"]:
            raise _BadInput(f"bad-framing: transfer-encoding {codings}")
        return "chunked", 0
    if cl:
        values = set(_tokens(cl))
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise _BadInput(f"bad-framing: content-length {cl}")
        return "length", int(next(iter(values)))
    return "none", 0


# ---------------------------------------------------------------------------
# The server


class UpstreamServer:
    """A recording HTTP/1.1 server on 127.0.0.1:0, on its own thread and loop.

    `idle_timeout` closes a keep-alive connection that stays idle that long
    between requests, the way real servers do, without warning the client.
    """

    def __init__(
        self, name: str = "upstream", *, idle_timeout: float | None = None, port: int = 0
    ) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.forced: tuple[str, dict[str, str]] | None = None
        """(behaviour, params) for every request, whatever it asks; None = as asked."""
        self._cond = threading.Condition()
        self._requests: list[_LiveRequest] = []
        self._conns: list[_LiveConnection] = []
        self._next_conn_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.port = port
        """0 until started on an ephemeral port; a given one is bound as it is
        (a stopped endpoint restarted on its own port)."""

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> UpstreamServer:
        self._thread = threading.Thread(target=self._run, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"upstream {self.name} did not start")
        if self._start_error is not None:
            raise RuntimeError(f"upstream {self.name} failed to start") from self._start_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._handle, "127.0.0.1", self.port, backlog=1024, reuse_address=True
                )
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
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
        with self._cond:
            writers = [c.writer for c in self._conns if c.writer is not None]
        for w in writers:
            w.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read -----------------------------------------------------

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, as an endpoint in the proxy's config."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return [r.snapshot() for r in self._requests]

    @property
    def connections(self) -> list[ConnectionRecord]:
        with self._cond:
            return [c.snapshot() for c in self._conns]

    @property
    def connection_count(self) -> int:
        with self._cond:
            return len(self._conns)

    @property
    def bytes_received(self) -> int:
        with self._cond:
            return sum(c.bytes_received for c in self._conns)

    def clear(self) -> None:
        """Forget what was recorded; open connections go on being recorded."""
        with self._cond:
            self._requests.clear()
            self._conns = [c for c in self._conns if not c.closed]
            for c in self._conns:
                c.raw.clear()
                c.bytes_received = 0
                c.requests = 0

    def wait_for(
        self,
        predicate: Callable[[UpstreamServer], bool],
        timeout: float = 10.0,
        what: str = "condition",
    ) -> None:
        """Wait until `predicate(self)` holds; fail the test after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # The predicate reads snapshots, which take the (reentrant) lock.
                if predicate(self):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(
            f"upstream {self.name}: timed out after {timeout}s waiting for {what}; "
            f"requests: {[(r.method, r.target, r.finished, r.error) for r in self.requests]}"
        )

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[RecordedRequest]:
        self.wait_for(lambda s: len(s._requests) >= n, timeout, f"{n} request(s)")
        return self.requests

    def wait_finished(self, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until every recorded request's body reading has ended."""
        self.wait_for(lambda s: all(r.finished for r in s._requests), timeout, "bodies to finish")
        return self.requests

    # -- connection handling (runs on the upstream's loop) -------------------

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")[:2]
        with self._cond:
            conn = _LiveConnection(self._next_conn_id, peer)
            self._next_conn_id += 1
            conn.writer = writer
            self._conns.append(conn)
            self._cond.notify_all()
        stream = _Stream(reader, conn, self)
        seq = 0
        try:
            while True:
                head = await stream.read_head(self.idle_timeout)
                if not await self._exchange(stream, writer, conn, head, seq):
                    break
                seq += 1
        except (_Eof, _BadInput, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            with self._cond:
                conn.closed = True
                for rec in self._requests:
                    if rec.conn_id == conn.conn_id and not rec.finished:
                        rec.finished = True
                        rec.error = rec.error or "eof"
                self._cond.notify_all()
            writer.transport.abort()
            self._tasks.discard(task)

    async def _exchange(
        self,
        stream: _Stream,
        writer: asyncio.StreamWriter,
        conn: _LiveConnection,
        head: bytes,
        seq: int,
    ) -> bool:
        """Serve one request; return whether the connection stays open."""
        try:
            method, target, version, header_list = _parse_head(head)
        except _BadInput as exc:
            await _write_simple(writer, 400, str(exc).encode(), close=True)
            raise
        headers = tuple(header_list)
        qs = parse_qs(urlsplit(target).query)
        params = {k: v[0] for k, v in qs.items()}
        behaviour = _header_all(headers, "x-test-behavior")
        forced = self.forced
        if forced is not None:
            # This server answers every request this way (one bad endpoint
            # of several that get the same requests).
            name = forced[0]
            params = {**params, **forced[1]}
        elif behaviour:
            name = behaviour[0].strip().lower()
        else:
            segments = urlsplit(target).path.split("/")
            name = next((seg for seg in segments if seg in BEHAVIOURS), "echo")
        try:
            framing, length = _framing(headers)
            framing_error = None
        except _BadInput as exc:
            framing, length, framing_error = "none", 0, str(exc)
        rec = _LiveRequest(
            upstream=self.name,
            conn_id=conn.conn_id,
            seq=seq,
            method=method,
            target=target,
            version=version,
            headers=headers,
            raw_head=head,
            framing=framing,
            behaviour=name,
            params=params,
        )
        with self._cond:
            self._requests.append(rec)
            conn.requests += 1
            self._cond.notify_all()
        out = _Responder(self, writer, rec)
        if framing_error is not None:
            self._finish_body(rec, framing_error)
            await out.simple(400, framing_error.encode(), close=True)
            return False

        expects = "100-continue" in _tokens(rec.header_all("expect"))
        if expects and name == "expect-reject":
            self._finish_body(rec, "eof")
            await out.simple(417, b"expectation refused\n", close=True)
            return False
        if expects and version == "HTTP/1.1":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            rec.sent_continue = True

        try:
            await self._read_body(stream, rec, framing, length)
        except _BadInput as exc:
            self._finish_body(rec, str(exc))
            await out.simple(400, str(exc).encode(), close=True)
            return False
        except _Eof as exc:
            self._finish_body(rec, exc.reason)
            raise

        handler = getattr(self, "_b_" + name.replace("-", "_"), None)
        if handler is None:
            await out.simple(400, f"unknown behaviour {name}\n".encode(), close=True)
            return False
        keep: bool = await handler(out, rec, seq)
        with self._cond:
            rec.response_complete = True
            self._cond.notify_all()
        return keep

    def _finish_body(self, rec: _LiveRequest, error: str | None) -> None:
        with self._cond:
            rec.finished = True
            rec.error = error
            rec.body_complete = error is None
            self._cond.notify_all()

    def _add_body(self, rec: _LiveRequest, data: bytes) -> None:
        with self._cond:
            rec.body_len += len(data)
            rec.sha.update(data)
            room = _BODY_CAP - len(rec.body)
            if room > 0:
                rec.body += data[:room]
            self._cond.notify_all()

    async def _read_body(self, stream: _Stream, rec: _LiveRequest, framing: str, n: int) -> None:
        if framing == "length":
            while n > 0:
                data = await stream.read_some(min(n, 65536))
                self._add_body(rec, data)
                n -= len(data)
        elif framing == "chunked":
            while True:
                line = await stream.read_line()
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise _BadInput(f"bad-chunk: size line {line[:60]!r}")
                size = int(size_text, 16)
                if size == 0:
                    while True:
                        trailer = await stream.read_line()
                        if not trailer:
                            break
                        k, _, v = trailer.decode("latin-1").partition(":")
                        rec.trailers.append((k, v.strip()))
                    break
                while size > 0:
                    data = await stream.read_some(min(size, 65536))
                    self._add_body(rec, data)
                    size -= len(data)
                if await stream.read_exact(2) != b"\r\n":
                    raise _BadInput("bad-chunk: no CRLF after chunk data")
        self._finish_body(rec, None)

    # -- behaviours: each returns whether the connection stays open ----------

    async def _b_echo(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        body = json.dumps(echo_doc(rec.snapshot())).encode()
        return await out.simple(200, body, content_type="application/json")

    async def _b_fixed(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        return await out.simple(200, FIXED_BODY)

    async def _b_hop(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        body = json.dumps(echo_doc(rec.snapshot())).encode()
        return await out.simple(
            200, body, content_type="application/json", extra=list(HOP_RESPONSE_HEADERS)
        )

    async def _b_headers(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        extra = []
        for item in rec.params.get("add", "").split("|"):
            name, sep, value = item.partition(":")
            if sep:
                extra.append((name.strip(), value.strip()))
        body = json.dumps(echo_doc(rec.snapshot())).encode()
        return await out.simple(200, body, content_type="application/json", extra=extra)

    async def _b_expect_reject(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        # Reached only without an expectation (a proxy may answer 100 itself
        # and not forward `expect`): then there is nothing to reject.
        return await self._b_echo(out, rec, seq)

    async def _b_bad_response(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        out.writer.write(BAD_RESPONSES[rec.params.get("kind", "garbage")])
        await out.writer.drain()
        return False

    async def _b_answer_close(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        body = json.dumps(echo_doc(rec.snapshot())).encode()
        await out.simple(200, body, content_type="application/json")
        return False

    async def _b_close(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        return False

    async def _b_close_reused(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        if seq > 0:
            return False
        return await self._b_echo(out, rec, seq)

    async def _b_status(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        parts = urlsplit(rec.target).path.strip("/").split("/")
        code = int(rec.params.get("code") or (parts[1] if len(parts) > 1 else 200))
        if code in (204, 304):
            extra = []
            if code == 304 and "cl" in rec.params:
                extra.append(("Content-Length", rec.params["cl"]))
            if code == 304:
                extra.append(("ETag", '"v1"'))
            await out.start(code, extra)
            return out.keep_alive
        extra = []
        if "retry_after" in rec.params:
            extra.append(("Retry-After", rec.params["retry_after"]))
        return await out.simple(code, f"status {code}\n".encode(), extra=extra)

    async def _b_download(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        size = int(rec.params.get("size", "1048576"))
        mode = rec.params.get("mode", "length")
        if mode == "length":
            await out.start(200, [("Content-Length", str(size))], content_type="octet")
            if out.no_body:
                return out.keep_alive
            for block in iter_pattern(size):
                await out.send(block)
            return out.keep_alive
        if mode == "chunked":
            await out.start(200, [("Transfer-Encoding", "chunked")], content_type="octet")
            if out.no_body:
                return out.keep_alive
            for block in iter_pattern(size):
                await out.send_chunk(block)
            await out.end_chunks()
            return out.keep_alive
        # close-delimited: no framing header, the end of the body is the close
        await out.start(200, [], content_type="octet", close=True)
        for block in iter_pattern(size):
            await out.send(block)
        return False

    async def _b_truncate(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        size = int(rec.params.get("size", "100000"))
        half = pattern_bytes(0, size // 2)
        if rec.params.get("mode", "length") == "chunked":
            await out.start(200, [("Transfer-Encoding", "chunked")], content_type="octet")
            await out.send_chunk(half)
        else:
            await out.start(200, [("Content-Length", str(size))], content_type="octet")
            await out.send(half)
        return False

    async def _b_slow(self, out: _Responder, rec: _LiveRequest, seq: int) -> bool:
        await asyncio.sleep(float(rec.params.get("headers_delay", "0")))
        chunks = int(rec.params.get("chunks", "0"))
        if chunks == 0:
            return await out.simple(200, b"slow\n")
        size = int(rec.params.get("chunk_size", "16"))
        delay = float(rec.params.get("chunk_delay", "0.1"))
        await out.start(200, [("Transfer-Encoding", "chunked")], content_type="octet")
        for i in range(chunks):
            if i:
                await asyncio.sleep(delay)
            await out.send_chunk(b"x" * size)
        await out.end_chunks()
        return out.keep_alive


def echo_doc(rec: RecordedRequest) -> dict[str, Any]:
    """What the `echo` behaviour answers: the request as received."""
    text = None
    if rec.body_len <= 65536:
        with contextlib.suppress(UnicodeDecodeError):
            text = rec.body.decode()
    return {
        "upstream": rec.upstream,
        "conn_id": rec.conn_id,
        "seq": rec.seq,
        "method": rec.method,
        "target": rec.target,
        "path": rec.path,
        "version": rec.version,
        "headers": [list(h) for h in rec.headers],
        "framing": rec.framing,
        "body_len": rec.body_len,
        "body_sha256": rec.body_sha256,
        "body": text,
        "body_complete": rec.body_complete,
        "trailers": [list(t) for t in rec.trailers],
        "sent_continue": rec.sent_continue,
    }


def _wants_close(rec: _LiveRequest) -> bool:
    tokens = _tokens(rec.header_all("connection"))
    if rec.version == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


def _status_line(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


async def _write_simple(
    writer: asyncio.StreamWriter, status: int, body: bytes, close: bool
) -> None:
    head = _status_line(status) + f"Content-Length: {len(body)}\r\n".encode()
    if close:
        head += b"Connection: close\r\n"
    writer.write(head + b"\r\n" + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


class _Responder:
    """Writes one response; skips the body for HEAD, 204 and 304."""

    def __init__(self, server: UpstreamServer, writer: asyncio.StreamWriter, rec: _LiveRequest):
        self.server = server
        self.writer = writer
        self.rec = rec
        self.keep_alive = not _wants_close(rec)
        self.no_body = rec.method == "HEAD"

    async def start(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        content_type: str | None = None,
        close: bool = False,
    ) -> None:
        if status in (204, 304):
            self.no_body = True
        if close:
            self.keep_alive = False
        rec = self.rec
        lines = [
            ("X-Upstream", self.server.name),
            ("X-Conn-Id", str(rec.conn_id)),
            ("X-Seq", str(rec.seq)),
            ("X-Target", rec.target),
        ]
        if content_type == "octet":
            lines.append(("Content-Type", "application/octet-stream"))
        elif content_type:
            lines.append(("Content-Type", content_type))
        connection = [v for k, v in headers if k.lower() == "connection"]
        headers = [(k, v) for k, v in headers if k.lower() != "connection"]
        if not self.keep_alive and not close:
            connection.insert(0, "close")
        elif self.keep_alive and rec.version == "HTTP/1.0":
            connection.insert(0, "keep-alive")
        if close and not connection:
            connection.append("close")
        if connection:
            lines.append(("Connection", ", ".join(connection)))
        lines += headers
        head = _status_line(status) + b"".join(f"{k}: {v}\r\n".encode() for k, v in lines)
        with self.server._cond:
            rec.response_status = status
        self.writer.write(head + b"\r\n")
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        if self.no_body or not data:
            return
        self.writer.write(data)
        await self.writer.drain()
        with self.server._cond:
            self.rec.response_body_sent += len(data)

    async def send_chunk(self, data: bytes) -> None:
        if self.no_body or not data:
            return
        self.writer.write(b"%x\r\n" % len(data) + data + b"\r\n")
        await self.writer.drain()
        with self.server._cond:
            self.rec.response_body_sent += len(data)

    async def end_chunks(self) -> None:
        if self.no_body:
            return
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def simple(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain",
        extra: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> bool:
        """A whole response with a content-length; returns keep-alive."""
        if close:
            self.keep_alive = False
        headers = [("Content-Length", str(len(body))), *(extra or [])]
        await self.start(status, headers, content_type=content_type)
        await self.send(body)
        return self.keep_alive
