"""HTTP/1.1 for the control plane's API, both sides, on asyncio streams.

The control API is not a hot path: a few requests per proxy per certificate
lifetime, and one long-lived stream per proxy. So it is written plainly on
`asyncio` streams and httptools, with whole JSON bodies, except for the
stream: `POST /v1/stream` has a chunked request body that never ends and a
chunked response that never ends, each chunk one JSON document followed by a
newline (the proxy's hello, ACKs, NACKs and heartbeats one way; snapshots the
other), as xDS's bidirectional stream does over HTTP/2.

The peer's identity is read once per connection from the TLS session (the
SPIFFE URI SAN of a certificate the handshake verified against the bundle).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools
import orjson

from meshgate.tls.identity import peer_spiffe_id

__all__ = [
    "ApiError",
    "ClientConnection",
    "Request",
    "Response",
    "control_addresses",
    "control_identity",
    "peer_spiffe_id",
    "serve_connection",
]

MAX_BODY = 1 << 20  # a CSR or a hello is a few KiB; a line on the stream likewise
MAX_HEAD = 16 * 1024


def control_addresses(text: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` (each may start with `https://`), as the
    sidecar, the agent and a gateway's `mesh.control` give the control plane."""
    out = []
    for part in text.split(","):
        part = part.strip().removeprefix("https://").rstrip("/")
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected host:port for the control plane, found {part!r}")
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    return out


def control_identity(trust_domain: str) -> str:
    """The SPIFFE ID the control plane serves with; proxies check it."""
    return f"spiffe://{trust_domain}/ns/meshgate/sa/control"


class ApiError(Exception):
    """A refusal, answered with its status and reason (and raised on the client)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, doc: Any) -> None:
        self.status = status
        self.body = orjson.dumps(doc)
        self.content_type = "application/json"
        self.headers: tuple[tuple[str, str], ...] = ()
        """More header fields (name, value)."""

    @classmethod
    def text(cls, status: int, text: str, content_type: str) -> Response:
        resp = cls(status, None)
        resp.body = text.encode()
        resp.content_type = content_type
        return resp


_PHRASES = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _head(status: int, extra: str, content_type: str = "application/json") -> bytes:
    phrase = _PHRASES.get(status, "Error")
    return f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {content_type}\r\n{extra}\r\n".encode()


class Request:
    """One request; `read()` is the whole body, `lines()` the body as a stream."""

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        identity: str | None,
        peer: Any,
        writer: asyncio.StreamWriter,
    ) -> None:
        split = urlsplit(target)
        self.method = method
        self.path = split.path
        self.query = {k: v[0] for k, v in parse_qs(split.query).items()}
        self.headers = headers
        self.identity = identity
        """The caller's SPIFFE ID (from its certificate), or None."""
        self.peer = peer
        """The peer's address, or (pid, uid, gid) on a unix socket."""
        self.writer = writer
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.size = 0
        self.streaming = False
        self.closed = asyncio.Event()
        """Set once the client's side of the connection ended."""

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            chunk = await self.chunks.get()
            if chunk is None:
                return b"".join(parts)
            parts.append(chunk)

    async def json(self) -> Any:
        body = await self.read()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "the body is not JSON") from None

    async def lines(self) -> AsyncIterator[Any]:
        """Each newline-ended JSON document of a streamed body."""
        buf = b""
        while True:
            chunk = await self.chunks.get()
            if chunk is None:
                return
            buf += chunk
            if len(buf) > MAX_BODY:
                raise ApiError(400, "a stream message is larger than 1 MiB")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    try:
                        yield orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise ApiError(400, "a stream message is not JSON") from None

    def start_stream(self) -> None:
        self.streaming = True
        self.writer.write(_head(200, "transfer-encoding: chunked\r\n"))

    def start_events(self, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with Server-Sent Events: a body that ends when the
        connection does (written as it is, not chunked)."""
        self.streaming = True
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers if k != "cache-control")
        self.writer.write(
            _head(
                200, f"cache-control: no-store\r\nconnection: close\r\n{extra}", "text/event-stream"
            )
        )

    def send_line(self, doc: Any) -> None:
        self.send_raw(orjson.dumps(doc) + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))


Handler = Callable[[Request], Awaitable[Response | None]]


class _Parser:
    """httptools callbacks, building `Request`s for one connection."""

    def __init__(self, writer: asyncio.StreamWriter, identity: str | None, peer: Any) -> None:
        self.writer = writer
        self.identity = identity
        self.peer = peer
        self.url = b""
        self.headers: dict[str, str] = {}
        self.head = 0
        self.parser = httptools.HttpRequestParser(self)
        self.ready: asyncio.Queue[Request | None] = asyncio.Queue()
        self.current: Request | None = None
        self.closed = asyncio.Event()
        """Set once the client's side of the connection ended."""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head += len(name) + len(value)
        if self.head > MAX_HEAD:
            raise ApiError(431, "the request head is too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        req = Request(
            self.parser.get_method().decode(),
            self.url.decode("latin-1"),
            self.headers,
            self.identity,
            self.peer,
            self.writer,
        )
        self.url, self.headers, self.head = b"", {}, 0
        req.closed = self.closed
        self.current = req
        self.ready.put_nowait(req)

    def on_body(self, body: bytes) -> None:
        req = self.current
        if req is not None:
            req.size += len(body)
            if req.size > MAX_BODY and not req.path.startswith("/v1/stream"):
                raise ApiError(413, "the request body is larger than 1 MiB")
            req.chunks.put_nowait(body)

    def on_message_complete(self) -> None:
        req = self.current
        if req is not None:
            req.chunks.put_nowait(None)
        self.current = None


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    *,
    peer: Any = None,
) -> None:
    """Serve requests on one connection, one at a time, until it closes."""
    transport = writer.transport
    identity = peer_spiffe_id(transport)
    if peer is None:
        peer = transport.get_extra_info("peername")
    p = _Parser(writer, identity, peer)

    async def feed() -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                p.parser.feed_data(data)
        except ApiError as exc:
            _refuse(writer, exc.status, exc.reason)
        except httptools.HttpParserUpgrade:
            _refuse(writer, 400, "the control API upgrades to nothing")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, ApiError):
                _refuse(writer, exc.__context__.status, exc.__context__.reason)
            else:
                _refuse(writer, 400, "malformed request")
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            req = p.current
            if req is not None:
                req.chunks.put_nowait(None)
            p.closed.set()
            p.ready.put_nowait(None)

    feeder = asyncio.get_running_loop().create_task(feed())
    try:
        while True:
            req = await p.ready.get()
            if req is None:
                break
            try:
                resp = await handler(req)
            except ApiError as exc:
                resp = Response(exc.status, {"error": exc.reason})
            if req.streaming:
                break
            if resp is None:
                resp = Response(500, {"error": "no answer"})
            extra = "".join(f"{k}: {v}\r\n" for k, v in resp.headers)
            writer.write(
                _head(
                    resp.status,
                    f"content-length: {len(resp.body)}\r\n{extra}",
                    resp.content_type,
                )
                + resp.body
            )
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        feeder.cancel()
        with contextlib.suppress(BaseException):
            await feeder
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = orjson.dumps({"error": reason})
    with contextlib.suppress(Exception):
        writer.write(_head(status, f"content-length: {len(body)}\r\nconnection: close\r\n") + body)


