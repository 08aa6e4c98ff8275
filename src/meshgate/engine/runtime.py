"""The immutable `Runtime`: a validated `Config` compiled for the hot path.

A runtime is built completely before it is swapped in, and an exchange keeps
a reference to the objects it started with, so a reload never changes a
request in flight. What a request needs is resolved here, once: the route
table, each route's cluster object (never looked up by name per request)
or, for a route with `split:`, its `Splitter` over several, and the server
limits.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from meshgate.config.schema import Config, RouteConfig, ServerLimits
from meshgate.filters import Chain
from meshgate.filters.build import CompiledFilters, FilterServices, compile_filters
from meshgate.filters.cors import UPSTREAM_DROPPED
from meshgate.handlers import Handler
from meshgate.handlers.aggregate import Aggregator
from meshgate.handlers.transform import BodyTransformer
from meshgate.handlers.unavailable import NoEndpoints
from meshgate.http.router import Router
from meshgate.http.split import Splitter
from meshgate.transform.jsonmap import JsonMap
from meshgate.upstream.cluster import Cluster, PoolRegistry
from meshgate.upstream.retry import RetryPolicy


class RouteTarget:
    """What a matched route resolves to."""

    __slots__ = (
        "chain",
        "cluster",
        "drop",
        "handler",
        "label",
        "max_body",
        "passthrough",
        "path",
        "rate_limited",
        "read_timeout",
        "response_drop",
        "retry",
        "splitter",
        "total_timeout",
    )

    def __init__(
        self,
        cluster: Cluster,
        label: str,
        *,
        passthrough: bool,
        chain: Chain | None = None,
        drop: frozenset[bytes] | None = None,
        splitter: Splitter[Cluster] | None = None,
        retry: RetryPolicy | None = None,
        read_timeout: float = 0.0,
        total_timeout: float = 0.0,
        handler: Handler | None = None,
        response_drop: frozenset[bytes] | None = None,
        path: str = "",
        rate_limited: bool = False,
        max_body: int = 0,
    ) -> None:
        self.cluster = cluster
        self.max_body = max_body
        """The largest request body the route takes, in bytes (0: no limit):
        the route's `max_body:`, else `limits.max_body`; for a route with a
        handler, the smaller of that and the handler's own."""
        self.path = path
        """The route's configured path pattern (`/api/orders/**`), as the
        access log names it: never the request's own path or query."""
        self.rate_limited = rate_limited
        """The route has a `rate_limit:` (a span says whether it let the request by)."""
        self.response_drop = response_drop
        """Upstream response headers never passed on (on a route with CORS,
        the upstream's own Access-Control-* fields), or None."""
        self.handler = handler
        """For an `aggregate:` route or one that maps JSON bodies: what
        answers the whole request (the body is buffered); else None."""
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        """The route's own timeouts in seconds; 0.0 = its upstream's."""
        self.retry = retry
        """The route's own retry policy (else its upstream's), or None."""
        """The route's upstream; with `split:`, its first backend (requests
        take theirs from `splitter`)."""
        self.splitter = splitter
        """With `split:`, what picks each request's cluster; else None."""
        self.label = label
        # The request target goes upstream byte for byte (no strip or rewrite).
        self.passthrough = passthrough
        self.chain = chain
        """The route's filters (auth, rate limit), or None."""
        self.drop = drop
        """Request headers never forwarded on this route (identity headers
        only the gateway may set), or None."""


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    source: str
    router: Router[RouteTarget]
    clusters: dict[str, Cluster]
    limits: ServerLimits
    tick: float
    filters: CompiledFilters
    route_cache: dict[tuple[bytes, bytes, bytes], tuple[RouteTarget, bytes, dict[str, str]]] | None
    """(method, Host, target) -> (route target, upstream target, path
    parameters); None when
    a route matches on headers. Mutable on purpose, and private to this
    runtime: a reload starts with an empty one."""
    """How often timeouts are checked: a tenth of the shortest one, so a
    timeout fires at most 10% late (clamped to 20 ms .. 1 s)."""

    @classmethod
    def build(
        cls,
        config: Config,
        registry: PoolRegistry,
        *,
        source: str = "",
        services: FilterServices | None = None,
    ) -> Runtime:
        """Compile `config`. A key file that cannot be read or parsed raises
        ValueError naming its `auth.<name>` entry."""
        head_limit = config.limits.max_response_header_bytes
        clusters = {
            name: Cluster(name, up, registry, head_limit=head_limit)
            for name, up in config.upstreams.items()
        }
        labels = [route.name or f"routes[{i}]" for i, route in enumerate(config.routes)]
        base_dir = pathlib.Path(source).resolve().parent if source else pathlib.Path.cwd()
        filters = compile_filters(config, services or FilterServices(), labels, base_dir=base_dir)
        drop = filters.identity_headers or None
        pairs: list[tuple[RouteConfig, RouteTarget]] = []
        for route, label, chain in zip(config.routes, labels, filters.chains, strict=True):
            passthrough = route.rewrite is None and not route.strip_prefix
            splitter = Splitter(route, clusters, label) if route.split is not None else None
            retry = RetryPolicy(route.retry) if route.retry is not None else None
            total = (route.timeouts.total or 0.0) if route.timeouts else 0.0
            handler: Handler | None = None
            route_drop = drop
            transform = route.transform
            if route.aggregate is not None:
                response = transform.response if transform is not None else None
                always = set(filters.identity_headers)
                ops = transform.request.headers if transform and transform.request else None
                if ops is not None:
                    for name in (*ops.set, *ops.add, *ops.rename.values()):
                        always.add(name.lower().encode("latin-1"))
                    # What the route adds reaches the backends, a client's own
                    # copies of those headers do not (the allow-list's rule).
                    added = frozenset(name.lower().encode("latin-1") for name in ops.add)
                    route_drop = added if drop is None else drop | added
                handler = Aggregator(
                    route.aggregate,
                    clusters,
                    route.path,
                    f"{label}.",
                    always=frozenset(always),
                    response_map=JsonMap(response.body, f"{label}.transform.response.body")
                    if response is not None and response.body is not None
                    else None,
                )
            elif transform is not None and transform.buffers():
                handler = BodyTransformer(transform, label, timeout=total, retry=retry)
            first = route.upstream_names()[0]
            if handler is None and splitter is None and not clusters[first].endpoints:
                handler = NoEndpoints(first, config.upstreams[first].service)
            max_body = route.max_body or config.limits.max_body or 0
            if handler is not None:
                # A handler reads the whole body: up to its own limit, or the
                # route's when that is smaller.
                max_body = min(handler.max_body, max_body or handler.max_body)
            target = RouteTarget(
                clusters[route.upstream_names()[0]],
                label,
                passthrough=passthrough,
                chain=chain,
                drop=route_drop,
                splitter=splitter,
                retry=retry,
                read_timeout=(route.timeouts.read or 0.0) if route.timeouts else 0.0,
                total_timeout=total,
                handler=handler,
                response_drop=UPSTREAM_DROPPED if config.route_cors(route) is not None else None,
                path=route.path,
                rate_limited=bool(route.rate_limits()),
                max_body=max_body,
            )
            pairs.append((route, target))
        shortest = min(
            [
                config.limits.header_timeout,
                config.limits.keepalive_timeout,
                config.limits.body_timeout,
                config.limits.write_timeout,
            ]
            + [min(u.timeouts.read, u.timeouts.total) for u in config.upstreams.values()]
            + [
                t
                for r in config.routes
                if r.timeouts
                for t in (r.timeouts.read, r.timeouts.total)
                if t
            ]
            # Per-try timeouts fire on the same tick.
            + [
                r.retry.per_try_timeout
                for r in config.routes
                if r.retry and r.retry.per_try_timeout
            ]
            + [
                u.retry.per_try_timeout
                for u in config.upstreams.values()
                if u.retry and u.retry.per_try_timeout
            ]
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
            filters=filters,
        )

    def pool_ids(self) -> set[int]:
        return {id(p) for c in self.clusters.values() for p in c.pools()}

    def start_health(self, previous: Runtime | None = None) -> None:
        """Start the clusters' health checks, now that this runtime is the
        active one; each takes over the state of the cluster of the same
        name in `previous` (whose checks must be stopped first)."""
        old = previous.clusters if previous is not None else {}
        for name, cluster in self.clusters.items():
            cluster.start_health(old.get(name))

    def stop_health(self) -> None:
        """Stop the health checks (a reload replaced this runtime, or the
        worker drains): no check is sent after this returns."""
        for cluster in self.clusters.values():
            cluster.stop_health()

    async def close_health(self) -> None:
        """`stop_health`, and wait until every check task has ended."""
        self.stop_health()
        for cluster in self.clusters.values():
            if cluster.health is not None:
                await cluster.health.wait_stopped()
