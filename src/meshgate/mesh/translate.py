"""A snapshot, as the gateway configs that a sidecar's listeners serve.

The sidecar has no engine of its own: each listener runs a gateway `Config`
that is derived from the control plane's snapshot, validated and compiled
by the same step as a file (`Runtime.build`). A snapshot that does not
compile is NACKed, and the running runtimes keep serving.

- inbound: one route, `/**` to the local app, carrying the service's
  authorization policy and rate limits, and the XFCC header for the app;
- outbound: for every service the proxy may call, an upstream (`service:`,
  with the snapshot's endpoints: mutual TLS with the service's identity
  expected, or plain HTTP for a static instance) and its routes, matched by
  Host (the service's name) on the shared outbound port, or on a port of
  its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from meshgate.config.schema import Address, Config, Endpoint

__all__ = [
    "SERVICE_PREFIX",
    "inbound_config",
    "outbound_config",
    "services_of",
    "with_mesh_endpoints",
]

SERVICE_PREFIX = "service/"


def services_of(sections: Mapping[str, Any]) -> list[str]:
    """The services a snapshot lets this proxy call, in order."""
    return sorted(k[len(SERVICE_PREFIX) :] for k in sections if k.startswith(SERVICE_PREFIX))


def _compile(doc: dict[str, Any], what: str) -> Config:
    try:
        return Config.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{what}: {where}: {first['msg']}") from None


def _limits(limits: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(limits or {})


def inbound_config(
    sections: Mapping[str, Any],
    app: Address,
    *,
    limits: Mapping[str, Any] | None = None,
) -> Config:
    """The inbound listener's config: `/**` to the app, behind the policy."""
    inbound = sections.get("inbound")
    if not isinstance(inbound, dict):
        raise ValueError("the snapshot has no inbound section")
    route: dict[str, Any] = {
        "name": f"inbound/{inbound.get('service', '')}",
        "path": "/**",
        "upstream": "app",
        "forward_client_cert": inbound.get("identity"),
    }
    if inbound.get("authz") is not None:
        route["authz"] = inbound["authz"]
    if inbound.get("rate_limit"):
        route["rate_limit"] = inbound["rate_limit"]
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "limits": _limits(limits),
        "routes": [route],
        "upstreams": {
            "app": {
                "endpoints": [f"{app.host}:{app.port}"],
                # One local app: nothing to fail over to, and its failures
                # are its callers' to see (their sidecars retry and eject).
                "outlier_detection": False,
            }
        },
    }
    return _compile(doc, "inbound")


def _upstream(name: str, section: Mapping[str, Any]) -> dict[str, Any]:
    endpoints: list[Any] = []
    for ep in section.get("endpoints") or ():
        if ep.get("tls"):
            endpoints.append(
                {"host": ep["address"], "port": int(ep["port"]), "identity": section["identity"]}
            )
        else:
            endpoints.append({"host": ep["address"], "port": int(ep["port"])})
    up: dict[str, Any] = dict(section.get("traffic") or {})
    up["service"] = name
    if endpoints:  # none: the upstream's routes answer 503 no-endpoints
        up["endpoints"] = endpoints
    return up


def outbound_config(
    sections: Mapping[str, Any],
    *,
    only: str | None = None,
    limits: Mapping[str, Any] | None = None,
) -> Config:
    """The outbound config: every callable service, routed by Host (its
    name, with any port); with `only`, that service's routes for any Host
    (a port of its own)."""
    upstreams: dict[str, Any] = {}
    routes: list[dict[str, Any]] = []
    for name in services_of(sections):
        upstreams[name] = _upstream(name, sections[SERVICE_PREFIX + name])
    for name in [only] if only is not None else services_of(sections):
        section = sections.get(SERVICE_PREFIX + name)
        if section is None:
            continue  # not (or no longer) in the snapshot: 404 no-route
        declared = section.get("routes") or [{"path": "/**", "upstream": name}]
        for i, declared_route in enumerate(declared):
            route = dict(declared_route)
            route.setdefault("name", f"{name}/{i}")
            if only is None:
                route["host"] = name
            routes.append(route)
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "limits": _limits(limits),
        "routes": routes,
        "upstreams": upstreams,
    }
    return _compile(doc, "outbound" if only is None else f"outbound {only}")


def with_mesh_endpoints(config: Config, sections: Mapping[str, Any]) -> Config:
    """`config` with each `service:` upstream's endpoints taken from the
    snapshot (none while the snapshot has no live instance of it). The
    file's own settings for the upstream (balancer, retries, timeouts) stay."""
    upstreams = dict(config.upstreams)
    changed = False
    for name, up in config.upstreams.items():
        if up.service is None:
            continue
        section = sections.get(SERVICE_PREFIX + up.service) or {}
        endpoints = [
            Endpoint.model_validate(ep)
            for ep in _upstream(up.service, section).get("endpoints", ())
        ]
        upstreams[name] = up.model_copy(update={"endpoints": endpoints})
        changed = True
    return config.model_copy(update={"upstreams": upstreams}) if changed else config