# -- the client side --------------------------------------------------------------------


class _ResponseReader:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.body: list[bytes] = []
        self.done = False
        self.head_done = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class ClientConnection:
    """One keep-alive connection to the control plane (TLS or a unix socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        ctx: ssl.SSLContext | None,
        *,
        timeout: float = 5.0,
        unix: str | None = None,
    ) -> ClientConnection:
        if unix is not None:
            coro = asyncio.open_unix_connection(unix)
        else:
            coro = asyncio.open_connection(host, port, ssl=ctx, server_hostname="" if ctx else None)
        reader, writer = await asyncio.wait_for(coro, timeout)
        return cls(reader, writer)

    def peer_identity(self) -> str | None:
        """The server certificate's SPIFFE ID (verified by the handshake)."""
        return peer_spiffe_id(self.writer.transport)

    async def request(self, method: str, path: str, doc: Any = None, timeout: float = 10.0) -> Any:
        """A whole request and its JSON answer; ApiError for a refusal."""
        body = b"" if doc is None else orjson.dumps(doc)
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: meshgate-control\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        rr = _ResponseReader()
        async with asyncio.timeout(timeout):
            while not rr.done:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the control plane closed the connection")
                rr.parser.feed_data(data)
        try:
            answer = orjson.loads(b"".join(rr.body)) if rr.body else None
        except orjson.JSONDecodeError:
            raise ApiError(rr.status, "the control plane's answer is not JSON") from None
        if rr.status >= 400:
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise ApiError(rr.status, str(reason or rr.status))
        return answer

    async def open_stream(self, path: str, first: Any, timeout: float = 10.0) -> _Stream:
        """Start the bidirectional stream with its first message."""
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: meshgate-control\r\n"
            "content-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )
        stream = _Stream(self)
        stream.send(first)
        await stream.wait_head(timeout)
        return stream

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Stream:
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.rr = _ResponseReader()
        self.buf = b""

    def send(self, doc: Any) -> None:
        self.send_encoded(orjson.dumps(doc))

    def send_encoded(self, doc: bytes) -> None:
        """One JSON document, already encoded (without its newline)."""
        data = doc + b"\n"
        self.conn.writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def wait_head(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not self.rr.head_done:
                data = await self.conn.reader.read(65536)
                if not data:
                    raise ConnectionError("the control plane closed the stream")
                self.rr.parser.feed_data(data)
        if self.rr.status != 200:
            while not self.rr.done:
                data = await self.conn.reader.read(65536)
                if not data:
                    break
                self.rr.parser.feed_data(data)
            raw = b"".join(self.rr.body)
            try:
                reason = orjson.loads(raw).get("error", raw.decode("latin-1"))
            except (orjson.JSONDecodeError, AttributeError):
                reason = raw.decode("latin-1")
            raise ApiError(self.rr.status, str(reason))

    async def messages(self) -> AsyncIterator[Any]:
        """Each JSON document the control plane sends, until it closes."""
        while True:
            while self.rr.body:
                self.buf += self.rr.body.pop(0)
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.strip():
                    yield orjson.loads(line)
            if self.rr.done:
                return
            data = await self.conn.reader.read(65536)
            if not data:
                return
            self.rr.parser.feed_data(data)
