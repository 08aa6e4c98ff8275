"""`meshgate stats` and `meshgate top` against a real gateway's admin
listener, after a known number of requests through it to a real upstream."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshgate.observability.scrape import parse
from support.client import fetch, free_port, http_get, wait_until
from support.mesh import ControlProcess
from support.proxy import ProxyProcess, Stack, meshgate_cmd, run_meshgate, upstream_block
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine


def _config(up: UpstreamServer) -> dict[str, Any]:
    return {
        "upstreams": {"up": upstream_block(up)},
        "routes": [
            {"path": "/api/**", "name": "api", "upstream": "up"},
            {"path": "/limited/**", "name": "limited", "upstream": "up", "rate_limit": "1/min"},
        ],
    }


def _get(proxy: ProxyProcess, path: str) -> int:
    status, _ = http_get(proxy.port, path, timeout=5.0)
    return status


def _traffic(proxy: ProxyProcess) -> None:
    """10 requests on route api (6 answered 200, 2 404, 2 503 by the
    upstream), 3 that match no route, 2 on a route limited to one a minute."""
    statuses = [_get(proxy, "/api/orders/1") for _ in range(6)]
    statuses += [_get(proxy, "/api/status?code=404") for _ in range(2)]
    statuses += [_get(proxy, "/api/status?code=503") for _ in range(2)]
    statuses += [_get(proxy, "/nowhere") for _ in range(3)]
    statuses += [_get(proxy, "/limited/x") for _ in range(2)]
    assert statuses == [200] * 6 + [404] * 2 + [503] * 2 + [404] * 3 + [200, 429]


@pytest.fixture
def busy(stack: Stack, upstream: UpstreamServer) -> ProxyProcess:
    proxy = stack.proxy(_config(upstream))
    _traffic(proxy)
    return proxy


def _stats_json(proxy: ProxyProcess) -> dict[str, Any]:
    return _stats_json_at(proxy.admin_url())


def _stats_json_at(admin: str) -> dict[str, Any]:
    cp = run_meshgate("stats", "--admin", admin, "--json")
    assert cp.returncode == 0, cp.stderr
    doc: dict[str, Any] = json.loads(cp.stdout)
    return doc


def test_stats_counts_requests_success_and_reasons(busy: ProxyProcess) -> None:
    doc = _stats_json(busy)
    routes = {(r["direction"], r["name"]): r for r in doc["routes"]}
    api = routes[("inbound", "api")]
    assert api["requests"] == 10
    assert api["failures"] == 2
    assert api["success_rate"] == pytest.approx(0.8)
    assert api["codes"] == {"200": 6, "404": 2, "503": 2}
    p50, p95, p99 = (api["latency_seconds"][q] for q in ("p50", "p95", "p99"))
    assert 0 < p50 <= p95 <= p99 < 5
    unrouted = routes[("inbound", "(none)")]
    assert (unrouted["requests"], unrouted["success_rate"]) == (3, 1.0)
    assert unrouted["reasons"] == {"no_route": 3}
    limited = routes[("inbound", "limited")]
    assert (limited["requests"], limited["failures"]) == (2, 0)
    assert limited["reasons"] == {"ratelimit": 1}
    process = doc["process"]
    assert process["config_generation"] == 1
    assert process["reloads"] == {"ok": 0, "refused": 0}
    assert process["identities"] == []  # not in the mesh
    assert process["in_flight"] == {"inbound": 0}
    (up,) = doc["upstreams"]
    assert up["name"] == "up" and not up["breaker_open"]
    assert [e["state"] for e in up["endpoints"]] == ["serving"]


def test_stats_counts_open_connections(busy: ProxyProcess) -> None:
    assert _stats_json(busy)["process"]["connections"] == {"inbound": 0}
    conns = [http.client.HTTPConnection("127.0.0.1", busy.port, timeout=5) for _ in range(2)]
    try:
        for conn in conns:
            conn.request("GET", "/api/kept")
            conn.getresponse().read()
        assert _stats_json(busy)["process"]["connections"] == {"inbound": 2}
    finally:
        for conn in conns:
            conn.close()
    wait_until(
        lambda: _stats_json(busy)["process"]["connections"] == {"inbound": 0},
        what="the closed connections to be counted",
    )


def test_stats_text_shows_the_routes_and_upstreams(busy: ProxyProcess) -> None:
    cp = run_meshgate("stats", "--admin", f"127.0.0.1:{busy.admin_port}")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == f"meshgate at http://127.0.0.1:{busy.admin_port}/metrics"
    (api,) = [line for line in lines if line.startswith("api ")]
    assert api.split()[:4] == ["api", "in", "10", "80.00%"]
    assert "    reasons: no_route 3" in lines
    assert "    reasons: ratelimit 1" in lines
    assert any(line.startswith("upstream up: 1/1 serving, breaker closed") for line in lines)
    assert max(map(len, lines)) <= 80, cp.stdout


def test_the_parser_reads_a_real_scrape_as_prometheus_client_does(busy: ProxyProcess) -> None:
    text = fetch(busy.admin_url("/metrics")).body.decode()
    theirs = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    ours = sorted(
        (s.name, tuple(sorted(s.labels)), s.value)
        for family in parse(text).families.values()
        for s in family.samples
    )
    assert ours == theirs
    assert any(name == "meshgate_request_duration_seconds_bucket" for name, _, _ in ours)


class _Load(threading.Thread):
    """Requests on route api over one keep-alive connection, about 50 a
    second, until stopped (or 3000 of them)."""

    def __init__(self, port: int, path: str = "/api/load") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        self.stop = threading.Event()
        self.sent = 0
        self.problems: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            while not self.stop.is_set() and self.sent < 3000:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.problems.append(f"status {resp.status}")
                self.sent += 1
                time.sleep(0.02)
        except OSError as exc:
            self.problems.append(repr(exc))
        finally:
            conn.close()


def _blocks(text: str) -> list[list[str]]:
    """`top`'s refreshes when stdout is not a terminal: blocks of lines,
    each starting with its `meshgate top` line."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("meshgate top "):
            blocks.append([])
        if blocks and line:
            blocks[-1].append(line)
    return blocks


