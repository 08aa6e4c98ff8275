"""The sidecar's security and traffic features against real processes.

One loopback mesh (a `meshgate control`, a `meshgate sidecar` per service,
recording apps that know nothing of the mesh) and real clients: `openssl
s_client` against a sidecar's inbound listener (no certificate, another CA's,
an identity the policy refuses, TLS 1.2/1.1, an allowed one), a `meshgate
agent` that registers a fake instance at another service's address, audit
mode, per-source rate limits and the admin metrics that count them, a canary
split added by a reload under a steady stream of requests, and the control
plane killed with -9 while the mesh carries on. Permissive mTLS has a small
mesh of its own (`mtls:` is the whole mesh's setting).

A refusal is proven on the callee's side: its app recorded nothing (no
request, no byte).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.client import (
    IncompleteResponse,
    RawResponse,
    assert_problem,
    fetch,
    parse_response,
    wait_until,
)
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.proxy import meshgate_cmd
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh


def sid(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"


ORDERS = sid("orders")
CUSTOMERS = sid("customers")
PAYMENTS = sid("payments")
LEDGER = sid("ledger")
REPORTS = sid("reports")
LIMITED = sid("limited")
FRONTEND = sid("frontend")
ORDERS_V2 = sid("orders-v2")
INVENTORY = sid("inventory")

SERVICES: dict[str, Any] = {
    "orders": {
        "calls": ["customers", "payments", "ledger", "reports", "limited", "inventory"],
    },
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
            "rules": [{"name": "callers", "action": "allow", "from": [ORDERS]}],
        }
    },
    # No sidecar of its own: the spoofing test registers a fake instance.
    "ledger": {},
    "reports": {
        "authz": {
            "default": "deny",
            "mode": "audit",
            "rules": [
                {"name": "no-deletes", "action": "deny", "methods": ["DELETE"]},
                {"name": "payments-only", "action": "allow", "from": [PAYMENTS]},
            ],
        }
    },
    "limited": {
        "authz": {
            "default": "deny",
            "rules": [{"name": "callers", "action": "allow", "from": [ORDERS, FRONTEND]}],
        },
        "rate_limit": {"per_source": "3/min"},
    },
    "frontend": {"calls": ["orders", "limited"]},
    "orders-v2": {},
    # Started only once the control plane came back (test_control_plane_killed).
    "inventory": {},
}

# name -> the services it gets a local port for
SIDECARS: dict[str, tuple[str, ...]] = {
    "orders": ("customers", "payments", "ledger", "reports", "limited", "inventory"),
    "customers": (),
    "payments": (),
    "reports": (),
    "limited": (),
    "frontend": ("orders", "limited"),
    "orders-v2": (),
}


# -- helpers -------------------------------------------------------------------------------


def snapshot_endpoints(sc: SidecarProcess, service: str) -> list[dict[str, Any]]:
    """The endpoints of `service` in the snapshot `sc` last accepted (its
    state directory has it once the listeners run it)."""
    try:
        doc = json.loads((sc.state_dir / "snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return list(doc.get("sections", {}).get(f"service/{service}", {}).get("endpoints", []))


def snapshot_sections(sc: SidecarProcess) -> dict[str, Any]:
    try:
        doc = json.loads((sc.state_dir / "snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return dict(doc.get("sections", {}))


def wait_endpoint(sc: SidecarProcess, service: str, port: int, timeout: float = 20) -> None:
    wait_until(
        lambda: any(ep["port"] == port for ep in snapshot_endpoints(sc, service)),
        timeout=timeout,
        what=f"{sc.service}'s sidecar to get {service}'s endpoint :{port}",
    )


def start_all(cp: ControlProcess, sidecars: list[SidecarProcess]) -> None:
    """Tokens one after another (one store), then the sidecars together."""
    for sc in sidecars:
        if sc.token is None:
            sc.token = cp.token(sc.service)
    with concurrent.futures.ThreadPoolExecutor(len(sidecars)) as pool:
        for f in [pool.submit(sc.start) for sc in sidecars]:
            f.result()


def app_witness(app: UpstreamServer) -> tuple[int, int]:
    """What an app has seen: requests, and raw bytes over every connection."""
    return len(app.requests), app.bytes_received


def received(app: UpstreamServer, prefix: str) -> list[Any]:
    return [r for r in app.requests if r.target.startswith(prefix)]


@dataclass
class SClient:
    returncode: int
    stdout: bytes
    stderr: str

    def response(self, method: str = "GET") -> RawResponse | None:
        if not self.stdout.startswith(b"HTTP/"):
            return None
        try:
            return parse_response(self.stdout, method)[0]
        except IncompleteResponse:
            return None


def s_client(
    port: int,
    *args: str,
    path: str = "/",
    method: str = "GET",
    host: str = "svc",
) -> SClient:
    """`openssl s_client` to 127.0.0.1:port, one HTTP/1.1 request with
    `Connection: close`; stdout is what the server sent back (nothing when
    the handshake or the certificate was refused)."""
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    try:
        proc = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", *args],
            input=request,
            capture_output=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"s_client {args} did not finish: the server neither answered nor closed; "
            f"stdout {exc.stdout!r}"
        ) from None
    return SClient(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def cert_args(sc: SidecarProcess) -> list[str]:
    """A sidecar's own identity, from its state directory, as s_client takes it."""
    st = sc.state_dir
    return [
        "-cert",
        str(st / "cert.pem"),
        "-cert_chain",
        str(st / "chain.pem"),
        "-key",
        str(st / "key.pem"),
        "-CAfile",
        str(st / "bundle.pem"),
    ]


