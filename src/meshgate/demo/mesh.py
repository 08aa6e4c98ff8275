"""The demo's mesh half: a control plane, and the demo's services joining it.

`meshgate demo` runs `meshgate control` in-process (its state in a temp
dir), makes a join token per service, and has each demo service's proxy
agent join: a key made in the agent, a CSR, a SPIFFE certificate, the
instance registered, and a snapshot pushed with the endpoints of what it
calls. It prints what each of them got, so that the identities of the mesh
are visible next to the gateway's requests.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from meshgate.engine.load import load_mesh
from meshgate.mesh.agent import MeshAgent
from meshgate.mesh.control.server import ControlPlane

__all__ = ["MeshDemo"]

TRUST_DOMAIN = "demo.mesh"
MESH_YAML = """\
trust_domain: {td}
mtls: strict
control:
  listen: 127.0.0.1:{port}
  state_dir: state
  certificate_lifetime: 24h
  lease: 15s
services:
  order-service:
    calls: [customer-service]
    traffic: {{balancer: least_request, retry: {{attempts: 2, on: [connect-failure]}}}}
    routes:
    - path: /**
      split: [{{upstream: order-service, weight: 90}}, {{upstream: order-service-v2, weight: 10}}]
  order-service-v2: {{}}
  customer-service:
    authz:
      rules:
      - {{name: orders-only, action: allow, from: ["spiffe://{td}/ns/default/sa/order-service"]}}
      default: deny
"""


class MeshDemo:
    """The control plane and one agent per demo service."""

    def __init__(self, instances: list[tuple[str, int]], port: int = 15012) -> None:
        self.instances = instances
        self.port = port
        self.tmp = tempfile.TemporaryDirectory(prefix="meshgate-demo-mesh-")
        self.dir = Path(self.tmp.name)
        self.cp: ControlPlane | None = None
        self.agents: list[MeshAgent] = []

    @property
    def mesh_path(self) -> Path:
        return self.dir / "mesh.yaml"

    async def start(self) -> None:
        self.mesh_path.write_text(MESH_YAML.format(td=TRUST_DOMAIN, port=self.port))
        mesh = load_mesh(self.mesh_path)
        self.cp = ControlPlane(str(self.mesh_path), mesh)
        await self.cp.start()
        bundle = self.cp.ca.bundle_pem
        for service, port in self.instances:
            token = self.cp.store.create_token(service, ttl=3600)
            agent = MeshAgent(
                identity=f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}",
                controls=[("127.0.0.1", self.cp.port)],
                state_dir=self.dir / "proxies" / f"{service}-{port}",
                token=token,
                bundle_pem=bundle,
                instance={"address": "127.0.0.1", "port": port, "version": "v1"},
            )
            await agent.start()
            self.agents.append(agent)
        for agent in self.agents:
            await asyncio.wait_for(agent.connected.wait(), 10)
        # Every registration has been pushed once the last one is in.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self._complete():
            await asyncio.sleep(0.05)

    def _complete(self) -> bool:
        for agent in self.agents:
            if agent.identity.endswith("/order-service"):
                eps = agent.sections.get("service/customer-service", {}).get("endpoints", [])
                return len(eps) >= 1
        return True

    def report(self) -> list[str]:
        assert self.cp is not None
        lines = [
            f"The mesh: `meshgate control` on 127.0.0.1:{self.cp.port} (trust domain "
            f"{TRUST_DOMAIN}, its state in {self.dir}).",
            "Each service's proxy agent made its own key, sent a CSR with a join token, and got:",
            "",
        ]
        for agent in self.agents:
            cert = agent.state.certificate()
            assert cert is not None
            lines.append(
                f"  {agent.identity}\n      serial {cert.serial_number:x}, ECDSA P-256, valid "
                f"until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, snapshot v{agent.version}"
            )
        for agent in self.agents:
            if agent.identity.endswith("/order-service"):
                view: dict[str, Any] = agent.sections
                eps = view.get("service/customer-service", {}).get("endpoints", [])
                lines.append("")
                lines.append("order-service's proxy was pushed customer-service's endpoints:")
                for ep in eps:
                    lines.append(f"  {ep['address']}:{ep['port']}  expecting {ep['identity']}")
                break
        lines += [
            "",
            f"  meshgate mesh status -c {self.mesh_path}",
            f"  meshgate mesh explain order-service -c {self.mesh_path}",
        ]
        return lines

    async def close(self) -> None:
        for agent in self.agents:
            await agent.close()
        if self.cp is not None:
            await self.cp.close()
        self.tmp.cleanup()
