"""What the admin API reads of the process it serves, registered by that process.

The admin layer imports neither the server nor the mesh (imports go one
way): a gateway worker registers its config generations and how it rolls
back, a proxy in the mesh its identity, a sidecar the version of its
snapshot. One process serves one admin API, so these are process-wide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from meshgate.config.generations import Generations

__all__ = ["HOOKS", "AdminHooks", "DashboardSource", "IdentitySource"]


class IdentitySource(Protocol):
    """A proxy's mesh identity: public material only (never the key)."""

    identity: str
    chain_pem: bytes
    """The certificate, leaf first, then its chain ('' before the first)."""
    bundle_pem: bytes
    """The trust bundle: the roots this proxy accepts."""


class DashboardSource(Protocol):
    """A gateway's dashboard (`admin.gateway_ui.GatewayDashboard`)."""

    def handle(
        self,
        server: Any,
        method: bytes,
        path: bytes,
        query: dict[str, list[str]],
        headers: dict[bytes, bytes],
        token: str | None,
        matches: Callable[[str | None, str], bool],
    ) -> Any: ...


@dataclass
class AdminHooks:
    generations: Generations | None = None
    """The gateway's config generations (None: a sidecar, fed by snapshots)."""
    rollback: Callable[[], Awaitable[tuple[int, Any]]] | None = None
    """Serve the previous generation again; the admin answer."""
    identity: IdentitySource | None = None
    snapshot: Callable[[], int] | None = None
    """A sidecar: the version of the control plane's snapshot it serves."""
    dashboard: DashboardSource | None = None
    """A gateway with an admin listener: its dashboard under `/ui`."""


HOOKS = AdminHooks()
