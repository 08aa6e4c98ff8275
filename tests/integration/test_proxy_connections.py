"""Client and upstream connections through the real gateway: keep-alive and
pooling, pipelining, HTTP/1.0 clients, `Expect: 100-continue`, responses
without a body (HEAD, 204, 304), and the client keep-alive timeout."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support.client import RawConnection, curl, fetch, raw_request
from support.proxy import ProxyProcess, Stack, single_upstream_config
from support.upstream import FIXED_BODY, UpstreamServer, pattern_bytes, pattern_sha256

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(single_upstream_config(up, limits={"keepalive_timeout": "1s"}))


@pytest.fixture(autouse=True)
def _clear(up: UpstreamServer) -> None:
    up.clear()


def test_client_keepalive_and_upstream_connection_reuse(stack: Stack, tmp_path: Path) -> None:
    # Its own upstream and proxy: the upstream's connection count starts at 0.
    up = stack.upstream("up")
    proxy = stack.proxy(single_upstream_config(up))
    args = []
    for i in range(4):
        args += ["-o", str(tmp_path / f"{i}"), proxy.url(f"/echo/{i}")]
    cp = curl("-w", "%{num_connects} %{http_code}\n", *args)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.decode().split("\n")[:4]
    assert lines == ["1 200", "0 200", "0 200", "0 200"]  # one client connection
    docs = [json.loads((tmp_path / f"{i}").read_bytes()) for i in range(4)]
    # ...and the proxy reused one pooled upstream connection for all four.
    assert len({d["conn_id"] for d in docs}) == 1, docs
    assert [d["seq"] for d in docs] == sorted(d["seq"] for d in docs)
    # A new client connection still gets the pooled upstream connection.
    r = fetch(proxy.url("/echo/again"))
    assert r.json()["conn_id"] == docs[0]["conn_id"]
    assert up.connection_count == 1


def test_pipelined_requests_answered_in_order(proxy: ProxyProcess, up: UpstreamServer) -> None:
    reply = raw_request(
        proxy.port,
        b"GET /slow?headers_delay=0.3&n=1 HTTP/1.1\r\nHost: p\r\n\r\n"
        b"POST /echo?n=2 HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /fixed?n=3 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        read_timeout=10,
    )
    assert reply.closed, reply.describe()
    r1, r2, r3 = reply.responses()
    assert (r1.status, r1.header("x-target"), r1.body) == (
        200,
        "/slow?headers_delay=0.3&n=1",
        b"slow\n",
    )
    assert r2.status == 200 and r2.json()["target"] == "/echo?n=2" and r2.json()["body"] == "hello"
    assert r3.status == 200 and r3.body == FIXED_BODY


def test_http10_client_content_length_response(proxy: ProxyProcess) -> None:
    r = fetch(proxy.url("/fixed"), "--http1.0")
    assert r.returncode == 0 and r.status == 200 and r.body == FIXED_BODY, r.describe()


def test_http10_client_gets_chunked_upstream_body_unchunked(proxy: ProxyProcess) -> None:
    size = 1_000_003
    reply = raw_request(
        proxy.port, f"GET /download?size={size}&mode=chunked HTTP/1.0\r\n\r\n".encode(), 10
    )
    assert reply.closed, reply.describe()
    (resp,) = reply.responses()
    assert resp.status == 200
    # An HTTP/1.0 client does not know chunked (RFC 9112 6.1): the proxy must
    # delimit the body by the close or with a content-length.
    assert resp.header("transfer-encoding") is None, resp.headers
    assert resp.framing in ("close", "length")
    assert hashlib.sha256(resp.body).hexdigest() == pattern_sha256(size)


def test_http10_with_curl_large_chunked_download(proxy: ProxyProcess) -> None:
    size = 2_000_000
    r = fetch(proxy.url(f"/download?size={size}&mode=chunked"), "--http1.0")
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(size)


def test_expect_100_continue_with_curl(proxy: ProxyProcess, up: UpstreamServer) -> None:
    body = "e" * 4096
    # With a long expect100 timeout, curl sends the body only once it has
    # received 100 Continue: the proxy must produce one (itself or relayed).
    r = fetch(
        proxy.url("/echo/expect"),
        "-v",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        "--data-binary",
        body,
    )
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.interim == [100], r.describe()
    assert r.info.get("time_total", 0) < 8, "curl waited out its expect timeout"
    assert r.json()["body"] == body
    (rec,) = up.requests
    assert rec.body_complete and rec.body == body.encode()


def test_expect_100_continue_rejected_by_upstream(proxy: ProxyProcess, up: UpstreamServer) -> None:
    """The proxy may relay the expectation (then the upstream's 417 reaches the
    client) or answer 100 itself and forward the body (then the upstream never
    sees `expect` and answers 200); either way the exchange must be coherent."""
    r = fetch(
        proxy.url("/x"),
        "-H",
        "x-test-behavior: expect-reject",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        "--data-binary",
        "b" * 4096,
    )
    assert r.returncode == 0, r.describe()
    (rec,) = up.requests
    if rec.header("expect") is not None:
        assert r.status == 417, r.describe()
    else:
        assert r.status == 200 and r.interim == [100], r.describe()
        assert rec.body_complete and rec.body_len == 4096


def test_head_then_get_on_one_connection(proxy: ProxyProcess) -> None:
    reply = raw_request(
        proxy.port,
        b"HEAD /download?size=100000&mode=length HTTP/1.1\r\nHost: p\r\n\r\n"
        b"HEAD /download?size=100000&mode=chunked HTTP/1.1\r\nHost: p\r\n\r\n"
        b"GET /fixed HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        read_timeout=10,
    )
    assert reply.closed, reply.describe()
    h1, h2, get = reply.responses(["HEAD", "HEAD", "GET"])
    assert h1.status == 200 and h1.header("content-length") == "100000"
    assert h2.status == 200
    assert get.status == 200 and get.body == FIXED_BODY


def test_head_with_curl(proxy: ProxyProcess) -> None:
    r = fetch(proxy.url("/download?size=123456&mode=length"), "-I")
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.header("content-length") == "123456"


def test_204_and_304_have_no_body(proxy: ProxyProcess) -> None:
    reply = raw_request(
        proxy.port,
        b"GET /status/204 HTTP/1.1\r\nHost: p\r\n\r\n"
        b"GET /status/304?cl=1234 HTTP/1.1\r\nHost: p\r\n\r\n"
        b"GET /fixed HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        read_timeout=10,
    )
    assert reply.closed, reply.describe()
    r204, r304, get = reply.responses()
    assert r204.status == 204 and r204.header("transfer-encoding") is None
    assert r304.status == 304 and r304.header("etag") == '"v1"'
    assert get.status == 200 and get.body == FIXED_BODY


def test_close_delimited_upstream_body(proxy: ProxyProcess) -> None:
    size = 500_000
    r = fetch(proxy.url(f"/download?size={size}&mode=close"))
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert r.body == pattern_bytes(0, size)


def test_idle_client_connection_closed_after_keepalive_timeout(proxy: ProxyProcess) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: p\r\n\r\n")
        assert conn.read_response().body == FIXED_BODY
        reply = conn.read_until_closed(6)  # keepalive_timeout is 1s
    assert reply.closed and reply == b"", reply.describe()


def test_absolute_form_request_target(proxy: ProxyProcess, up: UpstreamServer) -> None:
    """RFC 9112 3.2.2: a server MUST accept the absolute-form; the upstream
    gets the origin-form."""
    reply = raw_request(
        proxy.port,
        b"GET http://api.example.com/echo?x=1 HTTP/1.1\r\nHost: api.example.com\r\n"
        b"Connection: close\r\n\r\n",
    )
    (resp,) = reply.responses()
    assert resp.status == 200, reply.describe()
    (rec,) = up.requests
    assert rec.target == "/echo?x=1"


def test_many_concurrent_client_connections(proxy: ProxyProcess, up: UpstreamServer) -> None:
    def one(i: int) -> tuple[int, str]:
        with RawConnection(proxy.port) as conn:
            conn.send(f"GET /echo?i={i} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode())
            resp = conn.read_response(timeout=30)
            return resp.status, resp.json()["target"]

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(300)))
    assert results == [(200, f"/echo?i={i}") for i in range(300)]
