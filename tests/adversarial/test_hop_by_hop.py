"""Hop-by-hop abuse and forged forwarding headers (README, "Security notes").

What `Connection` names is removed, except the names that frame the message
or that the gateway writes or relies on, which are ignored; hop-by-hop
headers never go on; upgrades are answered 501; the forwarding headers the
upstream sees are the gateway's, never the client's (X-Forwarded-For only
has the client's claim before the address the gateway saw)."""

from __future__ import annotations

import json

import pytest

from support.adversarial import (
    SMUGGLED,
    Case,
    Refuse,
    Serve,
    assert_clean_head,
    params,
    run_case,
    send,
)
from support.client import RawConnection
from support.proxy import ProxyProcess
from support.upstream import RecordedRequest, UpstreamServer

pytestmark = [pytest.mark.engine, pytest.mark.adversarial]


def exchange(
    gateway: ProxyProcess, up: UpstreamServer, request: bytes, method: str = "GET"
) -> RecordedRequest:
    """Send one request; it must be answered 200 and reach the upstream once."""
    with RawConnection(gateway.port) as conn:
        send(conn, request)
        resp = conn.read_response(method, timeout=5)
        assert resp.status == 200, (resp.status, resp.body[:300])
        target = json.loads(resp.body)["target"]
        if resp.header("connection") != "close":
            send(conn, b"GET /after HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            after = conn.read_response(timeout=5)
            assert json.loads(after.body)["target"] == "/after"
    reqs = up.wait_finished()
    assert [r.target for r in reqs][:1] == [target], [r.target for r in reqs]
    assert all(r.target in (target, "/after") for r in reqs), [r.target for r in reqs]
    for rec in reqs:
        assert rec.body_complete and rec.error is None, rec
        assert_clean_head(rec)
    return reqs[0]


def tokens(rec: RecordedRequest, name: str) -> list[str]:
    return [t.strip().lower() for v in rec.header_all(name) for t in v.split(",") if t.strip()]


# -- what Connection can name ------------------------------------------------------------

# name -> (the client's line(s) for it, what the upstream must see for it)
NAMED: dict[str, tuple[bytes, list[str] | None]] = {
    # Ignored in Connection: they frame the message or the gateway relies on them.
    "host": (b"", ["gw.test"]),
    "authorization": (b"Authorization: Bearer abc\r\n", ["Bearer abc"]),
    # Written by the gateway: naming them changes nothing.
    "x-forwarded-for": (b"X-Forwarded-For: 203.0.113.9\r\n", ["203.0.113.9, 127.0.0.1"]),
    "x-forwarded-proto": (b"X-Forwarded-Proto: https\r\n", ["http"]),
    "x-forwarded-host": (b"X-Forwarded-Host: evil.test\r\n", ["gw.test"]),
    "x-request-id": (b"X-Request-Id: client-id-1\r\n", ["client-id-1"]),
    "via": (b"Via: 1.0 front\r\n", ["1.0 front, 1.1 meshgate"]),
    # Hop-by-hop whatever Connection says.
    "te": (b"TE: trailers\r\n", None),
    "trailer": (b"Trailer: X-T\r\n", None),
    "keep-alive": (b"Keep-Alive: timeout=5\r\n", None),
    "proxy-connection": (b"Proxy-Connection: keep-alive\r\n", None),
    "proxy-authorization": (b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n", None),
    "upgrade": (b"", None),
    # Forgeable: removed whatever Connection says.
    "forwarded": (b"Forwarded: for=203.0.113.9\r\n", None),
    "x-real-ip": (b"X-Real-IP: 203.0.113.9\r\n", None),
    # End-to-end ones: named, they are removed (RFC 9110 7.6.1).
    "x-custom": (b"X-Custom: 1\r\n", None),
    "cookie": (b"Cookie: a=b\r\n", None),
    "user-agent": (b"User-Agent: adv\r\n", None),
}


@pytest.mark.parametrize("style", ["alone", "listed", "upper"])
@pytest.mark.parametrize("name", sorted(NAMED))
def test_connection_naming(
    gateway: ProxyProcess, up: UpstreamServer, name: str, style: str
) -> None:
    line, expected = NAMED[name]
    value = {"alone": name, "listed": f"keep-alive, x-other , {name},", "upper": name.upper()}[
        style
    ]
    request = (
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nConnection: "
        + value.encode()
        + b"\r\n"
        + line
        + b"\r\n"
    )
    rec = exchange(gateway, up, request)
    assert rec.header_all(name) == (expected or []), rec.headers
    # The client's Connection tokens never go on.
    assert not set(tokens(rec, "connection")) - {"keep-alive", "close"}, rec.headers


@pytest.mark.parametrize("style", ["alone", "upper"])
def test_connection_naming_content_length(
    gateway: ProxyProcess, up: UpstreamServer, style: str
) -> None:
    value = b"content-length" if style == "alone" else b"CONTENT-LENGTH"
    request = (
        b"POST /h HTTP/1.1\r\nHost: gw.test\r\nConnection: " + value + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(SMUGGLED)
    ) + SMUGGLED
    rec = exchange(gateway, up, request, "POST")
    assert rec.body == SMUGGLED and rec.header_all("content-length") == [str(len(SMUGGLED))]


@pytest.mark.parametrize("style", ["alone", "upper"])
def test_connection_naming_transfer_encoding(
    gateway: ProxyProcess, up: UpstreamServer, style: str
) -> None:
    value = b"transfer-encoding" if style == "alone" else b"TRANSFER-ENCODING"
    request = (
        b"POST /h HTTP/1.1\r\nHost: gw.test\r\nConnection: " + value + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    )
    rec = exchange(gateway, up, request, "POST")
    assert rec.body == SMUGGLED and rec.framing == "chunked", rec


# -- Upgrade, TE, Trailer, Proxy-Connection -------------------------------------------------

WS = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked "Hello"

CASES = [
    Case(
        "upgrade-websocket",
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + WS
        + b"\r\n"
        + FRAME,
        Refuse((501,)),
    ),
    Case(
        "upgrade-h2c",
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n" + SMUGGLED,
        Refuse((501,)),
    ),
    Case(
        "upgrade-post-with-body",
        b"POST /h HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
        b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
        Refuse((501,)),
    ),
    Case(
        "upgrade-mixed-case",
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nupgrade: WebSocket\r\n"
        b"connection: keep-alive, UPGRADE\r\n" + WS + b"\r\n" + FRAME,
        Refuse((501,)),
    ),
    Case(
        "upgrade-without-connection",
        # Not a request to upgrade (RFC 9110 7.8): served, Upgrade not forwarded.
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\n" + WS + b"\r\n",
        Serve((("/h", b""),)),
    ),
    Case(
        "connection-upgrade-without-upgrade",
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nConnection: upgrade\r\n\r\n",
        Serve((("/h", b""),)),
    ),
    Case(
        "te-chunked-header-with-cl",
        # `TE` (what the client accepts), not Transfer-Encoding: framing is the CL.
        b"POST /h HTTP/1.1\r\nHost: gw.test\r\nTE: chunked\r\nContent-Length: 5\r\n\r\nhello",
        Serve((("/h", b"hello"),)),
    ),
    Case(
        "trailer-announces-framing",
        b"POST /h HTTP/1.1\r\nHost: gw.test\r\nTrailer: Content-Length, X-T\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        Serve((("/h", b"hello"),)),
    ),
    Case(
        "proxy-connection-close",
        b"GET /h HTTP/1.1\r\nHost: gw.test\r\nProxy-Connection: close\r\n\r\n",
        Serve((("/h", b""),)),
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_hop_by_hop(gateway: ProxyProcess, up: UpstreamServer, case: Case) -> None:
    run_case(gateway, up, case)
    for rec in up.requests:
        for name in ("upgrade", "te", "trailer", "proxy-connection", "keep-alive"):
            assert rec.header(name) is None, (name, rec.headers)
        assert rec.trailers == (), rec.trailers


# -- forged forwarding headers -----------------------------------------------------------

# The client's lines -> what the upstream must see, header by header.
FORGED: dict[str, tuple[bytes, dict[str, list[str]]]] = {
    "xff-two-lines": (
        b"X-Forwarded-For: 203.0.113.1\r\nX-Forwarded-For: 203.0.113.2\r\n",
        {"x-forwarded-for": ["203.0.113.1, 203.0.113.2, 127.0.0.1"]},
    ),
    "xff-odd-case": (
        b"x-FORWARDED-for: 203.0.113.1\r\n",
        {"x-forwarded-for": ["203.0.113.1, 127.0.0.1"]},
    ),
    "xfp-two-lines": (
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Proto: https\r\n",
        {"x-forwarded-proto": ["http"]},
    ),
    "xfh-two-lines": (
        b"X-Forwarded-Host: evil.test\r\nX-Forwarded-Host: evil2.test\r\n",
        {"x-forwarded-host": ["gw.test"]},
    ),
    "forwarded-variants": (
        b"Forwarded: for=203.0.113.9;proto=https\r\nFORWARDED: host=evil.test\r\n",
        {"forwarded": []},
    ),
    "forgeable-set": (
        b"X-Real-IP: 1.2.3.4\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /evil\r\n"
        b"X-Forwarded-Server: evil\r\nX-Forwarded-Uri: /evil\r\nX-Forwarded-Method: DELETE\r\n"
        b"X-Forwarded-Ssl: on\r\nX-Forwarded-Scheme: https\r\n"
        b"X-Forwarded-Client-Cert: By=spiffe://evil/x\r\n",
        {
            n: []
            for n in (
                "x-real-ip",
                "x-forwarded-port",
                "x-forwarded-prefix",
                "x-forwarded-server",
                "x-forwarded-uri",
                "x-forwarded-method",
                "x-forwarded-ssl",
                "x-forwarded-scheme",
                "x-forwarded-client-cert",
            )
        },
    ),
    "request-id-unsafe": (b"X-Request-Id: <script>\r\n", {}),
    # httpoxy: CGI-style servers read `Proxy` as HTTP_PROXY, the proxy their
    # own outgoing calls use.
    "httpoxy": (b"Proxy: http://evil.test:3128\r\nPROXY: http://evil2.test\r\n", {"proxy": []}),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_forged_forwarding_headers(gateway: ProxyProcess, up: UpstreamServer, name: str) -> None:
    lines, expected = FORGED[name]
    rec = exchange(gateway, up, b"GET /f HTTP/1.1\r\nHost: gw.test\r\n" + lines + b"\r\n")
    for header, values in expected.items():
        assert rec.header_all(header) == values, (header, rec.headers)
    # Whatever was forged, the gateway's own lines are there, once each.
    assert rec.header_all("x-forwarded-proto") == ["http"], rec.headers
    assert rec.header_all("x-forwarded-host") == ["gw.test"], rec.headers
    assert len(rec.header_all("x-forwarded-for")) == 1, rec.headers
    assert rec.header_all("x-forwarded-for")[0].endswith("127.0.0.1"), rec.headers
    (rid,) = rec.header_all("x-request-id")
    assert "<" not in rid, rec.headers


# CGI-style servers (WSGI, PHP, Rack) read `X_Forwarded_For` as X-Forwarded-For
# (both are HTTP_X_FORWARDED_FOR), as the README says of `X_Consumer`: an
# underscore spelling of a header the gateway owns must not reach them.
UNDERSCORED = [
    "X_Forwarded_For",
    "x_forwarded_for",
    "X-Forwarded_For",
    "X_Forwarded-Proto",
    "X_Forwarded_Host",
    "X_Real_IP",
    "X_Forwarded_Client_Cert",
    "X_Forwarded_Prefix",
    "X_Request_Id",
    "Content_Length",
    "Transfer_Encoding",
]


@pytest.mark.parametrize("spelling", UNDERSCORED)
def test_underscore_spellings_of_owned_headers_are_dropped(
    gateway: ProxyProcess, up: UpstreamServer, spelling: str
) -> None:
    request = b"GET /u HTTP/1.1\r\nHost: gw.test\r\n" + spelling.encode() + b": forged\r\n\r\n"
    rec = exchange(gateway, up, request)
    assert "forged" not in [v for _, v in rec.headers], rec.headers
