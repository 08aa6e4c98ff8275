"""Resource limits of client connections, through the real gateway (issue
16): connection caps per listener and per client address, requests per
connection, body size per route (413), the header, body and write timeouts
against slowloris, slow POST and slow readers, and memory that stays
bounded under all of them (the process's RSS, from /proc)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.client import RawConnection, assert_problem, http_get, parse_response, wait_until
from support.proxy import ProxyProcess, Stack, single_upstream_config, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

SMALL = 1000  # the /small route's max_body
TIMEOUT = 1.0  # header_timeout, body_timeout and write_timeout of the module's gateway


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def gateway(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(
        {
            "limits": {
                "header_timeout": f"{TIMEOUT}s",
                "body_timeout": f"{TIMEOUT}s",
                "write_timeout": f"{TIMEOUT}s",
                "keepalive_timeout": "10s",
                "max_requests_per_connection": 3,
            },
            "upstreams": {"up": upstream_block(up)},
            "routes": [
                {"path": "/small/**", "upstream": "up", "max_body": SMALL},
                {"path": "/**", "upstream": "up"},
            ],
        }
    )


@pytest.fixture(autouse=True)
def _fresh(up: UpstreamServer) -> Iterator[None]:
    up.clear()
    yield


def connect_from(port: int, source: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A client socket from `source` (127.0.0.1, 127.0.0.2: two client
    addresses on one machine) to the gateway."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def get_ok(sock: socket.socket, path: str = "/x") -> bytes:
    """One keep-alive GET on `sock`; its whole answer (must be 200)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
    data = b""
    while True:
        try:
            resp, _ = parse_response(data, eof=False)
        except Exception:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
            continue
        assert resp.status == 200, data[:300]
        return data


def refused(sock: socket.socket) -> bool:
    """The gateway closed this connection unanswered."""
    try:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def read_all(conn: RawConnection, timeout: float) -> tuple[bytes, bool]:
    """Everything until the gateway closes; and whether it did in `timeout`."""
    reply = conn.read_until_closed(timeout)
    return bytes(reply), reply.closed


# -- connections ---------------------------------------------------------------------


def test_connection_caps_per_client_address_and_per_listener(
    stack: Stack, up: UpstreamServer
) -> None:
    proxy = stack.proxy(
        single_upstream_config(up, limits={"max_connections_per_ip": 2, "max_connections": 3})
    )
    socks: list[socket.socket] = []
    try:
        a1, a2 = connect_from(proxy.port, "127.0.0.1"), connect_from(proxy.port, "127.0.0.1")
        socks += [a1, a2]
        get_ok(a1)
        get_ok(a2)
        # A third from the same address: closed at once, unanswered.
        a3 = connect_from(proxy.port, "127.0.0.1")
        socks.append(a3)
        assert refused(a3)
        # Another address is not held to the first one's count ...
        b1 = connect_from(proxy.port, "127.0.0.2")
        socks.append(b1)
        get_ok(b1)
        # ... but the listener's cap (3) counts them all.
        b2 = connect_from(proxy.port, "127.0.0.2")
        socks.append(b2)
        assert refused(b2)
        # A closed connection frees its place (for its address, and the listener's).
        a1.close()

        def admitted() -> bool:
            sock = connect_from(proxy.port, "127.0.0.1")
            socks.append(sock)
            try:
                get_ok(sock)
            except (AssertionError, OSError):
                return False
            return True

        wait_until(admitted, timeout=5, interval=0.1, what="a place after a close")
        get_ok(a2)  # the admitted ones were never disturbed
        get_ok(b1)
    finally:
        for sock in socks:
            sock.close()
    assert all(r.target == "/x" for r in up.requests)
    # Each refusal is counted by the limit that made it.
    status, body = http_get(proxy.admin_port, "/metrics")
    assert status == 200
    counted = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("meshgate_tcp_connections_refused_total{")
    }
    assert counted["max_connections_per_ip"] >= 1 and counted["max_connections"] >= 1, counted


