"""CORS in the real gateway: preflights answered (or refused) at the edge, and the
response fields of actual requests, against a recording upstream."""

from __future__ import annotations

from typing import Any

import pytest

from support.client import CurlResponse, assert_problem, fetch
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

APP = "https://app.example.com"
VARY_PREFLIGHT = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def _config(up: UpstreamServer) -> dict[str, Any]:
    return {
        "auth": {"keys": {"type": "api_key"}},
        "upstreams": {"up": upstream_block(up)},
        "cors": {"origins": ["*"]},
        "routes": [
            {
                "path": "/open/**",
                "upstream": "up",
                "cors": {
                    "origins": [APP, "https://*.example.com"],
                    "methods": ["GET", "POST", "PUT"],
                    "headers": ["x-trace", "content-type"],
                    "expose_headers": ["x-total"],
                    "max_age": "10m",
                },
            },
            {
                "path": "/creds/**",
                "upstream": "up",
                "cors": {"origins": [APP], "credentials": True},
            },
            {"path": "/authed/**", "upstream": "up", "auth": "keys", "cors": {"origins": [APP]}},
            {"path": "/global/**", "upstream": "up"},
            {"path": "/off/**", "upstream": "up", "cors": False},
            {"path": "/plain/**", "upstream": "up", "cors": False},
        ],
    }


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(_config(up))


def _preflight(
    proxy: ProxyProcess,
    path: str,
    origin: str = APP,
    method: str = "GET",
    headers: str | None = None,
) -> CurlResponse:
    args = ["-X", "OPTIONS", "-H", f"Origin: {origin}"]
    args += ["-H", f"Access-Control-Request-Method: {method}"]
    if headers is not None:
        args += ["-H", f"Access-Control-Request-Headers: {headers}"]
    return fetch(proxy.url(path), *args)


def _cors_names(r: CurlResponse) -> list[str]:
    return [n for n in r.header_names() if n.startswith("access-control-")]


def _upstream_saw(proxy: ProxyProcess, up: UpstreamServer, prefix: str) -> list[str]:
    """The methods of the requests under `prefix` the upstream received, once a
    request sent after them has arrived (so none of them is still on its way)."""
    marker = f"/plain/after{prefix.replace('/', '-')}-{len(up.requests)}"
    assert fetch(proxy.url(marker)).status == 200
    up.wait_for(lambda s: any(r.path == marker for r in s.requests), what=marker)
    return [r.method for r in up.requests if r.path.startswith(prefix)]


def test_preflight_allowed_is_answered_at_the_gateway(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    r = _preflight(proxy, "/open/pf-ok", method="PUT", headers="Content-Type, X-Trace")
    assert r.status == 204, r.describe()
    assert r.body == b""
    assert r.header("access-control-allow-origin") == APP
    assert r.header("access-control-allow-methods") == "GET, POST, PUT"
    assert r.header("access-control-allow-headers") == "content-type, x-trace"
    assert r.header("access-control-max-age") == "600"
    assert r.header("access-control-allow-credentials") is None
    assert r.header("vary") == VARY_PREFLIGHT
    wild = _preflight(proxy, "/open/pf-wild", origin="https://a.example.com")
    assert wild.status == 204, wild.describe()
    assert wild.header("access-control-allow-origin") == "https://a.example.com"
    assert _upstream_saw(proxy, up, "/open/pf-") == []


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"origin": "https://evil.test"}, "origin"),
        ({"origin": "https://a.b.example.com"}, "origin"),
        ({"origin": "http://app.example.com"}, "origin"),
        ({"method": "DELETE"}, "DELETE"),
        ({"headers": "x-trace, x-secret"}, "x-secret"),
    ],
)
def test_preflight_refused(
    proxy: ProxyProcess, up: UpstreamServer, kwargs: dict[str, str], detail: str
) -> None:
    r = _preflight(proxy, "/open/pf-refused", **kwargs)
    doc = assert_problem(r, 403)
    assert doc["type"].endswith("/cors-refused"), doc
    assert detail in doc["detail"], doc
    assert _cors_names(r) == []
    assert _upstream_saw(proxy, up, "/open/pf-refused") == []