def throwaway_ca(directory: Path, identity: str) -> list[str]:
    """A CA of nobody's mesh and a leaf of it that claims `identity`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the mesh's CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (directory / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return [
        "-cert",
        str(directory / "leaf.pem"),
        "-cert_chain",
        str(directory / "ca.pem"),
        "-key",
        str(directory / "leaf.key"),
    ]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def yaml_doc(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the mesh ------------------------------------------------------------------------------


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cp = ControlProcess(tmp / "cp", services=SERVICES)
        names = [*SIDECARS, "inventory"]
        self.apps = {name: UpstreamServer(name) for name in names}
        self.sidecars: dict[str, SidecarProcess] = {}
        self.extra: list[SidecarProcess] = []
        self.pids: dict[str, int] = {}
        self.started = 0.0

    def sidecar(self, name: str, *, admin: bool = False) -> SidecarProcess:
        return SidecarProcess(
            self.cp,
            name,
            self.apps[name].port,
            self.tmp / name,
            upstreams=SIDECARS.get(name, ()),
            admin=admin,
        )

    def start(self) -> Mesh:
        self.cp.start()
        for app in self.apps.values():
            app.start()
        for name in SIDECARS:
            self.sidecars[name] = self.sidecar(name, admin=name == "limited")
        start_all(self.cp, list(self.sidecars.values()))
        self.started = time.monotonic()
        self.pids = {name: sc.pid for name, sc in self.sidecars.items()}
        sc = self.sidecars
        for caller, callee in (
            ("orders", "customers"),
            ("orders", "payments"),
            ("orders", "reports"),
            ("orders", "limited"),
            ("frontend", "orders"),
            ("frontend", "limited"),
            ("payments", "limited"),
        ):
            wait_endpoint(sc[caller], callee, sc[callee].inbound_port)
        r = fetch(sc["orders"].url("/ping", "customers"))
        assert r.status == 200, r.describe()
        return self

    def stop(self) -> None:
        for s in [*self.sidecars.values(), *self.extra]:
            s.stop()
        for app in self.apps.values():
            app.stop()
        self.cp.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh-security"))
    try:
        yield m.start()
    finally:
        m.stop()


# -- 1. the inbound listener, with openssl ----------------------------------------------------


def test_no_client_certificate_is_refused_and_reaches_nothing(mesh: Mesh) -> None:
    customers = mesh.sidecars["customers"]
    app = mesh.apps["customers"]
    before = app_witness(app)
    out = s_client(customers.inbound_port, "-tls1_3", path="/no-cert")
    assert out.response() is None, out.stdout
    assert out.returncode != 0, out.stderr
    # It was the sidecar that refused: its chain came first, then no answer.
    assert "meshgate intermediate" in out.stderr, out.stderr
    # Plain HTTP to a strict inbound port is no HTTP either.
    r = fetch(f"http://127.0.0.1:{customers.inbound_port}/plain", "--max-time", "10")
    assert r.status == 0, r.describe()
    assert app_witness(app) == before


def test_a_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    """The leaf claims an identity that the policy allows (orders): the
    name is worth nothing without the mesh's roots behind it."""
    customers = mesh.sidecars["customers"]
    app = mesh.apps["customers"]
    before = app_witness(app)
    forged = throwaway_ca(mesh.tmp / "rogue", ORDERS)
    out = s_client(customers.inbound_port, "-tls1_3", *forged, path="/rogue")
    assert out.response() is None, out.stdout
    assert out.returncode != 0, out.stderr
    assert "meshgate intermediate" in out.stderr, out.stderr
    assert app_witness(app) == before


