"""The admin API's answers about config and policy: `/config` and its
generations, `POST /config/rollback`, `/ratelimits`, `/identity`, `/explain`.

Each handler takes the listener's state and the request, and returns
`(status, document)` or an awaitable of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshgate.admin.hooks import HOOKS
from meshgate.admin.identity import describe_identity
from meshgate.config.schema import redact_url
from meshgate.http.paths import normalize_path
from meshgate.observability.peers import gather

if TYPE_CHECKING:
    from meshgate.engine.runtime import RouteTarget
    from meshgate.http.router import Route
    from meshgate.protocol.h1 import ServerState

__all__ = [
    "AdminRequest",
    "config_doc",
    "explain",
    "generations",
    "identity",
    "ratelimits",
    "redact",
    "rollback",
]


@dataclass
class AdminRequest:
    method: bytes
    path: bytes
    query: dict[str, list[str]] = field(default_factory=dict)

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default


_SECRET_FIELDS = frozenset({"secret", "password", "admin_token"})


def _redact_tracing(doc: dict[str, Any]) -> dict[str, Any]:
    """`tracing:` without the values of its export headers (a collector's
    API key) or its endpoint's credentials."""
    out = dict(doc)
    if isinstance(out.get("endpoint"), str):
        out["endpoint"] = redact_url(out["endpoint"])
    if isinstance(out.get("headers"), dict):
        out["headers"] = dict.fromkeys(out["headers"], "<redacted>")
    return out


