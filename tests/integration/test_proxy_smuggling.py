"""Request smuggling through what the client names in `Connection`, and the
other headers that could decide the framing, the route or the identity the
upstream sees (issue 11, defects 1 and 2).

Every test sends raw bytes to the real gateway and counts what a recording
upstream received: exactly one request per client request, framed by the
gateway, with the headers the gateway adds."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from support.client import RawConnection, parse_responses, raw_request
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

KEY = "smuggling-test-key-0123456789"
SMUGGLED = b"GET /secure/SMUGGLED HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("u")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(
        {
            "auth": {"keys": {"type": "api_key"}},
            "consumers": {"alice": {"api_keys": [digest(KEY)]}},
            "upstreams": {"u": upstream_block(up)},
            "routes": [
                {"path": "/secure/**", "upstream": "u", "auth": "keys"},
                {"path": "/open/**", "upstream": "u"},
            ],
        }
    )


@pytest.fixture(autouse=True)
def _clear(up: UpstreamServer, proxy: ProxyProcess) -> Iterator[None]:
    up.clear()
    yield
    assert proxy.alive, f"meshgate died; stderr:\n{proxy.stderr_text()}"


def settle(up: UpstreamServer, expected: int) -> None:
    """Wait for `expected` requests, then a little longer for any extra one."""
    up.wait_for_requests(expected)
    time.sleep(0.3)


def assert_one_forwarded(up: UpstreamServer, path: str, body: bytes) -> None:
    reqs = up.requests
    assert [r.target for r in reqs] == [path], [(r.method, r.target) for r in reqs]
    (rec,) = reqs
    assert rec.body == body and rec.body_complete, rec
    assert rec.header("x-request-id"), rec.headers
    assert rec.header("x-forwarded-for"), rec.headers
    if body:
        assert rec.header_all("content-length") == [str(len(body))], rec.headers
    assert rec.header("transfer-encoding") is None, rec.headers


CONNECTION_VARIANTS = [
    "content-length",
    "Content-Length",
    "CONTENT-LENGTH",
    "close, content-length",
    "keep-alive, Content-Length",
    "x, content-length , y",
    "content-length,transfer-encoding",
    "Transfer-Encoding",
    "host, content-length",
    "te, trailer, upgrade, content-length",
]


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("connection", CONNECTION_VARIANTS)
def test_connection_naming_framing_smuggles_nothing(
    proxy: ProxyProcess, up: UpstreamServer, method: str, connection: str
) -> None:
    request = (
        f"{method} /open/a HTTP/1.1\r\nHost: gw.test\r\nConnection: {connection}\r\n"
        f"Content-Length: {len(SMUGGLED)}\r\n\r\n"
    ).encode() + SMUGGLED
    with RawConnection(proxy.port) as conn:
        conn.send(request)
        resp = conn.read_response(method)
        assert resp.status == 200, resp
        assert json.loads(resp.body)["path"] == "/open/a"
        settle(up, 1)
        assert_one_forwarded(up, "/open/a", SMUGGLED)
        if "close" not in connection:
            # The connection stays in step: the next request is answered as itself.
            conn.send(b"GET /open/next HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            nxt = conn.read_response()
            assert json.loads(nxt.body)["path"] == "/open/next"


@pytest.mark.parametrize("connection", ["transfer-encoding", "Content-Length, Transfer-Encoding"])
def test_connection_naming_chunked_framing_smuggles_nothing(
    proxy: ProxyProcess, up: UpstreamServer, connection: str
) -> None:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    request = (
        "POST /open/a HTTP/1.1\r\nHost: gw.test\r\n"
        f"Connection: {connection}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunked
    with RawConnection(proxy.port) as conn:
        conn.send(request)
        resp = conn.read_response("POST")
        assert resp.status == 200, resp
        settle(up, 1)
        (rec,) = up.requests
        assert rec.target == "/open/a"
        assert rec.framing == "chunked" and rec.body == SMUGGLED and rec.body_complete


def test_smuggled_slow_answer_never_reaches_another_client(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """The issue's victim case: the smuggled request's answer is slow; another
    client's next request, on its own connection, must get its own answer."""
    inner = b"GET /open/slow?headers_delay=0.6 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    attack = (
        b"POST /open/a HTTP/1.1\r\nHost: gw.test\r\nConnection: content-length\r\n"
        b"Content-Length: %d\r\n\r\n" % len(inner)
    ) + inner
    reply = raw_request(proxy.port, attack, read_timeout=1.0)
    assert reply.status == 200, reply.describe()
    victims = []
    for i in range(6):
        with RawConnection(proxy.port) as conn:
            conn.send(f"GET /open/victim-{i} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
            resp = conn.read_response()
            victims.append(json.loads(resp.body)["path"])
        time.sleep(0.1)
    assert victims == [f"/open/victim-{i}" for i in range(6)]
    time.sleep(0.8)
    targets = [r.target for r in up.requests]
    assert targets == ["/open/a"] + [f"/open/victim-{i}" for i in range(6)], targets


def test_connection_cannot_strip_identity_the_gateway_sets(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    request = (
        f"GET /secure/x HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: {KEY}\r\n"
        "Connection: x-consumer, x-request-id, x-forwarded-for, via\r\n"
        "X-Consumer: mallory\r\n\r\n"
    ).encode()
    with RawConnection(proxy.port) as conn:
        conn.send(request)
        assert conn.read_response().status == 200
    settle(up, 1)
    (rec,) = up.requests
    assert rec.header_all("x-consumer") == ["alice"], rec.headers
    assert rec.header("x-request-id") and rec.header("x-forwarded-for"), rec.headers
    assert "meshgate" in (rec.header("via") or ""), rec.headers


def test_unauthenticated_smuggle_to_secure_route_is_refused(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(SMUGGLED)
        resp = conn.read_response()
    assert resp.status == 401
    time.sleep(0.2)
    assert up.requests == []


def test_forgeable_forwarding_headers_are_not_copied(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    forged = {
        "Forwarded": "for=203.0.113.9;proto=https;host=evil.test",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.test",
        "X-Forwarded-Port": "443",
        "X-Forwarded-Prefix": "/evil",
        "X-Real-IP": "203.0.113.9",
        "X-Forwarded-Client-Cert": "By=spiffe://evil/ns/x/sa/y",
        "X-Forwarded-For": "203.0.113.9",
    }
    lines = "".join(f"{k}: {v}\r\n" for k, v in forged.items())
    with RawConnection(proxy.port) as conn:
        conn.send(f"GET /open/f HTTP/1.1\r\nHost: gw.test\r\n{lines}\r\n".encode())
        assert conn.read_response().status == 200
    settle(up, 1)
    (rec,) = up.requests
    for name in ("forwarded", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"):
        assert rec.header(name) is None, (name, rec.headers)
    assert rec.header("x-forwarded-client-cert") is None, rec.headers
    assert rec.header_all("x-forwarded-proto") == ["http"]
    assert rec.header_all("x-forwarded-host") == ["gw.test"]
    # The client's own chain is kept, and the address meshgate saw is last.
    assert rec.header_all("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]


# -- defect 2: HTTP/1.0 and Transfer-Encoding -------------------------------------


def test_http10_chunked_is_refused_and_closed(proxy: ProxyProcess, up: UpstreamServer) -> None:
    body = b"5\r\nhello\r\n0\r\n\r\n"
    request = (
        b"POST /open/customers/1 HTTP/1.0\r\nHost: gw.test\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body + SMUGGLED
    )
    reply = raw_request(proxy.port, request)
    assert reply.status == 400, reply.describe()
    assert reply.closed, reply.describe()
    (resp,) = reply.responses()
    assert json.loads(resp.body)["type"].endswith("bad-framing")
    time.sleep(0.3)
    assert up.requests == [] and up.bytes_received == 0


def test_http10_keep_alive_chunked_is_refused_too(proxy: ProxyProcess, up: UpstreamServer) -> None:
    request = (
        b"POST /open/a HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    reply = raw_request(proxy.port, request)
    assert reply.status == 400 and reply.closed, reply.describe()
    time.sleep(0.2)
    assert up.bytes_received == 0


def test_http10_with_content_length_still_works(proxy: ProxyProcess, up: UpstreamServer) -> None:
    request = b"POST /open/customers/1 HTTP/1.0\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello"
    reply = raw_request(proxy.port, request)
    assert reply.status == 200, reply.describe()
    (resp,) = parse_responses(bytes(reply), ["POST"])
    doc = json.loads(resp.body)
    assert doc["path"] == "/open/customers/1" and doc["body"] == "hello"
    (rec,) = up.requests
    assert rec.header_all("content-length") == ["5"]


def test_content_length_is_written_by_the_gateway(proxy: ProxyProcess, up: UpstreamServer) -> None:
    """Leading zeros and spaces in the client's value do not reach the upstream."""
    request = b"POST /open/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length:  005 \r\n\r\nhello"
    with RawConnection(proxy.port) as conn:
        conn.send(request)
        assert conn.read_response("POST").status == 200
    (rec,) = up.requests
    assert rec.header_all("content-length") == ["5"] and rec.body == b"hello"


# -- responses: an upstream's Connection cannot strip the client's framing ------------


class _RawUpstream:
    """Answers every request with a fixed byte string, then keeps the connection."""

    def __init__(self, answer: bytes, extra: bytes = b"", extra_delay: float = 0.0) -> None:
        self.answer = answer
        self.extra = extra
        self.extra_delay = extra_delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    self.requests += 1
                    try:
                        conn.sendall(self.answer)
                        if self.extra:
                            time.sleep(self.extra_delay)
                            conn.sendall(self.extra)
                    except OSError:
                        return

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


@pytest.fixture
def raw_upstream_proxy(stack: Stack, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    server = _RawUpstream(*request.param)
    try:
        yield stack.proxy(
            {
                "upstreams": {"r": {"endpoints": [f"127.0.0.1:{server.port}"]}},
                "routes": [{"path": "/**", "upstream": "r"}],
            }
        )
    finally:
        server.close()


RESPONSE_NAMING_CL = (
    b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\n"
    b"Content-Length: 5\r\n\r\nhello",
)


@pytest.mark.parametrize("raw_upstream_proxy", [RESPONSE_NAMING_CL], indirect=True)
def test_upstream_connection_cannot_strip_response_framing(
    raw_upstream_proxy: ProxyProcess,
) -> None:
    with RawConnection(raw_upstream_proxy.port) as conn:
        for _ in range(2):
            conn.send(b"GET /a HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            resp = conn.read_response()
            assert resp.status == 200 and resp.body == b"hello"
            assert resp.header("content-length") == "5"


UNASKED = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECOND",
)


@pytest.mark.parametrize(
    "raw_upstream_proxy",
    [(*UNASKED, 0.0), (*UNASKED, 0.2)],
    indirect=True,
    ids=["same-read", "idle"],
)
def test_a_response_nobody_asked_for_reaches_no_client(raw_upstream_proxy: ProxyProcess) -> None:
    bodies = []
    for _ in range(3):
        with RawConnection(raw_upstream_proxy.port) as conn:
            conn.send(b"GET /a HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            bodies.append(conn.read_response().body)
        time.sleep(0.5)  # the stray answer arrives, and its connection is closed
    assert bodies == [b"first"] * 3
    raw_upstream_proxy.wait_for_log("nobody asked for")
