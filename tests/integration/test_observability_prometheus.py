"""A real Prometheus scrapes a gateway with 2 workers, and a sidecar pair.

The figures are read back through Prometheus' own HTTP API (PromQL), not
from the text: the counts by route and code class are exactly the
requests the test sent (both workers served some, and one scrape of the
shared admin port holds both), `rate()` and `histogram_quantile()` give
sane values, and a sidecar pair counts each request once on each side,
with the peer's SPIFFE ID and the transport.
"""

from __future__ import annotations

import http.client
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.client import fetch, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.prometheus import PrometheusServer, require_prometheus
from support.proxy import ProxyProcess, Stack, descendants, socket_owners
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = [pytest.mark.mesh, pytest.mark.engine]

CLIENT_TIMEOUT = 10.0


@pytest.fixture
def make_prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], PrometheusServer]]:
    """`make_prometheus({job: "host:port"})`: a started Prometheus scraping
    each target every second; stopped (by its pid) at teardown, always."""
    require_prometheus()
    started: list[PrometheusServer] = []

    def make(targets: dict[str, str]) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(started)}", targets)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


class Clients:
    """Keep-alive connections to the gateway, each known to be served by
    one worker (found in /proc), used in turn."""

    def __init__(self, proxy: ProxyProcess, count: int) -> None:
        self.conns: list[http.client.HTTPConnection] = []
        for _ in range(count):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=CLIENT_TIMEOUT)
            conn.connect()
            self.conns.append(conn)
        workers = descendants(proxy.pid)
        ports = [c.sock.getsockname()[1] for c in self.conns]
        # The kernel completes a handshake before the worker accepts it.
        deadline = time.monotonic() + 5
        owners = socket_owners(ports, workers, accepted_on=proxy.port)
        while len(owners) < len(ports) and time.monotonic() < deadline:
            time.sleep(0.01)
            owners = socket_owners(ports, workers, accepted_on=proxy.port)
        assert len(owners) == len(ports), (owners, ports, workers)
        self.owner = [owners[p] for p in ports]
        self.served: Counter[int] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.turn = 0

    def send(self, path: str, n: int, what: str) -> None:
        for _ in range(n):
            i = self.turn % len(self.conns)
            self.turn += 1
            conn = self.conns[i]
            conn.request("GET", path, headers={"host": "api.test"})
            resp = conn.getresponse()
            resp.read()
            assert not resp.will_close, f"{path}: the gateway closed the connection"
            self.served[self.owner[i]] += 1
            self.statuses[(what, resp.status)] += 1

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def test_prometheus_counts_exactly_what_two_workers_served(
    stack: Stack, make_prometheus: Callable[[dict[str, str]], PrometheusServer]
) -> None:
    ok = stack.upstream("ok")
    failing = stack.upstream("failing")
    proxy = stack.proxy(
        {
            "workers": 2,
            "upstreams": {
                "ok": {"endpoints": [ok.address]},
                # Every answer is the upstream's own 503: no retry, no ejection.
                "failing": {
                    "endpoints": [failing.address],
                    "retry": {"attempts": 1},
                    "outlier_detection": False,
                },
            },
            "routes": [
                {"name": "route-a", "path": "/a/**", "upstream": "ok"},
                {"name": "route-b", "path": "/b/**", "upstream": "failing"},
            ],
        }
    )
    wait_until(lambda: len(descendants(proxy.pid)) == 2, timeout=10, what="two workers")
    prom = make_prometheus({"gateway": f"127.0.0.1:{proxy.admin_port}"})
    clients = Clients(proxy, 24)
    assert len(set(clients.owner)) == 2, "the kernel gave every connection to one worker"
    try:
        # Two rounds with a scrape between them, so that rate() sees the
        # counters grow between samples.
        clients.send("/a/hello", 100, "a")
        clients.send("/b/status?code=503", 10, "b")
        clients.send("/nowhere", 5, "none")
        prom.wait_scraped("gateway", after=time.time())
        clients.send("/a/hello", 200, "a")
        clients.send("/b/status?code=503", 30, "b")
        clients.send("/nowhere", 20, "none")
        prom.wait_scraped("gateway", after=time.time())
    finally:
        clients.close()
    assert clients.statuses == {("a", 200): 300, ("b", 503): 40, ("none", 404): 25}
    assert len(clients.served) == 2 and min(clients.served.values()) > 0, clients.served

    counts = prom.values(
        'sum by (route, code_class) (meshgate_requests_total{job="gateway"})',
        ("route", "code_class"),
    )
    assert counts == {
        ("route-a", "2xx"): 300,
        ("route-b", "5xx"): 40,
        ("(none)", "4xx"): 25,
    }
    assert prom.values('meshgate_workers_scraped{job="gateway"}', ("job",)) == {"gateway": 2}
    by_code = prom.values(
        'sum by (route, upstream, code, reason) (meshgate_requests_total{job="gateway"})',
        ("route", "upstream", "code", "reason"),
    )
    assert by_code == {
        ("route-a", "ok", "200", ""): 300,
        ("route-b", "failing", "503", ""): 40,
        ("(none)", "", "404", "no_route"): 25,
    }

    # The second round (200 to route A) happened between samples: the
    # increase is at least that, and extrapolation adds less than as much.
    increase = prom.values(
        'sum by (route) (increase(meshgate_requests_total{job="gateway"}[5m]))', ("route",)
    )
    assert 200 <= increase["route-a"] < 400, increase
    rate = prom.values(
        'sum by (route) (rate(meshgate_requests_total{job="gateway"}[5m]))', ("route",)
    )
    assert 0 < rate["route-a"] <= 400 / 300, rate
    assert 0 < rate["route-b"] < rate["route-a"], rate

    p99 = prom.values(
        "histogram_quantile(0.99, sum by (le, route) "
        '(rate(meshgate_request_duration_seconds_bucket{job="gateway"}[5m])))',
        ("route",),
    )
    for route in ("route-a", "route-b"):
        assert math.isfinite(p99[route]) and 0 < p99[route] < CLIENT_TIMEOUT, p99
    up99 = prom.values(
        "histogram_quantile(0.99, sum by (le, route) "
        '(rate(meshgate_upstream_duration_seconds_bucket{job="gateway"}[5m])))',
        ("route",),
    )
    assert math.isfinite(up99["route-a"]) and 0 < up99["route-a"] <= p99["route-a"] * 1.01, up99
    assert "(none)" not in up99  # a 404 never reached an upstream
    errors = prom.query('sum(rate(meshgate_requests_total{job="gateway",code_class="5xx"}[5m]))')
    assert float(errors[0]["value"][1]) > 0


