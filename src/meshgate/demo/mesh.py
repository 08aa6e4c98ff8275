"""The demo's mesh half: a control plane, a sidecar next to each demo
service, and a gateway that joins the mesh.

`meshgate demo` runs, in its own process:

- `meshgate control` (its state in a temp dir) with the mesh.yaml below;
- a sidecar per demo service instance: each made its key, sent a CSR with a
  join token, got a SPIFFE certificate, registered its instance and was
  pushed the endpoints of what it calls;
- a second gateway, `spiffe://demo.mesh/ns/edge/sa/gateway`, whose routes
  name mesh services: north/south at the edge, east/west inside.

It then sends requests through the hops and prints, for each one, the
identities that the mutual TLS handshake proved (the app behind each
sidecar sees them in X-Forwarded-Client-Cert), and a call that the
callee's policy refuses, with the rule that decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from meshgate.config.schema import Address
from meshgate.engine.load import load_config, load_mesh
from meshgate.mesh.control.server import ControlPlane
from meshgate.mesh.sidecar.proxy import Sidecar, SidecarOptions
from meshgate.observability.hub import MetricsHub
from meshgate.server.worker import Worker, WorkerOptions

__all__ = ["MeshDemo"]

TRUST_DOMAIN = "demo.mesh"
MESH_YAML = """\
trust_domain: {td}
mtls: strict
control:
  listen: 127.0.0.1:{port}
  admin: 127.0.0.1:0               # /metrics, /status and the dashboard (/ui)
  state_dir: state
  certificate_lifetime: 24h
  lease: 15s
services:
  gateway: {{namespace: edge}}
  order-service:
    calls: [customer-service]
    traffic: {{balancer: least_request, retry: {{attempts: 2, on: [connect-failure]}}}}
  order-service-v2: {{}}
  customer-service:
    authz:
      default: deny
      rules:
      - {{name: orders-only, action: allow, from: ["spiffe://{td}/ns/default/sa/order-service"]}}
"""
GATEWAY_YAML = """\
listen: 127.0.0.1:{port}
mesh:
  control: 127.0.0.1:{cp}
  trust_domain: {td}
  token_file: gateway.token
  trust_bundle: state/ca/bundle.pem
  state_dir: gateway-state
