"""The dashboard's numbers: windows over reported snapshots (a counter that
went down counts from 0), quantiles against hand-computed values, and the
state document built from reports made of real `RequestSeries.samples()`."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, cast

import pytest

from meshgate.engine.load import load_mesh_text
from meshgate.mesh.control.graph import MeshView, build_state
from meshgate.mesh.control.push import ProxyStream
from meshgate.mesh.control.store import Instance
from meshgate.mesh.control.telemetry import KEEP, Telemetry
from meshgate.observability import requests
from meshgate.observability.deltas import delta, index, quantile_ms
from meshgate.observability.requests import NB, RequestSeries

TD = "mesh.test"
ORDERS = f"spiffe://{TD}/ns/default/sa/orders"
CUSTOMERS = f"spiffe://{TD}/ns/default/sa/customers"
GATEWAY = f"spiffe://{TD}/ns/edge/sa/gateway"

MESH = f"""
trust_domain: {TD}
services:
  gateway: {{namespace: edge}}
  orders:
    calls: [customers]
    routes:
    - path: /**
      name: orders-canary
      split: [{{upstream: orders, weight: 90}}, {{upstream: orders-v2, weight: 10}}]
  orders-v2: {{}}
  customers:
    authz:
      default: deny
      rules:
      - {{name: orders-reads, action: allow, from: ["{ORDERS}"], methods: [GET]}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _series_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(requests, "monotonic", clock)
    return clock


def record(
    series: RequestSeries,
    clock: Clock,
    *,
    peer: str | None,
    latency: float = 0.003,
    status: int = 200,
    kind: str = "",
    route: str = "inbound/customers",
    n: int = 1,
) -> None:
    for _ in range(n):
        series.record(
            SimpleNamespace(
                status=status,
                kind=kind,
                cluster=SimpleNamespace(name="app"),
                last_ep=None,
                proto=SimpleNamespace(peer=peer),
                route_label=route,
                method=b"GET",
                t_start=clock.now - latency,
                started=kind == "",
                try_t0=clock.now - latency / 2,
                attempt=1,
                sent_body=0,
                bytes_out=10,
                trace=None,
            )
        )


def report(series: RequestSeries, **extra: Any) -> dict[str, Any]:
    """What a proxy sends: its samples as JSON would carry them (lists)."""
    samples = {
        name: [[list(s[0]), *s[1:]] for s in rows] for name, rows in series.samples().items()
    }
    for name, rows in extra.items():
        samples[name] = rows
    return {"type": "report", "at": 0.0, "samples": samples, "denials": []}


def test_quantiles_are_promqls_over_the_windows_buckets(_series_clock: Clock) -> None:
    series = RequestSeries("inbound", True)
    series.local_identity = CUSTOMERS
    record(series, _series_clock, peer=ORDERS, latency=0.003, n=50)  # (2.5ms, 5ms]
    record(series, _series_clock, peer=ORDERS, latency=0.02, n=49)  # (10ms, 25ms]
    record(series, _series_clock, peer=ORDERS, latency=0.2, n=1)  # (100ms, 250ms]
    rows = index(report(series)["samples"])["meshgate_request_duration_seconds"]
    (buckets, total, count) = next(iter(rows.values()))
    assert count == 100 and math.isclose(total, 50 * 0.003 + 49 * 0.02 + 0.2)
    # rank 50 is the top of (2.5ms, 5ms]; rank 90 is 40 of the 49 in (10ms, 25ms]
    assert quantile_ms(0.5, buckets) == 5.0
    assert quantile_ms(0.9, buckets) == pytest.approx(10 + 15 * 40 / 49, abs=1e-3)
    assert quantile_ms(0.99, buckets) == 25.0
    assert quantile_ms(0.999, buckets) == pytest.approx(100 + 150 * 0.9, abs=1e-3)
    assert quantile_ms(0.5, [0.0] * NB) is None


def test_a_window_is_newest_minus_oldest_and_a_reset_counts_from_zero(
    _series_clock: Clock,
) -> None:
    clock = Clock()
    tel = Telemetry(clock)
    series = RequestSeries("inbound", True)
    series.local_identity = CUSTOMERS
    tel.add("c1", "customers", CUSTOMERS, report(series))  # nothing counted yet
    record(series, _series_clock, peer=ORDERS, n=10)
    clock.now += 2
    tel.add("c1", "customers", CUSTOMERS, report(series))
    clock.now += 2
    record(series, _series_clock, peer=ORDERS, n=30)
    tel.add("c1", "customers", CUSTOMERS, report(series))
    [w] = tel.window(60)
    assert w.span == 4
    assert sum(w.delta["meshgate_requests_total"].values()) == 40  # a new series counts whole

    # The proxy restarted: its counters start again; newer counts are from 0.
    restarted = RequestSeries("inbound", True)
    restarted.local_identity = CUSTOMERS
    record(restarted, _series_clock, peer=ORDERS, n=5)
    clock.now += 2
    tel.add("c1", "customers", CUSTOMERS, report(restarted))
    [w] = tel.window(60)
    assert sum(w.delta["meshgate_requests_total"].values()) == 5
    [(buckets, _, count)] = w.delta["meshgate_request_duration_seconds"].values()
    assert count == 5 and sum(buckets) == 5

    # Past the window: only what is inside it counts; past KEEP, nothing.
    clock.now += 120
    assert tel.window(60) == []
    assert len(tel.window(300)) == 1
    clock.now += KEEP
    tel.forget(lambda h: True)
    assert tel.proxies == {}


def test_history_is_thinned_and_bounded() -> None:
    clock = Clock()
    tel = Telemetry(clock)
    for _ in range(600):  # 20 minutes of reports every 2 s
        tel.add("p", "orders", ORDERS, {"samples": {}})
        clock.now += 2
    hist = tel.proxies["p"]
    assert len(hist.recent) <= 36
    assert len(hist.older) <= 60
    assert hist.older[0][0] >= clock.now - 2 - KEEP


def test_malformed_reports_keep_only_what_is_well_formed() -> None:
    bad = {
        "meshgate_requests_total": [
            [["inbound"], 1],  # wrong number of labels
            [["inbound", "r", "u", "", "", "GET", "200", "2xx", "true", ""], "x"],
            [["inbound", "r", "u", "", "", "GET", "200", "2xx", "true", ""], 7],
            [["inbound", "r", "u", "", "", "GET", "200", "2xx", "true", 5], 1],
        ],
        "meshgate_request_duration_seconds": [[["a"] * 8, [1, 2], 0.1, 3]],
        "not_a_family": [[[], 1]],
        "meshgate_circuit_breaker_open": "nope",
    }
    got = index(bad)
    assert list(got["meshgate_requests_total"].values()) == [7.0]
    assert got["meshgate_request_duration_seconds"] == {}
    assert "not_a_family" not in got
    assert index("nonsense") == {}
    # A gauge is its newest value, never a difference.
    before = index({"meshgate_circuit_breaker_open": [[["orders"], 1]]})
    now = index({"meshgate_circuit_breaker_open": [[["orders"], 0]]})
    assert delta(before, now)["meshgate_circuit_breaker_open"] == {("orders",): 0.0}


def _stream(proxy_id: str, service: str, identity: str, instance: bool) -> ProxyStream:
    s = ProxyStream(cast(Any, None), identity, service, proxy_id)
    s.instance_id = proxy_id if instance else None
    s.acked = s.sent = 7
    s.cert = {"serial": "ab", "not_before": 0.0, "not_after": 100.0}
    return s


def test_the_state_from_reports(_series_clock: Clock) -> None:
    mesh = load_mesh_text(MESH, "mesh.yaml", keys="'services'")
    clock = Clock()
    tel = Telemetry(clock)
    cust = RequestSeries("inbound", True)
    cust.local_identity = CUSTOMERS
    gw_in = RequestSeries("inbound", False)
    gw_in.local_identity = GATEWAY
    orders_in = RequestSeries("inbound", True)
    orders_in.local_identity = ORDERS
    orders_out = RequestSeries("outbound", True)
    orders_out.local_identity = ORDERS

    def send_all(**orders_extra: Any) -> None:
        tel.add("c1", "customers", CUSTOMERS, report(cust))
        tel.add("g1", "gateway", GATEWAY, report(gw_in), instance=False)
        samples = report(orders_in)
        for name, rows in report(orders_out, **orders_extra)["samples"].items():
            samples["samples"].setdefault(name, []).extend(rows)
        tel.add("o1", "orders", ORDERS, samples)

    send_all()
    record(cust, _series_clock, peer=ORDERS, n=8)
    record(cust, _series_clock, peer=ORDERS, status=503, n=2)
    record(cust, _series_clock, peer=ORDERS, status=403, kind="authz-denied", n=3)
    record(cust, _series_clock, peer=None, status=403, kind="authz-denied", n=1)
    record(gw_in, _series_clock, peer=None, route="orders", n=20)
    record(orders_in, _series_clock, peer=GATEWAY, route="inbound/orders", n=20)
    clock.now += 10
    send_all(
        meshgate_split_requests_total=[
            [["orders-canary", "orders"], 18],
            [["orders-canary", "orders-v2"], 2],
        ],
        meshgate_upstream_try_failures_total=[[["customers", "connect-failure", "true"], 4]],
        meshgate_circuit_breaker_open=[[["customers"], 1]],
    )
    tel.add(
        "c1",
        "customers",
        CUSTOMERS,
        {
            **report(cust),
            "denials": [
                {
                    "at": 5.0,
                    "source": ORDERS,
                    "policy": "inbound/customers",
                    "rule": None,
                    "reason": "no rule allowed it",
                    "method": "POST",
                    "path": "/w",
                },
                {
                    "at": 6.0,
                    "source": ORDERS,
                    "policy": "inbound/customers",
                    "rule": None,
                    "reason": "no rule allowed it",
                    "method": "PUT",
                    "path": "/w",
                    "destination": "x",
                },
            ],
        },
    )
    now = 50.0  # the certificate lives 0..100: not yet in its last 20%
    view = MeshView(
        mesh=mesh,
        generation=3,
        instances=[
            Instance(
                "c1", "customers", "127.0.0.1", 9002, CUSTOMERS, "v1", "z1", lease_expires=1e12
            ),
            Instance("c2", "customers", "127.0.0.1", 9003, CUSTOMERS, "v2", lease_expires=1e12),
            Instance("o1", "orders", "127.0.0.1", 9001, ORDERS, lease_expires=1e12),
        ],
        streams=[
            _stream("c1", "customers", CUSTOMERS, True),
            _stream("o1", "orders", ORDERS, True),
            _stream("g1", "gateway", GATEWAY, False),
        ],
        healthy={"c1", "c2", "o1"},
        proxies={"c2": {"acked_version": 5, "sent_version": 6, "nack": {"reason": "bad"}}},
        generations=[{"generation": 3, "at": 1.0, "source": "api", "digest": "ff"}],
        telemetry=tel,
    )
    state = build_state(view, now=now)
    nodes = {n["id"]: n for n in state["nodes"]}
    assert nodes["gateway"]["kind"] == "gateway" and nodes["external"]["kind"] == "external"
    assert nodes["customers"]["instances"] == 2 and nodes["customers"]["instances_up"] == 1
    assert nodes["customers"]["health"] == "degraded"  # c2 has no stream
    assert nodes["orders"]["health"] == "healthy"
    assert nodes["orders-v2"]["health"] == "down"  # no instance at all
    edges = {e["id"]: e for e in state["edges"]}
    ok = edges["orders->customers"]
    assert ok["requests"] == 10 and ok["rps"] == 1.0 and ok["success"] == 0.8 and ok["mtls"]
    assert ok["p99_ms"] == pytest.approx(2.5 + 2.5 * 0.99)  # 13 in (2.5ms, 5ms]
    denied = edges["orders->customers:denied"]
    assert denied["requests"] == 3 and denied["denied"] and denied["policy"] == "inbound/customers"
    assert edges["unknown->customers:denied"]["mtls"] is False
    assert edges["gateway->orders"]["requests"] == 20 and edges["gateway->orders"]["mtls"]
    ext = edges["external->gateway"]
    assert ext["requests"] == 20 and ext["mtls"] is False
    cust_doc = state["services"]["customers"]
    [c1, c2] = cust_doc["instances"]
    assert (c1["healthy"], c1["version"], c1["zone"], c1["serial"]) == (True, "v1", "z1", "ab")
    assert (
        c1["expiring"] is False
        and build_state(view, now=90.0)["services"]["customers"]["instances"][0]["expiring"]
    )
    assert (c2["healthy"], c2["acked"], c2["nack"]) == (False, 5, "bad")
    assert cust_doc["golden"]["1m"]["rps"] == pytest.approx(1.4)
    assert cust_doc["resilience"]["retries"] == 4
    assert cust_doc["resilience"]["breaker_open"] is True
    assert cust_doc["resilience"]["try_failures"] == {"connect-failure": 4}
    [split] = state["services"]["orders"]["routes"]
    assert [(b["upstream"], b["weight"], b["share"]) for b in split["split"]] == [
        ("orders", 90, 0.9),
        ("orders-v2", 10, 0.1),
    ]
    rules = {p["rule"]: p for p in cust_doc["policies"]}
    assert set(rules) == {"orders-reads", "(default)"}
    [d1, d2] = state["denials"][:2]
    assert d1["at"] == 6.0 and d1["destination"] == "customers" and d1["source"] == "orders"
    assert d2["method"] == "POST"
    assert state["config"]["generations"][0]["by"] == "PUT /config"
    proxies = {p["id"]: p for p in state["config"]["proxies"]}
    assert proxies["c2"] == {
        "id": "c2",
        "service": "customers",
        "connected": False,
        "acked": 5,
        "sent": 6,
        "nack": "bad",
        "report_age": None,
    }
    assert state["edge"]["routes"][0]["route"] == "orders"
    assert state["edge"]["routes"][0]["rps"] == 2.0
    assert proxies["c1"]["report_age"] == 0.0
