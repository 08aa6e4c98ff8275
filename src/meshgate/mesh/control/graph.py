"""The mesh dashboard's state document (`docs/dashboard-api.md`, "The state").

Built from what the control plane knows for itself (mesh.yaml, the
registry's instances and leases, the proxies' streams with their
certificates and ACKs, the generations) and from what the proxies report
(`telemetry.Telemetry`). Edges come from the callee's inbound series: the
callee is the reporting proxy's service (its certificate's), the caller the
service whose identity is the series' `source_identity`. Requests refused
with `reason="authz"` make the pair's `:denied` edge.

Numbers of nodes and edges are over the last minute (`window`); an edge is
drawn while it carried requests in the last 15 minutes. Counts by rule,
split shares, retries and refusals are over 15 minutes (`counts_window`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshgate.config.authz import PLAINTEXT
from meshgate.config.mesh import MeshConfig
from meshgate.mesh.control.push import ProxyStream
from meshgate.mesh.control.store import Instance
from meshgate.mesh.control.telemetry import WINDOWS, ProxyWindow, Telemetry
from meshgate.observability.deltas import Golden, label_index, route_row

__all__ = ["MeshView", "build_state"]

EXPIRING_SHARE = 0.2
REQ = "meshgate_requests_total"
DUR = "meshgate_request_duration_seconds"
# meshgate_requests_total's labels (exposition.SPECS)
_DIR, _ROUTE, _UP, _SRC, _DST, _METHOD, _CODE, _CLASS, _TLS, _REASON = range(10)


@dataclass(slots=True)
class MeshView:
    """What the state is built from, read once per build."""

    mesh: MeshConfig
    generation: int
    instances: list[Instance]
    streams: Iterable[ProxyStream]
    healthy: set[str]
    proxies: Mapping[str, Mapping[str, Any]]
    """The store's record of each proxy (those not connected too)."""
    generations: list[dict[str, Any]]
    telemetry: Telemetry
    metrics_source: Mapping[str, Any] | None = None
    """Where the numbers come from (`ControlPlane.metrics_source_state`)."""


def _rows(w: ProxyWindow, family: str) -> dict[tuple[str, ...], Any]:
    return w.delta.get(family, {})