routes:
- {{path: /orders/**, upstream: order-service, strip_prefix: true}}
- {{path: /customers/**, upstream: customer-service, strip_prefix: true}}
upstreams:
  order-service: {{service: order-service}}
  customer-service: {{service: customer-service}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    with contextlib.suppress(orjson.JSONDecodeError):
        return status, orjson.loads(body)
    return status, body.decode(errors="replace")


class MeshDemo:
    """The control plane, a sidecar per demo service, and a mesh gateway."""

    def __init__(self, instances: list[tuple[str, int]], port: int = 15012) -> None:
        self.instances = instances
        self.port = port
        self.tmp = tempfile.TemporaryDirectory(prefix="meshgate-demo-mesh-")
        self.dir = Path(self.tmp.name)
        self.cp: ControlPlane | None = None
        self.sidecars: list[Sidecar] = []
        self.gateway: Worker | None = None
        self.gateway_port = 0

    @property
    def mesh_path(self) -> Path:
        return self.dir / "mesh.yaml"

    async def start(self) -> None:
        # The sidecars' and the mesh gateway's own logs stay quiet: the demo
        # prints what they did.
        for name in ("meshgate.sidecar", "meshgate.agent", "meshgate.server", "meshgate.mesh"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mesh_path.write_text(MESH_YAML.format(td=TRUST_DOMAIN, port=self.port))
        self.cp = ControlPlane(str(self.mesh_path), load_mesh(self.mesh_path))
        await self.cp.start()
        bundle = self.cp.ca.bundle_pem
        first: set[str] = set()
        for service, app_port in self.instances:
            ports = {}
            if service == "order-service" and service not in first:
                ports = {"customer-service": Address(host="127.0.0.1", port=0)}
            first.add(service)
            sidecar = Sidecar(
                SidecarOptions(
                    service=service,
                    app=Address(host="127.0.0.1", port=app_port),
                    controls=[("127.0.0.1", self.cp.port)],
                    state_dir=self.dir / "proxies" / f"{service}-{app_port}",
                    trust_domain=TRUST_DOMAIN,
                    token=self.cp.store.create_token(service, ttl=3600),
                    bundle_pem=bundle,
                    inbound=Address(host="127.0.0.1", port=0),
                    outbound=None,
                    upstream_ports=ports,
                    version="v1",
                )
            )
            await sidecar.start()
            self.sidecars.append(sidecar)
        (self.dir / "gateway.token").write_text(self.cp.store.create_token("gateway"))
        self.gateway_port = _free_port()
        path = self.dir / "gateway.yaml"
        path.write_text(
            GATEWAY_YAML.format(port=self.gateway_port, cp=self.cp.port, td=TRUST_DOMAIN)
        )
        # Its own metrics: the sidecars of this process have theirs.
        self.gateway = Worker(
            load_config(path),
            WorkerOptions(config_path=str(path), watch=False, hub=MetricsHub()),
        )
        await self.gateway.start()
        # Every registration has been pushed once each caller sees its callees.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not await self._complete():
            await asyncio.sleep(0.1)

    async def _complete(self) -> bool:
        loop = asyncio.get_running_loop()
        status, _ = await loop.run_in_executor(None, _get, self.gateway_port, "/orders/hops")
        if status != 200:
            return False
        status, _ = await loop.run_in_executor(
            None, _get, self._orders().ports["port:customer-service"], "/hops"
        )
        return status == 200

    def _orders(self) -> Sidecar:
        return next(s for s in self.sidecars if "port:customer-service" in s.ports)

    async def report(self) -> list[str]:
        assert self.cp is not None
        loop = asyncio.get_running_loop()
        lines = [
            f"The mesh: `meshgate control` on 127.0.0.1:{self.cp.port} (trust domain "
            f"{TRUST_DOMAIN}, its state in {self.dir}).",
            "A sidecar runs next to each service instance. Each made its own key, sent a CSR "
            "with a join token, and got:",
            "",
        ]
        for sc in self.sidecars:
            cert = sc.agent.state.certificate()
            assert cert is not None
            lines.append(
                f"  {sc.identity:<52} inbound :{sc.ports['inbound']} (mTLS), "
                f"serial {cert.serial_number:x}"[:140]
            )
        gateway_id = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"
        lines.append(f"  {gateway_id:<52} the gateway in the mesh, on :{self.gateway_port}")
        orders_port = self._orders().ports["port:customer-service"]
        _, hop1 = await loop.run_in_executor(None, _get, self.gateway_port, "/orders/hops")
        _, hop2 = await loop.run_in_executor(None, _get, orders_port, "/hops")
        status, denied = await loop.run_in_executor(
            None, _get, self.gateway_port, "/customers/hops"
        )

        def xfcc(doc: Any) -> str:
            if isinstance(doc, dict):
                return str(doc.get("seen_headers", {}).get("x-forwarded-client-cert", "none"))
            return "none"

        lines += [
            "",
            "Requests through the mesh, hop by hop (each app saw the caller's identity in",
            "X-Forwarded-Client-Cert, which only its sidecar can set):",
            f"  curl http://127.0.0.1:{self.gateway_port}/orders/hops",
            "    client -> gateway            plain HTTP at the edge",
            "    gateway -> order-service     mutual TLS, TLS 1.3",
            f"    order-service saw            {xfcc(hop1)}",
            f"  curl http://127.0.0.1:{orders_port}/hops   # order-service's port for "
            "customer-service",
            "    order-service -> customer-service  mutual TLS, TLS 1.3",
            f"    customer-service saw         {xfcc(hop2)}",
            f"  curl http://127.0.0.1:{self.gateway_port}/customers/hops",
            f"    {status}: {denied.get('detail') if isinstance(denied, dict) else denied}",
            "",
            f"  meshgate mesh status -c {self.mesh_path}",
            f"  meshgate mesh explain --from gateway --to customer-service -c {self.mesh_path} "
            "GET /customers/1",
        ]
        return lines

    def stop_event(self) -> asyncio.Event | None:
        return self.gateway.stopping if self.gateway is not None else None

    async def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stopping.set()
            await self.gateway.wait_and_drain()
        for sc in self.sidecars:
            await sc.stop()
        if self.cp is not None:
            await self.cp.close()
        self.tmp.cleanup()
