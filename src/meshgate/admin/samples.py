"""What a listener's runtime reports to /metrics when scraped: its filters' counters,
its clusters and endpoints (`runtime_samples`).

Counters are plain attributes on the objects that count (a filter's
`admitted`, a Redis limiter's `errors`): the hot path pays one integer
increment, and this module reads them when scraped. They start again from
zero when a reload replaces the object that counted (Prometheus' `rate()`
treats that as a counter reset). The request series themselves are kept
apart, across reloads (`observability.requests`, `hub`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from meshgate.handlers.aggregate import Aggregator
from meshgate.observability.exposition import Samples

if TYPE_CHECKING:
    from meshgate.engine.runtime import Runtime
    from meshgate.protocol.h1 import ServerState

__all__ = ["listener_samples", "runtime_samples"]


def listener_samples(states: Iterable[ServerState]) -> Samples:
    """The samples of a process's listeners: each runtime's once (listeners
    may share one), each pool's once (runtimes share them), and the
    requests in flight per listener."""
    out: dict[str, list[list[Any]]] = {}
    seen_runtimes: set[int] = set()
    seen_pools: set[int] = set()
    flight = out.setdefault("meshgate_requests_in_flight", [])
    for state in states:
        in_flight = 0
        for conn in state.connections:
            for ex in conn.queue:
                if not getattr(ex, "finished", True):
                    in_flight += 1
        flight.append(
            [(state.direction, "true" if state.scheme == b"https" else "false"), in_flight]
        )
        runtime = state.runtime
        if id(runtime) in seen_runtimes:
            continue
        seen_runtimes.add(id(runtime))
        for name, rows in runtime_samples(runtime, seen_pools).items():
            out.setdefault(name, []).extend(rows)
    return out


def _endpoint_state(ep: Any) -> str:
    if ep.ejected_until:
        return "ejected"
    if ep.health_down:
        return "down"
    if ep.unreachable:
        return "unreachable"
    return "serving"


def runtime_samples(runtime: Runtime, seen_pools: set[int] | None = None) -> Samples:
    """A runtime's filters' and clusters' samples (the pools in `seen_pools`
    were reported already, by another runtime that shares them)."""
    seen = set() if seen_pools is None else seen_pools
    filters = runtime.filters
    out: dict[str, list[list[Any]]] = {}

    def add(name: str, labels: tuple[Any, ...], value: float) -> None:
        out.setdefault(name, []).append([labels, value])

    for label, auth in filters.auth_filters:
        for outcome, n in (
            ("admitted", auth.admitted),
            ("missing_credentials", auth.missing),
            ("refused", auth.refused),
            ("forbidden", auth.forbidden),
        ):
            add("meshgate_auth_requests_total", (label, outcome), n)
        add("meshgate_auth_failures_total", (label, "missing_credentials"), auth.missing)
        for reason, n in auth.failures.items():
            add("meshgate_auth_failures_total", (label, reason), n)
        for consumer, n in auth.consumers.items():
            add("meshgate_consumer_requests_total", (label, consumer), n)
    for _, authz in filters.authz_filters:
        for source, decision, n in authz.metric_rows():
            add(
                "meshgate_authz_decisions_total",
                (decision.policy, decision.decision, decision.rule or "(default)", source),
                n,
            )
    for label, limit in filters.limit_filters:
        for outcome, n in (
            ("allowed", limit.allowed),
            ("limited", limit.limited),
            ("store_error", limit.store_errors),
        ):
            add(
                "meshgate_ratelimit_decisions_total",
                (label, limit.name, limit.cfg.policy, outcome),
                n,
            )
        if limit.limited_by_source is not None:
            for source, row in limit.limited_by_source.rows.items():
                add(
                    "meshgate_ratelimit_limited_by_source_total",
                    (label, limit.name, source),
                    row[0],
                )
    for limiter in filters.limiters:
        add("meshgate_ratelimit_store_errors_total", (), limiter.errors)
        add("meshgate_ratelimit_store_skipped_total", (), limiter.skipped)
    for label, fault in filters.fault_filters:
        for kind, configured, n in (
            ("delay", fault.cfg.delay is not None, fault.delayed),
            ("abort", fault.cfg.abort is not None, fault.aborted),
        ):
            if configured:
                add("meshgate_fault_injected_total", (label, kind), n)
    for verifier in filters.verifiers:
        add("meshgate_jwks_fetches_total", (verifier.name,), verifier.fetches)
        add("meshgate_jwt_cache_lookups_total", (verifier.name, "hit"), verifier.cache.hits)
        add("meshgate_jwt_cache_lookups_total", (verifier.name, "miss"), verifier.cache.misses)
    for route in runtime.router.routes:
        splitter = route.target.splitter
        if splitter is not None:
            for name, n in zip(splitter.names, splitter.counts, strict=True):
                add("meshgate_split_requests_total", (splitter.label, name), n)
        handler = route.target.handler
        if isinstance(handler, Aggregator):
            for outcome, n in (
                ("complete", handler.complete),
                ("partial", handler.partial),
                ("failed", handler.failed),
            ):
                add("meshgate_aggregate_responses_total", (handler.label, outcome), n)
            for step in handler.steps:
                for outcome, n in (("ok", step.calls_ok), ("failed", step.calls_failed)):
                    add("meshgate_aggregate_calls_total", (handler.label, step.name, outcome), n)
    for name, cluster in runtime.clusters.items():
        cap = cluster.max_requests
        add(
            "meshgate_circuit_breaker_open",
            (name,),
            1 if cap is not None and cluster.active >= cap else 0,
        )
        add("meshgate_circuit_breaker_refused_total", (name,), cluster.overloaded)
        add("meshgate_retry_budget_exhausted_total", (name,), cluster.budget.exhausted)
        for (cause, retried), n in cluster.try_failures.items():
            add(
                "meshgate_upstream_try_failures_total",
                (name, cause, "true" if retried else "false"),
                n,
            )
        for ep in cluster.endpoints:
            if id(ep.pool) in seen:
                continue
            seen.add(id(ep.pool))
            address = ep.pool.address
            now_state = _endpoint_state(ep)
            for st in ("serving", "ejected", "down", "unreachable"):
                add("meshgate_endpoint_state", (name, address, st), 1 if st == now_state else 0)
            add("meshgate_endpoint_ejections_total", (name, address), ep.ejections)
            add("meshgate_endpoint_ewma_seconds", (name, address), ep.ewma)
            add("meshgate_endpoint_active_requests", (name, address), ep.active)
            stats = ep.pool.stats()
            idle = stats["idle"]
            add("meshgate_pool_connections", (name, address, "idle"), idle)
            add("meshgate_pool_connections", (name, address, "busy"), stats["open"] - idle)
            add("meshgate_pool_connections", (name, address, "connecting"), stats["connecting"])
    return out
