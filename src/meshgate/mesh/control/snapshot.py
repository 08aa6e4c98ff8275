"""What one proxy gets: its snapshot, in sections, and deltas between two.

A snapshot is filtered to what the proxy needs (go-control-plane keys its
cache by node; istiod by sidecar scope):

- `inbound`: its own service's identity, mTLS mode, authorization policy
  (`authz`, an `AuthzConfig`), and inbound limits: `rate_limit`, the list
  its inbound route's `rate_limit:` takes as is (key `peer` per source,
  `route` for the service; null for none), and `redis`, the `redis:` its
  gateway config needs for `policy: redis` limits (null if none);
- `service/<name>`: for each service it calls (and those their routes split
  to), the identity to expect at its endpoints, the traffic policy, the
  routes, and the endpoints: registered instances whose lease is live, and
  the static ones from mesh.yaml (plain HTTP, no identity);
- `mesh`: the trust domain and the config generation.

Each section has a digest (SHA-256 of its canonical JSON). A proxy says
which digests it holds when it connects, and gets only the sections that
differ, with `null` for one it must drop: a delta keyed by version, computed
with no history kept on the server, so any control-plane instance can answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from meshgate.config.mesh import MeshConfig, ServiceConfig
from meshgate.mesh.control.store import Instance

__all__ = ["build_sections", "delta", "digest"]


def digest(doc: Any) -> str:
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _endpoints(
    name: str, svc: ServiceConfig | None, instances: Iterable[Instance], now: float
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for inst in instances:
        if inst.service == name and inst.lease_expires > now:
            out.append(
                {
                    "address": inst.address,
                    "port": inst.port,
                    "identity": inst.identity,
                    "version": inst.version,
                    "zone": inst.zone,
                    "metadata": inst.metadata,
                    "tls": True,
                    "instance_id": inst.instance_id,
                }
            )
    if svc is not None:
        for ep in svc.instances:
            out.append(
                {
                    "address": ep.host,
                    "port": ep.port,
                    "identity": None,
                    "tls": False,
                    "static": True,
                }
            )
    out.sort(key=lambda e: (e["address"], e["port"]))
    return out


def build_sections(
    mesh: MeshConfig,
    generation: int,
    service: str,
    instances: Iterable[Instance],
    now: float,
    bundle: str = "",
) -> dict[str, Any]:
    """Every section of `service`'s proxy's snapshot (`lease` tells it how
    often to heartbeat)."""
    instances = list(instances)
    svc = mesh.services.get(service) or ServiceConfig()
    limits = svc.rate_limit
    sections: dict[str, Any] = {
        "mesh": {
            "trust_domain": mesh.trust_domain,
            "generation": generation,
            "lease": mesh.control.lease,
            "bundle": bundle,
        },
        "inbound": {
            "service": service,
            "identity": mesh.identity(service),
            "mtls": mesh.mtls,
            "authz": svc.authz.model_dump(mode="json", by_alias=True),
            "rate_limit": (
                [rl.model_dump(mode="json") for rl in limits.route_limits()] if limits else None
            ),
            "redis": limits.redis.model_dump(mode="json") if limits and limits.redis else None,
        },
    }
    for name in mesh.callees(service):
        callee = mesh.services.get(name)
        sections[f"service/{name}"] = {
            "identity": mesh.identity(name),
            "traffic": (callee or ServiceConfig()).traffic.model_dump(mode="json"),
            "routes": [
                r.model_dump(mode="json", exclude_defaults=True)
                for r in (callee or ServiceConfig()).routes
            ],
            "endpoints": _endpoints(name, callee, instances, now),
        }
    return sections


def delta(
    sections: Mapping[str, Any],
    digests: Mapping[str, str],
    have: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The sections whose digest differs from what the proxy `have`s (all of
    them when it has nothing), and `None` for each section it must drop."""
    if not have:
        return dict(sections)
    out: dict[str, Any] = {
        name: doc for name, doc in sections.items() if have.get(name) != digests[name]
    }
    for name in have:
        if name not in sections:
            out[name] = None
    return out
