"""Header handling through the real gateway: hop-by-hop removal both ways,
X-Forwarded-*, X-Request-Id, Host policies and Via, with curl as the client."""

from __future__ import annotations

import pytest

from support.client import fetch
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import RecordedRequest, UpstreamServer

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(
        {
            "upstreams": {
                "preserve": upstream_block(up, host="preserve"),
                "rewrite": upstream_block(up, host="rewrite"),
                "literal": upstream_block(up, host="backend.internal"),
                "default": upstream_block(up),
            },
            "routes": [
                {"path": "/preserve/**", "upstream": "preserve"},
                {"path": "/rewrite/**", "upstream": "rewrite"},
                {"path": "/literal/**", "upstream": "literal"},
                {"path": "/**", "upstream": "default"},
            ],
        }
    )


@pytest.fixture(autouse=True)
def _clear(up: UpstreamServer) -> None:
    up.clear()


def one(up: UpstreamServer) -> RecordedRequest:
    (rec,) = up.requests
    return rec


def test_hop_by_hop_request_headers_removed(proxy: ProxyProcess, up: UpstreamServer) -> None:
    r = fetch(
        proxy.url("/echo"),
        "-H",
        "Connection: X-Foo, keep-alive",
        "-H",
        "X-Foo: secret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "X-Bar: end-to-end",
    )
    assert r.status == 200, r.describe()
    rec = one(up)
    names = rec.header_names()
    for hop in ("x-foo", "keep-alive", "proxy-connection"):
        assert hop not in names, f"{hop} forwarded: {rec.headers}"
    tokens = [t.strip().lower() for v in rec.header_all("connection") for t in v.split(",")]
    assert "x-foo" not in tokens, rec.headers
    assert rec.header("x-bar") == "end-to-end"


def test_hop_by_hop_response_headers_removed(proxy: ProxyProcess) -> None:
    r = fetch(proxy.url("/hop"))
    assert r.status == 200, r.describe()
    names = r.header_names()
    for hop in ("x-resp-hop", "keep-alive", "proxy-connection"):
        assert hop not in names, f"{hop} reached the client: {r.headers}"
    tokens = [t.strip().lower() for v in r.header_all("connection") for t in v.split(",")]
    assert "x-resp-hop" not in tokens, r.headers
    assert r.header("x-resp-end") == "kept"


def test_x_forwarded_headers_added(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/echo"), "-H", "Host: api.example.com")
    rec = one(up)
    assert rec.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert rec.header("x-forwarded-proto") == "http"
    assert rec.header("x-forwarded-host") == "api.example.com"


def test_x_forwarded_for_appended(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/echo"), "-H", "X-Forwarded-For: 203.0.113.7, 198.51.100.2")
    rec = one(up)
    hops = [h.strip() for v in rec.header_all("x-forwarded-for") for h in v.split(",")]
    assert hops == ["203.0.113.7", "198.51.100.2", "127.0.0.1"], rec.headers


def test_request_id_propagated(proxy: ProxyProcess, up: UpstreamServer) -> None:
    r = fetch(proxy.url("/echo"), "-H", "X-Request-Id: abc-123")
    assert one(up).header_all("x-request-id") == ["abc-123"]
    assert r.header("x-request-id") == "abc-123"


def test_request_id_generated_and_returned(proxy: ProxyProcess, up: UpstreamServer) -> None:
    first = fetch(proxy.url("/echo"))
    second = fetch(proxy.url("/echo"))
    sent = [r.header("x-request-id") for r in up.requests]
    assert all(sent) and sent[0] != sent[1], sent
    assert [first.header("x-request-id"), second.header("x-request-id")] == sent


def test_host_preserve(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/preserve/x"), "-H", "Host: api.example.com:8443")
    assert one(up).header_all("host") == ["api.example.com:8443"]


def test_host_preserved_by_default(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/echo"))
    assert one(up).header_all("host") == [f"127.0.0.1:{proxy.port}"]


def test_host_rewrite(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/rewrite/x"), "-H", "Host: api.example.com")
    rec = one(up)
    assert rec.header_all("host") == [up.address]
    assert rec.header("x-forwarded-host") == "api.example.com"


def test_host_literal(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/literal/x"), "-H", "Host: api.example.com")
    rec = one(up)
    assert rec.header_all("host") == ["backend.internal"]
    assert rec.header("x-forwarded-host") == "api.example.com"


def test_via_added_to_request(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/echo"))
    (via,) = one(up).header_all("via")
    assert via.startswith("1.1 "), via


def test_via_appended_to_existing(proxy: ProxyProcess, up: UpstreamServer) -> None:
    fetch(proxy.url("/echo"), "-H", "Via: 1.0 fred")
    hops = [h.strip() for v in one(up).header_all("via") for h in v.split(",")]
    assert hops[0] == "1.0 fred" and len(hops) == 2 and hops[1].startswith("1.1 "), hops


def test_via_added_to_response(proxy: ProxyProcess) -> None:
    """RFC 9110 7.6.3: a proxy MUST send Via in each message it forwards."""
    r = fetch(proxy.url("/fixed"))
    assert any(v.strip().startswith("1.1 ") for v in r.header_all("via")), r.headers