def test_a_mesh_identity_the_policy_refuses_gets_403_naming_the_policy(mesh: Mesh) -> None:
    customers = mesh.sidecars["customers"]
    app = mesh.apps["customers"]
    before = app_witness(app)
    out = s_client(customers.inbound_port, *cert_args(mesh.sidecars["payments"]), path="/list")
    resp = out.response()
    assert resp is not None, (out.stdout, out.stderr)
    doc = assert_problem(resp, 403)
    assert doc["policy"] == "inbound/customers"
    assert doc["rule"] is None and "no rule allows it" in doc["detail"]
    assert "inbound/customers" in doc["detail"]
    assert doc["source"] == PAYMENTS
    # A deny rule is named.
    out = s_client(customers.inbound_port, *cert_args(mesh.sidecars["orders"]), path="/admin/x")
    resp = out.response()
    assert resp is not None, (out.stdout, out.stderr)
    doc = assert_problem(resp, 403)
    assert doc["rule"] == "no-admin" and "no-admin" in doc["detail"]
    assert doc["source"] == ORDERS
    assert app_witness(app) == before
    customers.wait_log(f"from {PAYMENTS} (rule -)")


def test_tls_below_1_3_is_refused(mesh: Mesh) -> None:
    customers = mesh.sidecars["customers"]
    app = mesh.apps["customers"]
    creds = cert_args(mesh.sidecars["orders"])
    # The same client and certificate over TLS 1.3 is answered (below, the
    # version alone makes the difference).
    out = s_client(customers.inbound_port, "-tls1_3", *creds, path="/tls13")
    resp = out.response()
    assert resp is not None and resp.status == 200, (out.stdout, out.stderr)
    before = app_witness(app)
    out = s_client(customers.inbound_port, "-tls1_2", *creds, path="/tls12")
    assert out.response() is None, out.stdout
    assert out.returncode != 0, out.stderr
    assert "depth=" not in out.stderr, out.stderr  # no ServerHello, no certificate
    # TLS 1.1: OpenSSL 3 offers it only at security level 0.
    out = s_client(
        customers.inbound_port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", *creds, path="/tls11"
    )
    assert out.response() is None, out.stdout
    assert out.returncode != 0, out.stderr
    assert "depth=" not in out.stderr, out.stderr
    assert app_witness(app) == before


def test_an_allowed_identity_gets_200_and_the_app_sees_xfcc(mesh: Mesh) -> None:
    customers = mesh.sidecars["customers"]
    app = mesh.apps["customers"]
    out = s_client(
        customers.inbound_port,
        "-tls1_3",
        *cert_args(mesh.sidecars["orders"]),
        path="/openssl-ok?x=1",
    )
    resp = out.response()
    assert resp is not None and resp.status == 200, (out.stdout, out.stderr)
    (req,) = received(app, "/openssl-ok")
    assert req.target == "/openssl-ok?x=1"
    assert req.header_all("x-forwarded-client-cert") == [f"By={CUSTOMERS};URI={ORDERS}"]


# -- 2. a spoofed endpoint ----------------------------------------------------------------------


