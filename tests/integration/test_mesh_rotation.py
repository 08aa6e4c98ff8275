"""Root rotation under traffic, with overlap (Consul's and Kuma's model).

Two proxies (`orders`, `customers`) hold certificates from the control
plane; `customers` makes mutual-TLS connections to `orders` back to back,
each side verifying the other with the trust bundle it currently holds, as
sidecars do. Meanwhile a new root is added (pushed to both before it signs
anything), the control plane switches to an intermediate of the new root,
the proxies renew, and the old root leaves the bundle by itself once the
last certificate it signed has expired. No connection may fail."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from meshgate.mesh.agent import MeshAgent
from meshgate.tls.context import client_context, load_cert_chain, server_context
from meshgate.tls.identity import peer_spiffe_id
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.proxy import run_meshgate

pytestmark = [pytest.mark.engine, pytest.mark.mesh]


def sid(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"


def roots(agent: MeshAgent) -> int:
    return (agent.state.bundle_pem or b"").count(b"BEGIN CERTIFICATE")


def issuer_cn(agent: MeshAgent) -> str:
    cert = agent.state.certificate()
    assert cert is not None
    return cert.issuer.rfc4514_string()


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class PeerTraffic:
    """`client` calls `server` over mutual TLS, one connection after another."""

    def __init__(self, server: MeshAgent, client: MeshAgent) -> None:
        self.server = server
        self.client = client
        self.ok = 0
        self.failures: list[str] = []
        self._key: tuple[bytes | None, ...] = ()
        self._ctx: ssl.SSLContext | None = None

    def _server_ctx(self) -> ssl.SSLContext:
        s = self.server.state
        key = (s.cert_pem, s.chain_pem, s.key_pem, s.bundle_pem)
        if key != self._key or self._ctx is None:
            assert s.cert_pem and s.chain_pem and s.key_pem and s.bundle_pem
            self._ctx = server_context(s.cert_pem + s.chain_pem, s.key_pem, s.bundle_pem)
            self._key = key
        return self._ctx

    def _pick(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self._server_ctx()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        who = peer_spiffe_id(writer.transport)
        line = await reader.readline()
        writer.write(b"pong " + (who or "none").encode() + b"\n" if line == b"ping\n" else b"?\n")
        await writer.drain()
        writer.close()

    async def run(self, stop: asyncio.Event) -> None:
        listener = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        listener.minimum_version = ssl.TLSVersion.TLSv1_3
        listener.verify_mode = ssl.CERT_REQUIRED
        s = self.server.state
        assert s.cert_pem and s.chain_pem and s.key_pem and s.bundle_pem
        listener.load_verify_locations(cadata=s.bundle_pem.decode())
        load_cert_chain(listener, s.cert_pem + s.chain_pem, s.key_pem)
        listener.sni_callback = self._pick
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=listener)
        port = srv.sockets[0].getsockname()[1]
        try:
            while not stop.is_set():
                c = self.client.state
                assert c.cert_pem and c.chain_pem and c.key_pem and c.bundle_pem
                try:
                    ctx = client_context(c.bundle_pem, c.cert_pem + c.chain_pem, c.key_pem)
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=""),
                        5,
                    )
                    peer = peer_spiffe_id(writer.transport)
                    writer.write(b"ping\n")
                    answer = await asyncio.wait_for(reader.readline(), 5)
                    writer.close()
                    if peer != self.server.identity:
                        self.failures.append(f"server was {peer}")
                    elif answer != b"pong " + self.client.identity.encode() + b"\n":
                        self.failures.append(f"answer {answer!r}")
                    else:
                        self.ok += 1
                except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                    self.failures.append(repr(exc))
                await asyncio.sleep(0.02)
        finally:
            srv.close()


async def test_root_rotation_under_traffic_fails_no_connection(tmp_path: Path) -> None:
    cp = ControlProcess(tmp_path / "cp", certificate_lifetime="1m").start()
    agents = []
    try:
        for service in ("orders", "customers"):
            agent = MeshAgent(
                identity=sid(service),
                controls=[("127.0.0.1", cp.port)],
                state_dir=tmp_path / service,
                token=cp.token(service),
                bundle_pem=cp.bundle,
            )
            await agent.start()
            agents.append(agent)
        orders, customers = agents
        first_issuer = issuer_cn(orders)
        traffic = PeerTraffic(orders, customers)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(traffic.run(stop))
        await wait_for(lambda: traffic.ok >= 20, 20, "traffic")

        root2 = tmp_path / "root2"
        assert (
            run_meshgate(
                "ca", "init", "--dir", str(root2), "--trust-domain", TRUST_DOMAIN
            ).returncode
            == 0
        )
        inter2 = tmp_path / "inter2"
        proc = run_meshgate(
            "ca", "issue-intermediate", "--root", str(root2), "--out", str(inter2), "--name", "cp-2"
        )
        assert proc.returncode == 0, proc.stderr
        # 1. The new root reaches every proxy before it signs anything.
        proc = run_meshgate("trust", "add-root", str(root2 / "root.pem"), "-c", str(cp.path))
        assert proc.returncode == 0, proc.stderr
        await wait_for(lambda: all(roots(a) == 2 for a in agents), 20, "the new root pushed")
        # 2. New leaves come from the new root's intermediate.
        proc = run_meshgate("trust", "use-intermediate", str(inter2), "-c", str(cp.path))
        assert proc.returncode == 0, proc.stderr
        await wait_for(
            lambda: "signing with" in cp.log_text() or "cp-2" in cp.log_text(), 10, "switch"
        )
        await asyncio.sleep(1.5)
        await orders.renew()  # one side on the new root, the other still on the old
        assert issuer_cn(orders) != first_issuer
        mark = traffic.ok
        await wait_for(lambda: traffic.ok >= mark + 20, 20, "mixed traffic")
        await customers.renew()
        # 3. The old root goes once its last leaf (1 min) has expired.
        await wait_for(lambda: all(roots(a) == 1 for a in agents), 150, "the old root to retire")
        bundle = x509.load_pem_x509_certificates(orders.state.bundle_pem or b"")
        assert [c.subject for c in bundle] == [
            x509.load_pem_x509_certificate((root2 / "root.pem").read_bytes()).subject
        ]
        mark = traffic.ok
        await wait_for(lambda: traffic.ok >= mark + 20, 20, "traffic on the new root only")
        stop.set()
        await task
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.ok > 100
        assert "retired root" in cp.log_text()
    finally:
        for agent in agents:
            await agent.close()
        cp.stop()
