"""Routing through the real gateway: path, host, method and header matching,
`strip_prefix`, `rewrite` and round robin, with curl as the client."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from support.client import curl, fetch
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

NAMES = ("orders", "hosted", "writer", "reader", "canary", "stable", "misc", "rr1", "rr2")


@pytest.fixture(scope="module")
def servers(module_stack: Stack) -> dict[str, UpstreamServer]:
    return {name: module_stack.upstream(name) for name in NAMES}


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, servers: dict[str, UpstreamServer]) -> ProxyProcess:
    ups = {name: upstream_block(servers[name]) for name in NAMES[:7]}
    ups["rr"] = upstream_block(servers["rr1"], servers["rr2"], balancer="round_robin")
    routes = [
        {"path": "/api/orders/**", "upstream": "orders"},
        {"path": "/**", "host": "admin.example.com", "upstream": "hosted"},
        {"path": "/wild/**", "host": "*.wild.test", "upstream": "hosted"},
        {"path": "/items", "methods": ["POST", "PUT"], "upstream": "writer"},
        {"path": "/items", "upstream": "reader"},
        {"path": "/flags/**", "headers": {"x-canary": "1"}, "upstream": "canary"},
        {"path": "/flags/**", "upstream": "stable"},
        {"path": "/present/**", "headers": {"x-debug": True}, "upstream": "canary"},
        {"path": "/present/**", "headers": {"x-debug": False}, "upstream": "stable"},
        {"path": "/svc/**", "strip_prefix": True, "upstream": "misc"},
        {"path": "/legacy/**", "strip_prefix": "/legacy", "upstream": "misc"},
        {"path": "/users/{id}/profile", "rewrite": "/v2/profiles/{id}", "upstream": "misc"},
        {"path": "/old/**", "rewrite": "/new/{**}", "upstream": "misc"},
        {"path": "/rr/**", "upstream": "rr"},
    ]
    return module_stack.proxy({"upstreams": ups, "routes": routes})


@pytest.fixture(autouse=True)
def _clear(servers: dict[str, UpstreamServer]) -> None:
    for s in servers.values():
        s.clear()


def via(proxy: ProxyProcess, path: str, *args: str) -> tuple[str | None, str | None]:
    """(upstream name, target it received) for one request through the proxy."""
    r = fetch(proxy.url(path), *args)
    assert r.returncode == 0, r.describe()
    if r.status != 200:
        return None, str(r.status)
    return r.header("x-upstream"), r.json()["target"]


@pytest.mark.parametrize(
    ("path", "args", "expected"),
    [
        ("/api/orders/7", [], ("orders", "/api/orders/7")),
        ("/api/orders", [], ("orders", "/api/orders")),
        ("/api/orders/7/items?x=1", [], ("orders", "/api/orders/7/items?x=1")),
        ("/api/orders/7", ["-H", "Host: admin.example.com"], ("hosted", "/api/orders/7")),
        ("/anything", ["-H", "Host: admin.example.com:8080"], ("hosted", "/anything")),
        ("/anything", ["-H", "Host: ADMIN.example.com"], ("hosted", "/anything")),
        ("/wild/x", ["-H", "Host: a.wild.test"], ("hosted", "/wild/x")),
        ("/items", ["-X", "POST", "-d", "x"], ("writer", "/items")),
        ("/items", ["-X", "PUT", "-d", "x"], ("writer", "/items")),
        ("/items", [], ("reader", "/items")),
        ("/flags/a", ["-H", "x-canary: 1"], ("canary", "/flags/a")),
        ("/flags/a", ["-H", "x-canary: 2"], ("stable", "/flags/a")),
        ("/flags/a", [], ("stable", "/flags/a")),
        ("/present/a", ["-H", "x-debug: anything"], ("canary", "/present/a")),
        ("/present/a", [], ("stable", "/present/a")),
    ],
)
def test_routes_by_path_host_method_header(
    proxy: ProxyProcess, path: str, args: list[str], expected: tuple[str, str]
) -> None:
    assert via(proxy, path, *args) == expected


@pytest.mark.parametrize(
    "path",
    ["/nothing", "/wild/x", "/api/order"],  # /wild/x without a *.wild.test host
)
def test_unmatched_request_is_404_and_reaches_no_upstream(
    proxy: ProxyProcess, servers: dict[str, UpstreamServer], path: str
) -> None:
    r = fetch(proxy.url(path))
    assert r.status == 404, r.describe()
    assert all(s.requests == [] for s in servers.values())


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/svc/a/b?q=1", "/a/b?q=1"),
        ("/svc", "/"),
        ("/svc/", "/"),
        ("/legacy/x/y", "/x/y"),
        ("/users/42/profile?x=1", "/v2/profiles/42?x=1"),
        ("/old/a/b", "/new/a/b"),
        ("/old/a/b?k=v&k=w", "/new/a/b?k=v&k=w"),
    ],
)
def test_strip_prefix_and_rewrite(proxy: ProxyProcess, path: str, target: str) -> None:
    assert via(proxy, path) == ("misc", target)


def test_round_robin_over_two_endpoints_new_connections(proxy: ProxyProcess) -> None:
    seen = Counter(via(proxy, f"/rr/{i}")[0] for i in range(10))
    assert seen == {"rr1": 5, "rr2": 5}


def test_round_robin_is_per_request_on_one_client_connection(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    args = []
    for i in range(10):
        args += ["-o", str(tmp_path / f"{i}.json"), proxy.url(f"/rr/{i}")]
    cp = curl("-w", "%{num_connects}\n", *args)
    assert cp.returncode == 0, cp.stderr
    assert sum(int(n) for n in cp.stdout.split()) == 1  # one client connection
    seen = Counter(json.loads((tmp_path / f"{i}.json").read_bytes())["upstream"] for i in range(10))
    assert seen == {"rr1": 5, "rr2": 5}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/svc/../api/orders/1", ("orders", "/api/orders/1")),
        ("/svc/%2e%2e/api/orders/1", ("orders", "/api/orders/1")),
        ("//api//orders/1", ("orders", "/api/orders/1")),
        ("/api/orders/../../svc/x", ("misc", "/x")),
        ("/api%2Forders/1", (None, "404")),  # an encoded slash is not a separator
    ],
)
def test_routes_on_the_path_it_forwards(
    proxy: ProxyProcess, path: str, expected: tuple[str | None, str]
) -> None:
    """Dot segments and repeated slashes: the route chosen and the target sent
    must agree, so that no upstream receives a path its route did not match.
    Refusing such a path (400) is also acceptable."""
    got = via(proxy, path, "--path-as-is")
    assert got == expected or got == (None, "400"), got


def test_repeated_requests_route_the_same_through_the_route_cache(
    module_stack: Stack,
) -> None:
    """With no header matchers, decisions are remembered per (method, Host,
    target): the same target under another Host or method still routes on
    its own, and rewrites repeat exactly."""
    a, b = module_stack.upstream("cache-a"), module_stack.upstream("cache-b")
    proxy = module_stack.proxy(
        {
            "upstreams": {"a": upstream_block(a), "b": upstream_block(b)},
            "routes": [
                {"path": "/x/**", "host": "b.example", "upstream": "b"},
                {"path": "/x/**", "methods": ["POST"], "upstream": "b"},
                {"path": "/r/{id}", "rewrite": "/v2/{id}", "upstream": "a"},
                {"path": "/x/**", "upstream": "a"},
            ],
        }
    )
    for _ in range(3):
        assert fetch(proxy.url("/x/1?q=1")).status == 200
        assert fetch(proxy.url("/x/1?q=1"), "-H", "host: b.example").status == 200
        assert fetch(proxy.url("/x/1?q=1"), "-X", "POST", "--data", "z").status == 200
        assert fetch(proxy.url("/r/7")).status == 200
        assert fetch(proxy.url("/r/8")).status == 200
    got_a = [(r.method, r.target) for r in a.requests]
    got_b = sorted((r.method, r.target) for r in b.requests)
    assert got_a == [("GET", "/x/1?q=1"), ("GET", "/v2/7"), ("GET", "/v2/8")] * 3
    assert got_b == [("GET", "/x/1?q=1")] * 3 + [("POST", "/x/1?q=1")] * 3
