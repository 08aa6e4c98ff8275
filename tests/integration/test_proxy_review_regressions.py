"""Regression tests for bugs found in review, over real sockets.

Each test fails on the behaviour the review found and passes on the fix:

1. chunked request trailers never leak into the next request's headers, and
   trailers past `max_header_bytes` are refused rather than buffered;
2. nothing pipelined after a request whose reply closes the connection is
   ever forwarded;
3. an upgrade request gets one 501, and nothing reaches the upstream;
4. a pipelined GET after a HEAD whose response has no body (Content-Length: 0,
   204) gets its own response, not the end of the HEAD's;
5. a malformed chunk from the upstream after body bytes went to the client
   aborts the transfer, never appends a 502 to the body;
6. a close-delimited upstream body cut by a reset is not turned into a
   complete chunked response (a clean close still is);
7. an upstream connection that sent bytes past a complete response is not
   pooled;
8. a client that half-closes after its request still gets the whole response,
   also when its FIN is read in the same loop turn as the upstream's response.

Items 5 to 7 need an upstream that misbehaves at the byte level, at a chosen
moment: `RawUpstream`, a bare TCP server on threads, scripted per test.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from support.client import (
    IncompleteResponse,
    RawConnection,
    assert_problem,
    parse_response,
    raw_request,
)
from support.proxy import ProxyProcess, Stack, single_upstream_config
from support.upstream import FIXED_BODY, UpstreamServer, pattern_bytes

pytestmark = pytest.mark.engine

MAX_HEADER_BYTES = 4096


@pytest.fixture(scope="module")
def shared_up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, shared_up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(
        single_upstream_config(shared_up, limits={"max_header_bytes": MAX_HEADER_BYTES})
    )


@pytest.fixture
def up(shared_up: UpstreamServer, proxy: ProxyProcess) -> Iterator[UpstreamServer]:
    shared_up.clear()
    yield shared_up
    assert proxy.alive, f"meshgate died; stderr:\n{proxy.stderr_text()}"


def warm_pool(proxy: ProxyProcess, up: UpstreamServer) -> None:
    """Leave an idle pooled upstream connection, then forget it was used: a
    request wrongly started now is written at once, not after a connect."""
    reply = raw_request(proxy.port, b"GET /warm HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    (resp,) = reply.responses()
    assert resp.status == 200, reply.describe()
    up.wait_for(lambda s: all(r.response_complete for r in s.requests), what="the warm-up")
    up.clear()


def assert_upstream_saw_nothing(up: UpstreamServer) -> None:
    time.sleep(0.3)  # let anything wrongly forwarded arrive before looking
    assert up.requests == [], [(r.method, r.target) for r in up.requests]
    assert up.bytes_received == 0, [c.raw[:300] for c in up.connections]


def recv_until(conn: RawConnection, marker: bytes, timeout: float = 10.0) -> bytes:
    """Read from the raw socket until `marker` has arrived; return all read."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} after {timeout}s; received {bytes(data)!r}")
        conn.sock.settimeout(left)
        chunk = conn.sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {marker!r}; received {bytes(data)!r}")
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------------------
# A scripted raw upstream