class _Builder:
    def __init__(self, view: MeshView, now: float) -> None:
        self.view = view
        self.mesh = view.mesh
        self.now = now
        self.streams = {s.proxy_id: s for s in view.streams}
        self.ids = {self.mesh.identity(name): name for name in self.mesh.services}
        for s in self.streams.values():
            self.ids.setdefault(s.identity, s.service)
        self.windows = {name: view.telemetry.window(sec) for name, sec in WINDOWS.items()}
        registered = {i.service for i in view.instances}
        self.gateways = {
            s.service
            for s in self.streams.values()
            if s.instance_id is None and s.service not in registered
        } | {
            h.service
            for h in view.telemetry.proxies.values()
            if not h.instance and h.service not in registered
        }

    # -- who called whom ------------------------------------------------------------

    def source(self, identity: str, target: str) -> str:
        if not identity or identity == PLAINTEXT:
            return "external" if target in self.gateways else "unknown"
        return self.ids.get(identity, "unknown")

    def edges(self) -> dict[tuple[str, str, bool], dict[str, Any]]:
        # Drawn while it carried requests in the last 15 minutes.
        now: dict[tuple[str, str, bool], Golden] = {}
        for w in self.windows["15m"]:
            for labels, n in _rows(w, REQ).items():
                if labels[_DIR] == "inbound" and n > 0:
                    src = self.source(labels[_SRC], w.service)
                    now.setdefault((src, w.service, labels[_REASON] == "authz"), Golden())
        mtls: dict[tuple[str, str, bool], bool] = dict.fromkeys(now, True)
        for w in self.windows["1m"]:
            for labels, n in _rows(w, REQ).items():
                if labels[_DIR] != "inbound":
                    continue
                src = self.source(labels[_SRC], w.service)
                key = (src, w.service, labels[_REASON] == "authz")
                g = now.get(key)
                if g is None:
                    continue
                g.add(n, n if labels[_CLASS] == "5xx" else 0.0, w.span)
                if n > 0 and (labels[_TLS] != "true" or not labels[_SRC]):
                    mtls[key] = False
            for labels, h in _rows(w, DUR).items():
                if labels[_DIR] == "inbound":
                    key = (self.source(labels[_SRC], w.service), w.service, False)
                    if key in now:
                        now[key].add_buckets(h[0])
        policy: dict[tuple[str, str], str] = {}
        for d in reversed(self.view.telemetry.recent_denials()):
            src = self.source(d["source_identity"] or "", d["destination"])
            if d["policy"]:
                policy[(src, d["destination"])] = d["policy"]
        out: dict[tuple[str, str, bool], dict[str, Any]] = {}
        for key, g in now.items():
            src, dst, denied = key
            doc = g.doc()
            edge: dict[str, Any] = {
                "id": f"{src}->{dst}" + (":denied" if denied else ""),
                "source": src,
                "target": dst,
                "rps": doc["rps"],
                "requests": doc["requests"],
                "mtls": mtls[key] and src not in ("external", "unknown"),
                "denied": denied,
            }
            if denied:
                edge["policy"] = policy.get((src, dst), f"inbound/{dst}")
            else:
                edge["success"] = doc["success"]
                edge["p99_ms"] = doc["p99_ms"]
            out[key] = edge
        return out

    # -- per service ------------------------------------------------------------------

    def golden(self, service: str, window: str) -> dict[str, Any]:
        g = Golden()
        for w in self.windows[window]:
            if w.service != service:
                continue
            for labels, n in _rows(w, REQ).items():
                if labels[_DIR] == "inbound":
                    g.add(n, n if labels[_CLASS] == "5xx" else 0.0, w.span)
            for labels, h in _rows(w, DUR).items():
                if labels[_DIR] == "inbound":
                    g.add_buckets(h[0])
        doc = g.doc()
        del doc["requests"]
        return doc

    def instances(self, service: str) -> list[dict[str, Any]]:
        out = []
        for inst in self.view.instances:
            if inst.service != service:
                continue
            stream = self.streams.get(inst.instance_id)
            stored = self.view.proxies.get(inst.instance_id) or {}
            cert = (stream.cert if stream is not None else stored.get("cert")) or {}
            nack = stream.nack if stream is not None else stored.get("nack")
            not_before, not_after = cert.get("not_before"), cert.get("not_after")
            expiring = False
            if isinstance(not_before, int | float) and isinstance(not_after, int | float):
                life = not_after - not_before
                expiring = life > 0 and not_after - self.now < EXPIRING_SHARE * life
            out.append(
                {
                    "id": inst.instance_id,
                    "address": f"{inst.address}:{inst.port}",
                    "healthy": stream is not None
                    and inst.instance_id in self.view.healthy
                    and inst.lease_expires > self.now,
                    "connected": stream is not None,
                    "version": inst.version,
                    "zone": inst.zone,
                    "serial": cert.get("serial"),
                    "not_before": not_before,
                    "not_after": not_after,
                    "expiring": expiring,
                    "acked": stream.acked if stream is not None else stored.get("acked_version"),
                    "nack": nack.get("reason") if isinstance(nack, dict) else None,
                }
            )
        svc = self.mesh.services.get(service)
        for ep in svc.instances if svc is not None else ():
            out.append(
                {
                    "id": f"static:{ep.host}:{ep.port}",
                    "address": f"{ep.host}:{ep.port}",
                    "healthy": None,
                    "static": True,
                }
            )
        return out

    def counts(self, family: str) -> Iterable[tuple[ProxyWindow, tuple[str, ...], float]]:
        for w in self.windows["15m"]:
            for labels, n in _rows(w, family).items():
                yield w, labels, n

    def routes(self, service: str) -> list[dict[str, Any]]:
        svc = self.mesh.services.get(service)
        if svc is None:
            return []
        shares: dict[tuple[str, str], float] = {}
        for _, (label, upstream), n in self.counts("meshgate_split_requests_total"):
            shares[(label, upstream)] = shares.get((label, upstream), 0.0) + n
        out: list[dict[str, Any]] = []
        for i, route in enumerate(svc.routes or ()):
            label = route.name or f"{service}/{i}"
            out.append(route_row(label, route, shares))
        if not out:
            out.append({"route": f"{service}/0", "path": "/**", "upstream": service})
        return out

    def resilience(self, service: str) -> dict[str, Any]:
        retries = 0.0
        causes: dict[str, float] = {}
        for _, (upstream, cause, retried), n in self.counts("meshgate_upstream_try_failures_total"):
            if upstream == service:
                causes[cause] = causes.get(cause, 0.0) + n
                if retried == "true":
                    retries += n
        budget = sum(
            n
            for _, (upstream,), n in self.counts("meshgate_retry_budget_exhausted_total")
            if upstream == service
        )
        breaker = False
        states: dict[str, int] = {}
        for w in self.windows["1m"]:
            for (upstream,), v in w.newest.get("meshgate_circuit_breaker_open", {}).items():
                breaker = breaker or (upstream == service and v >= 1)
            for (upstream, _, state), v in w.newest.get("meshgate_endpoint_state", {}).items():
                if upstream == service and v >= 1:
                    states[state] = states.get(state, 0) + 1
        return {
            "retries": int(retries),
            "budget_exhausted": int(budget),
            "breaker_open": breaker,
            "try_failures": {k: int(v) for k, v in sorted(causes.items()) if v},
            "endpoints": states,
        }

    def policies(self, service: str) -> list[dict[str, Any]]:
        svc = self.mesh.services.get(service)
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        name = f"inbound/{service}"
        if svc is not None:
            for r in svc.authz.rules:
                rows[(name, r.name)] = {"action": r.action}
            rows[(name, "(default)")] = {"action": svc.authz.default}
        for w, (policy, decision, rule, _), n in self.counts("meshgate_authz_decisions_total"):
            if w.service != service:
                continue
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

    # -- the edge ----------------------------------------------------------------------

    def edge(self) -> dict[str, Any]:
        routes: dict[str, Golden] = {}
        for w in self.windows["1m"]:
            if w.service not in self.gateways:
                continue
            for labels, n in _rows(w, REQ).items():
                if labels[_DIR] == "inbound":
                    g = routes.setdefault(labels[_ROUTE], Golden())
                    g.add(n, n if labels[_CLASS] == "5xx" else 0.0, w.span)
            for labels, h in _rows(w, DUR).items():
                if labels[_DIR] == "inbound" and labels[_ROUTE] in routes:
                    routes[labels[_ROUTE]].add_buckets(h[0])
        refusals: dict[str, float] = {}
        auth: dict[str, float] = {}
        limited: dict[str, float] = {}
        consumers: dict[str, float] = {}
        at = label_index("meshgate_consumer_requests_total", "consumer")
        for w in self.windows["15m"]:
            if w.service not in self.gateways:
                continue
            for labels, n in _rows(w, REQ).items():
                if labels[_DIR] == "inbound" and labels[_REASON]:
                    refusals[labels[_REASON]] = refusals.get(labels[_REASON], 0.0) + n
            for (_, reason), n in _rows(w, "meshgate_auth_failures_total").items():
                auth[reason] = auth.get(reason, 0.0) + n
            for (route, limit, _, outcome), n in _rows(
                w, "meshgate_ratelimit_decisions_total"
            ).items():
                if outcome == "limited":
                    limited[f"{route}/{limit}"] = limited.get(f"{route}/{limit}", 0.0) + n
            if at is not None:
                for labels, n in _rows(w, "meshgate_consumer_requests_total").items():
                    consumers[labels[at]] = consumers.get(labels[at], 0.0) + n

        def top(counts: dict[str, float], key: str, name: str = "count") -> list[dict[str, Any]]:
            ordered = sorted(((k, v) for k, v in counts.items() if v > 0), key=lambda kv: -kv[1])
            return [{key: k, name: int(v)} for k, v in ordered[:20]]

        return {
            "routes": [
                {"route": r, **{k: v for k, v in g.doc().items() if k != "p50_ms"}}
                for r, g in sorted(routes.items())
            ],
            "refusals": top(refusals, "reason"),
            "auth_failures": top(auth, "reason"),
            "ratelimited": top(limited, "limit"),
            "consumers": top(consumers, "consumer", "requests"),
        }

    # -- config ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        gens = [
            {
                "generation": g["generation"],
                "loaded_at": g["at"],
                "by": "PUT /config" if g["source"] == "api" else g["source"],
                "digest": f"sha256:{g['digest']}",
            }
            for g in self.view.generations
        ]
        proxies = []
        tel = self.view.telemetry
        clock = tel.clock()

        def report_age(proxy_id: str) -> float | None:
            hist = tel.proxies.get(proxy_id)
            return round(clock - hist.last, 1) if hist is not None else None

        for s in sorted(self.streams.values(), key=lambda s: s.proxy_id):
            proxies.append(
                {
                    "id": s.proxy_id,
                    "service": s.service,
                    "connected": True,
                    "acked": s.acked,
                    "sent": s.sent,
                    "nack": s.nack.get("reason") if s.nack else None,
                    "report_age": report_age(s.proxy_id),
                }
            )
        for inst in self.view.instances:
            if inst.instance_id in self.streams:
                continue
            stored = self.view.proxies.get(inst.instance_id) or {}
            nack = stored.get("nack")
            proxies.append(
                {
                    "id": inst.instance_id,
                    "service": inst.service,
                    "connected": False,
                    "acked": stored.get("acked_version"),
                    "sent": stored.get("sent_version"),
                    "nack": nack.get("reason") if isinstance(nack, dict) else None,
                    "report_age": report_age(inst.instance_id),
                }
            )
        return {"generation": self.view.generation, "generations": gens, "proxies": proxies}

    # -- all of it --------------------------------------------------------------------

    def node(self, name: str) -> dict[str, Any]:
        g = self.golden(name, "1m")
        if name in self.gateways:
            streaming = any(s.service == name for s in self.streams.values())
            return {
                "id": name,
                "kind": "gateway",
                "name": name,
                "identity": self.mesh.identity(name),
                "health": "healthy" if streaming else "down",
                "rps": g["rps"],
                "success": g["success"],
                "p99_ms": g["p99_ms"],
            }
        insts = self.instances(name)
        registered = [i for i in insts if not i.get("static")]
        up = sum(1 for i in registered if i["healthy"])
        if not registered:
            health = "unknown" if insts else "down"
        elif up == 0:
            health = "down"
        elif up < len(registered) or (g["success"] is not None and g["success"] < 0.95):
            health = "degraded"
        else:
            health = "healthy"
        return {
            "id": name,
            "kind": "service",
            "name": name,
            "identity": self.mesh.identity(name),
            "health": health,
            "instances": len(insts),
            "instances_up": up,
            "mtls": self.mesh.mtls if registered else "none",
            "rps": g["rps"],
            "success": g["success"],
            "p99_ms": g["p99_ms"],
        }

    def build(self) -> dict[str, Any]:
        edges = self.edges()
        names = list(self.mesh.services)
        for s in self.streams.values():
            if s.service not in names:
                names.append(s.service)
        nodes = [self.node(n) for n in names]
        ends = {e["source"] for e in edges.values()}
        if self.gateways or "external" in ends:
            nodes.insert(0, {"id": "external", "kind": "external", "name": "clients"})
        if "unknown" in ends:
            nodes.append({"id": "unknown", "kind": "unknown", "name": "unknown callers"})
        services = {
            n: {
                "instances": self.instances(n),
                "golden": {w: self.golden(n, w) for w in WINDOWS},
                "routes": self.routes(n),
                "resilience": self.resilience(n),
                "policies": self.policies(n),
            }
            for n in names
            if n not in self.gateways
        }
        denials = []
        for d in self.view.telemetry.recent_denials():
            src = d["source_identity"]
            name = self.ids.get(src, "unknown") if src and src != PLAINTEXT else PLAINTEXT
            denials.append({**d, "source": name})
        return {
            "scope": "mesh",
            "generated_at": time.time(),
            "trust_domain": self.mesh.trust_domain,
            "window": "1m",
            "counts_window": "15m",
            "nodes": nodes,
            "edges": sorted(edges.values(), key=lambda e: e["id"]),
            "services": services,
            "denials": denials,
            "config": self.config(),
            "edge": self.edge(),
            "metrics_source": dict(self.view.metrics_source or {"kind": "reports"}),
        }


def build_state(view: MeshView, now: float | None = None) -> dict[str, Any]:
    """The whole state document."""
    return _Builder(view, time.time() if now is None else now).build()