def redact(doc: Any) -> Any:
    """The config without its secrets: HMAC secrets, the admin token's
    digest, the credentials and query of every URL (Redis, JWKS, the
    tracing endpoint), and the tracing exporter's header values."""
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            if k == "tracing" and isinstance(v, dict):
                out[k] = _redact_tracing(v)
            elif k in _SECRET_FIELDS and v is not None:
                out[k] = "<redacted>"
            elif k.endswith("url") and isinstance(v, str):
                out[k] = redact_url(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(doc, list):
        return [redact(v) for v in doc]
    return doc


_SIDECAR_SOURCE = "the control plane's snapshot"


def config_doc(state: ServerState, req: AdminRequest) -> tuple[int, Any]:
    """The generation served, with its config (secrets redacted)."""
    gens = HOOKS.generations
    if gens is None or not gens.kept:
        version = HOOKS.snapshot() if HOOKS.snapshot is not None else None
        return 200, {
            "generation": version,
            "source": _SIDECAR_SOURCE,
            "worker": os.getpid(),
            "config": redact(state.runtime.config.model_dump(mode="json")),
        }
    gen = gens.current
    return 200, {
        **gen.describe(current=True),
        "worker": os.getpid(),
        "config": redact(gen.config.model_dump(mode="json")),
    }


def generations(state: ServerState, req: AdminRequest) -> tuple[int, Any]:
    gens = HOOKS.generations
    if gens is None or not gens.kept:
        version = HOOKS.snapshot() if HOOKS.snapshot is not None else None
        return 200, {
            "current": version,
            "worker": os.getpid(),
            "generations": [{"generation": version, "current": True, "source": _SIDECAR_SOURCE}],
        }
    return 200, {
        "current": gens.number,
        "kept": gens.keep,
        "worker": os.getpid(),
        "generations": gens.describe(),
    }


def rollback(state: ServerState, req: AdminRequest) -> Any:
    if HOOKS.rollback is None:
        return 409, {
            "error": "this proxy serves the control plane's snapshots: "
            "roll back the mesh's config on the control plane"
        }
    return HOOKS.rollback()


def identity(state: ServerState, req: AdminRequest) -> tuple[int, Any]:
    source = HOOKS.identity
    if source is None:
        return 404, {"error": "not in the mesh"}
    return 200, {**describe_identity(source), "worker": os.getpid()}


def _route_index(state: ServerState) -> dict[str, Route[RouteTarget]]:
    return {route.target.label: route for route in state.runtime.router.routes}


async def ratelimits(state: ServerState, req: AdminRequest) -> tuple[int, Any]:
    """Every route's limits, with the instance's decisions so far (every
    worker's, added up as /metrics does) and the state of the Redis store."""
    samples = await gather(state.hub)
    counts: dict[tuple[str, str, str], float] = {}
    for labels, value, *_ in samples.get("meshgate_ratelimit_decisions_total", []):
        route_label, name, _policy, outcome = labels
        counts[(route_label, name, outcome)] = value
    runtime = state.runtime
    routes = _route_index(state)
    out = []
    for label, limit in runtime.filters.limit_filters:
        cfg = limit.cfg
        route = routes.get(label)
        out.append(
            {
                "route": label,
                "path": route.config.path if route is not None else None,
                "name": limit.name,
                "limit": cfg.limit,
                "period_s": cfg.period,
                "burst": cfg.burst,
                "key": cfg.key,
                "algorithm": cfg.algorithm,
                "policy": cfg.policy,
                "on_store_error": cfg.on_store_error,
                "allowed": counts.get((label, limit.name, "allowed"), 0),
                "limited": counts.get((label, limit.name, "limited"), 0),
                "store_errors": counts.get((label, limit.name, "store_error"), 0),
            }
        )
    consumers = {
        name: {"limit": c.rate_limit.limit, "period_s": c.rate_limit.period}
        for name, c in runtime.config.consumers.items()
        if c.rate_limit is not None
    }
    stores = [
        {
            "url": redact_url(limiter.cfg.url),
            "state": "down" if limiter.down else "up",
            "errors": limiter.errors,
            "skipped": limiter.skipped,
        }
        for limiter in runtime.filters.limiters
    ]
    return 200, {
        "worker": os.getpid(),
        "limits": out,
        "consumer_rates": consumers,
        "redis": stores,
    }


def explain(state: ServerState, req: AdminRequest) -> tuple[int, Any]:
    """The route a request would take in the config served now, and why."""
    method = req.arg("method", "GET").upper()
    target = req.arg("path")
    headers: list[tuple[bytes, bytes]] = []
    for h in req.query.get("header", []):
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            return 400, {"error": f"header {h!r}: expected 'name: value'"}
        headers.append((name.strip().lower().encode(), value.strip().encode()))
    host = req.arg("host")
    if not host:
        host = next((v.decode() for k, v in headers if k == b"host"), "")
    host = host.strip().lower()
    host = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
    host = host.strip("[]")
    raw_path, _, query = target.partition("?")
    if not raw_path:
        return 400, {"error": "give the request's path: /explain?method=GET&path=/x"}
    path = normalize_path(raw_path)
    if path is None:
        return 400, {"error": f"{raw_path!r} is not a valid request path: meshgate answers 400"}
    router = state.runtime.router
    request = {"method": method, "path": path, "host": host or None}
    rows = [
        {
            "route": route.target.label,
            "index": route.index,
            "path": route.config.path,
            "matches": matched,
            "reason": reason,
        }
        for route, matched, reason in router.explain(method, host, path, headers)
    ]
    found = router.match(method, host, path, headers)
    gens = HOOKS.generations
    doc: dict[str, Any] = {
        "worker": os.getpid(),
        "generation": gens.number if gens is not None else None,
        "request": request,
        "match": None,
    }
    if found is not None:
        doc["match"] = _match_doc(state, found.route, found.params, found.rest, path, query)
    doc["routes"] = rows
    return 200, doc


def _match_doc(
    state: ServerState,
    route: Route[RouteTarget],
    params: dict[str, str],
    rest: str,
    path: str,
    query: str,
) -> dict[str, Any]:
    cfg = route.config
    config = state.runtime.config
    label = route.target.label
    out: dict[str, Any] = {
        "route": label,
        "index": route.index,
        "path": cfg.path,
        "target": cfg.target_label(),
        "params": params,
    }
    if cfg.aggregate is not None:
        out["aggregate"] = [
            {"group": b.group, "method": b.method, "path": b.path, "upstream": b.upstream}
            for b in cfg.aggregate.backends
        ]
    else:
        out["upstream"] = cfg.upstream
        out["sent_as"] = route.upstream_path(path, f"?{query}" if query else "", params, rest)
    if cfg.split is not None:
        out["split"] = [{"upstream": b.upstream, "weight": b.weight} for b in cfg.split]
    if cfg.canary:
        out["canary"] = [c.model_dump(mode="json", exclude_none=True) for c in cfg.canary]
    out["auth"] = (
        None
        if cfg.auth is None
        else {
            "use": [
                {"name": n, "type": getattr(config.auth.get(n), "type", None)} for n in cfg.auth.use
            ],
            "scopes": cfg.auth.scopes,
            "required_claims": cfg.auth.required_claims,
        }
    )
    out["rate_limits"] = [
        {
            "name": limit.name,
            "limit": limit.cfg.limit,
            "period_s": limit.cfg.period,
            "key": limit.cfg.key,
            "policy": limit.cfg.policy,
        }
        for lbl, limit in state.runtime.filters.limit_filters
        if lbl == label
    ]
    out["authz"] = None if cfg.authz is None else cfg.authz.model_dump(mode="json")
    return out
