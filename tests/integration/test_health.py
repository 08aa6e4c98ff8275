"""Active health checks, through the real gateway and real upstream servers.

Checks run every 0.2 s here; an endpoint is made to fail its checks with
`UpstreamServer.forced` (which fails every request it gets, so no client
request is sent while it is on its way down), by a health path that always
fails (`/status/503`), or by stopping it. Counts of checks over a window are
bounded loosely on purpose: what they prove is "the old checks stopped",
tens against a handful.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from support.client import fetch, wait_until
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

HEALTH = {
    "path": "/healthz",
    "interval": "0.2s",
    "timeout": "1s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 2,
}


def _config(upstream: dict[str, Any], **more: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstreams": {"up": upstream, **more},
        "routes": [{"path": "/**", "upstream": "up"}]
        + [{"path": f"/{name}/**", "upstream": name} for name in more],
    }


def _three(stack: Stack, **health: Any) -> tuple[list[UpstreamServer], ProxyProcess]:
    ups = [stack.upstream(f"e{i}") for i in range(3)]
    proxy = stack.proxy(
        _config(upstream_block(*ups, balancer="round_robin", health_check={**HEALTH, **health}))
    )
    return ups, proxy


def _endpoints(proxy: ProxyProcess, upstream: str = "up") -> dict[str, dict[str, Any]]:
    doc = fetch(proxy.admin_url("/upstreams")).json()[upstream]
    return {e["address"]: e for e in doc["endpoints"]}


def _wait_health(proxy: ProxyProcess, up: UpstreamServer, health: str, timeout: float = 10) -> Any:
    return wait_until(
        lambda: (e := _endpoints(proxy)[up.address])["health"] == health and e,
        timeout=timeout,
        what=f"{up.name} to be {health}",
    )


def _checks(up: UpstreamServer, path: str = "/healthz") -> int:
    return sum(1 for r in up.requests if r.target == path)


def _served(up: UpstreamServer, path: str = "/healthz") -> int:
    return sum(1 for r in up.requests if r.target != path)


def test_a_failing_endpoint_is_taken_out_and_comes_back(stack: Stack) -> None:
    ups, proxy = _three(stack)
    for up in ups:
        _wait_health(proxy, up, "up")
    bad = ups[1]
    bad.forced = ("status", {"code": "503"})
    doc = _wait_health(proxy, bad, "down")
    assert doc["in_service"] is False and doc["state"] == "down"
    assert doc["last_check"]["ok"] is False
    assert doc["last_check"]["result"] == "status 503"
    assert "is down after 2 failed health checks in a row" in proxy.stderr_text()

    # Out of the list: every request is served by the other two.
    before = _served(bad)
    statuses = [fetch(proxy.url(f"/x/{i}")).status for i in range(60)]
    assert statuses == [200] * 60, Counter(statuses)
    assert _served(bad) == before
    assert sum(_served(up) for up in ups if up is not bad) >= 60

    bad.forced = None  # it recovers
    doc = _wait_health(proxy, bad, "up")
    assert doc["in_service"] is True and doc["last_check"]["passes_in_a_row"] >= 2
    proxy.wait_for_log("back in service after 2 passed health checks in a row")
    statuses = [fetch(proxy.url(f"/y/{i}")).status for i in range(30)]
    assert statuses == [200] * 30
    assert _served(bad) - before == 10  # round robin over three again

    # Checks never use the request pool: each has a connection of its own.
    checks = [r for r in bad.requests if r.target == "/healthz"]
    assert len(checks) >= 5  # 1 before, 2 failing, 2 passing at least
    assert all(r.seq == 0 and r.method == "GET" for r in checks)
    assert all(r.header("connection") == "close" for r in checks)
    assert {r.header("host") for r in checks} == {bad.address}
    assert {r.header("user-agent") for r in checks} == {"meshgate-health-check"}


def test_a_stopped_endpoint_goes_down(stack: Stack) -> None:
    ups, proxy = _three(stack)
    ups[0].stop()
    doc = _wait_health(proxy, ups[0], "down")
    assert doc["last_check"]["result"] == "connection refused"
    statuses = [fetch(proxy.url(f"/d/{i}")).status for i in range(30)]
    assert statuses == [200] * 30, Counter(statuses)


def test_upstreams_shows_health_and_all_down_still_serve(stack: Stack) -> None:
    a, b, plain = stack.upstream("a"), stack.upstream("b"), stack.upstream("plain")
    proxy = stack.proxy(
        _config(
            upstream_block(
                a, b, health_check={**HEALTH, "path": "/status/503", "host": "health.internal"}
            ),
            plain=upstream_block(plain),
        )
    )
    for up in (a, b):
        _wait_health(proxy, up, "down")
    # Every endpoint failing its checks: rather than nothing, all serve.
    assert all(e["in_service"] for e in _endpoints(proxy).values())
    assert "no endpoint is in service, so all of them get requests" in proxy.stderr_text()
    statuses = [fetch(proxy.url(f"/z/{i}")).status for i in range(10)]
    assert statuses == [200] * 10
    assert _served(a, "/status/503") == _served(b, "/status/503") == 5
    assert {r.header("host") for r in a.requests if r.target == "/status/503"} == {
        "health.internal"
    }

    doc = fetch(proxy.admin_url("/upstreams")).json()
    assert doc["up"]["health_check"] == {"path": "/status/503", "interval_s": 0.2}
    assert doc["plain"]["health_check"] is None
    (unchecked,) = doc["plain"]["endpoints"]
    assert unchecked["health"] == "unchecked" and unchecked["last_check"] is None
    assert unchecked["in_service"] is True
    assert _checks(plain) == 0


def test_a_reload_replaces_the_checks_and_keeps_their_state(stack: Stack) -> None:
    good, bad = stack.upstream("good"), stack.upstream("bad")
    fast = {**HEALTH, "interval": "0.1s"}
    proxy = stack.proxy(_config(upstream_block(good, bad, health_check=fast)))
    bad.forced = ("status", {"code": "503"})
    _wait_health(proxy, bad, "down")
    wait_until(lambda: _checks(good) >= 5, what="checks of the good endpoint")

    slow = {**HEALTH, "interval": "2s"}
    proxy.reload(_config(upstream_block(good, bad, health_check=slow)))
    wait_until(
        lambda: (
            fetch(proxy.admin_url("/upstreams")).json()["up"]["health_check"]["interval_s"] == 2.0
        ),
        what="the reload",
    )
    # The new checks took over: the dead endpoint is still out, at once.
    assert _endpoints(proxy)[bad.address]["health"] == "down"
    statuses = [fetch(proxy.url(f"/r/{i}")).status for i in range(10)]
    assert statuses == [200] * 10
    assert _served(bad) == 0

    # Over 3 s the old checks (every 0.1 s) would send ~30 each; the new ones
    # (every 2 s, the first within 2 s of the reload) send 1 or 2.
    time.sleep(0.3)
    start = {up.name: _checks(up) for up in (good, bad)}
    time.sleep(3.0)
    counts = {up.name: _checks(up) - start[up.name] for up in (good, bad)}
    assert all(1 <= n <= 4 for n in counts.values()), counts

    # A reload without health checks stops them all.
    proxy.reload(_config(upstream_block(good, bad)))
    wait_until(
        lambda: fetch(proxy.admin_url("/upstreams")).json()["up"]["health_check"] is None,
        what="the second reload",
    )
    time.sleep(0.3)
    start = {up.name: _checks(up) for up in (good, bad)}
    time.sleep(2.5)
    assert {up.name: _checks(up) - start[up.name] for up in (good, bad)} == {"good": 0, "bad": 0}
    assert all(e["health"] == "unchecked" for e in _endpoints(proxy).values())
