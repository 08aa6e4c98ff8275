"""Rate limiting: the decision math shared by every store.

Two algorithms, both as pure functions over integer microseconds so that the
in-process `SharedTable` (`meshgate.ratelimit.local`) and the Redis Lua
scripts (`meshgate.ratelimit.redis`) take exactly the same decisions:

- `gcra`: the generic cell rate algorithm, i.e. a token bucket of `burst`
  tokens refilled one every `interval_us = period_us // limit`. Its whole
  state is one number, the theoretical arrival time (TAT).
- `sliding_window`: a counter per fixed window of `period_us` (aligned to
  multiples of the period), the previous window's count weighted by how much
  of it still overlaps the sliding window.

No float ever accumulates: state and arithmetic are integers, so exactly
`burst` requests pass at one instant, never `burst - 1` or `burst + 1`.
Seconds (`Decision.reset`, `Decision.retry_after`) are only computed at the
end, as `microseconds / 1e6`.

Denied requests change no state: a client that keeps retrying while limited
is not pushed further into the future.

Every product the math forms stays below 2**53, so Lua (whose numbers are
doubles) computes the same integers as Python; `LimitSpec` checks that or
coarsens the sliding window's clock (`tick_us`) for absurdly large limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshgate.config.schema import RateLimitConfig

__all__ = ["ALGORITHMS", "Decision", "LimitSpec", "gcra", "sliding_window"]

ALGORITHMS = ("gcra", "sliding_window")

# Lua numbers are doubles: integers are exact below 2**53. The bounds below
# keep every intermediate value (with an absolute time of ~2**51 us, the
# Unix epoch in microseconds, added to it) under that.
_GCRA_MAX_TOLERANCE_US = 1 << 50
_SLIDING_MAX_PRODUCT = 1 << 52


@dataclass(slots=True)
class Decision:
    """The answer for one request."""

    allowed: bool
    remaining: int
    """Requests that would still be allowed right now, after this one."""
    reset: float
    """Seconds until the quota is fully available again (gcra), or until the
    end of the current window (sliding_window)."""
    retry_after: float
    """Seconds until the next request would be allowed; 0.0 when allowed."""
    limit: int
    """The spec's limit, for the RateLimit header fields."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit, in the integer units the algorithms work in.

    `interval_us` (gcra) is the time one request's token takes to refill,
    `period_us // limit` rounded down (at most `limit - 1` microseconds per
    period more permissive than the exact rate; never less). `tick_us`
    (sliding_window) is the clock resolution: 1 unless `limit * period_us`
    would reach 2**52, then the smallest power of ten that brings it under.
    """

    limit: int
    period_us: int
    burst: int
    algorithm: str
    interval_us: int = field(init=False)
    tick_us: int = field(init=False)
    period_ticks: int = field(init=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown rate limit algorithm {self.algorithm!r}")
        if self.limit < 1 or self.burst < 1:
            raise ValueError("a rate limit's limit and burst must be at least 1")
        if self.period_us < 1:
            raise ValueError("a rate limit's period must be at least 1 microsecond")
        interval = max(1, self.period_us // self.limit)
        if self.burst * interval > _GCRA_MAX_TOLERANCE_US:
            raise ValueError("a rate limit's burst times its refill interval is too large")
        tick = 1
        while self.limit * (self.period_us // tick) >= _SLIDING_MAX_PRODUCT:
            tick *= 10
        if self.period_us // tick < 1:
            raise ValueError("a rate limit's limit is too large for its period")
        object.__setattr__(self, "interval_us", interval)
        object.__setattr__(self, "tick_us", tick)
        object.__setattr__(self, "period_ticks", self.period_us // tick)

    @classmethod
    def from_config(
        cls,
        cfg: RateLimitConfig,
        *,
        limit: int | None = None,
        period: float | None = None,
    ) -> LimitSpec:
        """The spec of `cfg`, with `limit` and/or `period` (seconds) replaced
        when given (a consumer's own rate). `burst` defaults to the limit."""
        lim = cfg.limit if limit is None else limit
        seconds = cfg.period if period is None else period
        return cls(
            limit=lim,
            period_us=round(seconds * 1_000_000),
            burst=lim if cfg.burst is None else cfg.burst,
            algorithm=cfg.algorithm,
        )


def gcra(now_us: int, tat_us: int, spec: LimitSpec) -> tuple[Decision, int | None]:
    """One gcra decision at `now_us` with the stored TAT `tat_us` (0 when
    there is none). Returns the decision and the TAT to store, or None when
    the request is denied (the stored TAT must stay as it was).

    The key can be forgotten once `now_us >= tat`: it is then back to a full
    burst, exactly like a key never seen.
    """
    interval = spec.interval_us
    tolerance = spec.burst * interval
    tat = tat_us if tat_us > now_us else now_us
    new_tat = tat + interval
    allow_at = new_tat - tolerance
    if now_us < allow_at:
        return Decision(False, 0, (tat - now_us) / 1e6, (allow_at - now_us) / 1e6, spec.limit), None
    remaining = (now_us + tolerance - new_tat) // interval
    return Decision(True, remaining, (new_tat - now_us) / 1e6, 0.0, spec.limit), new_tat


def sliding_window(
    now_us: int, window_start_us: int, prev: int, cur: int, spec: LimitSpec
) -> tuple[Decision, tuple[int, int, int] | None]:
    """One sliding-window decision at `now_us` with the stored state
    (`window_start_us`, `prev`, `cur`; all 0 when there is none). Returns the
    decision and the state to store, or None when the request is denied.

    Windows are `period` long and start at multiples of it. When the stored
    window is the one before the current one its count becomes `prev`; when
    it is older, both counts are 0. The estimate is
    `prev * (period - elapsed) // period + cur`; the request is allowed when
    `estimate + 1 <= limit`, and then counted in `cur`.

    `retry_after` is exact, assuming no other request is allowed meanwhile:
    the first instant where the weighted `prev` has shrunk enough, in this
    window or (when `cur` alone is at the limit) in the next one. It is
    always > 0 when denied. `reset` is the time until the current window
    ends. The state can be forgotten at `window_start + 2 * period`.
    """
    tick = spec.tick_us
    period = spec.period_ticks
    limit = spec.limit
    now = now_us // tick
    start = now // period * period
    stored = window_start_us // tick
    if stored != start:
        if stored + period == start:
            prev, cur = cur, 0
        else:
            prev, cur = 0, 0
    elapsed = now - start
    estimate = prev * (period - elapsed) // period + cur
    reset_us = (start + period) * tick - now_us
    if estimate < limit:
        return (
            Decision(True, limit - estimate - 1, reset_us / 1e6, 0.0, limit),
            (start * tick, prev, cur + 1),
        )
    room = limit - 1 - cur
    if room >= 0:
        # Here prev > 0 (estimate >= limit > cur). The first elapsed e with
        # prev * (period - e) // period <= room, i.e.
        # prev * (period - e) <= (room + 1) * period - 1.
        allow_at = start + period - ((room + 1) * period - 1) // prev
    else:
        # cur alone is at the limit: in the next window cur is prev, and the
        # same bound applies with room = limit - 1 and nothing counted yet.
        allow_at = start + 2 * period - (limit * period - 1) // cur
    retry_us = allow_at * tick - now_us
    return Decision(False, 0, reset_us / 1e6, retry_us / 1e6, limit), None
