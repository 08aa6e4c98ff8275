"""An in-memory HTTP/1.1 proxy for the parser's fuzz and property tests.

`ServerProtocol` is driven as the event loop would drive it, with in-memory
transports on both sides (as bench/micro_h1.py does): bytes are fed to
`data_received` in pieces, the write batcher is flushed, the loop runs its
`call_soon` callbacks, and a fake upstream answers every complete request
that reaches it. A test module opens `in_memory_pools()` (a module fixture)
so that no pool ever opens a real socket.

- `Harness` / `harness()`: the proxy, its client transport and its upstreams;
- `check_client_side`: every byte the client got is a well-formed response;
- `run_fuzz`: the parse-or-refuse rule for one input and its cuts;
- `mutated_requests(seeds)`, `cut_points(data)`: the strategies that mutate
  requests and split them into reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import httptools
import pytest
import uvloop
from hypothesis import strategies as st

from meshgate.engine.load import load_config_text
from meshgate.engine.runtime import Runtime
from meshgate.protocol.h1 import ServerProtocol, ServerState
from meshgate.stream.stream import ProxyStream
from meshgate.upstream.cluster import PoolRegistry
from meshgate.upstream.pool import EndpointPool, UpstreamConnection

CONFIG = """
listen: 127.0.0.1:0
limits:
  max_header_bytes: 2KiB
  max_request_line: 512
upstreams:
  backend: {endpoints: [127.0.0.1:9]}
