"""What `meshgate check` says about a valid config: a summary, and what is not enforced."""

from __future__ import annotations

import json

from meshgate.config.schema import (
    Config,
    CorsConfig,
    OutlierDetectionConfig,
    RateLimitConfig,
    RouteConfig,
)

__all__ = ["describe"]

_PERIODS = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "day"}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rate(rate: RateLimitConfig) -> str:
    unit = _PERIODS.get(rate.period)
    if unit is not None:
        return f"{rate.limit}/{unit}"
    return f"{rate.limit}/{rate.period:g}s"


def _label(index: int, route: RouteConfig) -> str:
    name = f"{route.name}, " if route.name else ""
    return f"routes[{index}] ({name}{route.path})"


def _share(weight: int, total: int) -> str:
    share = 100 * weight / total
    return f"{share:.0f}%" if share == round(share) else f"{share:.3g}%"


def _split(route: RouteConfig) -> list[str]:
    """What a `split:` route does with its requests, and what to know about it."""
    weights: dict[str, int] = {}
    for b in route.split or ():
        weights[b.upstream] = weights.get(b.upstream, 0) + b.weight
    total = sum(weights.values())
    how = {None: "random per request", "ip": "sticky by client IP"}.get(
        route.sticky, f"sticky by {(route.sticky or '').replace(':', ' ')}"
    )
    lines = [
        "split "
        + ", ".join(f"{n} {_share(w, total)} (weight {w})" for n, w in weights.items())
        + f", {how}"
    ]
    for c in route.canary or ():
        source = f"header {c.header}" if c.header is not None else f"cookie {c.cookie}"
        test = " present" if c.value is None else f" = {json.dumps(c.value)}"
        lines.append(f"canary: {source}{test} -> {c.upstream}")
    canaried = {c.upstream for c in route.canary or ()}
    for name, weight in weights.items():
        if weight == 0:
            gets = "only canary matches" if name in canaried else "no requests"
            lines.append(f"split: {name} has weight 0 and gets {gets}")
    if route.sticky == "consumer" and route.auth is None:
        lines.append("sticky: consumer without auth: every request is sticky by client IP")
    return lines


def _cors(cors: CorsConfig, inherited: bool) -> str:
    """`CORS for https://app.example.com (GET, POST; credentials; max age 600s)`."""
    how = [", ".join(cors.methods)]
    if cors.headers:
        how.append("headers " + ", ".join(cors.headers))
    if cors.credentials:
        how.append("credentials")
    if cors.max_age is not None:
        how.append(f"max age {cors.max_age:g}s")
    origins = "any origin" if "*" in cors.origins else ", ".join(cors.origins)
    source = "; from the top-level cors:" if inherited else ""
    return f"CORS for {origins} ({'; '.join(how)}{source})"


def _aggregate(route: RouteConfig) -> str:
    agg = route.aggregate
    assert agg is not None
    calls = []
    for b in agg.backends:
        notes = [b.upstream]
        if not b.required:
            notes.append("optional")
        if b.timeout is not None:
            notes.append(f"{b.timeout:g}s")
        calls.append(f"{b.group or '(merged)'} ({', '.join(notes)})")
    return f"aggregate {', '.join(calls)} within {agg.timeout:g}s"


def _transform(route: RouteConfig) -> str:
    t = route.transform
    assert t is not None
    sides = []
    for side, part in (("request", t.request), ("response", t.response)):
        if part is None:
            continue
        names = [
            name
            for name in ("headers", "path", "query", "status", "body")
            if getattr(part, name, None)
        ]
        if names:
            sides.append(f"{side} {', '.join(names)}")
    body = f" (bodies buffered up to {t.max_body} bytes)" if t.buffers() else ""
    return f"transform: {'; '.join(sides) or 'nothing'}{body}"


