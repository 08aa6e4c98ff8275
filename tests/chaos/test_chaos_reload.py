"""A hundred reloads (SIGHUP) under a steady load: not one failed request.

The two configs route `/svc/**` to two different upstreams, each config
naming only its own: every reload swaps the route and drops the upstream
(and its pool) that requests were just using. The load is keep-alive
connections that live across all the reloads, plus clients that open a new
connection for every request. Each reload waits until the supervisor has
taken it (its "is generation N" line), so all hundred are applied; the
workers follow the supervisor's orders in sequence. After the last one,
both workers serve its generation, and its routing.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

import pytest

from support.client import http_get, wait_until
from support.load import SteadyLoad
from support.proxy import ProxyProcess, Stack, children, upstream_block
from support.upstream import UpstreamServer

pytestmark = [pytest.mark.engine, pytest.mark.chaos]

RELOADS = 100


def routed_to(name: str, server: UpstreamServer) -> dict[str, Any]:
    return {
        "upstreams": {name: upstream_block(server)},
        "routes": [{"path": "/svc/**", "upstream": name}],
    }


def reloads_taken(proxy: ProxyProcess) -> int:
    """How many reloads were taken: the newest generation the supervisor
    logged, less the first load; or, in a single process, its "reloaded"
    lines."""
    text = proxy.stderr_text()
    if proxy.workers is None:
        return text.count("reloaded ")
    found = re.findall(r" is generation (\d+)", text)
    return max((int(n) for n in found), default=1) - 1


def served_generations(proxy: ProxyProcess) -> dict[int, int]:
    """Worker pid -> the generation it serves, from a few `/config/generations`
    answers on new connections (the kernel picks the worker)."""
    seen: dict[int, int] = {}
    for _ in range(8):
        status, body = http_get(proxy.admin_port, "/config/generations")
        assert status == 200, body[:300]
        doc = json.loads(body)
        seen[doc["worker"]] = doc["current"]
    return seen


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "2-workers"])
def test_a_hundred_reloads_under_load_fail_no_request(stack: Stack, workers: int | None) -> None:
    a, b = stack.upstream("a"), stack.upstream("b")
    configs = [routed_to("first", a), routed_to("second", b)]
    proxy = stack.proxy(configs[0], workers=workers)
    processes = [proxy.pid] if workers is None else children(proxy.pid)
    assert len(processes) == (workers or 1)

    keepalive = SteadyLoad(
        proxy.port, "/svc/fixed", connections=6, rate=150, duration=90, max_requests=20_000
    )
    fresh = SteadyLoad(
        proxy.port, "/svc/fixed", connections=2, rate=40, duration=90, max_requests=5_000,
        headers={"Connection": "close"},
    )  # fmt: skip
    started = time.monotonic()
    with keepalive, fresh:
        keepalive.wait_for(60)
        fresh.wait_for(10)
        for n in range(1, RELOADS + 1):
            proxy.reload(configs[n % 2], via="sighup", atomic=True)
            wait_until(
                lambda n=n: reloads_taken(proxy) >= n,
                timeout=15,
                what=f"reload {n} to be taken",
            )
            time.sleep(0.05)  # requests meet the workers mid-swap, and between swaps
        final = 1 + reloads_taken(proxy)
        last = "b" if RELOADS % 2 else "a"
        wait_until(
            lambda: served_generations(proxy) == dict.fromkeys(processes, final),
            timeout=15,
            what=f"every worker serving generation {final}",
        )
        reloaded_at = time.monotonic()
        keepalive.wait_for(60, after=reloaded_at)
        fresh.wait_for(10, after=reloaded_at)
    took = reloaded_at - started

    outcomes = keepalive.outcomes() + fresh.outcomes()
    bad = [o for o in outcomes if o.status != 200]
    names = Counter(o.header("x-upstream") for o in outcomes)
    print(
        f"\n{RELOADS} reloads in {took:.1f}s (to generation {final}): {len(outcomes)} requests, "
        f"{len(bad)} failed, by upstream {dict(names)}"
    )
    assert bad == [], [o.describe() for o in bad[:10]]
    assert final >= RELOADS + 1
    assert set(names) == {"a", "b"}
    # Everything since the last reload was served by its route, on the
    # connections that lived through all of them and on new ones.
    after = [o for o in outcomes if o.started >= reloaded_at]
    assert after and {o.header("x-upstream") for o in after} == {last}, Counter(
        o.header("x-upstream") for o in after
    )
    if workers is not None:
        assert children(proxy.pid) == processes, "a worker was restarted"
    assert proxy.alive and proxy.stop() == 0
