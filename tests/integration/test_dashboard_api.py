"""The dashboard's API on a real control plane, with real sidecars and apps.

orders calls customers; customers lets orders read (GET) and denies the
rest by default. Every sidecar reports to the control plane on its push
stream; the control plane's admin listener serves `/ui`. The numbers are
checked against the callee's own `/metrics`, the denial against the
policy, the health against a sidecar that stops, and the API's access
rules against what a browser page elsewhere (Origin, DNS rebinding) or a
wrong method would send.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgate.observability.scrape import parse
from support.client import free_port, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh

ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
SERVICES: dict[str, Any] = {
    "orders": {"calls": ["customers"]},
    "customers": {
        "authz": {
            "default": "deny",
            "rules": [
                {"name": "orders-reads", "action": "allow", "from": [ORDERS], "methods": ["GET"]}
            ],
        }
    },
}


def call(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request, the path sent as it is (no normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method != "GET" else None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.admin = free_port()
        self.cp = ControlProcess(tmp / "cp", services=SERVICES, admin=f"127.0.0.1:{self.admin}")
        self.apps = {name: UpstreamServer(name) for name in SERVICES}
        self.tmp = tmp
        self.sidecars: dict[str, SidecarProcess] = {}

    def start(self) -> Mesh:
        self.cp.start()
        for app in self.apps.values():
            app.start()
        self.sidecars["orders"] = SidecarProcess(
            self.cp,
            "orders",
            self.apps["orders"].port,
            self.tmp / "orders",
            upstreams=("customers",),
        ).start()
        self.sidecars["customers"] = SidecarProcess(
            self.cp, "customers", self.apps["customers"].port, self.tmp / "customers", admin=True
        ).start()
        return self

    def state(self) -> dict[str, Any]:
        status, _, body = call(self.admin, "/ui/api/state")
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def stop(self) -> None:
        for sc in self.sidecars.values():
            sc.stop()
        for app in self.apps.values():
            app.stop()
        self.cp.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("dashboard"))
    try:
        yield m.start()
    finally:
        m.stop()


def _node(state: dict[str, Any], name: str) -> dict[str, Any]:
    for node in state["nodes"]:
        if node["id"] == name:
            return dict(node)
    raise AssertionError(f"no node {name}: {state['nodes']}")


def _edges(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in state["edges"]}


def _inbound_count(port: int, source: str, *, denied: bool) -> float:
    status, _, body = call(port, "/metrics")
    assert status == 200
    total = 0.0
    for s in parse(body.decode()).samples("meshgate_requests_total"):
        mine = s.label("direction") == "inbound" and s.label("source_identity") == source
        if mine and (s.label("reason") == "authz") == denied:
            total += s.value
    return total


def test_nodes_edges_counts_and_denials(mesh: Mesh) -> None:
    wait_until(
        lambda: all(_node(mesh.state(), n)["health"] == "healthy" for n in ("orders", "customers")),
        timeout=15,
        what="both services healthy on the dashboard",
    )
    # Counts start from each proxy's first report: call once both have sent one.
    wait_until(
        lambda: all(p["report_age"] is not None for p in mesh.state()["config"]["proxies"]),
        timeout=10,
        what="both proxies reporting",
    )
    orders = mesh.sidecars["orders"]
    url = f"127.0.0.1:{orders.ports['customers']}"
    for i in range(7):
        conn = http.client.HTTPConnection(url, timeout=10)
        conn.request("GET", f"/list?i={i}")
        assert conn.getresponse().status == 200
        conn.close()
    conn = http.client.HTTPConnection(url, timeout=10)
    conn.request("POST", "/write", body=b"x")
    assert conn.getresponse().status == 403
    conn.close()
    admin = mesh.sidecars["customers"].admin_port
    assert admin is not None
    assert _inbound_count(admin, ORDERS, denied=False) == 7

    def settled() -> dict[str, Any] | None:
        state = mesh.state()
        edges = _edges(state)
        ok, bad = edges.get("orders->customers"), edges.get("orders->customers:denied")
        if ok and bad and ok["requests"] == 7 and bad["requests"] == 1 and state["denials"]:
            return state
        return None

    state = wait_until(settled, timeout=10, what="the calls on the dashboard")
    edges = _edges(state)
    ok, bad = edges["orders->customers"], edges["orders->customers:denied"]
    # The very numbers the callee's /metrics has.
    assert ok["requests"] == _inbound_count(admin, ORDERS, denied=False)
    assert bad["requests"] == _inbound_count(admin, ORDERS, denied=True)
    assert ok["mtls"] is True and ok["success"] == 1.0 and ok["p99_ms"] is not None
    assert ok["rps"] > 0
    assert bad["denied"] is True and bad["policy"] == "inbound/customers"
    [denial] = state["denials"]
    assert denial["source"] == "orders" and denial["destination"] == "customers"
    assert denial["policy"] == "inbound/customers" and denial["rule"] is None
    assert denial["method"] == "POST" and denial["path"] == "/write"
    policies = {p["rule"]: p for p in state["services"]["customers"]["policies"]}
    assert policies["orders-reads"]["allow"] == 7
    assert policies["(default)"]["deny"] == 1
    [inst] = state["services"]["customers"]["instances"]
    assert inst["healthy"] and inst["serial"] and inst["not_after"] > time.time()
    assert inst["expiring"] is False and inst["acked"] > 0
    golden = state["services"]["customers"]["golden"]
    assert set(golden) == {"1m", "5m", "15m"} and golden["1m"]["rps"] > 0
    [gen] = state["config"]["generations"]
    assert gen["by"] == "file" and gen["digest"].startswith("sha256:")
    assert {p["service"] for p in state["config"]["proxies"]} == {"orders", "customers"}

    # The explanation names the policy and the reason.
    status, _, body = call(
        mesh.admin, "/ui/api/explain?source=orders&destination=customers&method=POST&path=/write"
    )
    doc = json.loads(body)
    assert status == 200 and doc["decision"] == "deny"
    assert doc["policy"] == "inbound/customers" and doc["rule"] is None
    status, _, body = call(mesh.admin, "/ui/api/explain?source=nobody&destination=customers")
    assert status == 400


def test_server_sent_events_deliver_a_state_within_3s(mesh: Mesh) -> None:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", mesh.admin), timeout=3) as s:
        s.sendall(b"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while data.count(b"event: state\ndata: ") < 2 or not data.endswith(b"\n\n"):
            chunk = s.recv(1 << 20)
            assert chunk, data[:500]
            data += chunk
    assert time.monotonic() - t0 < 5
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: text/event-stream" in head.lower()
    first = body.split(b"\n\n")[0]
    assert first.startswith(b"event: state\ndata: ")
    assert json.loads(first.partition(b"data: ")[2])["scope"] == "mesh"


def test_static_files_and_their_headers(mesh: Mesh) -> None:
    status, headers, _ = call(mesh.admin, "/ui/api/state")
    assert status == 200
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "script-src 'self';" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-cache"
    for path in ("/ui", "/ui/app.js", "/ui/app.css"):
        status, headers, _ = call(mesh.admin, path)
        if status == 404:
            continue  # the page is not in this tree yet
        assert status == 200
        assert headers["x-content-type-options"] == "nosniff"
        assert "unsafe-eval" not in headers["content-security-policy"]
        assert headers["content-type"].split(";")[0] in ("text/html", "text/javascript", "text/css")


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../x",
        "/ui/%2e%2e/",
        "/ui/%2e%2e/mesh/cli.py",
        "/ui/../../pyproject.toml",
        "/ui/vendor/../app.js",
        "/ui/vendor/..%2f..%2fpyproject.toml",
        "/ui/vendor/",
        "/ui/vendor/.hidden",
        "/ui//etc/passwd",
        "/ui/api/../../../etc/passwd",
    ],
)
def test_no_path_leaves_the_allow_list(mesh: Mesh, path: str) -> None:
    status, _, body = call(mesh.admin, path)
    assert status == 404, body


def test_the_api_is_read_only(mesh: Mesh) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = call(mesh.admin, "/ui/api/state", method)
        assert status == 405 and headers["allow"] == "GET"
    status, _, _ = call(mesh.admin, "/ui/events", "POST")
    assert status == 405


def test_other_pages_and_other_names_are_refused(mesh: Mesh) -> None:
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{mesh.admin + 1}"):
        status, _, _ = call(mesh.admin, "/ui/api/state", headers={"Origin": origin})
        assert status == 403
    # A DNS rebinding: the page's name resolves to 127.0.0.1.
    status, _, _ = call(mesh.admin, "/ui/api/state", headers={"Host": "evil.example"})
    assert status == 403
    status, _, _ = call(
        mesh.admin,
        "/ui/api/state",
        headers={"Host": "evil.example", "Origin": "http://evil.example"},
    )
    assert status == 403
    # The page's own requests (same origin) are answered.
    status, _, _ = call(
        mesh.admin, "/ui/api/state", headers={"Origin": f"http://127.0.0.1:{mesh.admin}"}
    )
    assert status == 200


def test_a_stopped_sidecar_turns_its_service_down_within_10s(mesh: Mesh) -> None:
    mesh.sidecars["customers"].stop()
    t0 = time.monotonic()
    wait_until(
        lambda: _node(mesh.state(), "customers")["health"] == "down",
        timeout=10,
        what="customers down",
    )
    assert time.monotonic() - t0 < 10
    state = mesh.state()
    [inst] = state["services"]["customers"]["instances"]
    assert inst["healthy"] is False and inst["connected"] is False
    mesh.sidecars["customers"].start()
    wait_until(
        lambda: _node(mesh.state(), "customers")["health"] == "healthy",
        timeout=15,
        what="customers back",
    )


def test_a_non_loopback_admin_needs_the_token(tmp_path: Path) -> None:
    admin = free_port()
    cp = ControlProcess(tmp_path / "open", services=SERVICES, admin=f"0.0.0.0:{admin}")
    cp.start()
    try:
        status, _, body = call(admin, "/ui/api/state")
        assert status == 403 and b"admin_token_file" in body
        # With a token file, the token is needed (and enough).
        (cp.directory / "admin.token").write_text("s3cret-token\n")
        doc = yaml.safe_load(cp.path.read_text())
        doc["control"]["admin_token_file"] = "admin.token"
        cp.path.write_text(yaml.safe_dump(doc))
        cp.wait_log("generation 2", timeout=10)
        status, headers, _ = call(admin, "/ui/api/state")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        status, _, _ = call(admin, "/ui/api/state", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        auth = {"Authorization": "Bearer s3cret-token", "Host": "dashboard.example:1"}
        status, _, body = call(admin, "/ui/api/state", headers=auth)
        assert status == 200, body
        status, _, body = call(admin, "/ui/api/config/diff?from=1&to=2", headers=auth)
        assert status == 200
        assert "+  admin_token_file: admin.token" in json.loads(body)["diff"]
        status, _, _ = call(admin, "/ui/api/config/diff?from=0&to=2", headers=auth)
        assert status == 404
    finally:
        cp.stop()
