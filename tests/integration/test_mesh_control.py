"""The control plane as a real process: joining, refused CSRs, registration,
the push with ACK/NACK, renewal, a kill -9 and a restart, reloads, and
node-local attestation. Proxies are `MeshAgent`s speaking the real protocol
over mutual TLS."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshgate.mesh.agent import MeshAgent
from meshgate.mesh.control.store import SqliteStore
from meshgate.mesh.wire import ApiError, ClientConnection
from meshgate.tls.context import client_context
from support.mesh import TRUST_DOMAIN, ControlProcess, mesh_yaml

pytestmark = [pytest.mark.engine, pytest.mark.mesh]


def sid(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"


@pytest.fixture
def cp(tmp_path: Path) -> Any:
    control = ControlProcess(tmp_path / "cp").start()
    yield control
    control.stop()


def make_agent(
    cp: ControlProcess,
    tmp: Path,
    service: str,
    *,
    token: str | None = None,
    instance: dict[str, Any] | None = None,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
    state: str | None = None,
) -> MeshAgent:
    return MeshAgent(
        identity=sid(service),
        controls=[("127.0.0.1", cp.port)],
        state_dir=tmp / (state or service),
        token=token,
        bundle_pem=cp.bundle,
        instance=instance,
        on_snapshot=on_snapshot,
    )


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def csr_pem(
    sans: list[x509.GeneralName], key: Any = None, *, ca: bool = False
) -> tuple[bytes, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")])
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key


async def join(cp: ControlProcess, token: str, csr: bytes) -> Any:
    conn = await ClientConnection.open("127.0.0.1", cp.port, client_context(cp.bundle))
    try:
        return await conn.request("POST", "/v1/join", {"token": token, "csr": csr.decode()})
    finally:
        conn.close()


# -- certificates ---------------------------------------------------------------------


async def test_join_gives_a_leaf_that_openssl_verifies(cp: ControlProcess, tmp_path: Path) -> None:
    agent = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    await agent.start()
    try:
        state = tmp_path / "orders"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("key.pem", "cert.pem", "chain.pem", "bundle.pem", "token"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        verify = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(state / "bundle.pem"),
                "-untrusted",
                str(state / "chain.pem"),
                str(state / "cert.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        text = subprocess.run(
            ["openssl", "x509", "-in", str(state / "cert.pem"), "-noout", "-text"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"URI:{sid('orders')}" in text
        assert "prime256v1" in text or "P-256" in text
        assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    finally:
        await agent.close()


async def test_refused_csrs_say_why_and_are_audited(cp: ControlProcess) -> None:
    token = cp.token("orders")
    uri = x509.UniformResourceIdentifier
    cases: dict[str, tuple[bytes, str]] = {}
    cases["wrong-san"] = (csr_pem([uri(sid("payments"))])[0], token)
    cases["second-san"] = (csr_pem([uri(sid("orders")), uri(sid("payments"))])[0], token)
    cases["dns-san"] = (csr_pem([uri(sid("orders")), x509.DNSName("orders.test")])[0], token)
    cases["rsa-1024"] = (
        csr_pem([uri(sid("orders"))], rsa.generate_private_key(65537, 1024))[0],
        token,
    )
    cases["ca-csr"] = (csr_pem([uri(sid("orders"))], ca=True)[0], token)
    good, _ = csr_pem([uri(sid("orders"))])
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55  # inside the signature
    import base64

    broken = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    cases["bad-signature"] = (broken, token)
    revoked = cp.token("orders")
    assert cp.cli("token", "revoke", revoked[4:].split(".")[0]).returncode == 0
    cases["revoked-token"] = (good, revoked)
    expiring = cp.token("orders", "--ttl", "1s")
    cases["unknown-token"] = (good, "mgt_000000000000.nope")
    reasons = {}
    for name, (csr, tok) in cases.items():
        with pytest.raises(ApiError) as info:
            await join(cp, tok, csr)
        assert info.value.status in (400, 401), (name, info.value.status)
        reasons[name] = info.value.reason
    await asyncio.sleep(1.1)
    with pytest.raises(ApiError) as info:
        await join(cp, expiring, good)
    reasons["expired-token"] = info.value.reason
    assert "payments" in reasons["wrong-san"] and "orders" in reasons["wrong-san"]
    assert "revoked" in reasons["revoked-token"]
    assert "expired" in reasons["expired-token"]
    assert "unknown" in reasons["unknown-token"]
    assert "RSA" in reasons["rsa-1024"]
    assert "DNS" in reasons["dns-san"]
    for name, reason in reasons.items():
        assert reason and len(reason) < 300, (name, reason)
    # Each refusal is in the audit log with its reason; the good CSR still works.
    store = SqliteStore(cp.state / "store.db")
    try:
        refused = [e for e in store.audit_log() if e["event"] == "refused"]
        logged = {e["reason"] for e in refused}
        assert set(reasons.values()) <= logged, (reasons, logged)
    finally:
        store.close()
    answer = await join(cp, token, good)
    assert answer["identity"] == sid("orders")


async def test_renewal_is_proven_by_the_current_certificate(
    cp: ControlProcess, tmp_path: Path
) -> None:
    agent = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    await agent.start()
    try:
        first = agent.state.certificate()
        await agent.renew()
        second = agent.state.certificate()
        assert first is not None and second is not None
        assert first.serial_number != second.serial_number
        assert first.public_key() != second.public_key()  # a new key each time
        # Without a certificate, a renewal is refused.
        conn = await ClientConnection.open("127.0.0.1", cp.port, client_context(cp.bundle))
        with pytest.raises(ApiError) as info:
            await conn.request("POST", "/v1/certificate", {"csr": "x"})
        conn.close()
        assert info.value.status == 401
    finally:
        await agent.close()


# -- registry and push -------------------------------------------------------------------


async def test_a_registration_reaches_its_callers_only(cp: ControlProcess, tmp_path: Path) -> None:
    orders = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    payments = make_agent(cp, tmp_path, "payments", token=cp.token("payments"))
    customers = make_agent(
        cp,
        tmp_path,
        "customers",
        token=cp.token("customers"),
        instance={"address": "127.0.0.1", "port": 9999, "version": "v7", "zone": "z1"},
    )
    for a in (orders, payments, customers):
        await a.start()
    try:

        def endpoints() -> list[Any]:
            return list(orders.sections.get("service/customers", {}).get("endpoints", []))

        await wait_for(lambda: len(endpoints()) == 1, what="the customers endpoint at orders")
        (ep,) = endpoints()
        assert (ep["address"], ep["port"], ep["identity"], ep["version"]) == (
            "127.0.0.1",
            9999,
            sid("customers"),
            "v7",
        )
        # Filtered: orders calls customers only; payments calls everyone.
        assert "service/payments" not in orders.sections
        assert orders.sections["inbound"]["identity"] == sid("orders")
        await wait_for(lambda: "service/customers" in payments.sections, what="payments' view")
        # The state directory holds the last accepted snapshot.
        saved = json.loads((tmp_path / "orders" / "snapshot.json").read_text())
        assert saved["version"] == orders.version
        status = cp.cli("mesh", "status", "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        (inst,) = doc["services"]["customers"]["instances"]
        assert inst["health"] == "healthy"
        acked = {p["identity"]: p["acked_version"] for p in doc["proxies"].values()}
        assert acked[sid("orders")] == orders.version
    finally:
        for a in (orders, payments, customers):
            await a.close()


async def test_an_instance_cannot_register_as_another_service(
    cp: ControlProcess, tmp_path: Path
) -> None:
    agent = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    await agent.start()
    await agent.close()
    ctx = client_context(
        cp.bundle, agent.state.cert_pem + agent.state.chain_pem, agent.state.key_pem
    )
    conn = await ClientConnection.open("127.0.0.1", cp.port, ctx)
    with pytest.raises(ApiError) as info:
        await conn.open_stream(
            "/v1/stream",
            {
                "type": "hello",
                "proxy_id": "evil",
                "instance": {"service": "payments", "address": "127.0.0.1", "port": 1},
            },
        )
    conn.close()
    assert info.value.status == 403 and "payments" in info.value.reason


async def test_a_lost_lease_takes_the_instance_out(cp: ControlProcess, tmp_path: Path) -> None:
    orders = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    customers = make_agent(
        cp,
        tmp_path,
        "customers",
        token=cp.token("customers"),
        instance={"address": "127.0.0.1", "port": 9998},
    )
    await orders.start()
    await customers.start()
    try:

        def count() -> int:
            return len(orders.sections.get("service/customers", {}).get("endpoints", []))

        await wait_for(lambda: count() == 1, what="registration")
        await customers.close()  # no more heartbeats: the 3 s lease runs out
        await wait_for(lambda: count() == 0, timeout=15, what="the lease to be lost")
    finally:
        await orders.close()


async def test_nack_is_visible_with_the_reason(cp: ControlProcess, tmp_path: Path) -> None:
    def refuse_inventory(sections: dict[str, Any]) -> None:
        if "service/inventory" in sections:
            raise ValueError("inventory: this proxy cannot route to it (test)")

    orders = make_agent(
        cp, tmp_path, "orders", token=cp.token("orders"), on_snapshot=refuse_inventory
    )
    await orders.start()
    try:
        await wait_for(lambda: orders.version > 0, what="a first snapshot")
        before = orders.version
        cp.path.write_text(
            mesh_yaml(
                cp.port,
                services={
                    "orders": {"calls": ["customers", "inventory"]},
                    "customers": {},
                    "payments": {},
                    "inventory": {},
                },
            )
        )
        await wait_for(lambda: "refused version" in cp.log_text(), what="the NACK")
        status = json.loads(cp.cli("mesh", "status", "--json").stdout)
        (proxy,) = [p for p in status["proxies"].values() if p["identity"] == sid("orders")]
        assert "cannot route" in proxy["nack"]["reason"]
        assert orders.version == before  # it kept what it had
        assert proxy["acked_version"] == before
    finally:
        await orders.close()


# -- config generations ----------------------------------------------------------------------


async def test_a_bad_reload_is_refused_and_a_good_one_pushed(
    cp: ControlProcess, tmp_path: Path
) -> None:
    orders = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    await orders.start()
    try:
        await wait_for(lambda: "service/customers" in orders.sections, what="a first snapshot")
        good = cp.path.read_text()
        cp.path.write_text(good.replace("calls:\n    - customers", "calls:\n    - nowhere"))
        await wait_for(
            lambda: "refused, generation 1 keeps serving" in cp.log_text(), what="the refusal"
        )
        assert "mesh.yaml:" in cp.log_text() and "nowhere" in cp.log_text()
        assert "service/customers" in orders.sections
        cp.path.write_text(good.replace("calls:\n    - customers", "calls:\n    - payments"))
        await wait_for(lambda: "service/payments" in orders.sections, what="the new generation")
        assert "service/customers" not in orders.sections  # a delta drops it too
        assert orders.sections["mesh"]["generation"] == 2
    finally:
        await orders.close()


def test_check_names_the_line_of_a_bad_mesh_yaml(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("trust_domain: mesh.test\nservices:\n  orders:\n    calls: [nowhere]\n")
    from support.proxy import run_meshgate

    proc = run_meshgate("check", "-c", str(path))
    assert proc.returncode == 1
    assert f"{path}:4:" in proc.stderr and "nowhere" in proc.stderr
    path.write_text("trust_domain: mesh.test\nservices:\n  orders: {}\n")
    proc = run_meshgate("check", "-c", str(path))
    assert proc.returncode == 0 and "spiffe://mesh.test/ns/default/sa/orders" in proc.stdout


# -- the control plane gone -----------------------------------------------------------------------


async def test_kill_9_and_restart_breaks_nothing(cp: ControlProcess, tmp_path: Path) -> None:
    orders = make_agent(cp, tmp_path, "orders", token=cp.token("orders"))
    customers = make_agent(
        cp,
        tmp_path,
        "customers",
        token=cp.token("customers"),
        instance={"address": "127.0.0.1", "port": 9997},
    )
    await orders.start()
    await customers.start()
    try:

        def count(a: MeshAgent) -> int:
            return len(a.sections.get("service/customers", {}).get("endpoints", []))

        await wait_for(lambda: count(orders) == 1, what="registration")
        serials = {
            a.identity: a.state.certificate().serial_number  # type: ignore[union-attr]
            for a in (orders, customers)
        }
        cp.kill()
        await wait_for(lambda: not orders.connected.is_set(), what="the stream to drop")
        assert count(orders) == 1  # it keeps what it had
        with pytest.raises((OSError, ConnectionError)):
            await orders.renew()  # no renewal while it is gone; the old certificate stays
        # A proxy restarted while the control plane is gone serves from its state.
        again = make_agent(cp, tmp_path, "orders", state="orders")
        await again.start()
        assert count(again) == 1 and again.version == orders.version
        await again.close()
        cp.start()
        await wait_for(orders.connected.is_set, timeout=30, what="a reconnect")
        await wait_for(customers.connected.is_set, timeout=30, what="a reconnect")
        await asyncio.sleep(1.0)
        assert count(orders) == 1  # the registry survived; leases got their grace
        for a in (orders, customers):
            assert a.state.certificate().serial_number == serials[a.identity]  # type: ignore[union-attr]
        # Nothing was reissued: the CA is the same one, and the running agents
        # renew again with nothing restarted.
        assert "control plane for mesh.test" in cp.log_text()
        await orders.renew()
        assert orders.state.certificate().serial_number != serials[orders.identity]  # type: ignore[union-attr]
    finally:
        await orders.close()
        await customers.close()


# -- node-local attestation ------------------------------------------------------------------------


async def test_attestation_by_uid(tmp_path: Path) -> None:
    sock = tmp_path / "attest.sock"
    port_cp = ControlProcess(tmp_path / "cp")
    port_cp.path.write_text(
        mesh_yaml(port_cp.port)
        + f"attestation:\n  socket: {sock}\n  rules:\n  - {{uid: {os.getuid()}, service: orders}}\n"
    )
    port_cp.start()
    try:
        agent = MeshAgent(
            identity=sid("orders"),
            controls=[("127.0.0.1", port_cp.port)],
            state_dir=tmp_path / "orders",
            attest_socket=str(sock),
            bundle_pem=port_cp.bundle,
        )
        await agent.start()
        cert = agent.state.certificate()
        assert cert is not None
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [sid("orders")]
        await agent.close()
        # Asking for another identity over the socket is refused.
        conn = await ClientConnection.open("", 0, None, unix=str(sock))
        csr, _ = csr_pem([x509.UniformResourceIdentifier(sid("payments"))])
        with pytest.raises(ApiError) as info:
            await conn.request("POST", "/v1/join", {"csr": csr.decode()})
        conn.close()
        assert info.value.status == 400 and "payments" in info.value.reason
    finally:
        port_cp.stop()


# -- the admin listener ---------------------------------------------------------------------


async def test_admin_metrics_config_api_and_csr_rate(tmp_path: Path) -> None:
    from support.client import curl, free_port

    admin = free_port()
    (tmp_path / "cp").mkdir()
    (tmp_path / "cp" / "admin.token").write_text("s3cret-admin-token\n")
    control = ControlProcess(
        tmp_path / "cp",
        admin=f"127.0.0.1:{admin}",
        admin_token_file="admin.token",
        csr_rate={"limit": 4, "period": "1m"},
    ).start()
    try:
        token = control.token("orders")
        agent = make_agent(control, tmp_path, "orders", token=token)
        await agent.start()
        await wait_for(agent.connected.is_set, what="the stream")
        await asyncio.sleep(0.3)
        metrics = curl(f"http://127.0.0.1:{admin}/metrics").stdout.decode()
        assert "meshgate_control_proxies_connected 1" in metrics
        assert 'meshgate_control_certificates_total{outcome="issued"} 1' in metrics
        cert = agent.state.certificate()
        assert cert is not None
        assert (
            f'meshgate_identity_cert_expiration_timestamp_seconds{{identity="{sid("orders")}"'
            in metrics
        )
        assert f"}} {cert.not_valid_after_utc.timestamp()}" in metrics
        # The config API: a bearer token, then the same validation as the file.
        put = ["-X", "PUT", "--data-binary"]
        new = mesh_yaml(control.port, services={"orders": {"calls": ["payments"]}, "payments": {}})
        r = curl(
            "-o", "/dev/null", "-w", "%{http_code}", *put, new, f"http://127.0.0.1:{admin}/config"
        )
        assert r.stdout == b"401", r.stdout
        auth = ["-H", "Authorization: Bearer s3cret-admin-token"]
        bad = curl(
            *put,
            "services:\n  orders: {calls: [nowhere]}\n",
            *auth,
            f"http://127.0.0.1:{admin}/config",
        )
        assert b"PUT /config:2:" in bad.stdout and b"nowhere" in bad.stdout, bad.stdout
        ok = curl(*put, new, *auth, f"http://127.0.0.1:{admin}/config")
        assert json.loads(ok.stdout)["generation"] == 2, ok.stdout
        await wait_for(lambda: "service/payments" in agent.sections, what="the API's generation")
        await agent.close()
        # CSR rate: 4 a minute per caller (the agent's join was the first).
        good, _ = csr_pem([x509.UniformResourceIdentifier(sid("orders"))])
        for _ in range(3):
            await join(control, token, good)
        with pytest.raises(ApiError) as info:
            await join(control, token, good)
        assert info.value.status == 429 and "too many" in info.value.reason
    finally:
        control.stop()
