"""Strict request parsing at the gateway, over raw sockets: every malformed
or ambiguous request is refused (400, 414, 431, 408) with the connection
closed, and the upstream receives nothing at all, not even a partial request."""

from __future__ import annotations

import time

import pytest

from support.client import RawConnection, fetch, raw_request
from support.proxy import ProxyProcess, Stack, single_upstream_config
from support.upstream import FIXED_BODY, UpstreamServer

pytestmark = pytest.mark.engine

HEADER_TIMEOUT = 1.0
LIMITS = {
    "max_request_line": 1024,
    "max_header_bytes": 4096,
    "header_timeout": f"{HEADER_TIMEOUT}s",
}
# Each request smuggles a second one in its body, which must never arrive.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: p\r\n\r\n"


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(single_upstream_config(up, limits=LIMITS))


@pytest.fixture(autouse=True)
def _clear(up: UpstreamServer, proxy: ProxyProcess) -> None:
    up.clear()
    yield
    assert proxy.alive, f"meshgate died; stderr:\n{proxy.stderr_text()}"


def assert_upstream_saw_nothing(up: UpstreamServer) -> None:
    time.sleep(0.25)  # let anything wrongly forwarded arrive before looking
    assert up.requests == [], [(r.method, r.target) for r in up.requests]
    assert up.bytes_received == 0, [c.raw[:300] for c in up.connections]


def assert_refused(reply: bytes, statuses: tuple[int, ...] = (400,)) -> None:
    assert reply.status in statuses, reply.describe()
    assert reply.closed, f"connection left open: {reply.describe()}"
    (resp,) = reply.responses()  # one response, nothing after it
    assert resp.status in statuses


BAD_REQUESTS = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "differing-duplicate-cl": b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!" + SMUGGLED,
    "differing-cl-list": b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5, 6\r\n\r\n"
    b"hello!" + SMUGGLED,
    "invalid-cl": b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: +5\r\n\r\nhello" + SMUGGLED,
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Folded: a\r\n b\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Foo : a\r\n\r\n",
    "space-before-colon-cl": b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length : 5\r\n\r\nhello",
    "space-in-header-name": b"GET /echo HTTP/1.1\r\nHost: p\r\nX Foo: a\r\n\r\n",
    "cr-in-header-value": b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Foo: a\rb\r\n\r\n",
    "missing-host": b"GET /echo HTTP/1.1\r\nX-Foo: a\r\n\r\n",
    "duplicate-host": b"GET /echo HTTP/1.1\r\nHost: p\r\nHost: q\r\n\r\n",
    "bad-chunk-size": b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "target-not-origin-form": b"GET echo HTTP/1.1\r\nHost: p\r\n\r\n",
    "chunk-size-overflow": b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"10000000000000000005\r\nhello\r\n0\r\n\r\n",
    "negative-chunk-size": b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-5\r\nhello\r\n0\r\n\r\n",
    "nul-in-header-value": b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Foo: a\x00b\r\n\r\n",
    "invalid-method-token": b"G@T /echo HTTP/1.1\r\nHost: p\r\n\r\n",
    "space-in-target": b"GET /echo x HTTP/1.1\r\nHost: p\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_malformed_request_refused_400(proxy: ProxyProcess, up: UpstreamServer, name: str) -> None:
    assert_refused(raw_request(proxy.port, BAD_REQUESTS[name]))
    assert_upstream_saw_nothing(up)


@pytest.mark.parametrize(
    "te", ["gzip, chunked", "chunked, gzip", "identity", "xchunked", "chunked, chunked"]
)
def test_unknown_transfer_coding_refused(proxy: ProxyProcess, up: UpstreamServer, te: str) -> None:
    """RFC 9112 6.1/6.3: a request whose final coding is not chunked cannot be
    framed; one with a coding the server does not know earns 501 (SHOULD)."""
    reply = raw_request(
        proxy.port,
        f"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: {te}\r\n\r\n".encode()
        + b"5\r\nhello\r\n0\r\n\r\n"
        + SMUGGLED,
    )
    assert_refused(reply, (400, 501))
    assert_upstream_saw_nothing(up)


def test_oversized_uri_414(proxy: ProxyProcess, up: UpstreamServer) -> None:
    target = "/echo?" + "a" * 2000
    assert_refused(
        raw_request(proxy.port, f"GET {target} HTTP/1.1\r\nHost: p\r\n\r\n".encode()), (414,)
    )
    assert_upstream_saw_nothing(up)