def test_max_requests_per_connection(gateway: ProxyProcess) -> None:
    with RawConnection(gateway.port) as conn:
        for i in range(3):
            conn.send(f"GET /n{i} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
            resp = conn.read_response(timeout=5)
            assert resp.status == 200, resp
            expected = "close" if i == 2 else None
            assert resp.header("connection") == expected, (i, resp.headers)
        rest = conn.read_until_closed(5)
        assert rest.closed and bytes(rest) == b"", rest.describe()


# -- bodies ----------------------------------------------------------------------------


def test_content_length_over_the_route_limit_is_413_unread(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    body = b"x" * (SMALL + 1)
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /small/cl HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        resp = conn.read_response(timeout=5)
        doc = assert_problem(resp, 413)
        assert doc["type"].endswith("/body-too-large"), doc
        assert resp.header("connection") == "close"
        assert conn.read_until_closed(5).closed
    # At the limit it goes through; the upstream never saw the larger one.
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /small/ok HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n" % SMALL
            + b"y" * SMALL
        )
        assert conn.read_response(timeout=5).status == 200
    assert [r.target for r in up.wait_finished()] == ["/small/ok"]
    # Other routes have no limit.
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /big HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n" % (4 * SMALL)
            + b"z" * (4 * SMALL)
        )
        assert conn.read_response(timeout=5).status == 200


