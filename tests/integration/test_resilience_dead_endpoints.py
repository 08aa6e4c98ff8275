"""Dead endpoints under the default config (issue 11, defect 3).

Three endpoints, `retry: {attempts: 3, on: [connect-failure, reset, 503]}`
and no `outlier_detection`: six clients send steady GETs; one endpoint is
killed (its port refuses connections), then a second one answers 503. No GET
may fail. With every endpoint down, the client gets a prompt 503 problem."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from typing import Any

import pytest

from support.client import assert_problem, fetch, wait_until
from support.proxy import ProxyProcess, Stack, run_meshgate, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

RETRY = {"attempts": 3, "on": ["connect-failure", "reset", "503"]}


def _proxy(stack: Stack, ups: list[UpstreamServer], **options: Any) -> ProxyProcess:
    return stack.proxy(
        {
            "upstreams": {
                "u": upstream_block(*ups, retry=RETRY, timeouts={"connect": "1s"}, **options)
            },
            "routes": [{"path": "/**", "upstream": "u"}],
        }
    )


class _Clients:
    """`n` keep-alive clients sending GETs back to back until stopped."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        k = 0
        while not self.stopping.is_set():
            k += 1
            try:
                conn.request("GET", f"/c{i}/{k}")
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
                if status != 200:
                    with self.lock:
                        self.failures.append(f"{status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as exc:
                status = 0
                with self.lock:
                    self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self.lock:
                self.statuses.append(status)
            time.sleep(0.005)
        conn.close()

    def count(self) -> int:
        with self.lock:
            return len(self.statuses)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(15)


@pytest.mark.parametrize("balancer", ["round_robin", "least_request", "ewma"])
def test_killed_then_503_endpoint_fails_no_get(stack: Stack, balancer: str) -> None:
    ups = [stack.upstream(f"e{i}") for i in range(3)]
    proxy = _proxy(stack, ups, balancer=balancer)
    clients = _Clients(proxy.port, 6)
    try:
        wait_until(lambda: clients.count() >= 150, timeout=20, what="warm-up traffic")
        ups[0].stop()  # its port now refuses connections
        mark = clients.count()
        wait_until(lambda: clients.count() >= mark + 300, timeout=30, what="traffic after kill")
        ups[1].forced = ("status", {"code": "503"})
        mark = clients.count()
        wait_until(lambda: clients.count() >= mark + 500, timeout=30, what="traffic after 503")
    finally:
        clients.stop()
    assert clients.failures == [], (len(clients.failures), Counter(clients.failures))
    assert clients.count() >= 950
    doc = fetch(proxy.admin_url("/upstreams")).json()["u"]
    states = {e["address"]: e["state"] for e in doc["endpoints"]}
    assert states[ups[0].address] == "unreachable", states
    assert "does not accept connections" in proxy.stderr_text()


def test_without_retries_a_killed_endpoint_costs_one_request(stack: Stack) -> None:
    """It leaves rotation on its first refused connect, not after several."""
    ups = [stack.upstream(f"e{i}") for i in range(3)]
    proxy = stack.proxy(
        {
            "upstreams": {"u": upstream_block(*ups, balancer="round_robin")},
            "routes": [{"path": "/**", "upstream": "u"}],
        }
    )
    ups[0].stop()
    statuses = [fetch(proxy.url(f"/d/{i}")).status for i in range(30)]
    assert Counter(statuses) == Counter({200: 29, 502: 1}), Counter(statuses)


def test_a_restarted_endpoint_comes_back_on_its_first_probe(stack: Stack) -> None:
    ups = [stack.upstream(f"e{i}") for i in range(2)]
    proxy = _proxy(stack, ups, balancer="round_robin")
    port = ups[0].port
    ups[0].stop()
    for i in range(6):
        assert fetch(proxy.url(f"/x/{i}")).status == 200
    revived = stack.upstream("e0-again", port=port)  # the same port, free again
    wait_until(
        lambda: fetch(proxy.url("/y")).status == 200 and len(revived.requests) > 0,
        timeout=15,
        what="the restarted endpoint to get requests again",
    )
    assert "accepts connections again" in proxy.stderr_text()


def test_every_endpoint_down_is_a_prompt_503(stack: Stack) -> None:
    ups = [stack.upstream(f"e{i}") for i in range(3)]
    proxy = _proxy(stack, ups)
    for up in ups:
        up.stop()
    n = 150
    started = time.monotonic()
    results = [fetch(proxy.url(f"/down/{i}")) for i in range(n)]
    elapsed = time.monotonic() - started
    for r in results:
        doc = assert_problem(r, 503)
        assert doc["type"].endswith("upstream-unavailable"), doc
    # Prompt: refused connects, no hang (a loose bound, not a benchmark).
    assert elapsed < 60, elapsed
    doc = fetch(proxy.admin_url("/upstreams")).json()["u"]
    assert {e["state"] for e in doc["endpoints"]} == {"unreachable"}, doc
    # With nothing in service, connect-failure retries are not free: the
    # budget (20% of requests + 10/s over 10 s) caps them, well below the
    # 2 retries x 150 requests the policy alone would send. (The first
    # request's retries were free: endpoints were still in service then.)
    assert 0 < doc["retried"] <= 0.2 * n + 100 + len(ups), doc
    assert doc["retry_budget_exhausted"] > 0, doc


def test_failure_accrual_is_on_by_default_and_can_be_turned_off(stack: Stack) -> None:
    up = stack.upstream("e")
    on = stack.directory / "on.yaml"
    on.write_text(
        f"upstreams:\n  u:\n    endpoints: [{up.address}]\nroutes:\n- path: /**\n  upstream: u\n"
    )
    proc = run_meshgate("check", "-c", str(on))
    assert proc.returncode == 0, proc.stderr
    assert "failure accrual is on" in proc.stdout, proc.stdout
    off = stack.directory / "off.yaml"
    off.write_text(
        f"upstreams:\n  u:\n    endpoints: [{up.address}]\n    outlier_detection: false\n"
        "routes:\n- path: /**\n  upstream: u\n"
    )
    proc = run_meshgate("check", "-c", str(off))
    assert proc.returncode == 0, proc.stderr
    assert "failure accrual is off" in proc.stdout, proc.stdout