def _spiffe(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"


def test_prometheus_sees_a_sidecar_pair_count_each_request_on_both_sides(
    tmp_path: Path, make_prometheus: Callable[[dict[str, str]], PrometheusServer]
) -> None:
    cp = ControlProcess(tmp_path / "cp", services={"client": {"calls": ["server"]}, "server": {}})
    apps = {name: UpstreamServer(name) for name in ("client", "server")}
    sidecars: dict[str, SidecarProcess] = {}
    try:
        cp.start()
        for app in apps.values():
            app.start()
        sidecars["server"] = SidecarProcess(
            cp, "server", apps["server"].port, tmp_path / "server", admin=True
        ).start()
        sidecars["client"] = SidecarProcess(
            cp,
            "client",
            apps["client"].port,
            tmp_path / "client",
            upstreams=("server",),
            admin=True,
        ).start()
        a, b = sidecars["client"], sidecars["server"]
        warmup: Counter[int] = Counter()

        def reaches() -> bool:
            status = fetch(a.url("/warm", "server")).status
            warmup[status] += 1
            return status == 200

        wait_until(reaches, timeout=15, what="the client's sidecar reaches the server's")
        prom = make_prometheus(
            {"client": f"127.0.0.1:{a.admin_port}", "server": f"127.0.0.1:{b.admin_port}"}
        )
        n = 120
        conn = http.client.HTTPConnection("127.0.0.1", a.ports["server"], timeout=CLIENT_TIMEOUT)
        for i in range(n):
            conn.request("GET", f"/orders/{i}?q={i}")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        conn.close()
        after = time.time()
        prom.wait_scraped("client", after=after)
        prom.wait_scraped("server", after=after)
        expected = n + warmup[200]

        out = prom.values(
            "sum by (direction, source_identity, destination_identity, tls) "
            '(meshgate_requests_total{job="client",code="200"})',
            ("direction", "source_identity", "destination_identity", "tls"),
        )
        assert out == {("outbound", _spiffe("client"), _spiffe("server"), "false"): expected}
        inbound = prom.values(
            "sum by (direction, source_identity, destination_identity, tls) "
            '(meshgate_requests_total{job="server",code="200"})',
            ("direction", "source_identity", "destination_identity", "tls"),
        )
        assert inbound == {("inbound", _spiffe("client"), _spiffe("server"), "true"): expected}
        now = time.time()
        for job, who in (("client", "client"), ("server", "server")):
            expiry = prom.values(
                f'meshgate_identity_cert_expiration_timestamp_seconds{{job="{job}"}}',
                ("identity",),
            )
            assert list(expiry) == [_spiffe(who)], expiry
            assert expiry[_spiffe(who)] > now, expiry
        hs = prom.values(
            'sum by (outcome) (meshgate_tls_handshakes_total{job="server",direction="inbound"})',
            ("outcome",),
        )
        assert hs.get("ok", 0) >= 1, hs
    finally:
        for sc in sidecars.values():
            sc.stop()
        for app in apps.values():
            app.stop()
        cp.stop()
