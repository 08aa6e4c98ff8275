"""The dashboard's state for a gateway alone (`scope: "gateway"`,
`docs/dashboard-api.md`): the same document the control plane serves for the
mesh, built from this gateway's own figures.

- Nodes: `external` (the clients), `gateway` (this gateway; its mesh
  identity when it is in the mesh), and one `service` node per upstream of
  the config served now, named after it. An upstream is `down` when none of
  its endpoints is serving, `degraded` when some are not or fewer than 95%
  of its requests of the last minute were answered without a 5xx.
  An endpoint is serving when no worker reports it out (ejected, failing
  its health checks, unreachable): the pessimistic view, as one worker that
  cannot reach it is enough to tell.
- Edges: `external->gateway` (every inbound request but the authz
  refusals, which make `external->gateway:denied`), and
  `gateway-><upstream>` (requests by their `upstream` label).
- `services`: per upstream, its endpoints, golden metrics over 1, 5 and 15
  minutes, the routes to it (splits with their live shares), resilience,
  and the authz policies of those routes with their counts by rule.
- `edge`, `denials`, `config`: per-route figures, refusals, top consumers;
  the last denials of the routes' authz; the generations.

The figures are the workers' samples added up (`observability.peers`), so
they are those of `/metrics`; windows come from `observability.history`.
Node and edge figures are over 1 minute (`window`), counts by rule, split
shares, retries and refusals over 15 minutes (`counts_window`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshgate.config.authz import PLAINTEXT
from meshgate.observability.deltas import Golden, Labels, label_index, route_row
from meshgate.observability.history import WINDOWS, Window

if TYPE_CHECKING:
    from meshgate.config.generations import Generations
    from meshgate.engine.runtime import Runtime

__all__ = ["GatewayView", "build_gateway_state", "node_id"]

REQ = "meshgate_requests_total"
DUR = "meshgate_request_duration_seconds"
# meshgate_requests_total's labels (exposition.SPECS)
_DIR, _ROUTE, _UP, _SRC, _DST, _METHOD, _CODE, _CLASS, _TLS, _REASON = range(10)
_OUT_OF_SERVICE = ("ejected", "down", "unreachable")
TOP = 20


def node_id(upstream: str) -> str:
    """An upstream's node id: its name, unless that is one of the fixed ids."""
    return f"upstream:{upstream}" if upstream in ("external", "gateway", "unknown") else upstream


@dataclass(slots=True)
class GatewayView:
    """What the state is built from, read once per build."""

    runtime: Runtime
    windows: Mapping[str, Window | None]
    """`history.WINDOWS`' names -> the change over it (None: no samples yet)."""
    denials: list[dict[str, Any]] = field(default_factory=list)
    """The routes' last denials (`DenialRing.since`), every worker's."""
    identity: str | None = None
    service: str = "gateway"
    generations: Generations | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    draining: bool = False