routes:
- {path: /**, upstream: backend}
"""

UPSTREAM_BODY = b"hello"
UPSTREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\n"

# Loggers whose ERROR records mean the proxy (or a loop callback) failed.
WATCHED_LOGGERS = ("meshgate", "asyncio")

_BUDGET_RE = re.compile(rb"x-meshgate-deadline: \d+\r\n")


# -- in-memory transports ------------------------------------------------------------


class MemTransport:
    """Just enough of asyncio.Transport, recording what is written. Closing it
    reports `connection_lost` to its protocol on the next loop turn, as a real
    transport does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int] | None) -> None:
        self.loop = loop
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None
        self.data = bytearray()
        self.closing = False
        self.how = ""  # "close" or "abort" once closing
        self.late_writes = 0  # writes made after close(): real transports drop them
        self.reading = True

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        if self.closing:
            self.late_writes += 1
            return
        self.data += data

    def writelines(self, data: Any) -> None:
        for d in data:
            self.write(d)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" and self.peer else default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self._lose("close")

    def abort(self) -> None:
        self._lose("abort")

    def _lose(self, how: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.how = how
        if self.protocol is not None:
            self.loop.call_soon(self.protocol.connection_lost, None)


# -- recording what the proxy creates -------------------------------------------------------


class RecordingServerProtocol(ServerProtocol):
    """A ServerProtocol that remembers the method of every exchange it queues,
    in order: the n-th response on the connection answers the n-th exchange,
    which says whether that response has a body (not for HEAD)."""

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.methods: list[bytes] = []


class RecordingStream(ProxyStream):
    def __init__(self, proto: Any, method: bytes, *args: Any) -> None:
        super().__init__(proto, method, *args)
        if isinstance(proto, RecordingServerProtocol):
            proto.methods.append(method)


HARNESS: list[Harness] = []  # the one in use, for the patched EndpointPool.connect


async def _connect_in_memory(self: EndpointPool) -> UpstreamConnection:
    """Replaces EndpointPool.connect: never a real socket from these tests."""
    self.open_count += 1
    return HARNESS[-1].new_upstream().conn


@contextlib.contextmanager
def in_memory_pools() -> Iterator[None]:
    """While open, an `EndpointPool` connects to a fake upstream of the
    harness in use, never to a real socket (a test module's fixture)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EndpointPool, "connect", _connect_in_memory)
        yield


# -- the fake upstream ------------------------------------------------------------------


class UpstreamMessage:
    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False


class Upstream:
    """One pooled UpstreamConnection with an in-memory transport, and an
    HTTP parser reading what the proxy sends it (which must be valid HTTP)."""

    def __init__(self, harness: Harness) -> None:
        self.transport = MemTransport(harness.loop, None)
        self.conn = UpstreamConnection(harness.pool)
        self.transport.attach(self.conn)
        self.parser = httptools.HttpRequestParser(self)
        self.parsed = 0
        self.messages: list[UpstreamMessage] = []
        self.answered = 0

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages.append(UpstreamMessage())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.messages[-1].method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True

    def serve(self) -> bool:
        """Parse new bytes; answer each newly complete request. True if anything
        happened."""
        progressed = False
        new = bytes(self.transport.data[self.parsed :])
        if new:
            self.parsed += len(new)
            progressed = True
            try:
                self.parser.feed_data(new)
            except httptools.HttpParserError as exc:
                raise AssertionError(
                    f"the proxy sent invalid HTTP upstream ({exc}): {bytes(self.transport.data)!r}"
                ) from None
        while self.answered < len(self.messages) and self.messages[self.answered].complete:
            msg = self.messages[self.answered]
            self.answered += 1
            if self.transport.closing or self.conn.sink is None:
                continue
            progressed = True
            self.conn.data_received(
                UPSTREAM_HEAD if msg.method == b"HEAD" else UPSTREAM_HEAD + UPSTREAM_BODY
            )
        return progressed


# -- the harness ------------------------------------------------------------------------------


class Harness:
    """A ServerProtocol on a MemTransport, its state, and the fake upstreams."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        registry = PoolRegistry(loop)
        self.runtime = Runtime.build(load_config_text(CONFIG), registry)
        self.state = ServerState(self.runtime, registry, loop=loop, streams=RecordingStream)
        self.batcher = self.state.batcher
        self.pool = self.runtime.clusters["backend"].endpoints[0].pool
        self.upstreams: list[Upstream] = []
        HARNESS.append(self)
        self.proto = RecordingServerProtocol(self.state)
        self.client = MemTransport(loop, ("127.0.0.1", 50000))
        self.client.attach(self.proto)
        self.ensure_idle()

    def new_upstream(self) -> Upstream:
        up = Upstream(self)
        self.upstreams.append(up)
        return up

    def ensure_idle(self) -> None:
        """Keep one pooled connection ready (the proxy closes one after a
        refused request aborts it)."""
        if not any(not u.transport.closing for u in self.upstreams if u.conn in self.pool.idle):
            up = self.new_upstream()
            self.pool.open_count += 1
            self.pool.release(up.conn)

    def run_loop_once(self) -> None:
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()

    def settle(self) -> None:
        """Flush, let call_soon callbacks run, and answer the upstream, until
        nothing moves."""
        quiet = 0
        for _ in range(200):
            self.batcher.flush()
            progressed = False
            for up in list(self.upstreams):
                progressed |= up.serve()
            self.batcher.flush()
            self.run_loop_once()
            quiet = 0 if progressed or self.batcher.dirty else quiet + 1
            if quiet >= 2:
                return
        raise AssertionError("the in-memory proxy never settled")

    def feed(self, data: bytes) -> None:
        self.ensure_idle()
        self.proto.data_received(data)  # must never raise
        self.settle()

    def feed_pieces(self, data: bytes, cuts: list[int]) -> None:
        start = 0
        for cut in [*sorted(set(cuts)), len(data)]:
            if start < cut <= len(data):
                self.feed(data[start:cut])
                start = cut

    def upstream_streams(self) -> list[bytes]:
        """The bytes each upstream received, with the deadline budget (which
        depends on when the request left, not on its bytes) written as `N`."""
        return [
            _BUDGET_RE.sub(b"x-meshgate-deadline: N\r\n", bytes(u.transport.data))
            for u in self.upstreams
            if u.transport.data
        ]

    def upstream_bytes(self) -> int:
        return sum(len(u.transport.data) for u in self.upstreams)

    def client_eof(self) -> None:
        """The client half-closes (as a transport would report it), then goes away."""
        if not self.client.closing:
            if not self.proto.eof_received():
                self.client.close()
            self.settle()
        if not self.client.closing:
            self.client.close()
        self.settle()

    def check_no_errors(self, caplog: pytest.LogCaptureFixture) -> None:
        """Nothing logged at ERROR (meshgate's "internal error", or an exception
        in a loop callback such as a pipelined start), nothing raised in one."""
        errors = [
            r
            for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.split(".")[0] in WATCHED_LOGGERS
        ]
        assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]
        assert not self.loop_errors, self.loop_errors


def watch_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Start an example with no records, capturing meshgate's ERRORs."""
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="meshgate")


@contextlib.contextmanager
def harness() -> Iterator[Harness]:
    loop = uvloop.new_event_loop()
    try:
        h = Harness(loop)
        yield h
    finally:
        HARNESS.clear()
        loop.close()


# -- reading the client's side ----------------------------------------------------------------


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_message_complete(self) -> None:
        self.done = True


def parse_responses(data: bytes, methods: list[bytes]) -> tuple[list[Response], bool]:
    """Split what the client received into responses, each parsed by llhttp
    (it must not raise). The n-th final response answers the n-th exchange:
    for HEAD it ends with its head. Returns the responses, and whether the
    last one was cut short (only allowed when the connection was reset)."""
    responses: list[Response] = []
    pos = 0
    final = 0
    while pos < len(data):
        assert final < len(methods), (
            f"more responses than requests ({methods!r}): {data[pos:]!r} in {data!r}"
        )
        resp = Response()
        parser = httptools.HttpResponseParser(resp)
        head_only = methods[final] == b"HEAD"
        start = pos
        while pos < len(data) and not resp.done:
            try:
                parser.feed_data(data[pos : pos + 1])
            except httptools.HttpParserError as exc:
                raise AssertionError(
                    f"malformed response at byte {pos} ({exc}): {data[start : pos + 1]!r} "
                    f"in {data!r}"
                ) from None
            pos += 1
            if resp.head_done and not resp.status:
                resp.status = parser.get_status_code()
                if head_only and resp.status >= 200:
                    resp.done = True
        responses.append(resp)
        if not resp.done:
            return responses, True
        assert 100 <= resp.status <= 599, resp.status
        if resp.status >= 200:
            final += 1
    return responses, False


def check_client_side(h: Harness) -> list[Response]:
    """Every byte the client got is a well-formed response; nothing follows a
    `connection: close` response, and the connection is then closed."""
    closed = h.client.closing
    responses, truncated = parse_responses(bytes(h.client.data), h.proto.methods)
    # Only a reset may cut a response short: a graceful close sends it all.
    assert not truncated or h.client.how == "abort", (
        f"a partial response, connection {h.client.how or 'open'}: {h.client.data!r}"
    )
    for i, resp in enumerate(responses):
        if resp.done and b"close" in [v.lower() for v in resp.header(b"connection")]:
            assert i == len(responses) - 1, f"bytes after 'connection: close': {h.client.data!r}"
            assert closed, f"'connection: close' sent, the connection left open: {h.client.data!r}"
    assert h.client.late_writes == 0
    return responses


# -- mutating requests, splitting them into reads --------------------------------------------------

INSERTIONS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"\x00",
    b"\xff",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Host: other\r\n",
    b"Connection: close\r\n",
    b"Expect: 100-continue\r\n",
    b"Expect: nonsense\r\n",
    b"X-Fold: a\r\n b\r\n",
    b"X-Sp : v\r\n",
    b"X-Bare: v\n",
    b"ffffffffffffffffff\r\n",
    b"0x5\r\n",
    b"-1\r\n",
    b"5 ;ext\r\n",
    b"0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: p\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: p\r\n\r\n",
    b"%zz",
    b"/../..",
    b"HTTP/1.1",
    b"HTTP/2.0",
    b"x" * 600,
]
# Whole lines, inserted after a CRLF.
LINES = [i for i in INSERTIONS if i.endswith(b"\r\n") and len(i) > 2] + [
    b"X-Big: " + b"y" * 1000 + b"\r\n",
    b"X-Big: " + b"y" * 2100 + b"\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: Chunked \r\n",
    b"Host: p\r\n",
    b"Connection: keep-alive, x-a\r\n",
    b"Upgrade: h2c\r\nConnection: upgrade\r\n",
    b"X-Request-Id: \x7f\xff\r\n",
    b"Proxy-Connection: close\r\n",
    b"X-Empty:\r\n",
]


@st.composite
def mutated_requests(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """1-3 of `seeds`, pipelined, then 1-4 mutations of the kinds that found
    framing bugs before: inserted bytes and header lines, deletions, a bare
    LF, a fold, a spliced request, a cut, an overlong target."""
    buf = bytearray(b"".join(draw(st.lists(st.sampled_from(seeds), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                [
                    "insert",
                    "insert-line",
                    "delete",
                    "replace",
                    "dup-line",
                    "bare-lf",
                    "fold",
                    "splice",
                    "cut",
                    "long-target",
                ]
            )
        )
        pos = draw(st.integers(0, len(buf)))
        if kind == "insert-line":
            # A whole header line (or chunk line) where a line starts.
            pos = buf.find(b"\r\n", pos)
            if pos >= 0:
                buf[pos + 2 : pos + 2] = draw(st.sampled_from(LINES))
        elif kind == "long-target":
            pos = buf.find(b" /", pos)
            if pos >= 0:
                buf[pos + 2 : pos + 2] = b"x" * draw(st.sampled_from([200, 511, 512, 513, 900]))
        elif kind == "insert":
            buf[pos:pos] = draw(st.sampled_from(INSERTIONS) | st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            buf[pos : pos + draw(st.integers(1, 8))] = b""
        elif kind == "replace" and buf:
            pos = min(pos, len(buf) - 1)
            buf[pos] = draw(st.integers(0, 255))
        elif kind == "dup-line":
            # Repeat one whole line (a header, a chunk size, a request line).
            start = buf.rfind(b"\n", 0, pos) + 1
            end = buf.find(b"\n", pos)
            if end >= 0:
                buf[start:start] = buf[start : end + 1]
        elif kind == "bare-lf":
            i = buf.find(b"\r\n", pos)
            if i >= 0:
                del buf[i]
        elif kind == "fold":
            i = buf.find(b"\r\n", pos)
            if i >= 0:
                buf[i + 2 : i + 2] = draw(st.sampled_from([b" x\r\n", b"\tx\r\n", b" \r\n"]))
        elif kind == "splice":
            buf[pos:pos] = draw(st.sampled_from(seeds))
        elif kind == "cut":
            del buf[pos:]
    return bytes(buf)


@st.composite
def cut_points(draw: st.DrawFn, data: bytes) -> list[int]:
    if len(data) < 2:
        return []
    mode = draw(st.sampled_from(["whole", "bytes", "random"]))
    if mode == "whole":
        return []
    if mode == "bytes":
        return list(range(1, len(data)))
    return draw(st.lists(st.integers(1, len(data) - 1), max_size=12))


def run_fuzz(data: bytes, cuts: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """h11's rule: fed `data` in the pieces `cuts` make, then EOF, the proxy
    parses or refuses, never raises or logs an ERROR, and writes only
    well-formed responses."""
    watch_logs(caplog)
    with harness() as h:
        h.feed_pieces(data, cuts)
        check_client_side(h)
        h.client_eof()
        check_client_side(h)
        h.check_no_errors(caplog)
