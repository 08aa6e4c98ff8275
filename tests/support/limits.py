"""Rate-limit specs for tests, in seconds rather than the microseconds the code uses."""

from __future__ import annotations

from meshgate.ratelimit import LimitSpec

SECOND = 1_000_000


def spec(
    limit: int, period_s: float, burst: int | None = None, algorithm: str = "gcra"
) -> LimitSpec:
    return LimitSpec(
        limit=limit,
        period_us=round(period_s * SECOND),
        burst=limit if burst is None else burst,
        algorithm=algorithm,
    )
