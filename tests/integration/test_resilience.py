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
    assert "circuit breaker open" in proxy.stderr_text()


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
    bad.forced = ("status", {"code": "500"})  # (a 503 is steered away from instead)
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


def test_a_dead_endpoint_leaves_rotation_on_its_first_refused_connect(stack: Stack) -> None:
    ups, proxy = _three(stack, base="60s")
    ups[0].stop()
    statuses = [fetch(proxy.url(f"/d/{i}")).status for i in range(60)]
    # Not after consecutive_gateway_failure (2) tries: the first refused
    # connect takes it out (no retry is configured here, so that one is a 502).
    assert Counter(statuses) == {200: 59, 502: 1}, Counter(statuses)


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


# -- retries ---------------------------------------------------------------------------


def _retrying(
    stack: Stack, ups: list[UpstreamServer], upstream: dict[str, Any] | None = None, **retry: Any
) -> ProxyProcess:
    return stack.proxy(
        _config(
            upstream_block(
                *ups,
                balancer="round_robin",
                retry={"attempts": 3, **retry},
                timeouts={"connect": "1s"},
                **(upstream or {}),
            )
        )
    )


def _many(port: int, paths: list[str], workers: int = 4) -> list[int]:
    with ThreadPoolExecutor(workers) as pool:
        return [status for status, _, _ in pool.map(lambda p: _get(port, p), paths)]


def test_a_killed_endpoint_costs_the_client_nothing(stack: Stack) -> None:
    """One of 3 endpoints dies while GETs are in flight (some mid-response):
    the client sees no failure."""
    ups = [stack.upstream(f"k{i}") for i in range(3)]
    proxy = _retrying(stack, ups)
    paths = [f"/slow?headers_delay=0.01&i={i}" for i in range(600)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_get, proxy.port, p) for p in paths]
        ups[1].wait_for(lambda s: len(s.requests) >= 40, what="load on the endpoint")
        ups[1].stop()  # its connections reset; new ones are refused
        statuses = [f.result()[0] for f in futures]
    assert set(statuses) == {200}, Counter(statuses)
    assert "retry budget exhausted" not in proxy.stderr_text()


def test_an_endpoint_answering_500_is_retried_then_ejected(stack: Stack) -> None:
    """1 of 3 answers 500 every time: its first answers are retried on the
    others, then it is ejected; at least 99.9% of requests succeed."""
    ups = [stack.upstream(f"f{i}") for i in range(3)]
    ups[0].forced = ("status", {"code": "500"})
    proxy = _retrying(
        stack,
        ups,
        upstream={"outlier_detection": {"consecutive_5xx": 3, "base_ejection_time": "60s"}},
        on=["5xx"],
    )
    statuses = _many(proxy.port, [f"/f/{i}" for i in range(1000)])
    assert statuses.count(200) >= 999, Counter(statuses)
    assert 3 <= len(ups[0].requests) < 20  # tried until ejected; its 500s never forwarded


def test_no_retry_storm_when_everything_fails(stack: Stack) -> None:
    """All endpoints answer 503 and every request could be tried 5 times: the
    budget (20% of requests + 10/s over 10 s) caps what the upstreams get."""
    ups = [stack.upstream(f"s{i}") for i in range(2)]
    for up in ups:
        up.forced = ("status", {"code": "503"})
    proxy = _retrying(stack, ups, attempts=5, backoff={"base": "1ms", "max": "2ms"})
    n = 600
    started = time.monotonic()
    statuses = _many(proxy.port, [f"/s/{i}" for i in range(n)])
    elapsed = time.monotonic() - started
    assert set(statuses) == {503}
    received = sum(len(up.requests) for up in ups)
    window = 10.0
    allowed = n * 1.2 + 10 * max(elapsed, window)
    assert n < received <= allowed, (received, allowed)
    assert "retry budget exhausted" in proxy.stderr_text()
    doc = fetch(proxy.admin_url("/upstreams")).json()["up"]
    assert doc["retry_budget_exhausted"] > 0 and doc["retried"] == received - n, doc


def test_a_post_is_not_retried_once_its_bytes_were_sent(stack: Stack) -> None:
    ups = [stack.upstream(f"p{i}") for i in range(2)]
    for up in ups:
        up.forced = ("close", {})  # reads the request, closes without answering
    proxy = _retrying(stack, ups, on=["reset", "connect-failure"])
    r = fetch(proxy.url("/p"), "-X", "POST", "--data-binary", "order=1")
    assert r.status == 502, r.describe()
    posts = [q for up in ups for q in up.requests if q.method == "POST"]
    assert len(posts) == 1  # the upstream log proves it
    # The same failure on a GET is retried (attempts: 3).
    r = fetch(proxy.url("/g"))
    assert r.status == 502
    gets = [q for up in ups for q in up.requests if q.method == "GET"]
    assert len(gets) == 3


