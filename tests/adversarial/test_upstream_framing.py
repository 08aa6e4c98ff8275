"""An upstream that answers with bad framing (RFC 9112 6.3: a proxy MUST
close the connection, discard it and answer 502). The scripted upstream
keeps each connection open after its bad answer, as a desynchronised server
would; the gateway must close it, and the next request must go on a fresh
connection and get its own answer, never the bad one's leftovers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from support.bad_upstream import ScriptedUpstream
from support.client import RawConnection, assert_problem
from support.proxy import ProxyProcess, Stack

pytestmark = [pytest.mark.engine, pytest.mark.adversarial]

OK = b"HTTP/1.1 200 OK\r\n"
# A second response hidden in the bad one: a desynchronised pool would hand
# it to the next request.
LEFTOVER = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nLEFTOVER"

# Bad answers that must become a 502 (the whole answer arrives in one read,
# before anything went to the client).
BAD_502: dict[str, bytes] = {
    "cl-two-differing": OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" + LEFTOVER,
    "cl-list-differing": OK + b"Content-Length: 5, 6\r\n\r\nhello!" + LEFTOVER,
    "cl-te": OK
    + b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "te-cl": OK
    + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "cl-plus": OK + b"Content-Length: +5\r\n\r\nhello" + LEFTOVER,
    "cl-minus": OK + b"Content-Length: -5\r\n\r\nhello" + LEFTOVER,
    "cl-hex": OK + b"Content-Length: 0x5\r\n\r\nhello" + LEFTOVER,
    "cl-space-inside": OK + b"Content-Length: 5 5\r\n\r\nhello" + LEFTOVER,
    "cl-overflow": OK + b"Content-Length: 18446744073709551621\r\n\r\nhello" + LEFTOVER,
    "chunk-size-bad": OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n" + LEFTOVER,
    "chunk-size-plus": OK
    + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "chunk-size-minus": OK
    + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "chunk-size-0x": OK + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n" + LEFTOVER,
    "chunk-size-overflow": OK
    + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-data-too-long": OK
    + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "chunk-size-bare-lf": OK
    + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "chunk-ext-bare-lf": OK + b"Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
    "trailer-nul": OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\x00b\r\n\r\n",
    "status-bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello" + LEFTOVER,
    "header-bare-lf": OK + b"Content-Length: 5\nX-A: 1\r\n\r\nhello" + LEFTOVER,
    "header-bare-cr": OK + b"X-A: a\rb\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "header-nul": OK + b"X-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "header-name-nul": OK + b"X-\x00A: a\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "header-obs-fold": OK + b"X-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "header-space-before-colon": OK + b"Content-Length : 5\r\n\r\nhello" + LEFTOVER,
    "header-no-colon": OK + b"X-A\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "status-code-long": b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello",
    "status-code-short": b"HTTP/1.1 20 OK\r\nContent-Length: 5\r\n\r\nhello",
    "status-not-http": b"HTTX/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "status-version-bad": b"HTTP/1.x 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "interim-then-bad": b"HTTP/1.1 100 Continue\r\n\r\n"
    + OK
    + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    + LEFTOVER,
    "garbage": b"THIS IS NOT HTTP\r\n\r\n",
    # Transfer codings meshgate does not undo: re-chunked, the client would
    # get compressed bytes with nothing saying so.
    "te-gzip-chunked": OK
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "te-gzip-then-chunked": OK
    + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    + LEFTOVER,
    "te-gzip-alone": OK + b"Transfer-Encoding: gzip\r\n\r\nhello",
    "switching-protocols-unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n\x81\x05hello",
}
# Valid framing, followed by bytes nobody asked for: the answer is the
# first, and that connection is not pooled. (A NUL in the reason phrase
# decides no framing, and the client gets meshgate's own status line.)
EXTRA_AFTER_ANSWER = {
    "extra-after-answer": OK + b"Content-Length: 5\r\n\r\nhello" + LEFTOVER,
    "status-nul": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "connection-close-then-more": OK
    + b"Connection: close\r\nContent-Length: 5\r\n\r\nhello"
    + LEFTOVER,
    "http10-then-more": b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
    "interim-flood": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 2000
    + OK
    + b"Content-Length: 5\r\n\r\nhello"
    + LEFTOVER,
}
# The head goes to the client before the body breaks: the client must see
# the transfer cut off (a reset), never a clean end.
BROKEN_MID_BODY: dict[str, bytes] = {
    "mid-chunk-bad": OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "mid-chunk-overflow": OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}
LATER = {
    "mid-chunk-bad": b"zz\r\nworld\r\n0\r\n\r\n",
    "mid-chunk-overflow": b"10000000000000000005\r\n",
}


@pytest.fixture(scope="module")
def bad_upstream() -> Iterator[ScriptedUpstream]:
    answers = {
        **BAD_502,
        **EXTRA_AFTER_ANSWER,
        "204-with-body": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello" + LEFTOVER,
        "huge-head": OK + b"X-A: " + b"v" * (4 << 20) + b"\r\nContent-Length: 5\r\n\r\nhello",
        "header-count-bomb": OK + b"X-A: 1\r\n" * 500_000 + b"Content-Length: 5\r\n\r\nhello",
    }
    for kind, first in BROKEN_MID_BODY.items():
        answers[kind] = first
    server = ScriptedUpstream(answers)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def gateway(module_stack: Stack, bad_upstream: ScriptedUpstream) -> ProxyProcess:
    return module_stack.proxy(
        {
            "upstreams": {
                "bad": {
                    "endpoints": [bad_upstream.address],
                    "timeouts": {"read": "3s"},
                }
            },
            "routes": [{"path": "/**", "upstream": "bad"}],
        }
    )


@pytest.fixture(autouse=True)
def _alive(gateway: ProxyProcess) -> Iterator[None]:
    yield
    assert gateway.alive, f"meshgate died; stderr:\n{gateway.stderr_text()}"
    assert "Traceback" not in gateway.stderr_text(), gateway.stderr_text()[-3000:]


def get(conn: RawConnection, path: str) -> None:
    conn.send(f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())


def follow_up_is_fresh_and_correct(gateway: ProxyProcess, bad: ScriptedUpstream, tag: str) -> None:
    """The connections that carried a bad answer are closed by the gateway;
    the next request goes on one that never did, and gets its own answer."""
    bad.wait_bad_closed()
    tainted = {c.conn_id for c in bad.connections if c.answered_bad}
    path = f"/ok/{tag}"
    with RawConnection(gateway.port) as conn:
        get(conn, path)
        resp = conn.read_response(timeout=5)
    assert resp.status == 200, resp
    fields = dict(part.split("=", 1) for part in resp.body.decode().split(" "))
    assert fields["target"] == path, resp.body
    assert int(fields["conn"]) not in tainted, (resp.body, tainted)
    assert b"LEFTOVER" not in resp.body


@pytest.mark.parametrize("kind", sorted(BAD_502))
def test_bad_upstream_framing_is_502_and_the_connection_dropped(
    gateway: ProxyProcess, bad_upstream: ScriptedUpstream, kind: str
) -> None:
    with RawConnection(gateway.port) as conn:
        get(conn, f"/bad/{kind}")
        resp = conn.read_response(timeout=10)
        assert_problem(resp, 502)
        assert b"LEFTOVER" not in resp.body
        if resp.header("connection") != "close":
            # The client's connection is still in step with the gateway's.
            get(conn, f"/ok/same-client-{kind}")
            again = conn.read_response(timeout=5)
            assert again.status == 200 and f"target=/ok/same-client-{kind}".encode() in again.body
    follow_up_is_fresh_and_correct(gateway, bad_upstream, kind)


@pytest.mark.parametrize("kind", sorted(EXTRA_AFTER_ANSWER))
def test_bytes_after_a_whole_answer_close_the_connection(
    gateway: ProxyProcess, bad_upstream: ScriptedUpstream, kind: str
) -> None:
    """A valid answer with a second one glued on: the first is the answer,
    the second goes to no client, and that connection is not pooled."""
    with RawConnection(gateway.port) as conn:
        get(conn, f"/bad/{kind}")
        resp = conn.read_response(timeout=5)
    if resp.status == 502:
        assert_problem(resp, 502)
    else:
        assert (resp.status, resp.reason, resp.body) == (200, "OK", b"hello"), resp
    follow_up_is_fresh_and_correct(gateway, bad_upstream, kind)


@pytest.mark.parametrize("kind", sorted(BROKEN_MID_BODY))
def test_body_breaking_after_the_head_resets_the_client(
    gateway: ProxyProcess, bad_upstream: ScriptedUpstream, kind: str
) -> None:
    """The head and a first chunk are already the client's when the bad
    chunk comes: the client sees the transfer cut off, never a clean end."""
    with RawConnection(gateway.port) as conn:
        get(conn, f"/bad/{kind}")
        head = conn.recv_some(len(OK), timeout=5)
        assert head == OK, head
        # The rest of the bad answer, on the connection it was answering.
        time.sleep(0.1)
        (tainted,) = [c for c in bad_upstream.connections if kind in " ".join(c.targets)]
        bad_upstream.send_on(tainted.conn_id, LATER[kind])
        reply = conn.read_until_closed(5)
    assert reply.closed, reply.describe()
    assert not bytes(reply).endswith(b"0\r\n\r\n"), reply.describe()
    follow_up_is_fresh_and_correct(gateway, bad_upstream, kind)


def test_204_with_a_body_reaches_the_client_without_one(
    gateway: ProxyProcess, bad_upstream: ScriptedUpstream
) -> None:
    """A 204 has no body and no Content-Length (RFC 9110 8.6): the upstream's
    `Content-Length: 5` and its five bytes must not reach the client, which
    could otherwise read the next response as this one's body."""
    with RawConnection(gateway.port) as conn:
        get(conn, "/bad/204-with-body")
        resp = conn.read_response(timeout=5)
        assert resp.status == 204 and resp.body == b"", resp
        assert resp.header("content-length") is None, resp.headers
        if resp.header("connection") != "close":
            get(conn, "/ok/after-204")
            again = conn.read_response(timeout=5)
            assert b"target=/ok/after-204" in again.body, again
    follow_up_is_fresh_and_correct(gateway, bad_upstream, "204")


@pytest.mark.parametrize("kind", ["huge-head", "header-count-bomb"])
def test_oversized_upstream_head_is_502(
    gateway: ProxyProcess, bad_upstream: ScriptedUpstream, kind: str
) -> None:
    """A response head past `limits.max_response_header_bytes` (60 KiB by
    default): 4 MiB in one header, or half a million short lines. Neither
    is buffered whole nor forwarded: 502, and that connection is closed."""
    with RawConnection(gateway.port) as conn:
        get(conn, f"/bad/{kind}")
        resp = conn.read_response(timeout=10)
    doc = assert_problem(resp, 502)
    assert doc["type"].endswith("/upstream-bad-response"), doc
    assert len(resp.headers) < 20, resp.headers[:20]
    follow_up_is_fresh_and_correct(gateway, bad_upstream, kind)