def test_chunked_body_growing_past_the_limit_is_413_and_the_upstream_reset(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /small/chunked HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        try:
            for _ in range(8):
                conn.send(b"12c\r\n" + b"c" * 300 + b"\r\n")  # 300 bytes a chunk
                sent += 300
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent > SMALL
        resp = conn.read_response(timeout=5)
        doc = assert_problem(resp, 413)
        assert doc["type"].endswith("/body-too-large"), doc
        assert conn.read_until_closed(5).closed
    # The upstream saw nothing, or a body cut off within the limit: never a
    # complete request.
    time.sleep(0.2)
    for rec in up.requests:
        assert rec.target == "/small/chunked"
        wait_until(lambda: up.requests[0].finished, timeout=5, what="the upstream's reset")
    for rec in up.requests:
        assert not rec.body_complete and rec.body_len <= SMALL, rec


# -- slow clients ----------------------------------------------------------------------


def test_slowloris_head_dribbled_byte_by_byte_is_408(gateway: ProxyProcess) -> None:
    head = b"GET /slow HTTP/1.1\r\nHost: gw.test\r\nX-Pad: " + b"p" * 200
    with RawConnection(gateway.port) as conn:
        start = time.monotonic()
        closed_early = False
        for byte in head:
            try:
                conn.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_early = True
                break
            time.sleep(0.02)  # 200+ bytes: past the header timeout
            if time.monotonic() - start > 4 * TIMEOUT:
                break
        data, closed = read_all(conn, 5)
    assert closed, data
    assert closed_early or time.monotonic() - start > TIMEOUT
    resp, _ = parse_response(data)
    doc = assert_problem(resp, 408)
    assert doc["type"].endswith("/request-timeout"), doc


def test_slow_post_body_stalling_is_408(gateway: ProxyProcess, up: UpstreamServer) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /slowpost HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n")
        # Dribbled well within the timeout between reads: still going ...
        for _ in range(4):
            conn.send(b"0123456789")
            time.sleep(TIMEOUT / 4)
        # ... then it stops.
        data, closed = read_all(conn, 5 * TIMEOUT)
    assert closed, data
    resp, _ = parse_response(data)
    doc = assert_problem(resp, 408)
    assert doc["type"].endswith("/body-timeout"), doc
    assert resp.header("connection") == "close"
    for rec in up.wait_finished():
        assert not rec.body_complete and rec.body_len == 40, rec


def test_slow_reader_is_cut_off_after_the_write_timeout(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    size = 64 << 20
    reader = connect_from(gateway.port, "127.0.0.1", rcvbuf=16384)
    try:
        reader.sendall(f"GET /download?size={size} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
        wait_until(lambda: up.requests, timeout=5, what="the download to start")
        # The reader reads nothing; meanwhile others are served.
        with RawConnection(gateway.port) as other:
            other.send(b"GET /other HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            assert other.read_response(timeout=5).status == 200
        time.sleep(3 * TIMEOUT)
        got = 0
        reset = False
        reader.settimeout(5)
        while True:
            try:
                chunk = reader.recv(1 << 20)
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            got += len(chunk)
    finally:
        reader.close()
    assert got < size // 4, got
    assert reset or got < size
    # The upstream's connection was closed with the exchange, mid-body.
    wait_until(
        lambda: all(
            c.closed for c in up.connections if c.requests and c.raw.find(b"download") >= 0
        ),
        timeout=5,
        what="the upstream connection of the download to close",
    )
    download = next(r for r in up.requests if r.path == "/download")
    assert download.response_body_sent < size // 4, download.response_body_sent


# -- memory ----------------------------------------------------------------------------


def drained(sock: socket.socket, timeout: float) -> int:
    """Read `sock` until the gateway closes or resets it; the bytes read."""
    sock.settimeout(timeout)
    got = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    return got


def dropped_downloads(up: UpstreamServer) -> int:
    """The upstream connections of downloads that the gateway has closed."""
    return sum(1 for c in up.connections if c.closed and b"download" in c.raw)


def worker_rss(proxy: ProxyProcess) -> int:
    return proxy.rss_bytes()


def test_memory_stays_bounded_under_slow_clients(stack: Stack, tmp_path: Path) -> None:
    up = stack.upstream("rss")
    proxy = stack.proxy(
        single_upstream_config(
            up,
            limits={
                "header_timeout": "1s",
                "body_timeout": "1s",
                "write_timeout": "1s",
            },
        )
    )
    # Warm up (imports, first connections), then the baseline.
    for _ in range(20):
        with RawConnection(proxy.port) as conn:
            conn.send(b"GET /answer-close HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            assert conn.read_response(timeout=5).status == 200
    wait_until(lambda: all(c.closed for c in up.connections), timeout=5, what="no pooled one")
    time.sleep(0.3)
    baseline = worker_rss(proxy)
    loris: list[socket.socket] = []
    readers: list[socket.socket] = []
    try:
        for _ in range(500):
            sock = connect_from(proxy.port, "127.0.0.1")
            sock.sendall(b"GET /loris HTTP/1.1\r\nHost: gw.test\r\nX-Pad: " + b"p" * 2000)
            loris.append(sock)
        for _ in range(20):
            sock = connect_from(proxy.port, "127.0.0.2", rcvbuf=16384)
            sock.sendall(b"GET /download?size=67108864 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            readers.append(sock)
        samples = []
        for _ in range(4):
            time.sleep(0.15)
            for sock in loris[:100]:
                with contextlib.suppress(OSError):
                    sock.send(b"p")  # dribbling does not extend the deadline
            samples.append(worker_rss(proxy))
        during = max(samples)
        # Every slowloris connection got its 408 and was closed.
        for sock in loris:
            sock.settimeout(5)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        # Every slow reader was cut off by the write timeout, long before its
        # 64 MiB: its exchange (and upstream connection) dropped before any
        # of them reads a byte (one that reads before its timeout is no
        # longer a slow reader, and gets its whole answer).
        wait_until(
            lambda: dropped_downloads(up) == len(readers),
            timeout=10,
            what="the write timeout to drop every slow reader",
        )
        for sock in readers:
            assert drained(sock, 10) < 32 << 20
    finally:
        for sock in loris + readers:
            sock.close()
    wait_until(lambda: all(c.closed for c in up.connections), timeout=10, what="upstreams closed")
    time.sleep(0.5)
    after = worker_rss(proxy)
    mib = 1 << 20
    assert during - baseline < 50 * mib, (baseline // mib, during // mib)
    assert after - baseline < 25 * mib, (baseline // mib, during // mib, after // mib)
    # Still serving.
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /after HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        assert conn.read_response(timeout=5).status == 200