def test_a_post_is_retried_when_nothing_was_sent(stack: Stack) -> None:
    dead, alive = stack.upstream("dead"), stack.upstream("alive")
    proxy = _retrying(stack, [dead, alive])
    dead.stop()
    for i in range(6):
        r = fetch(proxy.url(f"/post/{i}"), "-X", "POST", "--data-binary", f"n={i}")
        assert r.status == 200, r.describe()
    bodies = sorted(bytes(q.body) for q in alive.requests)
    assert bodies == [f"n={i}".encode() for i in range(6)]


def test_a_body_is_sent_again_whole_and_a_large_one_is_not_retried(stack: Stack) -> None:
    bad, good = stack.upstream("bad"), stack.upstream("good")
    bad.forced = ("close", {})
    proxy = _retrying(stack, [bad, good], attempts=2)
    body = bytes(range(256)) * 40  # 10 KiB
    small = stack.directory / "small.bin"
    small.write_bytes(body)
    statuses = []
    for i in range(4):
        r = fetch(proxy.url(f"/put/{i}"), "-X", "PUT", "--data-binary", f"@{small}")
        statuses.append(r.status)
    assert statuses == [200] * 4
    assert all(bytes(q.body) == body for q in good.requests)
    big = stack.directory / "big.bin"
    big.write_bytes(b"x" * (128 * 1024))  # past the 64 KiB kept for replay
    results = [
        fetch(proxy.url(f"/big/{i}"), "-X", "PUT", "--data-binary", f"@{big}").status
        for i in range(4)
    ]
    assert results.count(502) >= 1 and set(results) <= {200, 502}, results


# -- deadlines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "budget_ms"),
    [("x-meshgate-deadline: 300", 300), ("grpc-timeout: 250m", 250), ("grpc-timeout: 1S", 1000)],
)
def test_a_client_deadline_shortens_the_wait_and_goes_upstream(
    stack: Stack, header: str, budget_ms: int
) -> None:
    up = stack.upstream("deadline")
    proxy = stack.proxy(_config(upstream_block(up, timeouts={"read": "30s", "total": "30s"})))
    delay = 3.0
    started = time.monotonic()
    r = fetch(proxy.url(f"/slow?headers_delay={delay}"), "-H", header)
    elapsed = time.monotonic() - started
    assert r.status == 504, r.describe()
    assert elapsed < delay  # answered on the client's deadline, not the upstream's pace
    sent = up.requests[0].header("x-meshgate-deadline")
    assert sent is not None and 0 < int(sent) <= budget_ms, sent
    # The client's own header is not forwarded as it came: it is renewed.
    assert up.requests[0].header_all("x-meshgate-deadline") == [sent]
    grpc = up.requests[0].header_all("grpc-timeout")
    if header.startswith("grpc"):
        assert len(grpc) == 1 and 0 < int(grpc[0][:-1]) <= budget_ms, grpc
    else:
        assert grpc == []


def test_the_remaining_budget_goes_upstream_without_a_client_deadline(stack: Stack) -> None:
    up = stack.upstream("budget")
    proxy = stack.proxy(_config(upstream_block(up, timeouts={"total": "20s"})))
    assert fetch(proxy.url("/b"), "-H", "x-meshgate-deadline: soon").status == 200
    sent = up.requests[0].header("x-meshgate-deadline")
    assert sent is not None and 19_000 <= int(sent) <= 20_000, sent


# -- load balancing away from 429/503 -----------------------------------------------------


