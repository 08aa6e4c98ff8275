"""Buffered routes (aggregation, body mapping) against clients that misbehave:
a body that stops coming, a pipelined `Expect: 100-continue`, values that
would climb a backend's tree or spoof a header the route adds, a Host that is
not a host, header values that are not ASCII."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.client import RawConnection, fetch
from support.jsonapi import JsonApi
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

ORDER = {"id": "o-1", "customer_id": "c-1"}


@pytest.fixture(scope="module")
def api() -> Iterator[JsonApi]:
    def answer(req: Any) -> tuple[int, Any]:
        return 200, {"path": req.target, "tenant": req.header_all("x-tenant")}

    with JsonApi(answer) as server:
        yield server


@pytest.fixture(scope="module")
def slow_up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("slow")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, api: JsonApi, slow_up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(
        {
            "upstreams": {"api": upstream_block(api), "slow": upstream_block(slow_up)},
            "routes": [
                {
                    "path": "/agg/{id}",
                    "timeouts": {"total": "600ms"},
                    "aggregate": {
                        "backends": [
                            {"upstream": "api", "path": "/orders/{id}", "group": "order"},
                            {
                                "upstream": "api",
                                "path": "/users/{query.u}/orders",
                                "group": "user",
                                "required": False,
                            },
                            {
                                "upstream": "api",
                                "path": "/names/{header.x-name}",
                                "group": "name",
                                "required": False,
                            },
                        ]
                    },
                    "transform": {"request": {"headers": {"add": {"x-tenant": "acme"}}}},
                },
                {"path": "/slow/**", "upstream": "slow"},
                {
                    "path": "/mapped/**",
                    "upstream": "slow",
                    "transform": {"request": {"body": {"rename": {"/a": "b"}}}},
                },
            ],
        }
    )


def test_a_body_that_stops_coming_is_cut_off_with_408(proxy: ProxyProcess, api: JsonApi) -> None:
    api.clear()
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /agg/o-1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        resp = conn.read_response("POST", timeout=10)
        took = time.monotonic() - started
        assert resp.status == 408, resp
        assert resp.header("connection") == "close"
        conn.read_until_closed(timeout=5)
        assert conn.eof
    assert took < 5, took  # the route's 600 ms, on the sweep's tick
    assert api.requests == []  # no backend was called


def test_100_continue_waits_for_the_pipelined_answer_ahead(proxy: ProxyProcess) -> None:
    """A buffered request behind a slow one: its `100 Continue` must not land
    inside the first response."""
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"GET /slow/slow?headers_delay=0.3&chunks=0 HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"POST /agg/o-1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        first = conn.read_response("GET")
        assert first.status == 200, first
        assert b"100 Continue" not in first.body
        conn.send(b"{}")
        second = conn.read_response("POST")
        assert second.status == 200, second
        assert second.interim == [100]
        assert second.json()["order"]["path"] == "/orders/o-1"


def test_dot_segments_from_values_never_reach_a_backend(proxy: ProxyProcess, api: JsonApi) -> None:
    api.clear()
    for value in ("..", "."):
        r = fetch(proxy.url(f"/agg/o-1?u={value}"))
        assert r.status == 200, r.describe()
        doc = r.json()
        assert "user" not in doc
        (error,) = [e for e in doc["errors"] if e["backend"] == "user"]
        assert error["status"] == 400 and error["type"].endswith("/aggregate-bad-input")
    assert not [p for p in api.paths if p.startswith("/users") or p == "/orders"]
    ok = fetch(proxy.url("/agg/o-1?u=a..b")).json()
    assert ok["user"]["path"] == "/users/a..b/orders"


def test_a_header_the_route_adds_cannot_be_spoofed(proxy: ProxyProcess) -> None:
    doc = fetch(proxy.url("/agg/o-1"), "-H", "X-Tenant: evil").json()
    assert doc["order"]["tenant"] == ["acme"]


def test_header_values_are_percent_encoded_as_their_bytes(proxy: ProxyProcess) -> None:
    doc = fetch(proxy.url("/agg/o-1"), "-H", "X-Name: Zoë").json()
    assert doc["name"]["path"] == "/names/Zo%C3%AB"


@pytest.mark.parametrize(
    ("host", "kind"),
    [(b"a b", b"bad-host"), (b"a\tb", b"bad-host"), (b"a\x01b", b"bad-request")],
)
def test_a_host_that_is_not_a_host_is_a_400(proxy: ProxyProcess, host: bytes, kind: bytes) -> None:
    """(llhttp itself refuses most control characters in any field.)"""
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /agg/o-1 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        resp = conn.read_response()
    assert resp.status == 400, resp
    assert b"/problems/" + kind + b'"' in resp.body, resp.body
    assert "handler failed" not in proxy.stderr_text()


def test_a_declared_length_past_max_body_is_refused_before_the_body(
    proxy: ProxyProcess, api: JsonApi
) -> None:
    api.clear()
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST /agg/o-1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        resp = conn.read_response("POST", timeout=5)
        assert resp.status == 413, resp
        assert resp.interim == []  # no 100 Continue invited the body
        assert resp.header("connection") == "close"
    assert api.requests == []


def test_pipelined_big_bodies_behind_a_slow_answer(proxy: ProxyProcess) -> None:
    """Two mapped requests of 300 KB queued behind a slow one: their bodies
    are read when their turn comes, and all three are answered in order."""
    payload = json.dumps({"a": "x" * 300_000}).encode()
    mapped = json.dumps({"b": "x" * 300_000}, separators=(",", ":")).encode()
    post = (
        b"POST /mapped/echo HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /slow/slow?headers_delay=0.3&chunks=0 HTTP/1.1\r\nHost: gw\r\n\r\n")
        conn.send(post + post)
        assert conn.read_response("GET").status == 200
        for _ in range(2):
            resp = conn.read_response("POST")
            assert resp.status == 200, resp
            doc = resp.json()
            assert doc["body_len"] == len(mapped)
            assert doc["body_sha256"] == hashlib.sha256(mapped).hexdigest()
