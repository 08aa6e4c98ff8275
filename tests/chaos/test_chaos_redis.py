"""Redis failing under a rate-limited load, for both `on_store_error` modes.

The Redis server the test started is either killed (`kill -9`, then started
again on the same port, empty) or frozen (SIGSTOP: connections stay open
and nothing answers, then SIGCONT), while two workers take a steady load on
a `policy: redis` route. While it is away, `allow` lets every request
through (200, with no RateLimit fields: nothing was counted) and `deny`
answers each 429 `rate-limit-unavailable` with a Retry-After (the status
`filters.ratelimit` documents; not a 503: the request was not served
because it could not be counted, and a client should back off). No request
waits longer than the Redis timeout and a margin, and none fails. Once Redis
answers again, limits are enforced again: a fresh limit of 5 lets exactly 5
through, then 429 `rate-limited`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from support.client import wait_until
from support.load import Outcome, SteadyLoad
from support.proxy import ProxyProcess, Stack, upstream_block
from support.redis import RedisServer

pytestmark = [pytest.mark.engine, pytest.mark.chaos]

REDIS_TIMEOUT = 0.3
MARGIN = 1.5  # a loaded, shared two-core machine
PROBLEMS = "https://meshgate.dev/problems/"


def problem_kind(status: int | None, headers: Any, body: bytes) -> str | None:
    ctype = dict(headers).get("content-type", "")
    if not ctype.startswith("application/problem+json"):
        return None
    doc = json.loads(body)
    assert doc.get("status") == status, doc
    kind = str(doc.get("type", ""))
    assert kind.startswith(PROBLEMS), doc
    return kind[len(PROBLEMS) :]


def kind_of(o: Outcome) -> tuple[int | None, str | None]:
    return o.status, problem_kind(o.status, o.headers, o.body)


def decided(o: Outcome) -> bool:
    """Answered on a decision Redis made (it carries the count)."""
    return o.status == 200 and o.header("ratelimit") is not None


def lone_get(proxy: ProxyProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


@pytest.mark.parametrize("on_error", ["allow", "deny"])
@pytest.mark.parametrize("how", ["kill-9", "freeze"])
def test_redis_away_under_load_keeps_the_failure_mode(
    stack: Stack, redis_server: RedisServer, on_error: str, how: str
) -> None:
    up = stack.upstream("up")
    common = {"period": "1h", "key": "route", "policy": "redis", "on_store_error": on_error}
    proxy = stack.proxy(
        {
            "upstreams": {"up": upstream_block(up)},
            "routes": [
                {"path": "/load/**", "upstream": "up", "name": "load",
                 "rate_limit": {"limit": 10_000_000, **common}},
                {"path": "/small/**", "upstream": "up", "name": "small",
                 "rate_limit": {"limit": 5, **common}},
            ],
            "redis": {"url": redis_server.url, "timeout": f"{REDIS_TIMEOUT * 1000:g}ms",
                      "down_interval": "500ms"},
        },
        workers=2,
    )  # fmt: skip
    frozen = False
    try:
        with SteadyLoad(
            proxy.port, "/load/x", connections=4, rate=100, duration=60, max_requests=6000
        ) as load:
            wait_until(lambda: sum(map(decided, load.outcomes())) >= 30, what="30 decisions")
            away_at = time.monotonic()
            if how == "kill-9":
                redis_server.kill()
            else:
                os.kill(redis_server.pid, signal.SIGSTOP)
                frozen = True
            # Long enough for several probes (every down_interval) to fail.
            load.wait_for(150, after=away_at)
            back_at = time.monotonic()
            if how == "kill-9":
                redis_server.start()  # the same port, empty
            else:
                os.kill(redis_server.pid, signal.SIGCONT)
                frozen = False
            wait_until(
                lambda: any(map(decided, load.outcomes(started_after=back_at))),
                timeout=20,
                what="a decision by Redis once it is back",
            )
            load.wait_for(50, after=back_at)
    finally:
        if frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis_server.pid, signal.SIGCONT)

    outcomes = load.outcomes()
    during = load.outcomes(started_after=away_at, ended_before=back_at)
    slowest = max(o.elapsed for o in outcomes)
    kinds = Counter(kind_of(o) for o in during)
    print(
        f"\nredis {how}, on_store_error {on_error}: {len(outcomes)} requests, "
        f"{len(during)} while away {dict(kinds)}, slowest {slowest * 1000:.0f} ms"
    )
    assert load.errors() == [], [o.describe() for o in load.errors()[:5]]
    assert len(during) >= 100
    if on_error == "allow":
        assert kinds == {(200, None): len(during)}, kinds
        assert all(o.header("ratelimit") is None for o in during)
        assert {o.status for o in outcomes} == {200}
    else:
        assert kinds == {(429, "rate-limit-unavailable"): len(during)}, kinds
        assert all(int(o.header("retry-after") or 0) >= 1 for o in during)
        assert {o.status for o in outcomes} <= {200, 429}
    # Nothing hangs: a decision waits at most the Redis timeout.
    assert slowest < REDIS_TIMEOUT + MARGIN, sorted(o.elapsed for o in outcomes)[-5:]

    # Limits apply again once every worker has found Redis back (a run of
    # lone requests, on new connections, all decided by Redis).
    def decided_in_a_row() -> bool:
        return all(
            s == 200 and "ratelimit" in h
            for s, h, _ in (lone_get(proxy, "/load/p") for _ in range(10))
        )

    wait_until(decided_in_a_row, timeout=20, interval=0.2, what="Redis deciding again")
    replies = [lone_get(proxy, f"/small/{i}") for i in range(8)]
    got = [(s, problem_kind(s, h.items(), b)) for s, h, b in replies]
    assert got == [(200, None)] * 5 + [(429, "rate-limited")] * 3, got
    proxy.wait_for_log(r"rate limit store redis is down")
    proxy.wait_for_log(r"rate limit store redis answers again")
    assert proxy.alive
