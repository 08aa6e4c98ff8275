"""The sidecar on loopback: real control plane, real sidecars, real apps.

Three services (orders calls customers and payments; customers allows only
orders, and only reads). Every app is the recording `UpstreamServer`, which
knows nothing of the mesh: it sees plain HTTP, and the caller's identity in
X-Forwarded-Client-Cert.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.client import fetch, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.proxy import ProxyProcess
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh

ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
CUSTOMERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/customers"
PAYMENTS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"

SERVICES: dict[str, Any] = {
    "orders": {"calls": ["customers", "payments", "ledger"]},
    "customers": {
        "authz": {
            "default": "deny",
            "rules": [
                {"name": "orders-reads", "action": "allow", "from": [ORDERS], "methods": ["GET"]},
                {"name": "no-admin", "action": "deny", "paths": ["/admin/**"]},
            ],
        }
    },
    "payments": {
        "authz": {
            "default": "deny",
            "rules": [{"name": "callers", "action": "allow", "from": [ORDERS, GATEWAY]}],
        }
    },
    "ledger": {},
    "gateway": {"namespace": "edge"},
}


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cp = ControlProcess(tmp / "cp", services=SERVICES)
        self.apps = {name: UpstreamServer(name) for name in ("orders", "customers", "payments")}
        self.sidecars: dict[str, SidecarProcess] = {}
        self.gateway: ProxyProcess | None = None

    def start(self) -> Mesh:
        self.cp.start()
        for app in self.apps.values():
            app.start()
        self.sidecars["orders"] = SidecarProcess(
            self.cp,
            "orders",
            self.apps["orders"].port,
            self.tmp / "orders",
            upstreams=("customers", "payments", "ledger"),
        ).start()
        for name in ("customers", "payments"):
            self.sidecars[name] = SidecarProcess(
                self.cp, name, self.apps[name].port, self.tmp / name
            ).start()
        # orders' proxy has both callees' endpoints once their leases show.
        orders = self.sidecars["orders"]
        wait_until(
            lambda: (
                fetch(orders.url("/ping", "customers")).status == 200
                and fetch(orders.url("/ping", "payments")).status == 200
            ),
            timeout=15,
            what="orders' sidecar reaches customers and payments",
        )
        token = self.tmp / "gateway.token"
        token.write_text(self.cp.token("gateway"))
        self.gateway = ProxyProcess(
            {
                "mesh": {
                    "control": f"127.0.0.1:{self.cp.port}",
                    "trust_domain": TRUST_DOMAIN,
                    "token_file": str(token),
                    "trust_bundle": str(self.cp.state / "ca" / "bundle.pem"),
                    "state_dir": str(self.tmp / "gateway-state"),
                },
                "routes": [
                    {"path": "/pay/**", "upstream": "payments", "strip_prefix": True},
                    {"path": "/cust/**", "upstream": "customers", "strip_prefix": True},
                ],
                "upstreams": {
                    "payments": {"service": "payments"},
                    "customers": {"service": "customers"},
                },
            },
            self.tmp,
        ).start()
        gw = self.gateway
        wait_until(
            lambda: fetch(gw.url("/pay/ping")).status == 200,
            timeout=15,
            what="the gateway reaches payments through the mesh",
        )
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for sc in self.sidecars.values():
            sc.stop()
        for app in self.apps.values():
            app.stop()
        self.cp.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh-sidecar"))
    try:
        yield m.start()
    finally:
        m.stop()


def _last(app: UpstreamServer, path: str) -> Any:
    for req in reversed(app.requests):
        if req.target.startswith(path):
            return req
    raise AssertionError(f"{app.name} never received {path}")


def test_port_per_service_reaches_the_app_with_the_callers_identity(mesh: Mesh) -> None:
    orders = mesh.sidecars["orders"]
    r = fetch(orders.url("/by-port?x=1", "customers"))
    assert r.status == 200, r.body
    req = _last(mesh.apps["customers"], "/by-port")
    assert req.target == "/by-port?x=1"
    assert req.header("x-forwarded-client-cert") == f"By={CUSTOMERS};URI={ORDERS}"


def test_host_header_names_the_service_on_the_shared_port(mesh: Mesh) -> None:
    orders = mesh.sidecars["orders"]
    r = fetch(orders.url("/by-host"), "-H", "Host: payments")
    assert r.status == 200, r.body
    req = _last(mesh.apps["payments"], "/by-host")
    assert req.header("x-forwarded-client-cert") == f"By={PAYMENTS};URI={ORDERS}"
    # An unknown service is no route, not a guess.
    r = fetch(orders.url("/by-host"), "-H", "Host: nowhere")
    assert r.status == 404


def test_http_proxy_env_reaches_the_service_by_name(mesh: Mesh) -> None:
    """An app that honours HTTP_PROXY calls http://customers/ as it is."""
    orders = mesh.sidecars["orders"]
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://customers/proxied"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "http_proxy": f"http://127.0.0.1:{orders.outbound_port}"},
        timeout=30,
        check=False,
    )
    assert out.stdout == "200", out.stderr
    assert _last(mesh.apps["customers"], "/proxied").header("x-forwarded-client-cert")


