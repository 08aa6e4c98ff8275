"""Upstream failures through the real gateway, each answered with an RFC 9457
problem document (502 refused/closed, 504 timeouts, 503 pool exhausted), and
stale pooled connections retried so that the client never sees them."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from support.client import RawConnection, assert_problem, curl_popen, fetch, free_port
from support.proxy import Stack, single_upstream_config
from support.upstream import FIXED_BODY, UpstreamServer

pytestmark = pytest.mark.engine


def test_503_when_the_only_endpoint_refuses_connections(stack: Stack) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    proxy = stack.proxy(single_upstream_config(dead))
    start = time.monotonic()
    r = fetch(proxy.url("/x"))
    doc = assert_problem(r, 503)  # no endpoint accepts connections (Envoy's 503)
    assert doc["type"].endswith("upstream-unavailable")
    assert time.monotonic() - start < 5


def test_502_when_upstream_closes_without_answering(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(single_upstream_config(upstream))
    r = fetch(proxy.url("/close"), "-X", "POST", "-d", "payload")
    assert_problem(r, 502)


def test_504_on_read_timeout(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(single_upstream_config(upstream, timeouts={"read": "500ms"}))
    start = time.monotonic()
    r = fetch(proxy.url("/slow?headers_delay=10"))
    assert_problem(r, 504)
    assert time.monotonic() - start < 5


def test_504_on_total_timeout(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(
        single_upstream_config(upstream, timeouts={"read": "30s", "total": "500ms"})
    )
    start = time.monotonic()
    r = fetch(proxy.url("/slow?headers_delay=10"))
    assert_problem(r, 504)
    assert time.monotonic() - start < 5


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A loopback listener whose accept queue is full, so that a new connect
    hangs in SYN-SENT (Linux drops the SYN) until the client gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connect_timeout_answered_promptly(stack: Stack, blackhole: str) -> None:
    proxy = stack.proxy(single_upstream_config(blackhole, timeouts={"connect": "500ms"}))
    start = time.monotonic()
    r = fetch(proxy.url("/x"))
    assert r.status in (502, 503, 504), r.describe()
    assert_problem(r, r.status)
    assert time.monotonic() - start < 5


def test_503_when_pool_is_full(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(
        single_upstream_config(
            upstream,
            pool={"max_connections": 1, "acquire_timeout": "300ms"},
            timeouts={"read": "30s"},
        )
    )
    busy = curl_popen("-o", "/dev/null", "-w", "%{http_code}", proxy.url("/slow?headers_delay=3"))
    try:
        upstream.wait_for_requests(1)
        start = time.monotonic()
        r = fetch(proxy.url("/fixed"))
        assert_problem(r, 503)
        assert time.monotonic() - start < 2.5  # before the busy one frees the pool
    finally:
        out, _ = busy.communicate(timeout=30)
    assert out == b"200"
    assert upstream.connection_count == 1


def test_stale_connection_closed_right_after_answer(stack: Stack, upstream: UpstreamServer) -> None:
    """The upstream answers (no `connection: close`) and closes at once."""
    proxy = stack.proxy(single_upstream_config(upstream))
    for i in range(5):
        r = fetch(proxy.url(f"/answer-close?i={i}"))
        assert r.status == 200, r.describe()
    assert upstream.connection_count == 5


def test_stale_connection_closed_by_upstream_idle_timeout(stack: Stack) -> None:
    up = stack.upstream("idle", idle_timeout=0.2)
    proxy = stack.proxy(single_upstream_config(up))
    for i in range(3):
        r = fetch(proxy.url(f"/echo?i={i}"))
        assert r.status == 200, r.describe()
        # Let the upstream close the pooled connection before the next request.
        up.wait_for(lambda s: all(c.closed for c in s.connections), what="idle close")
    assert [rec.seq for rec in up.requests] == [0, 0, 0]


def test_stale_connection_retried_when_upstream_closes_on_reuse(
    stack: Stack, upstream: UpstreamServer
) -> None:
    """The race a pool cannot see coming: the idle connection looks fine, the
    request is written, and the upstream closes without a byte of answer.
    An idempotent request on a reused connection must be retried on a new one
    (RFC 9110 9.2.2), not answered 502."""
    proxy = stack.proxy(single_upstream_config(upstream))
    for i in range(4):
        r = fetch(proxy.url(f"/close-reused?i={i}"))
        assert r.status == 200, f"request {i}: {r.describe()}"
    answered = [rec for rec in upstream.requests if rec.seq == 0]
    dropped = [rec for rec in upstream.requests if rec.seq > 0]
    assert len(answered) == 4
    assert dropped, "the proxy never reused a pooled connection: nothing was retried"


@pytest.mark.parametrize("kind", ["garbage", "dup-cl"])
def test_malformed_upstream_response_is_502(
    stack: Stack, upstream: UpstreamServer, kind: str
) -> None:
    """RFC 9112 6.3: a proxy that receives a response with an invalid framing
    MUST close the upstream connection, discard it and answer 502."""
    proxy = stack.proxy(single_upstream_config(upstream))
    r = fetch(proxy.url(f"/bad-response?kind={kind}"))
    assert_problem(r, 502)
    assert fetch(proxy.url("/fixed")).body == FIXED_BODY


def test_upstream_response_with_cl_and_te(stack: Stack, upstream: UpstreamServer) -> None:
    """Transfer-Encoding wins over Content-Length (RFC 9112 6.3); a proxy may
    refuse the response (502) or forward it without the Content-Length."""
    proxy = stack.proxy(single_upstream_config(upstream))
    r = fetch(proxy.url("/bad-response?kind=cl-te"))
    if r.status == 502:
        assert_problem(r, 502)
    else:
        assert r.returncode == 0 and r.status == 200 and r.body == b"hello", r.describe()
        assert r.header("content-length") in (None, "5"), r.headers
    assert fetch(proxy.url("/fixed")).body == FIXED_BODY


def test_bad_chunk_in_upstream_response(stack: Stack, upstream: UpstreamServer) -> None:
    """Headers may already be on their way to the client when the bad chunk
    comes: then the client must see the transfer fail, never a clean end."""
    proxy = stack.proxy(single_upstream_config(upstream))
    r = fetch(proxy.url("/bad-response?kind=bad-chunk"))
    if r.status == 502:
        assert_problem(r, 502)
    else:
        assert r.returncode != 0, f"curl saw a complete response: {r.describe()}"
    assert fetch(proxy.url("/fixed")).body == FIXED_BODY


def test_client_abort_mid_download_does_not_poison_the_pool(
    stack: Stack, upstream: UpstreamServer
) -> None:
    """A client that goes away mid-body: the proxy must close the upstream
    connection (or read the body to its end) rather than leave it hanging or
    hand it, with body bytes still coming, to the next request."""
    proxy = stack.proxy(single_upstream_config(upstream))
    for i in range(3):
        with RawConnection(proxy.port) as conn:
            conn.send(f"GET /download?size={20 << 20}&i={i} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
            assert conn.recv_some(1 << 20).startswith(b"HTTP/1.1 200")

        def settled(s: UpstreamServer) -> bool:
            open_ids = {c.conn_id for c in s.connections if not c.closed}
            return all(r.response_complete or r.conn_id not in open_ids for r in s.requests)

        upstream.wait_for(settled, timeout=15, what="the abandoned download to be settled")
        for _ in range(3):
            r = fetch(proxy.url("/fixed"))
            assert r.status == 200 and r.body == FIXED_BODY, r.describe()