class RawPeer:
    """One connection accepted by a `RawUpstream`."""

    def __init__(self, server: RawUpstream, sock: socket.socket, index: int) -> None:
        self.server = server
        self.sock = sock
        self.index = index
        self.buf = bytearray()

    def read_head(self, timeout: float = 10.0) -> bytes | None:
        """The next request head (a GET: no body), or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionError):
                return None
            if not data:
                return None
            self.server.record(self.index, data)
            self.buf += data
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        self.server.record_head(self.index, head)
        return head

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, timeout: float = 10.0) -> None:
        """Read (and record) until the proxy closes its side."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionError):
                return
            if not data:
                return
            self.server.record(self.index, data)

    def reset(self) -> None:
        """Close with SO_LINGER 0: the proxy gets a RST, not a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class RawUpstream:
    """A bare TCP server on 127.0.0.1:0: every accepted connection runs
    `serve(peer)` on its own thread. Raw bytes and request heads are recorded
    per connection."""

    def __init__(self, serve: Callable[[RawPeer], None]) -> None:
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.raw: list[bytearray] = []
        self.heads: list[list[bytes]] = []
        self.socks: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                index = len(self.raw)
                self.raw.append(bytearray())
                self.heads.append([])
                self.socks.append(sock)
            threading.Thread(target=self._run, args=(sock, index), daemon=True).start()

    def _run(self, sock: socket.socket, index: int) -> None:
        try:
            self.serve(RawPeer(self, sock, index))
        except OSError:
            pass
        except BaseException as exc:
            with self.lock:
                self.errors.append(exc)
        finally:
            sock.close()

    def record(self, index: int, data: bytes) -> None:
        with self.lock:
            self.raw[index] += data

    def record_head(self, index: int, head: bytes) -> None:
        with self.lock:
            self.heads[index].append(head)

    def request_lines(self) -> list[list[bytes]]:
        """Per connection, the request lines received."""
        with self.lock:
            return [[h.split(b"\r\n", 1)[0] for h in heads] for heads in self.heads]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            s.close()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[Callable[[RawPeer], None]], RawUpstream]]:
    servers: list[RawUpstream] = []

    def make(serve: Callable[[RawPeer], None]) -> RawUpstream:
        server = RawUpstream(serve)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    for server in servers:
        assert not server.errors, server.errors


# ---------------------------------------------------------------------------
# 1. Chunked request trailers


def test_trailers_do_not_leak_into_the_next_request(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\nz\r\n0\r\nX-Injected: 1\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        first = conn.read_response("POST")
        second = conn.read_response("GET")
        extra = conn.read_until_closed(0.3)
    assert extra == b"", extra.describe()
    assert first.status == 200 and first.json()["target"] == "/x", first
    assert first.json()["body"] == "z"
    assert second.status == 200 and second.json()["target"] == "/b", second
    echoed = [name.lower() for name, _ in second.json()["headers"]]
    assert "x-injected" not in echoed, second.json()["headers"]

    x, b = up.wait_for_requests(2)
    assert (x.method, x.target, x.body, x.body_complete) == ("POST", "/x", b"z", True)
    assert "x-injected" not in x.header_names(), x.headers
    assert (b.method, b.target) == ("GET", "/b")
    assert "x-injected" not in b.header_names(), b.headers
    assert b"x-injected" not in b.raw_head.lower(), b.raw_head


def _start_chunked_post(conn: RawConnection, up: UpstreamServer) -> None:
    """A chunked POST whose head and first chunk reach the upstream."""
    conn.send(
        b"POST /echo/trailers HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
    )
    up.wait_for(lambda s: any(r.body_len >= 5 for r in s.requests), what="the first chunk")


def _assert_request_aborted(up: UpstreamServer) -> None:
    (rec,) = up.wait_finished()
    assert rec.target == "/echo/trailers" and rec.body == b"hello", rec
    assert not rec.body_complete, f"the upstream saw a complete request: {rec}"
    assert rec.error in ("eof", "reset"), rec.error
    time.sleep(0.3)
    assert len(up.requests) == 1, [(r.method, r.target) for r in up.requests]


def test_trailer_lines_past_the_header_limit_are_refused(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """~7 KiB of trailer lines (the limit is 4 KiB), the trailer section never
    ended: 431 and a close, and the upstream's request is aborted."""
    lines = b"".join(b"X-Trailer-%03d: %s\r\n" % (i, b"v" * 90) for i in range(64))
    assert len(lines) > MAX_HEADER_BYTES + 2048
    with RawConnection(proxy.port) as conn:
        _start_chunked_post(conn, up)
        conn.send(b"0\r\n" + lines)
        reply = conn.read_until_closed(5)
    assert reply.closed, f"the proxy is still buffering trailers: {reply.describe()}"
    (resp,) = reply.responses()
    assert_problem(resp, 431)
    _assert_request_aborted(up)