def describe(config: Config) -> list[str]:
    """Human-readable lines: a summary first, then one notice per thing to know."""
    summary = (
        f"{_plural(len(config.upstreams), 'upstream')}, {_plural(len(config.routes), 'route')}, "
        f"listening on {config.listen}"
    )
    summary += f", admin on {config.admin}" if config.admin else ", no admin listener"
    if config.workers != 1:
        summary += f", {config.workers} workers"
    lines = [summary]
    if not config.routes:
        lines.append("no routes are defined: no request will be forwarded to an upstream")
    used = {name for route in config.routes for name in route.upstream_names()}
    for name, upstream in config.upstreams.items():
        if name not in used:
            lines.append(f"upstreams.{name} is not used by any route")
        accrual = _accrual(upstream.outlier_detection)
        if accrual is not None:
            lines.append(f"upstreams.{name}: {accrual}")
        hc = upstream.health_check
        if hc is not None:
            passes = "1 pass" if hc.healthy_threshold == 1 else f"{hc.healthy_threshold} passes"
            lines.append(
                f"upstreams.{name}: health check GET {hc.path} every {hc.interval:g}s "
                f"(timeout {hc.timeout:g}s; out after {_plural(hc.unhealthy_threshold, 'failure')}"
                f" in a row, back after {passes})"
            )
    for i, route in enumerate(config.routes):
        if route.split is not None:
            lines += [f"{_label(i, route)}: {line}" for line in _split(route)]
        cors = config.route_cors(route)
        if cors is not None:
            lines.append(f"{_label(i, route)}: {_cors(cors, route.cors is None)}")
            if route.methods is not None and "OPTIONS" not in route.methods:
                lines.append(
                    f"{_label(i, route)}: methods has no OPTIONS, so CORS preflights "
                    "do not match this route"
                )
        if route.auth is not None:
            lines.append(f"{_label(i, route)}: auth by any of {', '.join(route.auth.use)}")
        if route.authz is not None:
            az = route.authz
            lines.append(
                f"{_label(i, route)}: authz default {az.default}, {len(az.rules)} rule"
                + ("" if len(az.rules) == 1 else "s")
                + (" (audit: denials are logged, not enforced)" if az.mode == "audit" else "")
            )
        for rl in route.rate_limits():
            lines.append(
                f"{_label(i, route)}: rate limit {_rate(rl)} per {rl.key} "
                f"({rl.algorithm}, {rl.policy}"
                + (f", on Redis errors {rl.on_store_error})" if rl.policy == "redis" else ")")
            )
        fault = route.fault
        if fault is not None:
            kinds = []
            if fault.delay is not None:
                kinds.append(f"delay {fault.delay.duration:g}s on {fault.delay.percent:g}%")
            if fault.abort is not None:
                kinds.append(f"abort {fault.abort.status} on {fault.abort.percent:g}%")
            lines.append(
                f"{_label(i, route)}: fault injection: {', '.join(kinds)} of requests"
                + (" matching its headers" if fault.headers else "")
            )
        if route.aggregate is not None:
            lines.append(f"{_label(i, route)}: {_aggregate(route)}")
        if route.transform is not None:
            lines.append(f"{_label(i, route)}: {_transform(route)}")
    for name, entry in config.auth.items():
        if entry.type == "api_key" and not any(c.api_keys for c in config.consumers.values()):
            lines.append(f"auth.{name}: no consumer has an API key, so no key is accepted")
    if config.upstreams and all(
        u.outlier_detection == _DEFAULT_ACCRUAL for u in config.upstreams.values()
    ):
        lines.append(
            "failure accrual is on for every upstream (outlier_detection's defaults): an "
            "endpoint is ejected after 5 5xx answers or 3 gateway failures in a row"
        )
    return lines


_DEFAULT_ACCRUAL = OutlierDetectionConfig()


def _accrual(od: OutlierDetectionConfig | None) -> str | None:
    """What `check` says of an upstream's failure accrual when it is not the
    default (the default is said once, for all)."""
    if od is None:
        return (
            "failure accrual is off (outlier_detection: false); only endpoints that "
            "refuse connections leave rotation"
        )
    if od == _DEFAULT_ACCRUAL:
        return None
    rules = []
    if od.consecutive_5xx:
        rules.append(f"{od.consecutive_5xx} 5xx answers")
    if od.consecutive_gateway_failure:
        rules.append(f"{od.consecutive_gateway_failure} gateway failures")
    after = " or ".join(rules) + " in a row" if rules else "a low success rate"
    return (
        f"failure accrual is on: an endpoint is ejected after {after}, for "
        f"{od.base_ejection_time:g}s at first (at most {od.max_ejection_percent}% out at once)"
    )