class _Builder:
    def __init__(self, view: GatewayView) -> None:
        self.view = view
        self.config = view.runtime.config
        self.routes = [
            (route.target.label, route.config)
            for route in sorted(view.runtime.router.routes, key=lambda r: r.index)
        ]

    def rows(self, window: str, family: str) -> dict[Labels, Any]:
        w = self.view.windows.get(window)
        return w.delta.get(family, {}) if w is not None else {}

    def span(self, window: str) -> float:
        w = self.view.windows.get(window)
        return w.span if w is not None else 0.0

    def newest(self, family: str) -> dict[Labels, Any]:
        w = self.view.windows.get("15m")
        return w.newest.get(family, {}) if w is not None else {}

    def golden(self, window: str, match: Any) -> Golden:
        g = Golden()
        span = self.span(window)
        for labels, n in self.rows(window, REQ).items():
            if labels[_DIR] == "inbound" and match(labels):
                g.add(n, n if labels[_CLASS] == "5xx" else 0.0, span)
        for labels, h in self.rows(window, DUR).items():
            # The duration histogram has neither code nor reason: its rows
            # count with the admitted requests of the match.
            as_request = (*labels[:6], "", labels[6], labels[7], "")
            if labels[_DIR] == "inbound" and match(as_request):
                g.add_buckets(h[0])
        return g

    def carried(self, match: Any) -> bool:
        return any(
            n > 0 and labels[_DIR] == "inbound" and match(labels)
            for labels, n in self.rows("15m", REQ).items()
        )

    # -- endpoints ------------------------------------------------------------------

    def endpoints(self, upstream: str) -> list[dict[str, Any]]:
        states: dict[str, set[str]] = {}
        for (up, endpoint, state), v in self.newest("meshgate_endpoint_state").items():
            if up == upstream:
                got = states.setdefault(endpoint, set())
                if v >= 1:
                    got.add(state)
        cluster = self.view.runtime.clusters.get(upstream)
        addresses = [ep.pool.address for ep in cluster.endpoints] if cluster is not None else []
        for address in states:
            if address not in addresses:
                addresses.append(address)
        out = []
        for address in dict.fromkeys(addresses):
            seen = states.get(address)
            if seen is None:
                state, healthy = "unknown", None
            else:
                out_of = [s for s in _OUT_OF_SERVICE if s in seen]
                state = out_of[0] if out_of else "serving" if "serving" in seen else "unknown"
                healthy = state == "serving" if state != "unknown" else None
            out.append({"id": address, "address": address, "healthy": healthy, "state": state})
        return out

    # -- nodes and edges ------------------------------------------------------------

    def service_node(self, upstream: str) -> dict[str, Any]:
        g = self.golden("1m", lambda labels: labels[_UP] == upstream).doc()
        eps = self.endpoints(upstream)
        known = [e for e in eps if e["healthy"] is not None]
        up = sum(1 for e in known if e["healthy"])
        if not eps:
            health = "down"
        elif not known:
            health = "unknown"
        elif up == 0:
            health = "down"
        elif up < len(eps) or (g["success"] is not None and g["success"] < 0.95):
            health = "degraded"
        else:
            health = "healthy"
        cfg = self.config.upstreams.get(upstream)
        mtls = cfg is not None and (
            cfg.service is not None or any(ep.identity for ep in cfg.endpoints)
        )
        return {
            "id": node_id(upstream),
            "kind": "service",
            "name": upstream,
            "identity": None,
            "health": health,
            "instances": len(eps),
            "instances_up": up,
            "mtls": "strict" if mtls else "none",
            "rps": g["rps"],
            "success": g["success"],
            "p99_ms": g["p99_ms"],
        }

    def gateway_node(self) -> dict[str, Any]:
        g = self.golden("1m", lambda labels: True).doc()
        return {
            "id": "gateway",
            "kind": "gateway",
            "name": self.view.service,
            "identity": self.view.identity,
            "health": "degraded" if self.view.draining else "healthy",
            "rps": g["rps"],
            "success": g["success"],
            "p99_ms": g["p99_ms"],
        }

    def edge_doc(
        self, source: str, target: str, match: Any, *, denied: bool = False
    ) -> dict[str, Any]:
        doc = self.golden("1m", match).doc()
        edge: dict[str, Any] = {
            "id": f"{source}->{target}" + (":denied" if denied else ""),
            "source": source,
            "target": target,
            "rps": doc["rps"],
            "requests": doc["requests"],
            "mtls": False,
            "denied": denied,
        }
        if denied:
            newest = sorted(self.view.denials, key=lambda d: float(d.get("at") or 0))
            edge["policy"] = next((d["policy"] for d in reversed(newest) if d.get("policy")), None)
        else:
            edge["success"] = doc["success"]
            edge["p99_ms"] = doc["p99_ms"]
        return edge

    def edges(self, upstreams: Iterable[str]) -> list[dict[str, Any]]:
        def admitted(labels: Labels) -> bool:
            return labels[_REASON] != "authz"

        def refused(labels: Labels) -> bool:
            return labels[_REASON] == "authz"

        out = []
        if self.carried(admitted):
            out.append(self.edge_doc("external", "gateway", admitted))
        if self.carried(refused):
            out.append(self.edge_doc("external", "gateway", refused, denied=True))
        for up in upstreams:

            def to(labels: Labels, up: str = up) -> bool:
                return labels[_UP] == up and labels[_REASON] != "authz"

            if self.carried(to):
                edge = self.edge_doc("gateway", node_id(up), to)
                node = self.service_node(up)
                edge["mtls"] = node["mtls"] == "strict"
                out.append(edge)
        return out

    # -- per upstream -----------------------------------------------------------------

    def counts(self, family: str) -> Iterable[tuple[Labels, float]]:
        yield from self.rows("15m", family).items()

    def reaches(self, route: Any, upstream: str) -> bool:
        if route.upstream == upstream:
            return True
        if route.split and any(b.upstream == upstream for b in route.split):
            return True
        return any(c.upstream == upstream for c in route.canary or ())

    def service_routes(self, upstream: str) -> list[dict[str, Any]]:
        shares: dict[tuple[str, str], float] = {}
        for (label, up), n in self.counts("meshgate_split_requests_total"):
            shares[(label, up)] = shares.get((label, up), 0.0) + n
        out: list[dict[str, Any]] = []
        for label, route in self.routes:
            if not self.reaches(route, upstream):
                continue
            out.append(route_row(label, route, shares))
        return out

    def resilience(self, upstream: str) -> dict[str, Any]:
        retries = 0.0
        causes: dict[str, float] = {}
        for (up, cause, retried), n in self.counts("meshgate_upstream_try_failures_total"):
            if up == upstream:
                causes[cause] = causes.get(cause, 0.0) + n
                if retried == "true":
                    retries += n
        budget = sum(
            n for (up,), n in self.counts("meshgate_retry_budget_exhausted_total") if up == upstream
        )
        breaker = any(
            v >= 1
            for (up,), v in self.newest("meshgate_circuit_breaker_open").items()
            if up == upstream
        )
        states: dict[str, int] = {}
        for ep in self.endpoints(upstream):
            states[ep["state"]] = states.get(ep["state"], 0) + 1
        cfg = self.config.upstreams.get(upstream)
        retry = cfg.retry if cfg is not None else None
        return {
            "retries": int(retries),
            "retry_attempts": getattr(retry, "attempts", None),
            "budget_exhausted": int(budget),
            "breaker_open": breaker,
            "try_failures": {k: int(v) for k, v in sorted(causes.items()) if v},
            "endpoints": states,
        }

    def policies(self, upstream: str) -> list[dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        mine = set()
        for label, route in self.routes:
            if route.authz is None or not self.reaches(route, upstream):
                continue
            mine.add(label)
            for r in route.authz.rules:
                rows[(label, r.name)] = {"action": r.action}
            rows[(label, "(default)")] = {"action": route.authz.default}
        for (policy, decision, rule, _), n in self.counts("meshgate_authz_decisions_total"):
            if policy in mine:
                row = rows.setdefault((policy, rule), {})
                row[decision] = row.get(decision, 0.0) + n
        return [
            {
                "policy": policy,
                "rule": rule,
                "action": row.get("action"),
                "allow": int(row.get("allow", 0)),
                "deny": int(row.get("deny", 0)),
                "audit_deny": int(row.get("audit_deny", 0)),
            }
            for (policy, rule), row in rows.items()
        ]

    def service(self, upstream: str) -> dict[str, Any]:
        golden = {}
        for w in WINDOWS:
            doc = self.golden(w, lambda labels: labels[_UP] == upstream).doc()
            del doc["requests"]
            golden[w] = doc
        return {
            "instances": self.endpoints(upstream),
            "golden": golden,
            "routes": self.service_routes(upstream),
            "resilience": self.resilience(upstream),
            "policies": self.policies(upstream),
        }

    # -- the edge, denials, config ----------------------------------------------------

    def edge(self) -> dict[str, Any]:
        routes: dict[str, Golden] = {}
        span = self.span("1m")
        for labels, n in self.rows("1m", REQ).items():
            if labels[_DIR] == "inbound":
                g = routes.setdefault(labels[_ROUTE], Golden())
                g.add(n, n if labels[_CLASS] == "5xx" else 0.0, span)
        for labels, h in self.rows("1m", DUR).items():
            if labels[_DIR] == "inbound" and labels[_ROUTE] in routes:
                routes[labels[_ROUTE]].add_buckets(h[0])
        refusals: dict[str, float] = {}
        for labels, n in self.counts(REQ):
            if labels[_DIR] == "inbound" and labels[_REASON]:
                refusals[labels[_REASON]] = refusals.get(labels[_REASON], 0.0) + n
        auth: dict[str, float] = {}
        for (_, reason), n in self.counts("meshgate_auth_failures_total"):
            auth[reason] = auth.get(reason, 0.0) + n
        limited: dict[str, float] = {}
        for (route, limit, _, outcome), n in self.counts("meshgate_ratelimit_decisions_total"):
            if outcome == "limited":
                limited[f"{route}/{limit}"] = limited.get(f"{route}/{limit}", 0.0) + n
        consumers: dict[str, float] = {}
        at = label_index("meshgate_consumer_requests_total", "consumer")
        if at is not None:
            for labels, n in self.counts("meshgate_consumer_requests_total"):
                consumers[labels[at]] = consumers.get(labels[at], 0.0) + n
        return {
            "routes": [
                {"route": r, **{k: v for k, v in g.doc().items() if k != "p50_ms"}}
                for r, g in sorted(routes.items())
            ],
            "refusals": _top(refusals, "reason"),
            "auth_failures": _top(auth, "reason"),
            "ratelimited": _top(limited, "limit"),
            "consumers": _top(consumers, "consumer", "requests"),
        }

    def denials(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(self.view.denials, key=lambda d: float(d.get("at") or 0), reverse=True):
            raw = d.get("source")
            out.append(
                {
                    "at": d.get("at"),
                    "source": PLAINTEXT if raw == PLAINTEXT else "unknown",
                    "source_identity": None if raw == PLAINTEXT else raw,
                    "destination": "gateway",
                    "policy": d.get("policy"),
                    "rule": d.get("rule"),
                    "reason": d.get("reason"),
                    "method": d.get("method"),
                    "path": d.get("path"),
                    "proxy": d.get("proxy"),
                }
            )
        return out[:50]

    def generations(self) -> dict[str, Any]:
        gens = self.view.generations
        kept = gens.kept if gens is not None else []
        return {
            "generation": gens.number if gens is not None else None,
            "generations": [
                {
                    "generation": g.number,
                    "loaded_at": g.loaded_at,
                    "by": g.source,
                    "kind": "rollback" if g.restores is not None else "load",
                    "digest": g.digest,
                }
                for g in reversed(kept)
            ],
            "proxies": self.view.workers,
        }

    def build(self) -> dict[str, Any]:
        upstreams = list(self.config.upstreams)
        for labels, n in self.rows("15m", REQ).items():
            up = labels[_UP]
            if n > 0 and up and up not in upstreams:
                upstreams.append(up)  # an upstream a reload removed, still in the window
        nodes = [
            {"id": "external", "kind": "external", "name": "clients"},
            self.gateway_node(),
            *(self.service_node(up) for up in upstreams),
        ]
        return {
            "scope": "gateway",
            "generated_at": time.time(),
            "trust_domain": None,
            "window": "1m",
            "counts_window": "15m",
            "nodes": nodes,
            "edges": self.edges(upstreams),
            "services": {node_id(up): self.service(up) for up in upstreams},
            "denials": self.denials(),
            "config": self.generations(),
            "edge": self.edge(),
        }


def _top(counts: dict[str, float], key: str, name: str = "count") -> list[dict[str, Any]]:
    ordered = sorted(((k, v) for k, v in counts.items() if v > 0), key=lambda kv: -kv[1])
    return [{key: k, name: int(v)} for k, v in ordered[:TOP]]


def build_gateway_state(view: GatewayView) -> dict[str, Any]:
    """The whole state document, `scope: "gateway"`."""
    return _Builder(view).build()