@pytest.mark.parametrize("balancer", ["round_robin", "least_request", "ewma"])
def test_an_endpoint_answering_503_is_avoided_for_a_while(stack: Stack, balancer: str) -> None:
    busy, calm = stack.upstream("busy"), stack.upstream("calm")
    busy.forced = ("status", {"code": "503"})
    proxy = stack.proxy(_config(upstream_block(busy, calm, balancer=balancer)))
    started = time.monotonic()
    statuses = [fetch(proxy.url(f"/a/{i}")).status for i in range(30)]
    elapsed = time.monotonic() - started
    # It is picked until it first says 503; then, for SHUN_TIME (5 s), only
    # when nothing else can serve (a slow machine may see the 5 s pass).
    allowed = 2 + int(elapsed // 5)
    assert len(busy.requests) <= allowed, (Counter(statuses), elapsed)
    assert statuses.count(200) >= 30 - allowed


def test_a_route_timeout_overrides_its_upstreams(stack: Stack) -> None:
    up = stack.upstream("t")
    proxy = stack.proxy(
        {
            "upstreams": {"up": upstream_block(up, timeouts={"read": "30s", "total": "30s"})},
            "routes": [
                {"path": "/quick/**", "upstream": "up", "timeouts": {"total": "300ms"}},
                {"path": "/**", "upstream": "up"},
            ],
        }
    )
    started = time.monotonic()
    r = fetch(proxy.url("/quick/slow?headers_delay=3"))
    assert r.status == 504, r.describe()
    assert time.monotonic() - started < 3  # the route's 300 ms, not the upstream's 30 s
    assert fetch(proxy.url("/slow?headers_delay=0.5")).status == 200


# -- review regressions ----------------------------------------------------------------


def test_a_try_that_runs_out_of_time_is_retried_elsewhere(stack: Stack) -> None:
    slow, fast = stack.upstream("slow"), stack.upstream("fast")
    slow.forced = ("slow", {"headers_delay": "5"})
    proxy = _retrying(stack, [slow, fast], per_try_timeout="300ms")  # on: the defaults
    statuses = [fetch(proxy.url(f"/t/{i}")).status for i in range(4)]
    assert statuses == [200] * 4
    assert len(fast.requests) == 4


@pytest.mark.parametrize("balancer", ["least_request", "ewma"])
def test_a_retry_leaves_the_dead_endpoint_whatever_the_balancer(
    stack: Stack, balancer: str
) -> None:
    dead, alive = stack.upstream("dead"), stack.upstream("alive")
    proxy = stack.proxy(
        _config(upstream_block(dead, alive, balancer=balancer, retry={"attempts": 2}))
    )
    dead.stop()
    statuses = [fetch(proxy.url(f"/r/{i}")).status for i in range(20)]
    assert statuses == [200] * 20


def test_a_client_deadline_does_not_eject_endpoints(stack: Stack) -> None:
    up = stack.upstream("patient")
    proxy = stack.proxy(
        _config(upstream_block(up, outlier_detection={"consecutive_gateway_failure": 2}))
    )
    for i in range(6):
        r = fetch(proxy.url(f"/slow?headers_delay=2&i={i}"), "-H", "x-meshgate-deadline: 50")
        assert r.status == 504
    doc = fetch(proxy.admin_url("/upstreams")).json()["up"]
    assert [e["state"] for e in doc["endpoints"]] == ["serving"], doc


def test_grpc_timeout_goes_on_renewed(stack: Stack) -> None:
    up = stack.upstream("grpc")
    proxy = stack.proxy(_config(upstream_block(up)))
    assert fetch(proxy.url("/g"), "-H", "grpc-timeout: 2S").status == 200
    sent = up.requests[0].header("grpc-timeout")
    assert sent is not None and sent.endswith("m") and 0 < int(sent[:-1]) <= 2000, sent


def test_an_overloaded_request_with_an_unsent_body_closes(stack: Stack) -> None:
    up = stack.upstream("busy")
    proxy = stack.proxy(
        _config(upstream_block(up, circuit_breaker={"max_requests": 1}, timeouts={"total": "30s"}))
    )
    with ThreadPoolExecutor(1) as pool:
        hold = pool.submit(_get, proxy.port, "/slow?headers_delay=2")
        up.wait_for(lambda s: len(s.requests) >= 1, what="the request holding the slot")
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.putrequest("POST", "/p")
        conn.putheader("Content-Length", "5")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 503
        assert resp.getheader("connection") == "close"
        assert resp.getheader("x-meshgate-overloaded") == "1"
        conn.close()
        assert hold.result()[0] == 200


def test_retry_after_is_waited_for_within_the_cap_and_forwarded_past_it(stack: Stack) -> None:
    busy, calm = stack.upstream("busy"), stack.upstream("calm")
    busy.forced = ("status", {"code": "503", "retry_after": "1"})
    proxy = _retrying(stack, [busy, calm], on=["503"], backoff={"base": "10ms", "max": "2s"})
    # Round robin: one of two requests starts on `busy`; its retry waits the
    # 1 s it asked for (and then `busy` is avoided, so it is tried once).
    times = []
    for i in range(2):
        started = time.monotonic()
        r = fetch(proxy.url(f"/ra/{i}"))
        times.append(time.monotonic() - started)
        assert r.status == 200, r.describe()
    assert len(busy.requests) == 1
    assert max(times) >= 1.0, times
    # A Retry-After beyond backoff.max is not waited for: the 503 goes back.
    busy.forced = ("status", {"code": "503", "retry_after": "30"})
    only = _retrying(stack, [busy], on=["503"], backoff={"base": "10ms", "max": "2s"})
    started = time.monotonic()
    r = fetch(only.url("/ra2"))
    assert r.status == 503 and r.header("retry-after") == "30", r.describe()
    assert time.monotonic() - started < 30
