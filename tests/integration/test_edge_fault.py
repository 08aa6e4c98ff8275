"""A route's `fault:` in the real gateway: aborts, delays, header matching, /metrics.

Timing is only ever bounded from below (a delayed response takes at least
the delay); how much longer it takes depends on the machine.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pytest

from support.client import RawConnection, assert_problem, fetch, wait_until
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

DELAY = 0.3
HANG = 1.0


def _route(path: str, name: str, **fault: Any) -> dict[str, Any]:
    return {"path": path, "name": name, "upstream": "up", "fault": fault}


def _config(up: UpstreamServer) -> dict[str, Any]:
    return {
        "auth": {"keys": {"type": "api_key"}},
        "upstreams": {"up": upstream_block(up)},
        "routes": [
            _route("/abort/**", "abort", abort={"percent": 100, "status": 503}),
            _route("/half/**", "half", abort={"percent": 50, "status": 502}),
            _route("/slow/**", "slow", delay={"percent": 100, "duration": f"{DELAY * 1000:g}ms"}),
            _route(
                "/hdr/**",
                "hdr",
                abort={"percent": 100, "status": 503},
                headers={"x-fault": "1"},
            ),
            _route("/hang/**", "hang", delay={"percent": 100, "duration": f"{HANG:g}s"}),
            _route("/empty/**", "empty", abort={"percent": 100, "status": 204}),
            {
                **_route("/authed/**", "authed", abort={"percent": 100, "status": 503}),
                "auth": "keys",
            },
            {"path": "/plain/**", "upstream": "up"},
        ],
    }


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(_config(up))


def _paths(up: UpstreamServer, prefix: str) -> list[str]:
    return [r.path for r in up.requests if r.path.startswith(prefix)]


def _metric(proxy: ProxyProcess, route: str, kind: str) -> int | None:
    r = fetch(proxy.admin_url("/metrics"))
    assert r.status == 200, r.describe()
    for line in r.body.decode().splitlines():
        if line.startswith("meshgate_fault_injected_total{") and (
            f'route="{route}"' in line and f'kind="{kind}"' in line
        ):
            return int(line.rsplit(" ", 1)[1])
    return None


def test_abort_100_answers_from_the_gateway(proxy: ProxyProcess, up: UpstreamServer) -> None:
    for i in range(5):
        r = fetch(proxy.url(f"/abort/{i}"))
        doc = assert_problem(r, 503)
        assert doc["type"].endswith("/fault-injected"), doc
        assert r.header("x-meshgate-fault") == "abort"
    # A request after them that does go upstream: the aborted ones, sent
    # first on their own connections, would have arrived by now.
    assert fetch(proxy.url("/plain/after-abort")).status == 200
    up.wait_for_requests(1)
    assert _paths(up, "/abort") == []


def test_abort_below_300_has_no_body(proxy: ProxyProcess, up: UpstreamServer) -> None:
    r = fetch(proxy.url("/empty/x"))
    assert r.status == 204, r.describe()
    assert r.body == b""
    assert r.header("x-meshgate-fault") == "abort"
    assert fetch(proxy.url("/plain/after-empty")).status == 200
    assert _paths(up, "/empty") == []


def test_auth_answers_before_the_fault(proxy: ProxyProcess) -> None:
    """The fault runs after auth: without credentials the answer is 401, as
    it would be in a real outage, and strangers cannot trigger faults."""
    r = fetch(proxy.url("/authed/x"))
    assert_problem(r, 401)
    assert r.header("x-meshgate-fault") is None


def test_abort_50_percent_aborts_about_half(proxy: ProxyProcess, up: UpstreamServer) -> None:
    n = 400
    aborted = passed = 0
    with RawConnection(proxy.port) as conn:
        for i in range(n):
            conn.send(f"GET /half/{i} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
            resp = conn.read_response()
            if resp.status == 502:
                assert resp.header("x-meshgate-fault") == "abort", resp
                aborted += 1
            else:
                assert resp.status == 200, resp
                assert resp.header("x-meshgate-fault") is None
                passed += 1
    assert 0.35 * n <= aborted <= 0.65 * n, f"{aborted} of {n} aborted"
    up.wait_for(lambda s: len(_paths(s, "/half")) >= passed, what=f"{passed} /half requests")
    assert len(_paths(up, "/half")) == passed
    assert _metric(proxy, "half", "abort") == aborted


def test_delay_100_holds_each_request(proxy: ProxyProcess, up: UpstreamServer) -> None:
    for i in range(3):
        start = time.monotonic()
        r = fetch(proxy.url(f"/slow/{i}"))
        elapsed = time.monotonic() - start
        assert r.status == 200, r.describe()
        assert elapsed >= DELAY, f"answered after {elapsed:.3f}s"
        assert r.header("x-meshgate-fault") is None
    assert sorted(_paths(up, "/slow")) == ["/slow/0", "/slow/1", "/slow/2"]
    assert _metric(proxy, "slow", "delay") == 3
    assert _metric(proxy, "slow", "abort") is None  # not configured, not rendered


def test_header_matched_fault_only_affects_matching_requests(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    hit = fetch(proxy.url("/hdr/hit"), "-H", "x-fault: 1")
    assert_problem(hit, 503)
    assert hit.header("x-meshgate-fault") == "abort"
    for path, args in (
        ("/hdr/none", ()),
        ("/hdr/other", ("-H", "x-fault: 2")),
        ("/hdr/empty", ("-H", "x-fault;")),
    ):
        r = fetch(proxy.url(path), *args)
        assert r.status == 200, r.describe()
        assert r.header("x-meshgate-fault") is None
    recorded = {r.path: r for r in up.requests if r.path.startswith("/hdr")}
    assert sorted(recorded) == ["/hdr/empty", "/hdr/none", "/hdr/other"]
    # Untouched: the header goes upstream as the client sent it.
    assert recorded["/hdr/other"].header("x-fault") == "2"
    assert _metric(proxy, "hdr", "abort") == 1


def _reset(conn: RawConnection) -> None:
    """Close with a RST (SO_LINGER 0): the client is gone, not half-closed."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_a_client_gone_during_the_delay_never_reaches_the_upstream(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    before = _metric(proxy, "hang", "delay") or 0
    gone = RawConnection(proxy.port)
    gone.send(b"GET /hang/gone HTTP/1.1\r\nhost: t\r\n\r\n")
    wait_until(lambda: _metric(proxy, "hang", "delay") == before + 1, what="the delay to start")
    _reset(gone)
    # A second request on the same route, delayed as long but started later:
    # once it arrives upstream, the first would have been sent before it.
    start = time.monotonic()
    r = fetch(proxy.url("/hang/stayed"))
    assert r.status == 200, r.describe()
    assert time.monotonic() - start >= HANG
    up.wait_for(lambda s: "/hang/stayed" in _paths(s, "/hang"), what="/hang/stayed")
    time.sleep(0.3)  # and some slack for a connection the first would have opened
    assert _paths(up, "/hang") == ["/hang/stayed"]
    assert _metric(proxy, "hang", "delay") == before + 2


def test_metrics_count_delays_and_aborts(stack: Stack, upstream: UpstreamServer) -> None:
    config = {
        "upstreams": {"up": upstream_block(upstream)},
        "routes": [
            _route(
                "/both/**",
                "both",
                delay={"percent": 100, "duration": "10ms"},
                abort={"percent": 100, "status": 503},
                headers={"x-fault": True},
            ),
            _route("/never/**", "never", abort={"percent": 0, "status": 503}),
        ],
    }
    proxy = stack.proxy(config)
    for _ in range(3):
        r = fetch(proxy.url("/both/x"), "-H", "x-fault: yes")
        assert_problem(r, 503)
        assert r.header("x-meshgate-fault") == "abort"
    for _ in range(2):
        assert fetch(proxy.url("/both/x")).status == 200
        assert fetch(proxy.url("/never/x")).status == 200
    text = fetch(proxy.admin_url("/metrics")).body.decode()
    assert "# TYPE meshgate_fault_injected_total counter" in text
    assert _metric(proxy, "both", "delay") == 3
    assert _metric(proxy, "both", "abort") == 3
    assert _metric(proxy, "never", "abort") == 0
    assert _metric(proxy, "never", "delay") is None
    assert len(upstream.requests) == 4