def test_endless_trailer_line_is_refused(proxy: ProxyProcess, up: UpstreamServer) -> None:
    """One trailer line that never ends (256 KiB of it, 64 times the limit)
    must not be buffered without bound: 431 or a close."""
    with RawConnection(proxy.port) as conn:
        _start_chunked_post(conn, up)
        conn.send(b"0\r\nX-Endless: ")
        piece = b"v" * 4096
        for _ in range(64):
            if select.select([conn.sock], [], [], 0)[0]:
                break  # the proxy answered (or closed)
            try:
                conn.send(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = conn.read_until_closed(3)
    assert reply.closed, f"the proxy is still buffering a trailer line: {reply.describe()}"
    if reply:
        (resp,) = reply.responses()
        assert_problem(resp, 431)
    _assert_request_aborted(up)


# ---------------------------------------------------------------------------
# 2. Nothing pipelined after a closing reply is forwarded


def test_request_after_a_refused_one_is_never_forwarded(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    warm_pool(proxy, up)
    reply = raw_request(
        proxy.port,
        b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\nDELETE /users/1 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert reply.closed, reply.describe()
    (resp,) = reply.responses()
    assert_problem(resp, 400)
    assert_upstream_saw_nothing(up)


def test_request_after_connection_close_is_never_forwarded(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    warm_pool(proxy, up)
    reply = raw_request(
        proxy.port,
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        b"DELETE /users/1 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert reply.closed, reply.describe()
    (resp,) = reply.responses()
    assert resp.status == 200 and resp.json()["target"] == "/a", reply.describe()
    assert resp.header("connection") == "close"
    time.sleep(0.3)
    assert [(r.method, r.target) for r in up.requests] == [("GET", "/a")]
    raw = b"".join(c.raw for c in up.connections)
    assert b"DELETE" not in raw and b"/users/1" not in raw, raw


# ---------------------------------------------------------------------------
# 3. Upgrade requests


def test_upgrade_request_gets_one_501_and_is_not_forwarded(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    reply = raw_request(
        proxy.port,
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    assert reply.closed, reply.describe()
    (resp,) = reply.responses()  # exactly one response
    assert_problem(resp, 501)
    assert resp.header("connection") == "close"
    assert_upstream_saw_nothing(up)


# ---------------------------------------------------------------------------
# 4. A pipelined GET after a bodiless HEAD response


@pytest.mark.parametrize(
    ("head_target", "head_status"),
    [("/download?size=0&mode=length", 200), ("/status/204", 204)],
    ids=["content-length-0", "204"],
)
def test_pipelined_get_after_bodiless_head(
    proxy: ProxyProcess, up: UpstreamServer, head_target: str, head_status: int
) -> None:
    reply = raw_request(
        proxy.port,
        f"HEAD {head_target} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        + b"GET /fixed HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert reply.closed, reply.describe()
    head, get = reply.responses(["HEAD", "GET"])  # and nothing after them
    assert head.status == head_status and head.body == b"", head
    assert head.header("x-target") == head_target
    if head_status == 200:
        assert head.header("content-length") == "0", head.headers
    assert get.status == 200 and get.header("x-target") == "/fixed", get
    assert get.body == FIXED_BODY
    assert [(r.method, r.target) for r in up.requests] == [
        ("HEAD", head_target),
        ("GET", "/fixed"),
    ]


# ---------------------------------------------------------------------------
# 5. A malformed chunk after body bytes reached the client


def test_bad_chunk_after_body_started_aborts_without_502(
    stack: Stack, raw_upstream: Callable[..., RawUpstream]
) -> None:
    client_has_first_chunk = threading.Event()

    def serve(peer: RawPeer) -> None:
        if peer.read_head() is None:
            return
        peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        client_has_first_chunk.wait(10)
        # A valid chunk, then a malformed one, in one later write.
        peer.send(b"5\r\nworld\r\nzz\r\n")
        peer.wait_closed()

    server = raw_upstream(serve)
    proxy = stack.proxy(single_upstream_config(server.address))
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /bad HTTP/1.1\r\nHost: a\r\n\r\n")
        first = recv_until(conn, b"hello\r\n")
        client_has_first_chunk.set()
        rest = conn.read_until_closed(5)
    data = first + rest
    assert rest.closed, f"transfer not ended: {rest.describe()}"
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert data.count(b"HTTP/1.") == 1, f"a second status line in the body: {data!r}"
    body = bytes(rest)  # what came after the first chunk
    assert b"502" not in body and b"problem+json" not in body, data
    assert not data.endswith(b"0\r\n\r\n"), data
    with pytest.raises(IncompleteResponse):
        parse_response(data, eof=True)  # the chunked body never ended
    assert server.request_lines() == [[b"GET /bad HTTP/1.1"]]


# ---------------------------------------------------------------------------
# 6. Close-delimited upstream bodies: a reset is not a clean end


def _close_delimited_serve(
    client_has_part: threading.Event, ending: str
) -> Callable[[RawPeer], None]:
    def serve(peer: RawPeer) -> None:
        if peer.read_head() is None:
            return
        peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npartial-"
        )
        client_has_part.wait(10)
        if ending == "reset":
            peer.reset()
            return
        peer.send(b"rest")
        peer.sock.shutdown(socket.SHUT_WR)
        peer.wait_closed()

    return serve


def _fetch_close_delimited(proxy: ProxyProcess, client_has_part: threading.Event) -> bytes:
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /cd HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        first = recv_until(conn, b"partial-")
        client_has_part.set()
        rest = conn.read_until_closed(5)
    assert rest.closed, f"transfer not ended: {rest.describe()}"
    return first + rest


def test_close_delimited_body_cut_by_reset_is_not_completed(
    stack: Stack, raw_upstream: Callable[..., RawUpstream]
) -> None:
    client_has_part = threading.Event()
    server = raw_upstream(_close_delimited_serve(client_has_part, "reset"))
    proxy = stack.proxy(single_upstream_config(server.address))
    data = _fetch_close_delimited(proxy, client_has_part)
    assert data.startswith(b"HTTP/1.1 200 "), data
    assert data.count(b"HTTP/1.") == 1, data
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    # Re-framed as chunked: the only way a 1.1 client can tell a truncation.
    assert b"transfer-encoding: chunked" in head, data
    assert not data.endswith(b"0\r\n\r\n"), f"a reset body was completed: {data!r}"
    with pytest.raises(IncompleteResponse):
        parse_response(data, eof=True)


def test_close_delimited_body_ended_by_clean_close_is_complete(
    stack: Stack, raw_upstream: Callable[..., RawUpstream]
) -> None:
    client_has_part = threading.Event()
    server = raw_upstream(_close_delimited_serve(client_has_part, "close"))
    proxy = stack.proxy(single_upstream_config(server.address))
    data = _fetch_close_delimited(proxy, client_has_part)
    assert data.endswith(b"0\r\n\r\n"), data
    resp, used = parse_response(data, eof=True)
    assert used == len(data), data
    assert resp.status == 200 and resp.framing == "chunked", resp
    assert resp.body == b"partial-rest"


# ---------------------------------------------------------------------------
# 7. Bytes after a complete upstream response


def test_connection_with_bytes_after_response_is_not_reused(
    stack: Stack, raw_upstream: Callable[..., RawUpstream]
) -> None:
    answered = 0
    lock = threading.Lock()

    def serve(peer: RawPeer) -> None:
        nonlocal answered
        while peer.read_head() is not None:
            with lock:
                n = answered
                answered += 1
            if n == 0:
                # One segment: a complete response, then bytes nobody asked for.
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello world")
            else:
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = raw_upstream(serve)
    proxy = stack.proxy(single_upstream_config(server.address))
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        one = conn.read_response()
        assert one.status == 200 and one.body == b"hello", one
        conn.send(b"GET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        reply = conn.read_until_closed(5)
    assert reply.closed, reply.describe()
    (two,) = reply.responses()  # nothing of " world" before it
    assert two.status == 200 and two.body == b"ok", reply.describe()
    # The second request went out on a new upstream connection.
    assert server.request_lines() == [[b"GET /one HTTP/1.1"], [b"GET /two HTTP/1.1"]]


# ---------------------------------------------------------------------------
# 8. A client that half-closes after its request


@pytest.mark.parametrize(
    ("request_bytes", "method"),
    [
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "OPTIONS"),
        (b"GET /fixed HTTP/1.1\r\nHost: a\r\n\r\n", "GET"),
        (b"GET /download?size=1000000&mode=chunked HTTP/1.1\r\nHost: a\r\n\r\n", "GET"),
    ],
    ids=["local-reply", "proxied", "proxied-1MB"],
)
def test_half_closed_client_gets_the_whole_response(
    proxy: ProxyProcess, up: UpstreamServer, request_bytes: bytes, method: str
) -> None:
    with RawConnection(proxy.port) as conn:
        # Corked, the request waits in the socket and leaves in one segment
        # with the FIN: the half-close comes right with the request.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        conn.send(request_bytes)
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.read_until_closed(5)
    assert reply.closed and not reply.reset, reply.describe()
    (resp,) = reply.responses([method])
    assert resp.status == 200, reply.describe()
    if method == "OPTIONS":
        assert resp.header("allow") is not None and resp.body == b"", resp
    elif b"/fixed" in request_bytes:
        assert resp.body == FIXED_BODY
    else:
        assert resp.body == pattern_bytes(0, 1_000_000)


def test_half_close_arriving_with_the_upstream_response(
    stack: Stack, raw_upstream: Callable[..., RawUpstream]
) -> None:
    """The client's FIN and the upstream's whole response wait in the proxy's
    sockets while it is stopped, so that it handles both in one loop turn: the
    response, complete but not yet written, must still be sent before the
    connection closes."""
    respond = threading.Event()

    def serve(peer: RawPeer) -> None:
        if peer.read_head() is None:
            return
        respond.wait(10)
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhalf-closed")
        peer.wait_closed()

    server = raw_upstream(serve)
    proxy = stack.proxy(single_upstream_config(server.address), workers=1)
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /hc HTTP/1.1\r\nHost: a\r\n\r\n")
        deadline = time.monotonic() + 10
        while not server.request_lines() or not server.request_lines()[0]:
            assert time.monotonic() < deadline, "the request never reached the upstream"
            time.sleep(0.01)
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            respond.set()
            time.sleep(0.1)  # the response lands in the stopped proxy's socket
            conn.sock.shutdown(socket.SHUT_WR)
            time.sleep(0.1)
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        reply = conn.read_until_closed(5)
    assert reply.closed and not reply.reset, reply.describe()
    assert reply, "the proxy closed without sending the response"
    (resp,) = reply.responses()
    assert resp.status == 200 and resp.body == b"half-closed", reply.describe()
