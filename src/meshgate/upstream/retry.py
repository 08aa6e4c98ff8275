"""Retry policies (compiled per route) and retry budgets (per upstream).

A `RetryPolicy` is a route's `retry:` turned into what a failed try needs
to decide at once: the causes and statuses it retries, the backoff, the
per-try timeout.

A `RetryBudget` is Linkerd's: over a sliding window (10 one-second buckets
of the configured window), retries may add at most `ratio` x requests plus
`min_per_second` x window. It is on by default, so that when an upstream
fails as a whole the retries stop instead of multiplying its load (a retry
storm). A refused retry is counted, and logged at most once a second.
"""

from __future__ import annotations

import logging
import random
from typing import Protocol

from meshgate.config.schema import RetryBudgetConfig, RetryConfig
from meshgate.http.headers import IDEMPOTENT

__all__ = ["RetryBudget", "RetryPolicy", "RetryTarget"]

log = logging.getLogger("meshgate.upstream")

_BUCKETS = 10
_GATEWAY = frozenset({502, 503, 504})


class RetryTarget(Protocol):
    """What a retry decision reads and counts on the upstream it goes to (a
    `Cluster`): its breaker's `max_retries`, its retries in flight, its
    budget, and the count of retries allowed."""

    retries_active: int
    retried: int

    @property
    def max_retries(self) -> int | None: ...

    @property
    def budget(self) -> RetryBudget: ...


class RetryPolicy:
    __slots__ = (
        "attempts",
        "base",
        "cap",
        "causes",
        "non_idempotent",
        "per_try_timeout",
        "statuses",
    )

    def __init__(self, cfg: RetryConfig) -> None:
        self.attempts = cfg.attempts
        self.per_try_timeout = cfg.per_try_timeout
        self.base = cfg.backoff.base
        self.cap = cfg.backoff.max
        self.non_idempotent = cfg.non_idempotent
        on = set(cfg.on)
        self.causes = frozenset(on & {"connect-failure", "reset", "timeout"})
        statuses: set[int] = set()
        if "gateway-error" in on:
            statuses |= _GATEWAY
        if "5xx" in on:
            statuses |= set(range(500, 600))
        if "retriable-4xx" in on:
            statuses.add(409)
        statuses |= {int(x) for x in on if x.isdigit()}
        self.statuses = frozenset(statuses)
        if "gateway-error" in on or "5xx" in on:
            # A gateway error includes the failures a gateway sees itself,
            # a try that ran out of time among them (as in Envoy).
            self.causes |= {"connect-failure", "reset", "timeout"}

    def backoff(self, retry: int) -> float:
        """Full jitter: a random wait below min(cap, base x 2^(retry-1))."""
        return random.uniform(0.0, min(self.cap, self.base * (1 << min(retry - 1, 20))))

    def next_delay(
        self,
        cluster: RetryTarget,
        cause: str,
        attempt: int,
        *,
        method: bytes,
        sent: bool,
        now: float,
        deadline: float,
        retry_after: float | None = None,
        free: bool = False,
    ) -> float | None:
        """The wait before try `attempt + 1` after a try failed with `cause`
        (a status as digits, or connect-failure, reset, timeout), or None
        when that failure is the answer: the attempts, the cause, the method
        (a request that was sent is repeated only when idempotent), the
        breaker's `max_retries`, an upstream's `Retry-After` beyond the cap,
        the deadline and the budget all have their say. A retry allowed is
        drawn from the budget and counted in `cluster.retried`; a `free` one
        (a connect that failed, to go to an untried endpoint) goes at once and
        draws nothing from the budget."""
        if attempt >= self.attempts:
            return None
        if cause.isdigit():
            if int(cause) not in self.statuses:
                return None
        elif cause not in self.causes:
            return None
        if sent and not (method in IDEMPOTENT or self.non_idempotent):
            return None  # the upstream may have acted on it
        limit = cluster.max_retries
        if limit is not None and cluster.retries_active >= limit:
            return None
        if retry_after is not None and retry_after > self.cap:
            return None  # the upstream asks for longer than retries may wait
        delay = 0.0 if free else self.backoff(attempt)
        if retry_after is not None:
            delay = retry_after
        if now + delay >= deadline:
            return None
        if not free and not cluster.budget.try_retry(now):
            return None
        cluster.retried += 1
        return delay


class RetryBudget:
    __slots__ = (
        "bucket_len",
        "buckets_at",
        "exhausted",
        "last_log",
        "min_retries",
        "name",
        "ratio",
        "requests",
        "retries",
    )

    def __init__(self, name: str, cfg: RetryBudgetConfig) -> None:
        self.name = name
        self.ratio = cfg.ratio
        self.min_retries = cfg.min_per_second * cfg.window
        self.bucket_len = cfg.window / _BUCKETS
        self.requests = [0] * _BUCKETS
        self.retries = [0] * _BUCKETS
        self.buckets_at = [0] * _BUCKETS  # which tick each bucket holds
        self.exhausted = 0
        self.last_log = 0.0

    def _slot(self, now: float) -> int:
        tick = int(now / self.bucket_len)
        i = tick % _BUCKETS
        if self.buckets_at[i] != tick:
            self.buckets_at[i] = tick
            self.requests[i] = 0
            self.retries[i] = 0
        return i

    def _live(self, now: float) -> tuple[int, int]:
        tick = int(now / self.bucket_len)
        requests = retries = 0
        for i in range(_BUCKETS):
            if tick - self.buckets_at[i] < _BUCKETS:
                requests += self.requests[i]
                retries += self.retries[i]
        return requests, retries

    def request(self, now: float) -> None:
        """A first try went out."""
        self.requests[self._slot(now)] += 1

    def try_retry(self, now: float) -> bool:
        """May one more retry go out? (It is counted when it may.)"""
        requests, retries = self._live(now)
        if retries + 1 > self.ratio * requests + self.min_retries:
            self.exhausted += 1
            if now - self.last_log >= 1.0:
                self.last_log = now
                log.warning(
                    "upstream %s: retry budget exhausted (%d retries for %d requests in the "
                    "window); failed tries are answered without a retry",
                    self.name,
                    retries,
                    requests,
                )
            return False
        self.retries[self._slot(now)] += 1
        return True