def test_uri_under_the_limit_is_served(proxy: ProxyProcess) -> None:
    r = fetch(proxy.url("/fixed?" + "a" * 800))
    assert r.status == 200 and r.body == FIXED_BODY, r.describe()


def test_oversized_headers_431(proxy: ProxyProcess, up: UpstreamServer) -> None:
    headers = "".join(f"X-Filler-{i}: {'v' * 90}\r\n" for i in range(64))  # ~6.5 KiB
    reply = raw_request(proxy.port, f"GET /echo HTTP/1.1\r\nHost: p\r\n{headers}\r\n".encode())
    assert_refused(reply, (431,))
    assert_upstream_saw_nothing(up)


def test_one_huge_header_431(proxy: ProxyProcess, up: UpstreamServer) -> None:
    reply = raw_request(
        proxy.port, f"GET /echo HTTP/1.1\r\nHost: p\r\nX-Big: {'v' * 6000}\r\n\r\n".encode()
    )
    assert_refused(reply, (431,))
    assert_upstream_saw_nothing(up)


def test_headers_under_the_limit_are_served(proxy: ProxyProcess) -> None:
    args = []
    for i in range(20):
        args += ["-H", f"X-Filler-{i}: {'v' * 90}"]  # ~2.2 KiB
    r = fetch(proxy.url("/fixed"), *args)
    assert r.status == 200 and r.body == FIXED_BODY, r.describe()


def test_http10_without_host_is_served(proxy: ProxyProcess) -> None:
    reply = raw_request(proxy.port, b"GET /fixed HTTP/1.0\r\n\r\n")
    (resp,) = reply.responses()
    assert resp.status == 200 and resp.body == FIXED_BODY


def test_slowloris_partial_head_times_out(proxy: ProxyProcess, up: UpstreamServer) -> None:
    reply = raw_request(proxy.port, b"GET /echo HTTP/1.1\r\nHost: p\r\n", read_timeout=10)
    assert reply.closed, reply.describe()
    assert reply.elapsed < HEADER_TIMEOUT + 4, reply.describe()
    assert reply == b"" or reply.status == 408, reply.describe()
    assert_upstream_saw_nothing(up)


def test_slowloris_drip_cannot_extend_header_timeout(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """The whole head must arrive within header_timeout: a byte every 100ms
    must not keep resetting the clock."""
    start = time.monotonic()
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo HTTP/1.1\r\nHost: p\r\n")
        closed = False
        while time.monotonic() - start < HEADER_TIMEOUT + 5:
            try:
                conn.send(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            reply = conn.read_until_closed(0.1)
            if reply.closed:
                closed = True
                assert reply == b"" or reply.status == 408, reply.describe()
                break
    assert closed, "the proxy kept a dripping head open past header_timeout + 5s"
    assert_upstream_saw_nothing(up)


def test_bad_chunk_in_streaming_body_aborts_upstream(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """The head and a first chunk are valid and already streaming to the
    upstream when a malformed chunk arrives: the client gets 400 and a close,
    and the upstream sees its body aborted, never complete (nor the bad bytes)."""
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        up.wait_for(lambda s: any(r.body_len >= 5 for r in s.requests), what="first chunk")
        conn.send(b"zz\r\nworld\r\n0\r\n\r\n" + SMUGGLED)
        reply = conn.read_until_closed(5)
    assert reply.closed, reply.describe()
    assert reply.status == 400, reply.describe()
    (rec,) = up.wait_finished()
    assert not rec.body_complete, rec
    assert rec.error in ("eof", "reset"), f"upstream saw {rec.error!r}, body {rec.body!r}"
    time.sleep(0.25)
    assert [r.target for r in up.requests] == ["/echo"]


def test_chunk_without_crlf_after_data(proxy: ProxyProcess, up: UpstreamServer) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        up.wait_for(lambda s: any(r.body_len >= 5 for r in s.requests), what="first chunk")
        conn.send(b"3\r\nabcXY0\r\n\r\n")
        reply = conn.read_until_closed(5)
    assert reply.closed and reply.status == 400, reply.describe()
    (rec,) = up.wait_finished()
    assert not rec.body_complete and rec.error in ("eof", "reset"), rec


def test_proxy_still_serves_after_refusals(proxy: ProxyProcess) -> None:
    r = fetch(proxy.url("/fixed"))
    assert r.status == 200 and r.body == FIXED_BODY
