"""Metric families: what each one is (`SPECS`), how the workers' samples
add up (`merge`), and the Prometheus text format (0.0.4) they are served in
(`render`), and back (`from_scrape`: a parsed page, or what a Prometheus
holds of one, as samples again).

A sample is `[labels, value]` or `[labels, value, last]`, where `labels`
is the tuple of the family's label values in `Spec.labels` order and
`last` is when the series was last touched (monotonic seconds, for
expiry). A histogram's value is `[buckets, sum, count]`, the buckets not
yet cumulative (one per bound of `requests.BUCKETS`, then +Inf). Samples
are plain data so that a worker can hand its own to the one answering a
scrape (`observability.peers`), which merges them: counters, histograms
and most gauges add up; a few gauges (an expiry time, a generation, an
EWMA) keep the largest value (`Spec.merge`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshgate.observability.requests import BUCKETS
from meshgate.observability.scrape import Scrape

__all__ = ["REPORT_FAMILIES", "SPECS", "Spec", "from_scrape", "merge", "render"]

Samples = dict[str, list[list[Any]]]


@dataclass(frozen=True, slots=True)
class Spec:
    type: str  # counter, gauge, histogram
    help: str
    labels: tuple[str, ...]
    merge: str = "sum"  # or "max"


_REQ = (
    "direction",
    "route",
    "upstream",
    "source_identity",
    "destination_identity",
    "method",
)

SPECS: dict[str, Spec] = {
    # -- requests ------------------------------------------------------------------
    "meshgate_requests_total": Spec(
        "counter",
        "Requests that ended, by direction, route, upstream, peer identities, method,"
        " status code and class, transport, and refusal reason.",
        (*_REQ, "code", "code_class", "tls", "reason"),
    ),
    "meshgate_request_duration_seconds": Spec(
        "histogram",
        "Time from the request head to the end of the answer, as the client saw it.",
        (*_REQ, "code_class", "tls"),
    ),
    "meshgate_upstream_duration_seconds": Spec(
        "histogram",
        "The upstream part of a request's time: from the answering try's start to the"
        " end of the upstream's response.",
        (*_REQ, "code_class", "tls"),
    ),
    "meshgate_request_bytes_total": Spec(
        "counter", "Request body bytes sent upstream.", (*_REQ, "tls")
    ),
    "meshgate_response_bytes_total": Spec(
        "counter", "Response bytes sent to clients.", (*_REQ, "tls")
    ),
    "meshgate_upstream_tries_total": Spec(
        "counter",
        "Tries of requests that reached an upstream (first tries and retries).",
        (*_REQ, "code_class", "tls"),
    ),
    "meshgate_upstream_try_failures_total": Spec(
        "counter",
        "Tries that failed, by upstream and cause (connect-failure, reset, timeout, a status),"
        " and whether the try was retried.",
        ("upstream", "cause", "retried"),
    ),
    "meshgate_requests_in_flight": Spec(
        "gauge", "Requests being answered now.", ("direction", "tls")
    ),
    # -- connections ---------------------------------------------------------------
    "meshgate_tcp_connections_opened_total": Spec(
        "counter", "Client connections accepted.", ("direction", "tls")
    ),
    "meshgate_tcp_connections_closed_total": Spec(
        "counter", "Client connections closed.", ("direction", "tls")
    ),
    "meshgate_tcp_connections_active": Spec(
        "gauge", "Client connections open now.", ("direction", "tls")
    ),
    "meshgate_tcp_connections_refused_total": Spec(
        "counter",
        "Client connections closed at accept, past a connection limit (the limit's key).",
        ("direction", "tls", "reason"),
    ),
    "meshgate_tls_handshakes_total": Spec(
        "counter",
        "TLS handshakes of clients, by outcome (ok, or the failure's reason).",
        ("direction", "outcome"),
    ),
    "meshgate_identity_cert_expiration_timestamp_seconds": Spec(
        "gauge",
        "When this proxy's mesh certificate expires (Unix time).",
        ("identity",),
        merge="max",
    ),
    # -- endpoints -----------------------------------------------------------------
    "meshgate_endpoint_state": Spec(
        "gauge",
        "1 for the state each endpoint is in (serving, ejected, down, unreachable).",
        ("upstream", "endpoint", "state"),
        merge="max",
    ),
    "meshgate_endpoint_ejections_total": Spec(
        "counter", "Times outlier detection ejected an endpoint.", ("upstream", "endpoint")
    ),
    "meshgate_endpoint_ewma_seconds": Spec(
        "gauge",
        "An endpoint's latency EWMA (the peak_ewma and least_request balancers' view).",
        ("upstream", "endpoint"),
        merge="max",
    ),
    "meshgate_endpoint_active_requests": Spec(
        "gauge", "Requests on an endpoint now.", ("upstream", "endpoint")
    ),
    "meshgate_pool_connections": Spec(
        "gauge",
        "Upstream connections per endpoint, by state (idle, busy, connecting).",
        ("upstream", "endpoint", "state"),
    ),
    "meshgate_circuit_breaker_open": Spec(
        "gauge",
        "1 while an upstream's circuit breaker refuses requests (max_requests reached).",
        ("upstream",),
        merge="max",
    ),
    "meshgate_circuit_breaker_refused_total": Spec(
        "counter", "Requests a circuit breaker refused.", ("upstream",)
    ),
    "meshgate_retry_budget_exhausted_total": Spec(
        "counter", "Retries refused because the retry budget was spent.", ("upstream",)
    ),
    # -- config --------------------------------------------------------------------
    "meshgate_config_generation": Spec(
        "gauge", "The generation of the config being served.", (), merge="max"
    ),
    "meshgate_config_reloads_total": Spec(
        "counter",
        "Config reloads, by outcome (ok, refused); workers reload in step, so the largest"
        " worker's count is the process's.",
        ("outcome",),
        merge="max",
    ),
    "meshgate_workers_scraped": Spec(
        "gauge", "Workers whose samples this scrape holds.", (), merge="sum"
    ),
    "meshgate_proxy_info": Spec(
        "gauge",
        "1 for each worker of this proxy, by its proxy id in the mesh (its push stream's):"
        " how the control plane tells which proxy a Prometheus target is.",
        ("proxy_id",),
        merge="max",
    ),
    # -- filters -------------------------------------------------------------------
    "meshgate_auth_requests_total": Spec(
        "counter", "Requests on routes with auth, by outcome.", ("route", "outcome")
    ),
    "meshgate_auth_failures_total": Spec(
        "counter",
        "Requests auth refused, by reason: missing_credentials, or the RFC 6750 error"
        " (invalid_token, invalid_request, insufficient_scope).",
        ("route", "reason"),
    ),
    "meshgate_consumer_requests_total": Spec(
        "counter",
        "Requests auth admitted, by route and consumer (the config's consumers).",
        ("route", "consumer"),
    ),
    "meshgate_authz_decisions_total": Spec(
        "counter",
        "Authorization decisions of routes with authz: (a sidecar's inbound policy), by"
        ' rule and source identity (at most 1000 sources per policy, then source="other").',
        ("policy", "decision", "rule", "source"),
    ),
    "meshgate_ratelimit_decisions_total": Spec(
        "counter", "Rate limit decisions, by outcome.", ("route", "limit", "policy", "outcome")
    ),
    "meshgate_ratelimit_limited_by_source_total": Spec(
        "counter",
        "Requests a limit refused, by source identity (limits by peer, and routes with"
        ' authz:; at most 1000 sources per limit, then source="other").',
        ("route", "limit", "source"),
    ),
    "meshgate_ratelimit_store_errors_total": Spec(
        "counter", "Redis calls that failed or timed out.", ()
    ),
    "meshgate_ratelimit_store_skipped_total": Spec(
        "counter", "Decisions that skipped Redis while it was marked down.", ()
    ),
    "meshgate_fault_injected_total": Spec(
        "counter", "Requests a route's fault: delayed or aborted.", ("route", "kind")
    ),
    "meshgate_jwks_fetches_total": Spec(
        "counter", "JWKS fetch attempts, per auth entry.", ("auth",)
    ),
    "meshgate_jwt_cache_lookups_total": Spec(
        "counter",
        "Bearer tokens looked up in a jwt entry's verified-token cache: hit (no signature"
        " check), or miss.",
        ("auth", "outcome"),
    ),
    "meshgate_split_requests_total": Spec(
        "counter",
        "Requests a route with split: sent to each upstream (canary matches included).",
        ("route", "upstream"),
    ),
    "meshgate_aggregate_responses_total": Spec(
        "counter",
        "Answers of aggregate: routes: complete, partial (an optional backend failed) or"
        " failed (a required one did).",
        ("route", "outcome"),
    ),
    "meshgate_aggregate_calls_total": Spec(
        "counter",
        "Backend calls of aggregate: routes, by outcome.",
        ("route", "backend", "outcome"),
    ),
    "meshgate_access_log_dropped_total": Spec(
        "counter", "Access log lines dropped because the writer fell behind.", ()
    ),
    "meshgate_trace_spans_total": Spec(
        "counter", "Spans handed to the exporter, and those it dropped.", ("outcome",)
    ),
}


REPORT_FAMILIES: tuple[str, ...] = (
    "meshgate_requests_total",
    "meshgate_request_duration_seconds",
    "meshgate_authz_decisions_total",
    "meshgate_split_requests_total",
    "meshgate_circuit_breaker_open",
    "meshgate_retry_budget_exhausted_total",
    "meshgate_upstream_try_failures_total",
    "meshgate_endpoint_state",
    "meshgate_ratelimit_decisions_total",
    "meshgate_auth_failures_total",
    "meshgate_consumer_requests_total",
    "meshgate_identity_cert_expiration_timestamp_seconds",
)
"""The families a proxy reports to the control plane (docs/dashboard-api.md)."""


def merge(parts: list[Samples]) -> Samples:
    """One set of samples from several workers' (see the module)."""
    out: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
    for part in parts:
        for name, samples in part.items():
            spec = SPECS.get(name)
            if spec is None:
                continue
            into = out.setdefault(name, {})
            for sample in samples:
                labels = tuple(sample[0])
                have = into.get(labels)
                if have is None:
                    into[labels] = [labels, *_copy(sample[1:])]
                    continue
                if spec.type == "histogram":
                    buckets, total, count = sample[1], sample[2], sample[3]
                    hb = have[1]
                    for i, n in enumerate(buckets):
                        hb[i] += n
                    have[2] += total
                    have[3] += count
                    if len(sample) > 4 and sample[4] > have[4]:
                        have[4] = sample[4]
                else:
                    if spec.merge == "max":
                        have[1] = max(have[1], sample[1])
                    else:
                        have[1] += sample[1]
                    if len(sample) > 2 and sample[2] > have[2]:
                        have[2] = sample[2]
    return {name: list(rows.values()) for name, rows in out.items()}