def test_an_endpoint_presenting_another_identity_is_refused(mesh: Mesh) -> None:
    """A `ledger` instance registered at payments' inbound port: the
    endpoint presents payments' certificate where ledger's is expected."""
    orders = mesh.sidecars["orders"]
    payments = mesh.sidecars["payments"]
    state = mesh.tmp / "fake-ledger"
    log_path = mesh.tmp / "fake-ledger.log"
    env = dict(os.environ)
    env.pop("MESHGATE_TOKEN", None)
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            meshgate_cmd(
                "--log-level",
                "debug",
                "agent",
                "--service",
                "ledger",
                "--trust-domain",
                TRUST_DOMAIN,
                "--control",
                f"127.0.0.1:{mesh.cp.port}",
                "--state-dir",
                str(state),
                "--trust-bundle",
                str(mesh.cp.state / "ca" / "bundle.pem"),
                "--token",
                mesh.cp.token("ledger"),
                "--register",
                f"127.0.0.1:{payments.inbound_port}",
            ),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: "meshgate agent" in log_path.read_text() or agent.poll() is not None,
            timeout=20,
            what="the fake ledger agent",
        )
        assert agent.poll() is None, log_path.read_text()
        wait_endpoint(orders, "ledger", payments.inbound_port)
        app = mesh.apps["payments"]
        before = app_witness(app)
        r = fetch(orders.url("/spoofed", "ledger"))
        doc = assert_problem(r, 503)
        assert f"presented {PAYMENTS}" in doc["detail"], doc
        assert LEDGER in doc["detail"], doc
        assert app_witness(app) == before  # payments' app never heard of it
        orders.wait_log(f"presented {PAYMENTS}, expected {LEDGER}: refused")
        # payments itself is still reached, as itself.
        assert fetch(orders.url("/real", "payments")).status == 200
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)