def test_a_forged_xfcc_from_the_app_never_reaches_the_callee(mesh: Mesh) -> None:
    orders = mesh.sidecars["orders"]
    forged = f"By={CUSTOMERS};URI=spiffe://{TRUST_DOMAIN}/ns/default/sa/admin"
    r = fetch(orders.url("/forged", "customers"), "-H", f"X-Forwarded-Client-Cert: {forged}")
    assert r.status == 200
    req = _last(mesh.apps["customers"], "/forged")
    assert req.header_all("x-forwarded-client-cert") == [f"By={CUSTOMERS};URI={ORDERS}"]


def test_denied_call_gets_403_naming_policy_and_rule_and_never_reaches_the_app(
    mesh: Mesh,
) -> None:
    orders = mesh.sidecars["orders"]
    before = len(mesh.apps["customers"].requests)
    r = fetch(orders.url("/write", "customers"), "-X", "POST", "-d", "x")
    assert r.status == 403
    doc = json.loads(r.body)
    assert doc["policy"] == "inbound/customers"
    assert doc["rule"] is None and "no rule allows it" in doc["detail"]
    assert doc["source"] == ORDERS
    r = fetch(orders.url("/admin/users", "customers"))
    assert r.status == 403
    assert json.loads(r.body)["rule"] == "no-admin"
    assert len(mesh.apps["customers"].requests) == before
    mesh.sidecars["customers"].wait_log("denied")


def test_no_live_instance_is_503_no_endpoints(mesh: Mesh) -> None:
    orders = mesh.sidecars["orders"]
    r = fetch(orders.url("/x", "ledger"))
    assert r.status == 503
    doc = json.loads(r.body)
    assert doc["type"].endswith("no-endpoints")
    assert "ledger" in doc["detail"]


def test_the_sidecars_state_directory_keeps_its_key_private(mesh: Mesh) -> None:
    state = mesh.sidecars["orders"].state_dir
    assert (state / "key.pem").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in mesh.cp.log_text()


def test_the_gateway_joins_the_mesh_and_calls_a_sidecar_over_mtls(mesh: Mesh) -> None:
    """North/south at the edge, east/west inside: the gateway's route names
    a mesh service; payments' app sees the gateway's own identity."""
    assert mesh.gateway is not None
    r = fetch(mesh.gateway.url("/pay/charge"))
    assert r.status == 200, r.body
    req = _last(mesh.apps["payments"], "/charge")
    assert req.header("x-forwarded-client-cert") == f"By={PAYMENTS};URI={GATEWAY}"
    # customers allows only orders: the gateway's identity is refused there.
    r = fetch(mesh.gateway.url("/cust/list"))
    assert r.status == 403
    assert json.loads(r.body)["source"] == GATEWAY
    key = mesh.tmp / "gateway-state" / "worker-0" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600


def test_two_workers_serve_one_instance_each_with_its_own_key(mesh: Mesh, tmp_path: Path) -> None:
    """`--workers 2`: two processes on the same ports, one registered
    instance, and a key per worker (a key never leaves its process)."""
    app = UpstreamServer("payments-2").start()
    token = mesh.cp.token("payments")  # reusable: both workers join with it
    sc = SidecarProcess(
        mesh.cp, "payments", app.port, tmp_path, token=token, extra=("--workers", "2"), admin=True
    )
    try:
        sc.start()
        sc.wait_log("worker 1 serving", timeout=30)
        keys = sorted(sc.state_dir.glob("worker-*/key.pem"))
        assert [k.parent.name for k in keys] == ["worker-0", "worker-1"]
        assert keys[0].read_bytes() != keys[1].read_bytes()
        assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
        children = Path(f"/proc/{sc.pid}/task/{sc.pid}/children").read_text().split()
        assert len(children) == 1
        orders = mesh.sidecars["orders"]
        # payments now has two instances (this one and the fixture's): both
        # answer, over mutual TLS, with the caller's identity.
        statuses = []

        def reached() -> bool:
            statuses.append(fetch(orders.url("/w2", "payments")).status)
            return any(r.target == "/w2" for r in app.requests)

        wait_until(reached, timeout=15, what="the two-worker instance gets requests")
        assert set(statuses) == {200}
        for req in app.requests:
            assert req.header("x-forwarded-client-cert") == f"By={PAYMENTS};URI={ORDERS}"
        # One scrape of the shared admin port answers for both workers.
        for _ in range(20):
            fetch(orders.url("/w2-more", "payments"))
        reached_app = len(app.requests)
        assert sc.admin_port is not None
        text = fetch(f"http://127.0.0.1:{sc.admin_port}/metrics").body.decode()
        assert "\nmeshgate_workers_scraped 2\n" in text, text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshgate_requests_total{")
            and 'direction="inbound"' in line
            and f'source_identity="{ORDERS}"' in line
        )
        assert counted == reached_app, text
    finally:
        sc.stop()
        app.stop()
