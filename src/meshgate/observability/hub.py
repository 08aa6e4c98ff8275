"""A process's metrics: its request series and what else it reports.

A `MetricsHub` is one proxy's metrics: a gateway worker's, or a
sidecar's. `HUB` is the process's default one (a worker, or a sidecar
process, is one proxy); a process that runs several proxies (the demo: a
sidecar per service and a gateway) gives each its own, so that their
series, identities and directions do not mix. Listeners get their
`RequestSeries` from their proxy's hub by role and transport (`series`,
once, when their state is made), so that a reload or a new mesh snapshot,
which builds new listener states, keeps counting into the same rows.
Everything else that reports (a runtime's filters and clusters, a mesh
agent's certificate) registers a collector: a function that returns
samples when scraped, so the hot path pays nothing for it.

A scrape (`collect`) also expires idle request rows. With several
workers, the worker answering the scrape merges the others' samples
(`observability.peers`) and tells every worker which groups of rows were
idle in all of them, so that no worker drops a row another still counts
(the sum would go down, which Prometheus reads as a counter reset).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from meshgate.observability.exposition import Samples
from meshgate.observability.requests import RequestSeries

__all__ = ["DIRECTIONS", "HUB", "MetricsHub"]

log = logging.getLogger("meshgate.metrics")

# A listener's role -> the direction label of its requests.
DIRECTIONS = {
    "gateway": "inbound",
    "sidecar-inbound": "inbound",
    "sidecar-outbound": "outbound",
}

Collector = Callable[[], Samples]


class MetricsHub:
    def __init__(self) -> None:
        self.stores: dict[tuple[str, bool], RequestSeries] = {}
        self.collectors: dict[str, Collector] = {}
        self.idle_expiry = 600.0
        """Seconds a request series may go untouched before it is dropped."""
        self.max_identities = 1000
        self.local_identity = ""
        self.peers: list[str] = []
        """The other workers' sample sockets (`observability.peers`)."""
        self.scraped_at = time.monotonic()
        """When a scrape last took this worker's samples (with peers)."""
        self.connections: dict[tuple[str, bool], list[int]] = {}
        """opened, closed, active, by (direction, tls)."""
        self.handshakes: dict[tuple[str, str], int] = {}
        self.reloads = {"ok": 0, "refused": 0}
        self.generation = 0
        self.in_flight: dict[tuple[str, bool], int] = {}
        self.request_hook: Callable[[Any, float, str], None] | None = None
        """Every series' `then` (the access log), or None."""
        self.extras: dict[str, Callable[[], Any]] = {}
        """What else the other workers may ask of this one, by name (plain
        data, JSON: `observability.peers.gather_extra`)."""

    def configure(self, idle_expiry: float, max_identities: int) -> None:
        """The config's `metrics:` (at start, and on every reload)."""
        self.idle_expiry = idle_expiry
        self.max_identities = max_identities
        for store in self.stores.values():
            store.max_identities = max_identities

    def series(self, role: str, tls: bool) -> RequestSeries:
        direction = DIRECTIONS.get(role, "inbound")
        key = (direction, tls)
        store = self.stores.get(key)
        if store is None:
            store = self.stores[key] = RequestSeries(
                direction, tls, max_identities=self.max_identities
            )
            store.local_identity = self.local_identity
            store.then = self.request_hook
        return store

    def set_request_hook(self, hook: Callable[[Any, float, str], None] | None) -> None:
        """Call `hook(ex, now, reason)` after every request is counted, in
        every series, those made later too (`RequestSeries.then`)."""
        self.request_hook = hook
        for store in self.stores.values():
            store.then = hook

    def set_local_identity(self, identity: str) -> None:
        self.local_identity = identity
        for store in self.stores.values():
            store.local_identity = identity

    def connection_counters(self, role: str, tls: bool) -> list[int]:
        key = (DIRECTIONS.get(role, "inbound"), tls)
        got = self.connections.get(key)
        if got is None:
            # opened, closed, active, refused by the listener's cap, by the
            # client address's (`protocol.limits.Admission`)
            got = self.connections[key] = [0, 0, 0, 0, 0]
        return got

    def handshake(self, role: str, outcome: str) -> None:
        """Count a TLS handshake of a client, `ok` or a failure's reason
        (at most 32 reasons, then `other`)."""
        key = (DIRECTIONS.get(role, "inbound"), outcome)
        if key not in self.handshakes and len(self.handshakes) >= 32:
            key = (key[0], "other")
        self.handshakes[key] = self.handshakes.get(key, 0) + 1

    def identity(self, identity: str, not_after: Callable[[], float]) -> None:
        """Report this proxy's certificate expiry (`not_after`, read when
        scraped), and take `identity` as its own in request series."""
        self.set_local_identity(identity)
        self.register(
            "identity",
            lambda: {
                "meshgate_identity_cert_expiration_timestamp_seconds": [[(identity,), not_after()]]
            },
        )

    def register(self, name: str, collector: Collector) -> None:
        """Report `collector`'s samples under `name` (a later one replaces it)."""
        self.collectors[name] = collector

    def unregister(self, name: str) -> None:
        self.collectors.pop(name, None)

    def expire_local(self, now: float | None = None) -> int:
        """Drop request rows idle past the expiry: a lone worker's own
        decision. With peers, the scrapes decide (`observability.peers`):
        a worker dropping a group on its own while another still counts it
        would make the sum go down. Only when no scrape came for four times
        the expiry (nobody is looking) does it drop, on its own, the groups
        idle that long, so that memory stays bounded."""
        now = time.monotonic() if now is None else now
        expiry = self.idle_expiry
        if self.peers:
            expiry *= 4
            if now - self.scraped_at < expiry:
                return 0
        return sum(s.expire(now - expiry) for s in self.stores.values())

    def collect(self, families: Collection[str] | None = None, *, scrape: bool = True) -> Samples:
        """This proxy's samples (request rows idle past the expiry are
        dropped first when it has no peers); only `families`' when given.
        `scrape=False` (a report to the control plane, not a scrape) leaves
        the scrape's clock alone: with peers, expiry is the scrapes' to
        decide, and their absence lets a worker expire on its own."""
        if not self.peers:
            self.expire_local()
        elif scrape:
            self.scraped_at = time.monotonic()
        out: dict[str, list[Any]] = {}
        for store in self.stores.values():
            for name, rows in store.samples().items():
                out.setdefault(name, []).extend(rows)
        conns = out.setdefault("meshgate_tcp_connections_opened_total", [])
        closed = out.setdefault("meshgate_tcp_connections_closed_total", [])
        active = out.setdefault("meshgate_tcp_connections_active", [])
        refused = out.setdefault("meshgate_tcp_connections_refused_total", [])
        for (direction, tls), (o, c, a, by_listener, by_client) in self.connections.items():
            labels = (direction, "true" if tls else "false")
            conns.append([labels, o])
            closed.append([labels, c])
            active.append([labels, a])
            if by_listener or by_client:
                refused.append([(*labels, "max_connections"), by_listener])
                refused.append([(*labels, "max_connections_per_ip"), by_client])
        out["meshgate_tls_handshakes_total"] = [[k, n] for k, n in self.handshakes.items()]
        out["meshgate_config_reloads_total"] = [[(k,), n] for k, n in self.reloads.items()]
        out["meshgate_config_generation"] = [[(), self.generation]]
        out["meshgate_workers_scraped"] = [[(), 1]]
        for name, collector in list(self.collectors.items()):
            try:
                got = collector()
            except Exception:
                log.exception("metrics collector %s failed", name)
                continue
            for fam, rows in got.items():
                out.setdefault(fam, []).extend(rows)
        if families is not None:
            return {name: out[name] for name in families if name in out}
        return out


HUB = MetricsHub()
"""The process's default hub (one proxy per process)."""
