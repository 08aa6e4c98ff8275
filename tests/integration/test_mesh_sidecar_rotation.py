"""Certificate rotation under load, through a pair of real sidecars.

`certificate_lifetime: 1m`: each sidecar's agent renews at about 70% of the
remaining life (jittered), so some 90 seconds see two renewals on each side.
Meanwhile requests flow both ways through the pair: `orders` calls
`customers` over one client keep-alive connection (its sidecar keeps its
mTLS connection to customers' sidecar in the pool), and `customers` calls
`orders` on a new client connection each time, with no idle connection kept
to orders' sidecar (`pool.max_idle: 0`), so that every one of those requests
is a new mutual-TLS handshake between the sidecars, made with whatever
certificate each side holds at that moment. No request may fail, and the
listeners must present the renewed certificates.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from support.client import wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = [pytest.mark.mesh, pytest.mark.slow]

ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
CUSTOMERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/customers"

SERVICES = {
    # Whoever calls orders keeps no idle connection to it: a handshake per request.
    "orders": {"calls": ["customers"], "traffic": {"pool": {"max_idle": 0}}},
    "customers": {"calls": ["orders"]},
}

ISSUED = re.compile(r"certificate for (\S+), serial ([0-9a-f]+), valid until")
ROTATIONS = 2
"""Renewals wanted on each side (the join's certificate, then these)."""


def serials(sc: SidecarProcess) -> list[str]:
    """The serial of each certificate the sidecar's agent took, in order."""
    return [serial for who, serial in ISSUED.findall(sc.log_text()) if who == sc.identity]


class Worker:
    """One client calling one sidecar port back to back; `keepalive` keeps
    one connection, else each request opens (and closes) its own."""

    def __init__(self, port: int, host: str, prefix: str, *, keepalive: bool, pause: float):
        self.port = port
        self.host = host
        self.prefix = prefix
        self.keepalive = keepalive
        self.pause = pause
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self.stop.is_set():
            path = f"{self.prefix}{i}"
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                headers = {"Host": self.host}
                if not self.keepalive:
                    headers["Connection"] = "close"
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{time.strftime('%X')} {path}: {resp.status} {body!r}")
                if not self.keepalive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{time.strftime('%X')} {path}: {exc!r}")
                if conn is not None:
                    conn.close()
                conn = None
            self.stop.wait(self.pause)
        if conn is not None:
            conn.close()


def presented_serial(server: SidecarProcess, client: SidecarProcess) -> str:
    """The serial of the certificate `server`'s inbound listener presents
    now, to a new handshake made with `client`'s current identity."""
    st = client.state_dir
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(st / "bundle.pem"))
    chain = st.parent / "client-chain.pem"
    chain.write_bytes((st / "cert.pem").read_bytes() + (st / "chain.pem").read_bytes())
    ctx.load_cert_chain(str(chain), str(st / "key.pem"))
    with (
        socket.create_connection(("127.0.0.1", server.inbound_port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"GET /presented HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


@pytest.fixture
def pair(
    tmp_path: Path,
) -> Iterator[tuple[SidecarProcess, SidecarProcess, dict[str, UpstreamServer]]]:
    cp = ControlProcess(tmp_path / "cp", services=SERVICES, certificate_lifetime="1m")
    apps = {name: UpstreamServer(name) for name in ("orders", "customers")}
    sidecars: list[SidecarProcess] = []
    try:
        cp.start()
        for app in apps.values():
            app.start()
        orders = SidecarProcess(
            cp, "orders", apps["orders"].port, tmp_path / "orders", upstreams=("customers",)
        ).start()
        sidecars.append(orders)
        customers = SidecarProcess(
            cp, "customers", apps["customers"].port, tmp_path / "customers", upstreams=("orders",)
        ).start()
        sidecars.append(customers)
        yield orders, customers, apps
    finally:
        for sc in sidecars:
            sc.stop()
        for app in apps.values():
            app.stop()
        cp.stop()


@pytest.mark.timeout(480)
def test_two_rotations_on_each_side_under_load_fail_no_request(
    pair: tuple[SidecarProcess, SidecarProcess, dict[str, UpstreamServer]],
) -> None:
    orders, customers, apps = pair
    # Both sidecars route to each other before the load starts.
    wait_until(
        lambda: (
            http_ok(orders.ports["customers"], "customers")
            and http_ok(customers.ports["orders"], "orders")
        ),
        timeout=20,
        what="each sidecar reaches the other",
    )
    first = {sc.service: serials(sc) for sc in (orders, customers)}
    assert all(len(s) == 1 for s in first.values()), first
    workers = [
        Worker(orders.ports["customers"], "customers", "/ka/", keepalive=True, pause=0.05),
        Worker(customers.ports["orders"], "orders", "/nc/", keepalive=False, pause=0.1),
    ]
    for w in workers:
        w.thread.start()
    try:
        wait_until(
            lambda: (
                all(len(set(serials(sc))) > ROTATIONS for sc in (orders, customers))
                or any(w.failures for w in workers)
            ),
            timeout=300,
            interval=1.0,
            what=f"{ROTATIONS} renewals of each sidecar's certificate",
        )
        # Some more traffic on the newest certificates.
        marks = [w.ok for w in workers]
        wait_until(
            lambda: (
                all(w.ok >= m + 40 for w, m in zip(workers, marks, strict=True))
                or any(w.failures for w in workers)
            ),
            timeout=60,
            what="traffic after the last renewal",
        )
    finally:
        for w in workers:
            w.stop.set()
        for w in workers:
            w.thread.join(30)
    for w in workers:
        assert w.failures == [], (w.prefix, w.failures[:10])
    keepalive, fresh = workers
    assert keepalive.ok > 200 and fresh.ok > 200, (keepalive.ok, fresh.ok)
    # Every request reached the other side's app, as the caller.
    ka = [r for r in apps["customers"].requests if r.target.startswith("/ka/")]
    nc = [r for r in apps["orders"].requests if r.target.startswith("/nc/")]
    assert len(ka) == keepalive.ok and len(nc) == fresh.ok
    assert {r.header("x-forwarded-client-cert") for r in ka} == {f"By={CUSTOMERS};URI={ORDERS}"}
    assert {r.header("x-forwarded-client-cert") for r in nc} == {f"By={ORDERS};URI={CUSTOMERS}"}
    for sc, peer in ((orders, customers), (customers, orders)):
        taken = serials(sc)
        assert len(taken) > ROTATIONS and len(set(taken)) == len(taken), (sc.service, taken)
        assert "renewing the certificate failed" not in sc.log_text()
        # The state directory holds the newest, and new handshakes get it.
        cert = x509.load_pem_x509_certificate((sc.state_dir / "cert.pem").read_bytes())
        assert format(cert.serial_number, "x") == taken[-1]
        assert presented_serial(sc, peer) == taken[-1]
        assert sc.alive and sc.starts == 1


def http_ok(port: int, host: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/ready-check", headers={"Host": host})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
