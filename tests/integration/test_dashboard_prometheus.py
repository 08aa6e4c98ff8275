"""`control.metrics_source: prometheus`, for real: a `meshgate control`
process whose dashboard reads a real Prometheus, which scrapes the admin
listeners of two sidecars (orders, customers) and of a two-worker gateway
(one target: its page is the sum of its workers).

The dashboard's counts must be the ones the proxies' own `/metrics` show,
exactly (raw counters, never PromQL's extrapolating `increase()`); the
denials still come from the push stream; and with Prometheus gone the
control plane keeps serving its last numbers (not the reports', which it
then ignores) with the error in the state and on its `/metrics`.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshgate.observability.scrape import parse
from support.client import fetch, free_port, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess, mesh_yaml
from support.prometheus import PrometheusServer, require_prometheus
from support.proxy import ProxyProcess
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh

ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"
SERVICES: dict[str, Any] = {
    "orders": {"calls": ["customers"]},
    "customers": {
        "authz": {
            "default": "deny",
            "rules": [
                {
                    "name": "reads",
                    "action": "allow",
                    "from": [ORDERS, GATEWAY],
                    "methods": ["GET"],
                }
            ],
        }
    },
    "gateway": {"namespace": "edge"},
}


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Mesh:
    def __init__(self, tmp: Path) -> None:
        require_prometheus()
        self.tmp = tmp
        self.admin = free_port()
        self.cp = ControlProcess(tmp / "cp", services=SERVICES)
        self.apps = {name: UpstreamServer(name) for name in ("orders", "customers")}
        self.sidecars = {
            "orders": SidecarProcess(
                self.cp, "orders", 0, tmp / "orders", upstreams=("customers",), admin=True
            ),
            "customers": SidecarProcess(self.cp, "customers", 0, tmp / "customers", admin=True),
        }
        self.token = tmp / "gateway.token"
        self.gateway = ProxyProcess(
            {
                "mesh": {
                    "control": f"127.0.0.1:{self.cp.port}",
                    "trust_domain": TRUST_DOMAIN,
                    "token_file": str(self.token),
                    "trust_bundle": str(self.cp.state / "ca" / "bundle.pem"),
                    "state_dir": str(tmp / "gateway-state"),
                },
                "routes": [{"path": "/cust/**", "upstream": "customers", "strip_prefix": True}],
                "upstreams": {"customers": {"service": "customers"}},
            },
            tmp,
            workers=2,
        )
        self.admins = {
            "orders": self.sidecars["orders"].admin_port,
            "customers": self.sidecars["customers"].admin_port,
            "gateway": self.gateway.admin_port,
        }
        self.prom = PrometheusServer(
            tmp / "prometheus", {job: f"127.0.0.1:{port}" for job, port in self.admins.items()}
        )
        source = {"prometheus": self.prom.url, "interval": "500ms"}
        self.cp.path.write_text(
            mesh_yaml(
                self.cp.port,
                services=SERVICES,
                admin=f"127.0.0.1:{self.admin}",
                metrics_source=source,
            )
        )

    def start(self) -> Mesh:
        self.prom.start()  # first: the control plane's first poll finds it
        self.cp.start()
        for name, app in self.apps.items():
            app.start()
            self.sidecars[name].app_port = app.port
            self.sidecars[name].start()
        self.token.write_text(self.cp.token("gateway"))
        self.gateway.start()
        return self

    def state(self) -> dict[str, Any]:
        status, body = get(self.admin, "/ui/api/state")
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def page(self, job: str) -> Any:
        port = self.admins[job]
        assert port is not None
        status, body = get(port, "/metrics")
        assert status == 200
        return parse(body.decode())

    def stop(self) -> None:
        self.prom.stop()
        self.gateway.stop()
        for sc in self.sidecars.values():
            sc.stop()
        for app in self.apps.values():
            app.stop()
        self.cp.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("dashboard-prometheus"))
    try:
        yield m.start()
    finally:
        m.stop()


def _edges(state: dict[str, Any]) -> dict[str, int]:
    return {e["id"]: e["requests"] for e in state["edges"]}


def _expected(mesh: Mesh) -> dict[str, int]:
    """The edges' counts as the proxies' own pages have them: the callee's
    inbound requests by caller (authz refusals on their own edge)."""
    names = {ORDERS: "orders", GATEWAY: "gateway", "": "external"}
    out: dict[str, int] = {}
    for job, callee in (("customers", "customers"), ("gateway", "gateway")):
        for s in mesh.page(job).samples("meshgate_requests_total"):
            if s.label("direction") != "inbound":
                continue
            key = f"{names[s.label('source_identity')]}->{callee}"
            if s.label("reason") == "authz":
                key += ":denied"
            out[key] = out.get(key, 0) + int(s.value)
    return out


def _policies(mesh: Mesh) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for s in mesh.page("customers").samples("meshgate_authz_decisions_total"):
        key = (s.label("rule") or "(default)", s.label("decision"))
        out[key] = out.get(key, 0) + int(s.value)
    return out


def test_the_dashboard_counts_are_the_proxies_own_through_prometheus(mesh: Mesh) -> None:
    # Each proxy's history starts at its first scrape that the poller sees:
    # call once all three are there (the gateway's two workers are one).
    def seen() -> bool:
        state = mesh.state()
        ages = {p["service"] for p in state["config"]["proxies"] if p["report_age"] is not None}
        return ages == {"orders", "customers", "gateway"}

    wait_until(seen, timeout=30, what="every proxy's first scrape on the dashboard")
    source = mesh.state()["metrics_source"]
    assert source["kind"] == "prometheus" and source["healthy"] is True
    assert source["url"] == mesh.prom.url and source["targets"] == 3 and source["ignored"] == []

    orders = mesh.sidecars["orders"]
    for i in range(7):
        assert fetch(orders.url(f"/list?i={i}", "customers")).status == 200
    assert fetch(orders.url("/write", "customers"), "-X", "POST", "-d", "x").status == 403
    for i in range(5):
        assert fetch(mesh.gateway.url(f"/cust/item/{i}")).status == 200
    after = time.time()
    for job in mesh.admins:
        mesh.prom.wait_scraped(job, after)

    want = _expected(mesh)
    assert want == {
        "orders->customers": 7,
        "orders->customers:denied": 1,
        "gateway->customers": 5,
        "external->gateway": 5,
    }

    def settled() -> dict[str, Any] | None:
        state = mesh.state()
        return state if _edges(state) == want and state["denials"] else None

    state = wait_until(settled, timeout=10, what="the scraped calls on the dashboard")
    # The very numbers of the proxies' pages, exactly.
    assert _edges(state) == _expected(mesh)
    policies = {
        (p["rule"], kind): p[kind]
        for p in state["services"]["customers"]["policies"]
        for kind in ("allow", "deny")
        if p[kind]
    }
    assert policies == _policies(mesh) == {("reads", "allow"): 12, ("(default)", "deny"): 1}
    # Denials are the push stream's: Prometheus has none.
    [denial] = state["denials"]
    assert denial["source"] == "orders" and denial["method"] == "POST"
    assert denial["path"] == "/write" and denial["policy"] == "inbound/customers"

    # Prometheus goes: the control plane keeps serving the last numbers.
    mesh.prom.stop()
    for i in range(3):
        assert fetch(orders.url(f"/late?i={i}", "customers")).status == 200

    def failing() -> dict[str, Any] | None:
        state = mesh.state()
        return state if state["metrics_source"]["healthy"] is False else None

    state = wait_until(failing, timeout=10, what="the source's failure in the state")
    assert state["metrics_source"]["errors"] >= 1 and state["metrics_source"]["last_error"]
    # Two report intervals: the reports carry the late calls, and are not read.
    time.sleep(4.5)
    state = mesh.state()
    assert mesh.cp.alive
    assert _edges(state) == want
    source = state["metrics_source"]
    assert source["healthy"] is False and "unreachable" in source["last_error"]
    assert source["errors"] >= 3 and source["last_ok"] is not None
    assert _expected(mesh)["orders->customers"] == 10
    status, body = get(mesh.admin, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'meshgate_control_metrics_source_up{kind="prometheus"} 0' in text
    [errors] = [
        line for line in text.splitlines() if line.startswith("meshgate_control_metrics_source_err")
    ]
    assert float(errors.rsplit(" ", 1)[1]) >= 1
    log = mesh.cp.log_text()
    # Logged when the state changes (and when the error does), not at every poll.
    assert "answers again" not in log
    assert 1 <= log.count("(the dashboard keeps its last numbers)") <= 2, log[-3000:]


def test_every_proxy_page_names_its_workers_proxy_ids(mesh: Mesh) -> None:
    """One `meshgate_proxy_info` series per worker, each the id of that
    worker's push stream (`GET /status` on the control plane)."""
    status, body = get(mesh.admin, "/status")
    assert status == 200
    streams = json.loads(body)["proxies"]
    for job, identity, workers in (
        ("orders", ORDERS, 1),
        ("gateway", GATEWAY, 2),
    ):
        ids = {s.label("proxy_id") for s in mesh.page(job).samples("meshgate_proxy_info")}
        assert len(ids) == workers
        assert all(streams[pid]["identity"] == identity for pid in ids)
