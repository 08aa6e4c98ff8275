"""Whether a service's inbound policy lets a caller make a request, and why:
`meshgate mesh explain --from A --to B METHOD PATH` and the dashboard's
`/ui/api/explain` both answer with `explain_request`, from mesh.yaml alone,
by the engine the sidecar enforces with.
"""

from __future__ import annotations

from typing import Any

from meshgate.config.authz import PLAINTEXT
from meshgate.config.mesh import MeshConfig
from meshgate.config.schema import RateLimitConfig

__all__ = ["ExplainError", "caller", "explain_request", "limit_text"]


class ExplainError(ValueError):
    """A question that cannot be asked (an unknown service, a bad path...)."""


def caller(mesh: MeshConfig, source: str) -> tuple[str | None, str] | None:
    """`--from`: (the identity, how to name the caller), or None if unknown."""
    if source == PLAINTEXT:
        return None, "a caller without a client certificate (plaintext)"
    if source.startswith("spiffe://"):
        return source, source
    if source in mesh.services:
        identity = mesh.identity(source)
        return identity, f"{source} ({identity})"
    return None


def limit_text(rl: RateLimitConfig) -> str:
    per = {"peer": "per source", "route": "for the service"}.get(rl.key, f"per {rl.key}")
    unit = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "day"}.get(rl.period)
    rate = f"{rl.limit}/{unit}" if unit else f"{rl.limit} per {rl.period:g}s"
    return f"{rate} {per} ({rl.policy})"


def explain_request(
    mesh: MeshConfig,
    source: str,
    target: str,
    method: str,
    raw_path: str,
    header_lines: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The explanation, as `mesh explain --json` prints it (and `who`, how to
    name the caller); ExplainError for a question that cannot be asked."""
    from meshgate.filters.authz import AuthzPolicy, explain, request_path

    svc = mesh.services.get(target)
    if svc is None:
        known = ", ".join(sorted(mesh.services)) or "none"
        raise ExplainError(f"--to {target!r} is not a service of this mesh (services: {known})")
    found = caller(mesh, source)
    if found is None:
        raise ExplainError(
            f"--from {source!r} is not a service of this mesh; give a service, a "
            f"SPIFFE ID (spiffe://...) or {PLAINTEXT}"
        )
    peer, who = found
    headers: list[tuple[bytes, bytes]] = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ExplainError(f"-H {line!r}: expected 'Name: value'")
        headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("utf-8")))
    try:
        path = request_path(raw_path)
    except ValueError as exc:
        raise ExplainError(f"{exc} (the gateway answers 400)") from None
    method = method.upper()
    if not method.isascii() or not method.isalpha() or len(method) > 16:
        raise ExplainError(f"{method!r} is not an HTTP method")
    decision = explain(svc.authz, peer, method, path, headers, policy=target)
    trace = AuthzPolicy(svc.authz, target).trace(peer, method.encode("latin-1"), path, headers)
    refused_plaintext = peer is None and mesh.mtls == "strict"
    allowed = decision.allowed and not refused_plaintext
    notes = []
    if refused_plaintext:
        notes.append(
            "mtls is strict: a caller without a client certificate is refused before "
            "any policy (the decision below is the policy's alone)"
        )
    if source in mesh.services and target not in mesh.callees(source):
        notes.append(
            f"the calls: of {source} do not list {target}, so its proxy has no route to it"
        )
    limits = svc.rate_limit.route_limits() if svc.rate_limit else []
    return {
        "caller": source,
        "who": who,
        "identity": peer,
        "service": target,
        "request": {"method": method, "path": path},
        "policy": decision.policy,
        "rule": decision.rule,
        "decision": decision.decision,
        "reason": decision.reason,
        "allowed": allowed,
        "rules": [
            {"name": t.name, "action": t.action, "matches": t.matched, "why": t.why} for t in trace
        ],
        "rate_limits": [limit_text(rl) for rl in limits],
        "notes": notes,
    }
