"""What `meshgate check` says about a valid config: a summary, and what is not enforced."""

from __future__ import annotations

from meshgate.config.schema import Config, RateLimitConfig, RouteConfig

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
    for name in config.upstreams:
        if name not in used:
            lines.append(f"upstreams.{name} is not used by any route")
    for i, route in enumerate(config.routes):
        if route.auth is not None:
            lines.append(f"{_label(i, route)}: auth by any of {', '.join(route.auth.use)}")
        rl = route.rate_limit
        if rl is not None:
            lines.append(
                f"{_label(i, route)}: rate limit {_rate(rl)} per {rl.key} "
                f"({rl.algorithm}, {rl.policy}"
                + (f", on Redis errors {rl.on_store_error})" if rl.policy == "redis" else ")")
            )
    for name, entry in config.auth.items():
        if entry.type == "api_key" and not any(c.api_keys for c in config.consumers.values()):
            lines.append(f"auth.{name}: no consumer has an API key, so no key is accepted")
    return lines
