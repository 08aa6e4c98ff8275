"""A cluster: a named upstream compiled from config.

It owns what the exchange needs per request, resolved at load: the balancer
over its endpoints, timeouts in seconds, and the Host policy as a ready
value. Pools are shared between clusters and kept across reloads by
`PoolRegistry`, so a reload that keeps an endpoint keeps its warm
connections.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from meshgate.config.schema import UpstreamConfig
from meshgate.http.batch import WriteBatcher
from meshgate.upstream import reachability
from meshgate.upstream.balancer import BALANCERS, Balancer, Endpoint
from meshgate.upstream.health import HealthChecker
from meshgate.upstream.outlier import OutlierDetector
from meshgate.upstream.pool import DEFAULT_HEAD_LIMIT, EndpointPool
from meshgate.upstream.retry import RetryBudget, RetryPolicy

if TYPE_CHECKING:
    from meshgate.tls.holder import IdentityContexts

# Host policy, resolved at load: keep the client's Host, or send this value.
HOST_PRESERVE: bytes | None = None


class PoolRegistry:
    """Pools by (host, port, pool settings), shared across reloads."""

    __slots__ = ("batcher", "loop", "pools", "tls")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        tls: IdentityContexts | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_event_loop()
        # One write batcher per event loop, shared by clients and upstreams.
        self.batcher = WriteBatcher(self.loop)
        self.pools: dict[tuple[Any, ...], EndpointPool] = {}
        self.tls = tls
        """This proxy's mesh identity, for endpoints that have one (mTLS)."""

    def get(
        self,
        host: str,
        port: int,
        cfg: UpstreamConfig,
        identity: str | None = None,
        *,
        head_limit: int = DEFAULT_HEAD_LIMIT,
    ) -> EndpointPool:
        p = cfg.pool
        key = (
            host,
            port,
            identity,
            p.max_connections,
            p.max_idle,
            p.idle_timeout,
            cfg.timeouts.connect,
            head_limit,
        )
        pool = self.pools.get(key)
        if pool is None:
            pool = EndpointPool(
                host=host,
                port=port,
                max_connections=p.max_connections,
                max_idle=p.max_idle,
                idle_timeout=p.idle_timeout,
                connect_timeout=cfg.timeouts.connect,
                loop=self.loop,
                batcher=self.batcher,
                identity=identity,
                tls=self.tls,
                head_limit=head_limit,
            )
            self.pools[key] = pool
        return pool

    def retain_only(self, keep: set[int]) -> None:
        """Retire every pool whose id is not in `keep` (after a reload)."""
        for key, pool in list(self.pools.items()):
            if id(pool) not in keep:
                pool.retire()
                del self.pools[key]

    def sweep(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    def close_idle(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()


class Cluster:
    """A named upstream: endpoints behind a balancer, with timeouts and Host policy."""

    __slots__ = (
        "acquire_timeout",
        "active",
        "balancer",
        "budget",
        "config",
        "connect_timeout",
        "endpoints",
        "health",
        "host_value",
        "max_pending",
        "max_requests",
        "max_retries",
        "name",
        "outlier",
        "overload_logged",
        "overloaded",
        "pending",
        "read_timeout",
        "retried",
        "retries_active",
        "retry",
        "total_timeout",
        "try_failures",
    )

    def __init__(
        self,
        name: str,
        cfg: UpstreamConfig,
        registry: PoolRegistry,
        *,
        head_limit: int = DEFAULT_HEAD_LIMIT,
    ) -> None:
        self.name = name
        self.config = cfg
        self.endpoints = tuple(
            Endpoint(
                registry.get(ep.host, ep.port, cfg, ep.identity, head_limit=head_limit),
                ep.authority.encode("idna"),
            )
            for ep in cfg.endpoints
        )
        self.balancer: Balancer = BALANCERS[cfg.balancer](self.endpoints)
        self.balancer.name = name
        # Circuit breaking: requests in flight (connecting or attached) and
        # requests waiting for a free connection, against their limits.
        self.active = 0
        self.pending = 0
        self.overloaded = 0
        self.overload_logged = -1.0  # loop time of the last "breaker open" log line
        self.max_requests = cfg.circuit_breaker.max_requests
        self.max_pending = cfg.circuit_breaker.max_pending
        self.max_retries = cfg.circuit_breaker.max_retries
        self.retries_active = 0
        self.retried = 0
        self.try_failures: dict[tuple[str, bool], int] = {}
        """Failed tries by cause and whether they were retried (/metrics)."""
        # The default retry policy of routes to this upstream, and the budget
        # every retry to it draws on.
        self.retry = RetryPolicy(cfg.retry) if cfg.retry is not None else None
        self.budget = RetryBudget(name, cfg.retry_budget)
        self.outlier = (
            OutlierDetector(name, cfg.outlier_detection, self.balancer, registry.loop)
            if cfg.outlier_detection is not None
            else None
        )
        # Active health checks: built here, started only when the runtime
        # becomes active (`start_health`).
        self.health = (
            HealthChecker(name, cfg.health_check, self.balancer, registry.loop)
            if cfg.health_check is not None
            else None
        )
        self.connect_timeout = cfg.timeouts.connect
        self.read_timeout = cfg.timeouts.read
        self.total_timeout = cfg.timeouts.total
        self.acquire_timeout = cfg.pool.acquire_timeout or cfg.timeouts.connect
        # "preserve" -> None; "rewrite" -> per endpoint (marked by b""); else literal.
        if cfg.host == "preserve":
            self.host_value: bytes | None = HOST_PRESERVE
        elif cfg.host == "rewrite":
            self.host_value = b""
        else:
            self.host_value = cfg.host.encode("idna")

    def pools(self) -> list[EndpointPool]:
        return [ep.pool for ep in self.endpoints]

    def start_health(self, previous: Cluster | None = None) -> None:
        """Start the health checks, taking over the state of `previous` (the
        cluster of the same name this one replaces) where they agree."""
        if self.health is None:
            return
        if previous is not None and previous.health is not None:
            self.health.adopt(previous.health)
        self.health.start()

    def stop_health(self) -> None:
        """This cluster serves no more: its checks, probes and timers end."""
        if self.health is not None:
            self.health.stop()
        if self.outlier is not None:
            self.outlier.close()
        reachability.stop(self.endpoints)
