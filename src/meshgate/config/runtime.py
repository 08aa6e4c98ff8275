"""The immutable `Runtime`: a validated `Config` compiled for the hot path.

A runtime is built completely before it is swapped in, and an exchange keeps
a reference to the objects it started with, so a reload never changes a
request in flight. What a request needs is resolved here, once: the route
table, each route's cluster object (never looked up by name per request),
and the server limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshgate.config.schema import Config, RouteConfig, ServerLimits
from meshgate.http.router import Router
from meshgate.upstream.cluster import Cluster, PoolRegistry


class RouteTarget:
    """What a matched route resolves to."""

    __slots__ = ("cluster", "label", "passthrough")

    def __init__(self, cluster: Cluster, label: str, *, passthrough: bool) -> None:
        self.cluster = cluster
        self.label = label
        # The request target goes upstream byte for byte (no strip or rewrite).
        self.passthrough = passthrough


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    source: str
    router: Router[RouteTarget]
    clusters: dict[str, Cluster]
    limits: ServerLimits
    tick: float
    route_cache: dict[tuple[bytes, bytes, bytes], tuple[RouteTarget, bytes]] | None
    """(method, Host, target) -> (route target, upstream target); None when
    a route matches on headers. Mutable on purpose, and private to this
    runtime: a reload starts with an empty one."""
    """How often timeouts are checked: a tenth of the shortest one, so a
    timeout fires at most 10% late (clamped to 20 ms .. 1 s)."""

    @classmethod
    def build(cls, config: Config, registry: PoolRegistry, *, source: str = "") -> Runtime:
        clusters = {name: Cluster(name, up, registry) for name, up in config.upstreams.items()}
        pairs: list[tuple[RouteConfig, RouteTarget]] = []
        for i, route in enumerate(config.routes):
            label = route.name or f"routes[{i}]"
            passthrough = route.rewrite is None and not route.strip_prefix
            target = RouteTarget(clusters[route.upstream], label, passthrough=passthrough)
            pairs.append((route, target))
        shortest = min(
            [config.limits.header_timeout, config.limits.keepalive_timeout]
            + [min(u.timeouts.read, u.timeouts.total) for u in config.upstreams.values()]
        )
        cacheable = not any(route.headers for route in config.routes)
        return cls(
            route_cache={} if cacheable else None,
            tick=min(max(shortest / 10, 0.02), 1.0),
            config=config,
            source=source,
            router=Router(pairs),
            clusters=clusters,
            limits=config.limits,
        )

    def pool_ids(self) -> set[int]:
        return {id(p) for c in self.clusters.values() for p in c.pools()}
