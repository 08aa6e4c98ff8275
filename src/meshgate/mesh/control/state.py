"""What the push and the admin API read of the control plane.

`ControlPlane` (server.py) builds a `Push` and an `AdminApi` and hands
itself to them as these protocols, so neither imports the server that
imports them. Each attribute is read at every use, never kept: a reload
replaces `mesh` and `generation`, and `meshgate trust` the `ca`.
"""

from __future__ import annotations

from typing import Any, Protocol

from meshgate.config.mesh import MeshConfig
from meshgate.mesh.ca import CertificateAuthority
from meshgate.mesh.control.store import Store
from meshgate.mesh.control.telemetry import Telemetry

__all__ = ["AdminState", "PushState"]


class PushState(Protocol):
    """What the push builds snapshots from and records leases in."""

    @property
    def mesh(self) -> MeshConfig: ...

    @property
    def generation(self) -> int: ...

    @property
    def store(self) -> Store: ...

    @property
    def ca(self) -> CertificateAuthority: ...


class AdminState(Protocol):
    """What `/metrics`, `/status` and `PUT /config` read and change."""

    @property
    def mesh(self) -> MeshConfig: ...

    @property
    def mesh_path(self) -> str: ...

    @property
    def generation(self) -> int: ...

    @property
    def store(self) -> Store: ...

    @property
    def telemetry(self) -> Telemetry: ...

    @property
    def issued(self) -> int: ...

    @property
    def refused(self) -> int: ...

    def metrics_source_state(self) -> dict[str, Any]:
        """Where the dashboard's numbers come from (`{kind: reports}`, or
        the Prometheus poller's state)."""
        ...

    def apply(self, mesh: MeshConfig, text: str, source: str) -> int | None:
        """Serve a validated mesh config as the next generation (None: refused)."""
        ...