def test_actual_request_with_an_allowed_origin(proxy: ProxyProcess, up: UpstreamServer) -> None:
    r = fetch(proxy.url("/open/actual"), "-H", f"Origin: {APP}")
    assert r.status == 200, r.describe()
    assert r.header("access-control-allow-origin") == APP
    assert r.header("access-control-expose-headers") == "x-total"
    assert r.header("access-control-allow-credentials") is None
    assert r.header("access-control-allow-methods") is None  # preflight-only fields
    assert "Origin" in r.header_all("vary")
    seen = up.wait_for_requests(1)
    assert any(req.path == "/open/actual" and req.header("origin") == APP for req in seen)


def test_disallowed_origin_goes_upstream_without_cors_fields(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    r = fetch(proxy.url("/open/stranger"), "-H", "Origin: https://evil.test")
    assert r.status == 200, r.describe()
    assert _cors_names(r) == []
    assert "Origin" in r.header_all("vary")
    assert _upstream_saw(proxy, up, "/open/stranger") == ["GET"]


def test_options_without_request_method_goes_upstream(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    r = fetch(proxy.url("/open/options"), "-X", "OPTIONS", "-H", f"Origin: {APP}")
    assert r.status == 200, r.describe()
    assert r.header("access-control-allow-origin") == APP
    assert _upstream_saw(proxy, up, "/open/options") == ["OPTIONS"]


def test_credentials_echo_the_origin_never_a_star(proxy: ProxyProcess) -> None:
    pf = _preflight(proxy, "/creds/x")
    assert pf.status == 204, pf.describe()
    assert pf.header("access-control-allow-origin") == APP
    assert pf.header("access-control-allow-credentials") == "true"
    r = fetch(proxy.url("/creds/x"), "-H", f"Origin: {APP}")
    assert r.status == 200, r.describe()
    assert r.header_all("access-control-allow-origin") == [APP]
    assert r.header("access-control-allow-credentials") == "true"


def test_preflight_on_an_authed_route_needs_no_credentials(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    pf = _preflight(proxy, "/authed/x")
    assert pf.status == 204, pf.describe()
    assert pf.header("access-control-allow-origin") == APP
    assert pf.header("www-authenticate") is None
    assert pf.header("content-length") is None  # a 204 has none
    # The actual request still needs its key; its 401 is readable by the
    # page's script (it carries the CORS fields too).
    refused = fetch(proxy.url("/authed/x"), "-H", f"Origin: {APP}")
    assert_problem(refused, 401)
    assert refused.header("access-control-allow-origin") == APP
    assert _upstream_saw(proxy, up, "/authed/") == []


def test_top_level_cors_applies_unless_a_route_turns_it_off(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    pf = _preflight(proxy, "/global/x", origin="https://anyone.test")
    assert pf.status == 204, pf.describe()
    assert pf.header("access-control-allow-origin") == "*"
    r = fetch(proxy.url("/global/x"), "-H", "Origin: https://anyone.test")
    assert r.header("access-control-allow-origin") == "*"
    off = _preflight(proxy, "/off/x")
    assert off.status == 200, off.describe()  # cors: false: the upstream answers it
    assert _cors_names(off) == []
    assert _upstream_saw(proxy, up, "/off/") == ["OPTIONS"]


def test_an_upstreams_own_cors_fields_never_reach_the_client(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """On a route with CORS the gateway's policy is the only one a browser
    sees: the upstream's Access-Control-* fields are dropped, whatever the
    origin; its other fields pass."""
    leaky = (
        "/open/headers?add=Access-Control-Allow-Origin:*|Access-Control-Allow-Credentials:true"
        "|Access-Control-Max-Age:99|X-Kept:yes"
    )
    allowed = fetch(proxy.url(leaky), "-H", f"Origin: {APP}")
    assert allowed.status == 200, allowed.describe()
    assert allowed.header_all("access-control-allow-origin") == [APP]
    assert allowed.header("access-control-allow-credentials") is None
    assert allowed.header("access-control-max-age") is None
    assert allowed.header("x-kept") == "yes"
    stranger = fetch(proxy.url(leaky), "-H", "Origin: https://evil.example.net")
    assert stranger.status == 200, stranger.describe()
    assert stranger.header("access-control-allow-origin") is None
    # without CORS on the route, the upstream's fields are its own business
    plain = fetch(proxy.url(leaky.replace("/open/", "/plain/")), "-H", f"Origin: {APP}")
    assert plain.header("access-control-allow-origin") == "*"
