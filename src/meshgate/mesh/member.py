"""A gateway in the mesh: the seed's picture, north/south at the edge and
east/west inside, one system.

A gateway whose file has `mesh:` joins the mesh as a proxy of its own
identity (`spiffe://<td>/ns/edge/sa/gateway` by default). Each worker runs a
`MeshAgent` (its own key, in `state_dir/worker-N`: a key never leaves the
process that made it), and each snapshot fills the endpoints of the
upstreams that name a `service:`. The file and the snapshot are two config
sources feeding one compile step: the worker builds its runtime from the
file's config with the snapshot's endpoints, after either changes. Its
agent reports the worker's metrics and denials (`mesh.report`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshgate.admin.hooks import HOOKS
from meshgate.config.schema import Config, GatewayMeshConfig
from meshgate.filters.authz import DenialRing
from meshgate.mesh.agent import MeshAgent
from meshgate.mesh.report import Reporter, proxy_info
from meshgate.mesh.translate import with_mesh_endpoints
from meshgate.mesh.wire import control_addresses
from meshgate.observability.hub import HUB, MetricsHub
from meshgate.tls.holder import IdentityContexts

__all__ = ["MeshMember"]

log = logging.getLogger("meshgate.mesh")


class MeshMember:
    """One worker's identity and snapshot."""

    def __init__(
        self,
        cfg: GatewayMeshConfig,
        base_dir: Path,
        worker_id: int,
        on_snapshot: Callable[[dict[str, Any]], None],
        *,
        hub: MetricsHub = HUB,
        denials: DenialRing | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = f"spiffe://{cfg.trust_domain}/ns/{cfg.namespace}/sa/{cfg.service}"
        self.tls = IdentityContexts(self.identity)
        hub.identity(self.identity, lambda: self.tls.not_after)
        HOOKS.identity = self.tls
        self.sections: dict[str, Any] = {}
        self._on_snapshot = on_snapshot
        token = None
        if cfg.token_file is not None:
            token = (base_dir / cfg.token_file).read_text().strip()
        bundle = (base_dir / cfg.trust_bundle).read_bytes() if cfg.trust_bundle else None
        self.agent = MeshAgent(
            identity=self.identity,
            controls=control_addresses(cfg.control),
            state_dir=base_dir / cfg.state_dir / f"worker-{worker_id}",
            token=token,
            attest_socket=cfg.attest_socket,
            bundle_pem=bundle,
            on_snapshot=self._snapshot,
            on_certificate=self._certificate,
            reporter=Reporter(hub, DenialRing() if denials is None else denials, cfg.service),
        )
        proxy_info(hub, self.agent.state.proxy_id)

    def _certificate(self) -> None:
        creds = self.agent.credentials()
        if creds is not None:
            self.tls.update(*creds)

    def _snapshot(self, sections: dict[str, Any]) -> None:
        previous = self.sections
        self.sections = sections
        try:
            self._on_snapshot(sections)
        except ValueError:
            self.sections = previous
            raise

    def compose(self, config: Config) -> Config:
        """The file's config with the snapshot's endpoints."""
        return with_mesh_endpoints(config, self.sections)

    async def start(self) -> None:
        await self.agent.start()
        self._certificate()
        log.info("in the mesh as %s", self.identity)

    async def close(self) -> None:
        await self.agent.close()