def test_a_new_sidecar_keeps_its_first_lease(mesh: Mesh) -> None:
    """The lease is 3 s, the agent's default 15 s until the first snapshot
    says otherwise: the first heartbeat must follow the lease in force, or
    every new instance leaves the snapshots for a while after joining."""
    lease = 3.0
    time.sleep(max(0.0, mesh.started + 2 * lease - time.monotonic()))
    log = mesh.cp.log_text()
    for name, sc in mesh.sidecars.items():
        proxy_id = (sc.state_dir / "proxy_id").read_text().strip()
        assert f"instance {proxy_id} missed its lease" not in log, name
    proc = mesh.cp.cli("mesh", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    for name in mesh.sidecars:
        assert [i["health"] for i in services[name]["instances"]] == ["healthy"], name


# -- 3. permissive mTLS --------------------------------------------------------------------------


WEB = sid("web")


def test_permissive_takes_plaintext_without_xfcc_under_the_policy(tmp_path: Path) -> None:
    services = {
        "api": {
            "authz": {
                "default": "deny",
                "rules": [
                    {
                        "name": "public-reads",
                        "action": "allow",
                        "from": ["plaintext"],
                        "methods": ["GET"],
                        "paths": ["/public/**"],
                    },
                    {"name": "web", "action": "allow", "from": [WEB]},
                ],
            }
        },
        "web": {"calls": ["api"]},
    }
    cp = ControlProcess(tmp_path / "cp", services=services)
    doc = yaml_doc(cp.path)
    doc["mtls"] = "permissive"
    cp.path.write_text(yaml.safe_dump(doc, sort_keys=False))
    apps = {name: UpstreamServer(name) for name in ("api", "web")}
    sidecars: list[SidecarProcess] = []
    try:
        cp.start()
        for a in apps.values():
            a.start()
        api = SidecarProcess(cp, "api", apps["api"].port, tmp_path / "api")
        web = SidecarProcess(cp, "web", apps["web"].port, tmp_path / "web", upstreams=("api",))
        sidecars += [api, web]
        start_all(cp, sidecars)
        assert "(permissive mTLS)" in api.log_text()
        wait_endpoint(web, "api", api.inbound_port)
        app = apps["api"]
        plain = f"http://127.0.0.1:{api.inbound_port}"
        # Plaintext, allowed by the rule for plaintext callers; a forged XFCC
        # is dropped, and none is added: there is no verified caller.
        forged = f"By={sid('api')};URI={WEB}"
        r = fetch(f"{plain}/public/hello", "-H", f"X-Forwarded-Client-Cert: {forged}")
        assert r.status == 200, r.describe()
        (req,) = received(app, "/public/hello")
        assert req.header_all("x-forwarded-client-cert") == []
        # Plaintext outside the rule: denied by the policy, reaching nothing.
        before = app_witness(app)
        r = fetch(f"{plain}/private")
        doc = assert_problem(r, 403)
        assert doc["source"] == "plaintext" and doc["rule"] is None
        assert doc["policy"] == "inbound/api"
        r = fetch(f"{plain}/public/hello", "-X", "POST", "-d", "x")
        assert_problem(r, 403)
        assert app_witness(app) == before
        # mTLS callers on the same port: the app sees who called.
        r = fetch(web.url("/private", "api"))
        assert r.status == 200, r.describe()
        (req,) = received(app, "/private")
        assert req.header_all("x-forwarded-client-cert") == [f"By={sid('api')};URI={WEB}"]
        # ...and so does a TLS client with web's certificate, not through a sidecar.
        # TLS without a client certificate: no identity either, the same as
        # plaintext for the policy (its `plaintext` source) and for XFCC.
        out = s_client(api.inbound_port, "-tls1_3", path="/public/anonymous-tls")
        resp = out.response()
        assert resp is not None and resp.status == 200, (out.stdout, out.stderr)
        (req,) = received(app, "/public/anonymous-tls")
        assert req.header_all("x-forwarded-client-cert") == []
        out = s_client(api.inbound_port, "-tls1_3", path="/anonymous-tls")
        resp = out.response()
        assert resp is not None, (out.stdout, out.stderr)
        assert assert_problem(resp, 403)["source"] == "plaintext"
        assert received(app, "/anonymous-tls") == []
        out = s_client(api.inbound_port, "-tls1_3", *cert_args(web), path="/tls-direct")
        resp = out.response()
        assert resp is not None and resp.status == 200, (out.stdout, out.stderr)
        (req,) = received(app, "/tls-direct")
        assert req.header_all("x-forwarded-client-cert") == [f"By={sid('api')};URI={WEB}"]
    finally:
        for sc in sidecars:
            sc.stop()
        for a in apps.values():
            a.stop()
        cp.stop()


# -- 4. audit mode ----------------------------------------------------------------------------


def test_audit_mode_lets_a_denied_request_through_and_logs_it(mesh: Mesh) -> None:
    orders = mesh.sidecars["orders"]
    reports = mesh.sidecars["reports"]
    app = mesh.apps["reports"]
    # No rule allows orders, and the default is deny: let through, logged.
    r = fetch(orders.url("/audited", "reports"))
    assert r.status == 200, r.describe()
    (req,) = received(app, "/audited")
    assert req.header("x-forwarded-client-cert") == f"By={REPORTS};URI={ORDERS}"
    reports.wait_log(
        f"authz inbound/reports: would deny GET /audited from {ORDERS} (rule -): "
        "no rule allows it, and the default is deny"
    )
    # A deny rule that matches: let through too, and the log names the rule.
    r = fetch(orders.url("/audited-delete", "reports"), "-X", "DELETE")
    assert r.status == 200, r.describe()
    assert len(received(app, "/audited-delete")) == 1
    reports.wait_log(
        f"authz inbound/reports: would deny DELETE /audited-delete from {ORDERS} "
        "(rule no-deletes): rule 'no-deletes' (deny) matches"
    )


# -- 5. per-source rate limits -----------------------------------------------------------------


def test_a_per_source_limit_refuses_one_caller_only_and_is_counted(mesh: Mesh) -> None:
    orders = mesh.sidecars["orders"]
    frontend = mesh.sidecars["frontend"]
    limited = mesh.sidecars["limited"]
    app = mesh.apps["limited"]
    for i in range(3):
        r = fetch(orders.url(f"/rl/orders/{i}", "limited"))
        assert r.status == 200, r.describe()
        assert r.header("x-ratelimit-limit") == "3"
        assert r.header("x-ratelimit-remaining") == str(2 - i)
    r = fetch(orders.url("/rl/orders/3", "limited"))
    assert_problem(r, 429)
    assert r.header("x-ratelimit-limit") == "3"
    assert r.header("x-ratelimit-remaining") == "0"
    assert r.header("ratelimit-policy") and "q=3" in (r.header("ratelimit-policy") or "")
    assert r.header("ratelimit") and "r=0" in (r.header("ratelimit") or "")
    assert r.header("retry-after")
    assert len(received(app, "/rl/orders/")) == 3  # the 4th never reached the app
    # Another source has its own bucket.
    r = fetch(frontend.url("/rl/frontend/0", "limited"))
    assert r.status == 200, r.describe()
    assert r.header("x-ratelimit-remaining") == "2"
    # And one the policy refuses (payments' shared outbound port, by Host).
    r = fetch(mesh.sidecars["payments"].url("/rl/payments/0"), "-H", "Host: limited")
    doc = assert_problem(r, 403)
    assert doc["source"] == PAYMENTS
    assert limited.admin_port is not None
    text = fetch(f"http://127.0.0.1:{limited.admin_port}/metrics").body.decode()
    limited_by = "meshgate_ratelimit_limited_by_source_total"
    assert metric(text, limited_by, route="inbound/limited", source=ORDERS) == 1, text
    assert metric(text, limited_by, source=FRONTEND) == 0
    decisions = "meshgate_authz_decisions_total"
    base = {"policy": "inbound/limited"}
    # Authorization comes before the limit: the refused 4th was allowed by the policy.
    assert metric(text, decisions, **base, decision="allow", rule="callers", source=ORDERS) == 4
    assert metric(text, decisions, **base, decision="allow", rule="callers", source=FRONTEND) == 1
    assert (
        metric(text, decisions, **base, decision="deny", rule="(default)", source=PAYMENTS) == 1
    ), text


def test_handshake_failures_are_counted_by_reason_and_requests_by_identity(mesh: Mesh) -> None:
    """What a refused handshake leaves: a count by OpenSSL's reason, on the
    callee's /metrics; and a request that got in is counted with the
    identity its certificate proved."""
    limited = mesh.sidecars["limited"]
    assert limited.admin_port is not None
    admin = f"http://127.0.0.1:{limited.admin_port}/metrics"
    before = fetch(admin).body.decode()
    handshakes = "meshgate_tls_handshakes_total"
    out = s_client(limited.inbound_port, "-tls1_3", path="/no-cert")
    assert out.response() is None, out.stdout
    r = fetch(f"http://127.0.0.1:{limited.inbound_port}/plain", "--max-time", "10")
    assert r.status == 0, r.describe()
    out = s_client(limited.inbound_port, *cert_args(mesh.sidecars["orders"]), path="/rl/x/ok")
    assert out.response() is not None, out.stderr
    text = fetch(admin).body.decode()

    def grew(**labels: str) -> float:
        return metric(text, handshakes, **labels) - metric(before, handshakes, **labels)

    assert grew(direction="inbound", outcome="not_tls") == 1, text
    assert grew(direction="inbound", outcome="ok") >= 1, text
    failures = {
        line.split('outcome="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith(handshakes + "{") and 'outcome="ok"' not in line
    }
    # No client certificate: TLS 1.3 ends the handshake with an alert the
    # server names (its reason is OpenSSL's, lowercased).
    assert failures - {"not_tls"}, text
    requests = "meshgate_requests_total"
    assert (
        metric(
            text,
            requests,
            direction="inbound",
            source_identity=ORDERS,
            destination_identity=LIMITED,
            tls="true",
        )
        >= 1
    ), text


# -- 7. a canary split added by a reload, under load ---------------------------------------------


class Load:
    """Requests to `port` back to back: one worker on one keep-alive
    connection, one opening a new connection for each request. Each path
    carries the phase it was sent in."""

    def __init__(self, port: int, host: str) -> None:
        self.port = port
        self.host = host
        self.phase = "before"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok: dict[str, int] = {}
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(True, "k"), daemon=True),
            threading.Thread(target=self._run, args=(False, "n"), daemon=True),
        ]
        self.seq = 0

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def count(self, phase: str) -> int:
        with self.lock:
            return self.ok.get(phase, 0)

    def _run(self, keepalive: bool, tag: str) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self.stop.is_set():
            phase = self.phase
            path = f"/canary/{phase}/{tag}{i}"
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                headers = {"Host": self.host}
                if not keepalive:
                    headers["Connection"] = "close"
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    with self.lock:
                        self.failures.append(f"{path}: {resp.status} {body[:300]!r}")
                else:
                    with self.lock:
                        self.ok[phase] = self.ok.get(phase, 0) + 1
                if not keepalive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failures.append(f"{path}: {exc!r}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def wait(self, phase: str, n: int, timeout: float = 60) -> None:
        wait_until(
            lambda: self.count(phase) >= n or len(self.failures) > 20,
            timeout=timeout,
            what=f"{n} requests in phase {phase}",
        )

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_a_canary_split_added_by_reload_takes_its_share_and_drops_nothing(mesh: Mesh) -> None:
    frontend = mesh.sidecars["frontend"]
    v1, v2 = mesh.apps["orders"], mesh.apps["orders-v2"]
    wait_endpoint(frontend, "orders", mesh.sidecars["orders"].inbound_port)
    assert "service/orders-v2" not in snapshot_sections(frontend)
    load = Load(frontend.ports["orders"], "orders").start()
    try:
        load.wait("before", 100)
        # The route, into mesh.yaml, then SIGHUP: a new generation while requests flow.
        doc = yaml_doc(mesh.cp.path)
        doc["services"]["orders"]["routes"] = [
            {
                "path": "/**",
                "split": [
                    {"upstream": "orders", "weight": 90},
                    {"upstream": "orders-v2", "weight": 10},
                ],
            }
        ]
        load.phase = "during"
        write_atomically(mesh.cp.path, yaml.safe_dump(doc, sort_keys=False))
        assert mesh.cp.process is not None
        os.kill(mesh.cp.process.pid, signal.SIGHUP)

        def split_applied() -> bool:
            sections = snapshot_sections(frontend)
            orders = sections.get("service/orders", {})
            return bool(orders.get("routes")) and any(
                ep["port"] == mesh.sidecars["orders-v2"].inbound_port
                for ep in sections.get("service/orders-v2", {}).get("endpoints", [])
            )

        wait_until(split_applied, timeout=20, what="the split in frontend's snapshot")
        load.phase = "after"
        load.wait("after", 320)
    finally:
        load.finish()
    assert load.failures == [], load.failures[:10]
    before = load.count("before")
    during = load.count("during")
    after = load.count("after")
    assert before >= 100 and during > 0 and after >= 320
    # Every request reached exactly one app.
    for phase, n in (("before", before), ("during", during), ("after", after)):
        prefix = f"/canary/{phase}/"
        assert len(received(v1, prefix)) + len(received(v2, prefix)) == n, phase
    assert received(v2, "/canary/before/") == []
    share = len(received(v2, "/canary/after/")) / after
    assert 0.03 <= share <= 0.20, f"orders-v2 got {share:.1%} of {after} requests"
    # orders-v2 was reached over mTLS as itself, and nothing restarted.
    (sample, *_) = received(v2, "/canary/after/")
    assert sample.header("x-forwarded-client-cert") == f"By={ORDERS_V2};URI={FRONTEND}"
    for name, sc in mesh.sidecars.items():
        assert sc.alive and sc.pid == mesh.pids[name] and sc.starts == 1, name
    assert "generation 2" in mesh.cp.log_text()


# -- 6. the control plane killed -----------------------------------------------------------------


def test_the_mesh_outlives_its_control_plane_and_rejoins_it(mesh: Mesh) -> None:
    cp = mesh.cp
    orders = mesh.sidecars["orders"]
    proxy_id = (orders.state_dir / "proxy_id").read_text().strip()
    connected = f"proxy {proxy_id} ({ORDERS}) connected"
    assert connected in cp.log_text()
    cp.kill()
    # Calls between sidecars go on: keep-alive and new client connections.
    for i in range(3):
        assert fetch(orders.url(f"/cp-down/{i}", "customers")).status == 200
        assert fetch(orders.url(f"/cp-down/{i}", "payments")).status == 200
    assert len(received(mesh.apps["customers"], "/cp-down/")) == 3
    # A sidecar restarted now: no token, no control plane, its state directory.
    orders.stop()
    orders.token = None
    orders.start(fresh_token=False)
    assert orders.starts == 2
    r = fetch(orders.url("/restarted", "customers"))
    assert r.status == 200, r.describe()
    (req,) = received(mesh.apps["customers"], "/restarted")
    assert req.header("x-forwarded-client-cert") == f"By={CUSTOMERS};URI={ORDERS}"
    assert fetch(orders.url("/restarted", "customers"), "-X", "POST").status == 403
    # ...and its inbound listener serves with the certificate from its state.
    out = s_client(orders.inbound_port, *cert_args(mesh.sidecars["frontend"]), path="/inbound")
    resp = out.response()
    assert resp is not None and resp.status == 200, (out.stdout, out.stderr)
    (req,) = received(mesh.apps["orders"], "/inbound")
    assert req.header("x-forwarded-client-cert") == f"By={ORDERS};URI={FRONTEND}"
    # No inventory instance yet: the snapshot from the state directory says so.
    r = fetch(orders.url("/inv", "inventory"))
    assert assert_problem(r, 503)["type"].endswith("no-endpoints")
    seen = cp.log_text().count(connected)
    cp.start()
    wait_until(
        lambda: cp.log_text().count(connected) > seen,
        timeout=40,
        what="the restarted sidecar's stream to reconnect",
    )

    def status() -> dict[str, Any]:
        proc = cp.cli("mesh", "status", "--json")
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    wait_until(
        lambda: status()["proxies"].get(proxy_id, {}).get("connected"),
        timeout=10,
        what="mesh status to show the restarted sidecar connected",
    )
    instances = status()["services"]["orders"]["instances"]
    assert [(i["port"], i["health"]) for i in instances] == [(orders.inbound_port, "healthy")]
    # A new endpoint reaches the restarted sidecar over its new stream.
    inventory = mesh.sidecar("inventory")
    mesh.extra.append(inventory)
    inventory.start()
    wait_until(
        lambda: fetch(orders.url("/inv", "inventory")).status == 200,
        timeout=20,
        what="the restarted sidecar to route to the new inventory instance",
    )
    req = received(mesh.apps["inventory"], "/inv")[-1]
    assert req.header("x-forwarded-client-cert") == f"By={INVENTORY};URI={ORDERS}"
    # Nothing needed a new certificate: the one from the join served throughout.
    assert orders.log_text().count(f"certificate for {ORDERS}, serial") == 1


def test_a_mesh_certificate_without_a_spiffe_id_is_closed_in_strict_mode(mesh: Mesh) -> None:
    """Signed by the mesh's own intermediate (read from the control plane's
    state, as only an attacker with the CA key could), but naming a DNS name
    instead of a SPIFFE ID: the chain verifies, and the strict inbound still
    serves nothing, though orders' policy allows every mesh identity."""
    orders = mesh.sidecars["orders"]
    app = mesh.apps["orders"]
    before = app_witness(app)
    ca_dir = mesh.cp.state / "ca"
    issuer = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key(
        (ca_dir / "intermediate.key").read_bytes(), password=None
    )
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-spiffe")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("orders.local")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    work = mesh.tmp / "no-spiffe"
    work.mkdir(exist_ok=True)
    pem = serialization.Encoding.PEM
    (work / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (work / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    out = s_client(
        orders.inbound_port,
        "-tls1_3",
        "-cert",
        str(work / "leaf.pem"),
        "-cert_chain",
        str(ca_dir / "chain.pem"),
        "-key",
        str(work / "leaf.key"),
        path="/no-spiffe",
    )
    assert out.response() is None, out.stdout
    assert app_witness(app) == before
    orders.wait_log("without a SPIFFE ID: closed")
