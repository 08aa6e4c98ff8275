"""Malformed request heads at the gateway: bare LF and bare CR, NUL and other
control bytes, obs-fold, request-line tricks, absolute-form URIs to a foreign
host, CONNECT, `Expect: 100-continue` edge cases and oversized request lines
and headers. A head the gateway cannot read exactly one way is refused, and
nothing of it reaches the upstream."""

from __future__ import annotations

import json

import pytest

from support.adversarial import (
    REFUSED,
    SMUGGLED,
    Case,
    Refuse,
    Serve,
    assert_clean_head,
    assert_refused,
    assert_upstream_saw_nothing,
    params,
    run_case,
    send,
)
from support.client import IncompleteResponse, RawConnection
from support.proxy import ProxyProcess, Stack
from support.upstream import UpstreamServer

pytestmark = [pytest.mark.engine, pytest.mark.adversarial]

GET = b"GET /g HTTP/1.1\r\nHost: gw.test\r\n"


def get(lines: bytes) -> bytes:
    return GET + lines + b"\r\n"


CONTROL_BYTES = {f"ctl-{b:02x}": bytes([b]) for b in [*range(0x01, 0x09), *range(0x0B, 0x20), 0x7F]}

CASES = [
    # -- line endings -------------------------------------------------------------
    Case("bare-lf-everywhere", b"GET /g HTTP/1.1\nHost: gw.test\n\n", Refuse()),
    Case("bare-lf-request-line", b"GET /g HTTP/1.1\nHost: gw.test\r\n\r\n", Refuse()),
    Case("bare-lf-header", get(b"X-A: 1\nX-B: 2\r\n"), Refuse()),
    Case("bare-lf-end-of-head", GET + b"X-A: 1\r\n\n", Refuse()),
    Case(
        "bare-lf-hides-request",
        # `X: a\nGET /smuggled ...` is one header line to a parser that wants
        # CRLF, two lines to one that takes LF.
        get(b"X-A: a\n" + SMUGGLED[:-4] + b"\r\n"),
        Refuse(),
    ),
    Case("bare-cr-request-line", b"GET /g HTTP/1.1\rHost: gw.test\r\n\r\n", Refuse()),
    Case("bare-cr-header-value", get(b"X-A: a\rb\r\n"), Refuse()),
    Case("bare-cr-end-of-line", get(b"X-A: a\r\r\n"), Refuse()),
    Case("bare-cr-header-name", get(b"X\r-A: a\r\n"), Refuse()),
    Case("crcr-end-of-head", GET + b"X-A: 1\r\n\r\r\n", Refuse()),
    # -- NUL and control bytes ---------------------------------------------------------
    Case("nul-in-method", b"G\x00T /g HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("nul-in-target", b"GET /g\x00x HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("nul-in-version", b"GET /g HTTP/1.1\x00\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("nul-in-header-name", get(b"X-\x00A: a\r\n"), Refuse()),
    Case("nul-in-header-value", get(b"X-A: a\x00b\r\n"), Refuse()),
    Case("nul-in-host", b"GET /g HTTP/1.1\r\nHost: gw\x00.test\r\n\r\n", Refuse()),
    Case("nul-before-head", b"\x00GET /g HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("del-in-header-name", get(b"X-\x7fA: a\r\n"), Refuse()),
    Case("ctl-in-target", b"GET /g\x1bx HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("space-in-host", b"GET /g HTTP/1.1\r\nHost: gw .test\r\n\r\n", Refuse()),
    Case("tab-in-host", b"GET /g HTTP/1.1\r\nHost: gw\t.test\r\n\r\n", Refuse()),
    # -- obs-fold and header-line shapes ----------------------------------------------
    Case("obs-fold-space", get(b"X-A: a\r\n b\r\n"), Refuse()),
    Case("obs-fold-tab", get(b"X-A: a\r\n\tb\r\n"), Refuse()),
    Case("obs-fold-into-host", b"GET /g HTTP/1.1\r\nHost: gw.test\r\n evil.test\r\n\r\n", Refuse()),
    Case("obs-fold-first-line", b"GET /g HTTP/1.1\r\n Host: gw.test\r\n\r\n", Refuse()),
    Case("header-without-colon", get(b"X-A a\r\n"), Refuse()),
    Case("header-empty-name", get(b": a\r\n"), Refuse()),
    Case("header-space-before-colon", get(b"X-A : a\r\n"), Refuse()),
    Case("header-tab-before-colon", get(b"X-A\t: a\r\n"), Refuse()),
    Case("header-name-with-space", get(b"X A: a\r\n"), Refuse()),
    Case("header-name-with-slash", get(b"X/A: a\r\n"), Refuse()),
    Case("header-name-non-ascii", get(b"X-\xe9: a\r\n"), Refuse()),
    Case("host-missing", b"GET /g HTTP/1.1\r\nX-A: a\r\n\r\n", Refuse()),
    Case("host-twice", b"GET /g HTTP/1.1\r\nHost: gw.test\r\nHost: evil.test\r\n\r\n", Refuse()),
    Case("host-list", b"GET /g HTTP/1.1\r\nHost: gw.test, evil.test\r\n\r\n", Refuse()),
    # -- the request line -----------------------------------------------------------------
    Case(
        "method-lowercase-served",
        b"get /g HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Serve((("/g", b""),), or_refuse=(400, 405, 501)),
    ),
    Case("method-bad-token", b"G(T /g HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case(
        "double-space",
        # RFC 9112 3 lets a recipient split on whitespace runs: safe either way.
        b"GET  /g HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Serve((("/g", b""),), or_refuse=(400,)),
    ),
    Case("tab-separator", b"GET\t/g HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("trailing-space", b"GET /g HTTP/1.1 \r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("no-version", b"GET /g\r\nHost: gw.test\r\n\r\n", Refuse((505,))),
    Case("http09", b"GET /g\r\n\r\n", Refuse((505,))),
    Case("http09-explicit", b"GET /g HTTP/0.9\r\nHost: gw.test\r\n\r\n", Refuse((505,))),
    Case("version-lowercase", b"GET /g http/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("version-1-2", b"GET /g HTTP/1.2\r\nHost: gw.test\r\n\r\n", Refuse(REFUSED)),
    Case("version-2", b"GET /g HTTP/2.0\r\nHost: gw.test\r\n\r\n", Refuse((505,))),
    Case("version-garbage", b"GET /g HTTP/1.x\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Refuse(REFUSED)),
    Case("target-relative", b"GET g HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case("target-space", b"GET /g x HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case(
        "target-backslash-crlf",
        b"GET /g\\r\\nX HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Serve((("/g\\r\\nX", b""),), or_refuse=(400,)),
    ),
    Case(
        "target-dotdot-escape",
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Serve((("/etc/passwd", b""),), or_refuse=(400,)),
    ),
    Case("options-star-served", b"OPTIONS * HTTP/1.1\r\nHost: gw.test\r\n\r\n", Serve(())),
    Case("star-with-get", b"GET * HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse()),
    Case(
        "empty-lines-before",
        b"\r\n\r\nGET /g HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Serve((("/g", b""),), or_refuse=(400,)),
    ),
    # -- CONNECT (documented: 501) ----------------------------------------------------------------
    Case(
        "connect", b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", Refuse(REFUSED)
    ),
    Case(
        "connect-with-tunnel-bytes",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n" + SMUGGLED,
        Refuse(REFUSED),
    ),
    Case("connect-origin-form", b"CONNECT /g HTTP/1.1\r\nHost: gw.test\r\n\r\n", Refuse(REFUSED)),
    Case(
        "connect-with-body",
        b"CONNECT evil.test:80 HTTP/1.1\r\nHost: evil.test:80\r\nContent-Length: %d\r\n\r\n"
        % len(SMUGGLED)
        + SMUGGLED,
        Refuse(REFUSED),
    ),
    # -- Expect ---------------------------------------------------------------------------------
    Case(
        "expect-unknown",
        b"POST /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 200-ok\r\nContent-Length: %d\r\n\r\n"
        % len(SMUGGLED)
        + SMUGGLED,
        Serve((), status=417),
    ),
    Case(
        "expect-continue-and-more",
        b"POST /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue, x\r\n"
        b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
        Serve((), status=417),
    ),
    Case(
        "expect-continue-body-at-once",
        b"POST /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        % len(SMUGGLED)
        + SMUGGLED,
        Serve((("/g", SMUGGLED),)),
    ),
    Case(
        "expect-continue-case",
        b"POST /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-Continue\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        Serve((("/g", b"hello"),)),
    ),
    Case(
        "expect-continue-no-body",
        b"GET /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n\r\n",
        Serve((("/g", b""),)),
    ),
    Case(
        "expect-continue-http10",
        b"POST /g HTTP/1.0\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        Serve((("/g", b"hello"),)),
    ),
    Case(
        "expect-continue-chunked",
        b"POST /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Serve((("/g", b"hello"),)),
    ),
    # -- sizes ------------------------------------------------------------------------------------
    Case(
        "target-too-long",
        b"GET /" + b"a" * 4000 + b" HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Refuse((414,)),
    ),
    Case(
        "method-too-long",
        b"A" * 4000 + b" /g HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        Refuse((400, 414, 431, 501)),
    ),
    Case("header-name-too-long", get(b"X" * 10000 + b": a\r\n"), Refuse((431,))),
    Case("header-value-too-long", get(b"X-A: " + b"v" * 10000 + b"\r\n"), Refuse((431,))),
    Case(
        "headers-too-many-bytes",
        get(b"".join(b"X-%d: %s\r\n" % (i, b"v" * 60) for i in range(200))),
        Refuse((431,)),
    ),
    Case(
        "host-too-long",
        b"GET /g HTTP/1.1\r\nHost: " + b"h" * 10000 + b"\r\n\r\n",
        Refuse((400, 431)),
    ),
]
CASES += [
    Case(f"{name}-in-header-value", get(b"X-A: a" + byte + b"b\r\n"), Refuse())
    for name, byte in CONTROL_BYTES.items()
]
CASES += [
    Case(f"{name}-in-header-name", get(b"X-A" + byte + b": a\r\n"), Refuse())
    for name, byte in CONTROL_BYTES.items()
    if byte != b"\t"
]


@pytest.mark.parametrize("case", params(CASES))
def test_syntax(gateway: ProxyProcess, up: UpstreamServer, case: Case) -> None:
    run_case(gateway, up, case)


def test_tab_in_header_value_is_served(gateway: ProxyProcess, up: UpstreamServer) -> None:
    """HTAB is field content (RFC 9110 5.5): kept as sent."""
    run_case(gateway, up, Case("tab", get(b"X-A: a\tb\r\n"), Serve((("/g", b""),))))
    rec = up.requests[0]
    assert rec.header_all("x-a") == ["a\tb"], rec.headers


def test_oversized_line_without_end_is_refused_promptly(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    """A request line that never ends is cut at the limit, not at the header
    timeout, and not buffered without bound."""
    with RawConnection(gateway.port) as conn:
        send(conn, b"GET /" + b"a" * 64 * 1024)
        reply = conn.read_until_closed(5)
    assert_refused(reply, (400, 414, 431))
    assert reply.elapsed < 1.5, reply.describe()
    assert_upstream_saw_nothing(up)


def test_oversized_header_line_without_end_is_refused_promptly(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    with RawConnection(gateway.port) as conn:
        send(conn, GET + b"X-A: " + b"v" * 64 * 1024)
        reply = conn.read_until_closed(5)
    assert_refused(reply, (431,))
    assert reply.elapsed < 1.5, reply.describe()
    assert_upstream_saw_nothing(up)


# -- absolute-form URIs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoy(module_stack: Stack) -> UpstreamServer:
    """A server on loopback that no route names: an open proxy would reach it."""
    return module_stack.upstream("decoy")


@pytest.mark.parametrize(
    "target",
    [
        "http://{decoy}/secret",
        "http://{decoy}/secret?x=1",
        "HTTP://{decoy}/secret",
        "https://{decoy}/secret",
        "http://user:pass@{decoy}/secret",
    ],
)
def test_absolute_form_to_a_foreign_host_reaches_only_the_route(
    gateway: ProxyProcess, up: UpstreamServer, decoy: UpstreamServer, target: str
) -> None:
    """RFC 9112 3.2.2: the authority of an absolute-form target replaces Host.
    It is routed like that Host: to the configured upstream, never to the
    host it names, which sees nothing; the upstream gets origin-form."""
    decoy.clear()
    url = target.format(decoy=decoy.address)
    request = f"GET {url} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()
    with RawConnection(gateway.port) as conn:
        send(conn, request)
        resp = conn.read_response(timeout=5)
        if resp.status != 200:
            # Refusing it is as safe (a 4xx, and nothing forwarded).
            assert 400 <= resp.status < 500, resp
            assert_upstream_saw_nothing(up)
            assert decoy.bytes_received == 0
            return
        assert json.loads(resp.body)["target"].startswith("/secret"), resp.body
    (rec,) = up.requests
    assert rec.target.startswith("/secret"), rec.target
    # One Host, the URI's authority (as RFC 9112 3.2.2 says), never both.
    assert rec.header_all("host") == [decoy.address], rec.headers
    assert_clean_head(rec)
    assert decoy.bytes_received == 0 and decoy.requests == []


def test_absolute_form_with_bad_authority_is_refused(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    with RawConnection(gateway.port) as conn:
        send(conn, b"GET http://ev il.test/secret HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        reply = conn.read_until_closed(5)
    assert_refused(reply, (400,))
    assert_upstream_saw_nothing(up)


# -- Expect: the body that follows a refusal ----------------------------------------------------


def test_expect_refused_then_body_is_never_a_request(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    """A request with `Expect: 100-continue` refused before its body (an
    unknown expectation): a client sending the body anyway must not get it
    read as a request of its own."""
    with RawConnection(gateway.port) as conn:
        send(
            conn,
            b"POST /g HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue, x\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SMUGGLED),
        )
        resp = conn.read_response("POST", timeout=5)
        assert resp.status == 417, resp
        send(conn, SMUGGLED)
        # The body is read as the body it is: the next request is answered
        # as itself (or the connection is closed).
        try:
            send(conn, b"GET /after HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            after = conn.read_response(timeout=5)
        except (OSError, IncompleteResponse):
            after = None
    if after is not None:
        assert json.loads(after.body)["target"] == "/after", after.body[:300]
    assert [r.target for r in up.requests] in ([], ["/after"]), up.requests