def test_top_shows_the_live_rate_of_a_route(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(_config(upstream))
    load = _Load(proxy.port)
    load.start()
    try:
        wait_until(lambda: load.sent >= 5, what="the load to start")
        cp = run_meshgate("top", "--admin", proxy.admin_url(), "--count", "2", "--interval", "1")
        by_dest = run_meshgate(
            "top", "--admin", proxy.admin_url(), "--count", "1", "--interval", "1",
            "--by", "destination", "--json",
        )  # fmt: skip
    finally:
        load.stop.set()
        load.join(10)
    assert not load.problems, load.problems
    assert cp.returncode == 0, cp.stderr
    blocks = _blocks(cp.stdout)
    assert len(blocks) == 2, cp.stdout
    for block in blocks:
        assert "by route, last 1." in block[0]
        head = block[2].split()
        assert head == ["ROUTE", "DIR", "RPS", "SUCCESS", "P50", "P99", "IN-FLIGHT"], block
        (api,) = [line.split() for line in block[3:] if line.startswith("api ")]
        assert api[1] == "in"
        assert float(api[2]) > 0, block
        assert api[3] == "100.00%"
    assert by_dest.returncode == 0, by_dest.stderr
    (doc,) = [json.loads(line) for line in by_dest.stdout.splitlines()]
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["up"]["rps"] > 0 and rows["up"]["success_rate"] == 1.0
    assert rows["up"]["in_flight"] in (0, 1)


def test_top_stops_cleanly_on_ctrl_c(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(_config(upstream))
    top = subprocess.Popen(
        meshgate_cmd("top", "--admin", proxy.admin_url(), "--interval", "0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert top.stdout is not None
        first = top.stdout.readline()
        assert first.startswith("meshgate top "), first
        top.send_signal(signal.SIGINT)
        _, err = top.communicate(timeout=10)
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
    assert top.returncode == 0, err
    assert "Traceback" not in err, err


def test_an_unreachable_admin_is_one_line_and_exit_2() -> None:
    port = free_port()
    for command in (["stats"], ["top", "--count", "1"]):
        cp = run_meshgate(*command, "--admin", f"http://127.0.0.1:{port}")
        assert cp.returncode == 2, cp
        assert cp.stdout == ""
        assert cp.stderr == (
            f"meshgate {command[0]}: cannot reach the admin at "
            f"http://127.0.0.1:{port}/metrics: Connection refused\n"
        )


# -- a sidecar's admin -----------------------------------------------------------


@pytest.mark.mesh
def test_stats_and_top_of_a_sidecar_pair(tmp_path: Path) -> None:
    """orders' sidecar calls customers' over mTLS: each one's stats name its
    identity and certificate, and the traffic on its side (outbound for
    the caller, inbound for the callee); top by destination names the
    callee's identity."""
    cp = ControlProcess(
        tmp_path / "cp", services={"orders": {"calls": ["customers"]}, "customers": {}}
    )
    apps = [UpstreamServer(name) for name in ("orders", "customers")]
    sidecars: list[SidecarProcess] = []
    try:
        cp.start()
        for app in apps:
            app.start()
        orders = SidecarProcess(
            cp, "orders", apps[0].port, tmp_path / "orders", upstreams=("customers",), admin=True
        ).start()
        sidecars.append(orders)
        customers = SidecarProcess(
            cp, "customers", apps[1].port, tmp_path / "customers", admin=True
        ).start()
        sidecars.append(customers)
        wait_until(
            lambda: fetch(orders.url("/ping", "customers")).status == 200,
            timeout=15,
            what="orders' sidecar reaches customers",
        )
        before = _stats_json_at(f"127.0.0.1:{orders.admin_port}")
        sent = [fetch(orders.url(f"/c/{i}", "customers")).status for i in range(7)]
        assert sent == [200] * 7

        def calls(doc: dict[str, Any], direction: str) -> int:
            return sum(r["requests"] for r in doc["routes"] if r["direction"] == direction)

        out = _stats_json_at(f"127.0.0.1:{orders.admin_port}")
        assert calls(out, "outbound") - calls(before, "outbound") == 7
        (ident,) = out["process"]["identities"]
        assert ident["identity"] == orders.identity
        assert 0 < ident["days_left"] < 400
        inbound = _stats_json_at(f"127.0.0.1:{customers.admin_port}")
        assert calls(inbound, "inbound") >= 8  # the pings, and the 7
        assert all(r["success_rate"] == 1.0 for r in inbound["routes"])
        text = run_meshgate("stats", "--admin", f"127.0.0.1:{orders.admin_port}").stdout
        assert f"  identity     {orders.identity}" in text, text
        assert "  certificate  expires in " in text, text

        load = _Load(orders.ports["customers"], "/c/load")
        load.start()
        try:
            wait_until(lambda: load.sent >= 5, what="the load to start")
            top = run_meshgate(
                "top", "--admin", f"127.0.0.1:{orders.admin_port}", "--by", "destination",
                "--count", "1", "--interval", "1", "--json",
            )  # fmt: skip
        finally:
            load.stop.set()
            load.join(10)
        assert top.returncode == 0, top.stderr
        rows = {(r["direction"], r["name"]): r for r in json.loads(top.stdout)["rows"]}
        assert rows[("outbound", customers.identity)]["rps"] > 0, rows
    finally:
        for sc in sidecars:
            sc.stop()
        for app in apps:
            app.stop()
        cp.stop()