def _copy(values: list[Any]) -> list[Any]:
    return [list(v) if isinstance(v, list) else v for v in values]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[Any, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return str(v)


_LE = (*(_num(b) for b in BUCKETS), "+Inf")


def render(samples: Samples) -> str:
    """The Prometheus text format of merged samples, every known family
    (with its HELP and TYPE) in `SPECS` order."""
    lines: list[str] = []
    for name, spec in SPECS.items():
        rows = samples.get(name)
        lines.append(f"# HELP {name} {spec.help}")
        lines.append(f"# TYPE {name} {spec.type}")
        if not rows:
            continue
        rows = sorted(rows, key=lambda s: tuple(map(str, s[0])))
        if spec.type == "histogram":
            for sample in rows:
                labels = tuple(sample[0])
                buckets, total, count = sample[1], sample[2], sample[3]
                acc = 0
                for le, n in zip(_LE, buckets, strict=True):
                    acc += n
                    le_label = 'le="' + le + '"'
                    lines.append(f"{name}_bucket{_labels(spec.labels, labels, le_label)} {acc}")
                lab = _labels(spec.labels, labels)
                lines.append(f"{name}_sum{lab} {_num(float(total))}")
                lines.append(f"{name}_count{lab} {count}")
        else:
            for sample in rows:
                lines.append(f"{name}{_labels(spec.labels, tuple(sample[0]))} {_num(sample[1])}")
    return "\n".join(lines) + "\n"


_BOUNDS = (*(float(b) for b in BUCKETS), math.inf)


class NotSamples(ValueError):
    """A page (or a Prometheus's copy of it) that is not what `render` makes."""


def from_scrape(scrape: Scrape, families: Iterable[str] | None = None) -> Samples:
    """The samples of a parsed page (`scrape.parse`), those of `families`
    (all of `SPECS` without it), as `render` was given them: labels in
    `Spec.labels` order (one a page lacks is "", as Prometheus drops empty
    ones; others are left out: `job`, `instance`...), histograms as
    `[buckets, sum, count]` with their buckets no longer cumulative. A
    histogram series without every bucket of `requests.BUCKETS`, its sum
    and its count is `NotSamples`."""
    out: Samples = {}
    for name in SPECS if families is None else families:
        spec = SPECS.get(name)
        if spec is None or name not in scrape.families:
            continue
        if spec.type != "histogram":
            plain = [
                [tuple(s.label(n) for n in spec.labels), s.value] for s in scrape.samples(name)
            ]
            if plain:
                out[name] = plain
            continue
        cumulative: dict[tuple[str, ...], dict[float, float]] = {}
        for s in scrape.samples(name, "_bucket"):
            key = tuple(s.label(n) for n in spec.labels)
            try:
                le = float(s.label("le"))
            except ValueError:
                raise NotSamples(f"{name}_bucket: le={s.label('le')!r}") from None
            cumulative.setdefault(key, {})[le] = s.value
        sums = {
            tuple(s.label(n) for n in spec.labels): s.value for s in scrape.samples(name, "_sum")
        }
        counts = {
            tuple(s.label(n) for n in spec.labels): s.value for s in scrape.samples(name, "_count")
        }
        rows: list[list[Any]] = []
        for key, by_le in cumulative.items():
            if set(by_le) != set(_BOUNDS) or key not in sums or key not in counts:
                raise NotSamples(f"{name}{dict(zip(spec.labels, key, strict=True))}: not whole")
            acc = [by_le[b] for b in _BOUNDS]
            buckets = [acc[0], *(b - a for a, b in itertools.pairwise(acc))]
            rows.append([key, buckets, sums[key], counts[key]])
        if rows:
            out[name] = rows
    return out
