"""Circuit breaking and outlier detection, through the real gateway.

Upstreams are real servers told to fail (`UpstreamServer.forced`), to be
slow (`/slow?headers_delay=S`), or stopped. Timings are never asserted as
upper bounds; where "at once" matters, the 503s are compared with a delay the
test chose (they must come back before the slow upstream answers anything).
"""

from __future__ import annotations

import http.client
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from support.client import fetch, wait_until
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine


def _get(port: int, path: str) -> tuple[int, dict[str, str], float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, time.monotonic() - start
    finally:
        conn.close()


def _config(upstream: dict[str, Any]) -> dict[str, Any]:
    return {"upstreams": {"up": upstream}, "routes": [{"path": "/**", "upstream": "up"}]}


# -- circuit breaking ------------------------------------------------------------------


def test_max_pending_overflow_gets_503_at_once(stack: Stack) -> None:
    """2 connections, 10 waiting at most: of 100 concurrent slow requests, 12
    are served and 88 are refused before the upstream answers anything."""
    up = stack.upstream("slow")
    delay = 3.0
    proxy = stack.proxy(
        _config(
            upstream_block(
                up,
                pool={"max_connections": 2, "acquire_timeout": "60s"},
                circuit_breaker={"max_pending": 10},
                timeouts={"read": "60s", "total": "60s"},
            )
        )
    )
    with ThreadPoolExecutor(100) as pool:
        results = list(
            pool.map(lambda i: _get(proxy.port, f"/slow?headers_delay={delay}&i={i}"), range(100))
        )
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 12, 503: 88}, statuses
    for status, headers, elapsed in results:
        if status == 503:
            assert headers.get("x-meshgate-overloaded") == "1"
            assert headers.get("content-type") == "application/problem+json"
            assert elapsed < delay, elapsed  # refused before any answer came back
    # Nothing hangs: the upstream saw exactly the ones that were let through.
    assert len(up.requests) == 12


def test_max_requests_limits_requests_in_flight(stack: Stack) -> None:
    up = stack.upstream("slow")
    proxy = stack.proxy(
        _config(
            upstream_block(
                up, circuit_breaker={"max_requests": 5}, timeouts={"read": "60s", "total": "60s"}
            )
        )
    )
    with ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(lambda i: _get(proxy.port, f"/slow?headers_delay=2&i={i}"), range(20))
        )
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 5, 503: 15}, statuses
    r = fetch(proxy.admin_url("/upstreams"))
    doc = r.json()["up"]
    assert doc["overloaded"] == 15
    assert doc["in_flight"] == 0  # every request left the count when it ended


# -- outlier detection -------------------------------------------------------------------


def _three(stack: Stack, base: str = "1s") -> tuple[list[UpstreamServer], ProxyProcess]:
    ups = [stack.upstream(f"e{i}") for i in range(3)]
    proxy = stack.proxy(
        _config(
            upstream_block(
                *ups,
                balancer="round_robin",
                outlier_detection={
                    "consecutive_5xx": 3,
                    "consecutive_gateway_failure": 2,
                    "base_ejection_time": base,
                },
            )
        )
    )
    return ups, proxy


def test_an_endpoint_answering_500_is_ejected(stack: Stack) -> None:
    ups, proxy = _three(stack, base="60s")
    bad = ups[1]
    bad.forced = ("status", {"code": "500"})
    statuses = [fetch(proxy.url(f"/x/{i}")).status for i in range(300)]
    # It answers 500 three times in a row (round robin: once every third
    # request), then it is out: the rest all succeed.
    assert statuses.count(500) == 3, Counter(statuses)
    last_500 = max(i for i, s in enumerate(statuses) if s == 500)
    after = statuses[last_500 + 1 :]
    assert len(after) >= 280 and all(s == 200 for s in after)
    doc = fetch(proxy.admin_url("/upstreams")).json()["up"]
    states = {
        e["address"] if "address" in e else str(i): e["state"]
        for i, e in enumerate(doc["endpoints"])
    }
    assert list(states.values()).count("ejected") == 1, doc
    assert "ejected" in proxy.stderr_text()


def test_an_ejected_endpoint_serves_again_after_its_time(stack: Stack) -> None:
    ups, proxy = _three(stack)
    bad = ups[2]
    bad.forced = ("status", {"code": "503"})
    for i in range(12):
        fetch(proxy.url(f"/a/{i}"))
    served_while_bad = len(bad.requests)
    bad.forced = None  # it recovers
    # After base_ejection_time (1 s) it is back in rotation.
    wait_until(
        lambda: fetch(proxy.url("/b")).status == 200 and len(bad.requests) > served_while_bad,
        timeout=15,
        what="the ejected endpoint to get requests again",
    )
    assert "is back after its ejection" in proxy.stderr_text()


def test_a_dead_endpoint_is_ejected_after_gateway_failures(stack: Stack) -> None:
    ups, proxy = _three(stack, base="60s")
    ups[0].stop()
    statuses = [fetch(proxy.url(f"/d/{i}")).status for i in range(60)]
    assert statuses.count(502) == 2, Counter(statuses)  # consecutive_gateway_failure: 2
    assert statuses[-30:] == [200] * 30


def test_never_all_endpoints_are_ejected(stack: Stack) -> None:
    ups, proxy = _three(stack, base="60s")
    for up in ups:
        up.forced = ("status", {"code": "500"})
    statuses = [fetch(proxy.url(f"/all/{i}")).status for i in range(30)]
    assert set(statuses) == {500}
    doc = fetch(proxy.admin_url("/upstreams")).json()["up"]
    ejected = [e for e in doc["endpoints"] if e["state"] == "ejected"]
    assert len(ejected) == 1, doc  # 50% of 3 endpoints, rounded down
    assert "stays in" in proxy.stderr_text()
