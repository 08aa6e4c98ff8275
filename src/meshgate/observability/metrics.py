"""`GET /metrics` on the admin listener, in the Prometheus text format (0.0.4).

Counters are plain attributes on the objects that count (a filter's
`admitted`, a Redis limiter's `errors`): the hot path pays one integer
increment, and this module reads them when scraped. They are per worker
process, with a `worker` label, and start again from zero when a reload
replaces the object that counted (Prometheus' `rate()` treats that as a
counter reset).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from meshgate.handlers.aggregate import Aggregator

if TYPE_CHECKING:
    from meshgate.protocol.h1 import ServerState

__all__ = ["render"]


def _labels(**labels: str) -> str:
    parts = []
    for k, v in labels.items():
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{k}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def render(state: ServerState) -> str:
    pid = str(os.getpid())
    filters = state.runtime.filters
    lines = [
        "# HELP meshgate_auth_requests_total Requests on routes with auth, by outcome.",
        "# TYPE meshgate_auth_requests_total counter",
    ]
    for label, auth in filters.auth_filters:
        for outcome, n in (
            ("admitted", auth.admitted),
            ("missing_credentials", auth.missing),
            ("refused", auth.refused),
            ("forbidden", auth.forbidden),
        ):
            labels = _labels(worker=pid, route=label, outcome=outcome)
            lines.append(f"meshgate_auth_requests_total{labels} {n}")
    lines += [
        "# HELP meshgate_authz_decisions_total Authorization decisions of routes with authz:"
        " (a sidecar's inbound policy), by rule and source identity (at most 1000 sources"
        ' per policy, then source="other").',
        "# TYPE meshgate_authz_decisions_total counter",
    ]
    for _, authz in filters.authz_filters:
        for source, decision, n in authz.metric_rows():
            labels = _labels(
                worker=pid,
                policy=decision.policy,
                decision=decision.decision,
                rule=decision.rule or "(default)",
                source=source,
            )
            lines.append(f"meshgate_authz_decisions_total{labels} {n}")
    lines += [
        "# HELP meshgate_ratelimit_decisions_total Rate limit decisions, by outcome.",
        "# TYPE meshgate_ratelimit_decisions_total counter",
    ]
    for label, limit in filters.limit_filters:
        for outcome, n in (
            ("allowed", limit.allowed),
            ("limited", limit.limited),
            ("store_error", limit.store_errors),
        ):
            labels = _labels(
                worker=pid, route=label, limit=limit.name, policy=limit.cfg.policy, outcome=outcome
            )
            lines.append(f"meshgate_ratelimit_decisions_total{labels} {n}")
    lines += [
        "# HELP meshgate_ratelimit_limited_by_source_total Requests a limit refused, by"
        " source identity (limits by peer, and routes with authz:; at most 1000 sources"
        ' per limit, then source="other").',
        "# TYPE meshgate_ratelimit_limited_by_source_total counter",
    ]
    for label, limit in filters.limit_filters:
        if limit.limited_by_source is None:
            continue
        for source, row in limit.limited_by_source.rows.items():
            labels = _labels(worker=pid, route=label, limit=limit.name, source=source)
            lines.append(f"meshgate_ratelimit_limited_by_source_total{labels} {row[0]}")
    lines += [
        "# HELP meshgate_ratelimit_store_errors_total Redis calls that failed or timed out.",
        "# TYPE meshgate_ratelimit_store_errors_total counter",
    ]
    for limiter in filters.limiters:
        lines.append(f"meshgate_ratelimit_store_errors_total{_labels(worker=pid)} {limiter.errors}")
    lines += [
        "# HELP meshgate_ratelimit_store_skipped_total Decisions that skipped Redis while it was"
        " marked down.",
        "# TYPE meshgate_ratelimit_store_skipped_total counter",
    ]
    for limiter in filters.limiters:
        lines.append(
            f"meshgate_ratelimit_store_skipped_total{_labels(worker=pid)} {limiter.skipped}"
        )
    lines += [
        "# HELP meshgate_fault_injected_total Requests a route's fault: delayed or aborted.",
        "# TYPE meshgate_fault_injected_total counter",
    ]
    for label, fault in filters.fault_filters:
        for kind, configured, n in (
            ("delay", fault.cfg.delay is not None, fault.delayed),
            ("abort", fault.cfg.abort is not None, fault.aborted),
        ):
            if configured:
                labels = _labels(worker=pid, route=label, kind=kind)
                lines.append(f"meshgate_fault_injected_total{labels} {n}")
    lines += [
        "# HELP meshgate_jwks_fetches_total JWKS fetch attempts, per auth entry.",
        "# TYPE meshgate_jwks_fetches_total counter",
    ]
    for verifier in filters.verifiers:
        lines.append(
            f"meshgate_jwks_fetches_total{_labels(worker=pid, auth=verifier.name)} "
            f"{verifier.fetches}"
        )
    lines += [
        "# HELP meshgate_split_requests_total Requests a route with split: sent to each"
        " upstream (canary matches included).",
        "# TYPE meshgate_split_requests_total counter",
    ]
    for route in state.runtime.router.routes:
        splitter = route.target.splitter
        if splitter is not None:
            for name, n in zip(splitter.names, splitter.counts, strict=True):
                labels = _labels(worker=pid, route=splitter.label, upstream=name)
                lines.append(f"meshgate_split_requests_total{labels} {n}")
    lines += [
        "# HELP meshgate_aggregate_responses_total Answers of aggregate: routes: complete,"
        " partial (an optional backend failed) or failed (a required one did).",
        "# TYPE meshgate_aggregate_responses_total counter",
    ]
    aggregators = [
        h
        for route in state.runtime.router.routes
        if isinstance(h := route.target.handler, Aggregator)
    ]
    for agg in aggregators:
        for outcome, n in (
            ("complete", agg.complete),
            ("partial", agg.partial),
            ("failed", agg.failed),
        ):
            labels = _labels(worker=pid, route=agg.label, outcome=outcome)
            lines.append(f"meshgate_aggregate_responses_total{labels} {n}")
    lines += [
        "# HELP meshgate_aggregate_calls_total Backend calls of aggregate: routes, by outcome.",
        "# TYPE meshgate_aggregate_calls_total counter",
    ]
    for agg in aggregators:
        for step in agg.steps:
            for outcome, n in (("ok", step.calls_ok), ("failed", step.calls_failed)):
                labels = _labels(worker=pid, route=agg.label, backend=step.name, outcome=outcome)
                lines.append(f"meshgate_aggregate_calls_total{labels} {n}")
    return "\n".join(lines) + "\n"
