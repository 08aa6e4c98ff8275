"""Load balancers: pick one endpoint of a cluster for each request.

- `RoundRobin` cycles through endpoints in order.
- `LeastRequest` is power-of-two-choices on requests in flight: two endpoints
  are drawn at random and the less loaded one wins. It avoids the herd that
  "pick the global minimum" causes when many requests arrive at once.
- `PeakEwma` is Linkerd's and Finagle's balancer: power-of-two-choices on
  cost = peak-EWMA latency x (requests in flight + 1). A slow response moves
  the average up at once (the peak), and it decays back over `decay` seconds.

Each endpoint keeps its own counters (`Endpoint.active`, `Endpoint.ewma`)
and the balancer only reads them. A reload builds new endpoints, so the
counters start afresh while the pools (and their warm connections) are kept.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from meshgate.upstream.pool import EndpointPool


def _two_of(eps: tuple[Endpoint, ...]) -> tuple[Endpoint, Endpoint]:
    """Two distinct endpoints drawn at random (power of two choices)."""
    n = len(eps)
    a = random.randrange(n)
    b = random.randrange(n - 1)
    if b >= a:
        b += 1
    return eps[a], eps[b]


class Endpoint:
    """One address of a cluster, with its pool and load counters."""

    __slots__ = (
        "active",
        "authority",
        "balancer",
        "ejected_until",
        "ejections",
        "ewma",
        "ewma_stamp",
        "failures_5xx",
        "failures_gateway",
        "health_down",
        "pool",
        "probe",
        "probe_delay",
        "probe_task",
        "retired",
        "shunned_until",
        "unreachable",
        "window_failed",
        "window_ok",
    )

    def __init__(self, pool: EndpointPool, authority: bytes) -> None:
        self.pool = pool
        self.balancer: Balancer = _NO_BALANCER  # set by the balancer that owns it
        self.authority = authority
        self.active = 0
        self.ewma = 0.0
        self.ewma_stamp = 0.0
        # Outlier detection (see outlier.py); 0.0 = in service.
        self.ejected_until = 0.0
        self.ejections = 0
        self.failures_5xx = 0
        self.failures_gateway = 0
        # Active health checks (see health.py): True once the endpoint failed
        # `unhealthy_threshold` checks in a row, until it passes enough again.
        self.health_down = False
        # A connect was refused or timed out: out of rotation, probed with
        # backoff until a connect succeeds (see reachability.py).
        self.unreachable = False
        self.probe: asyncio.TimerHandle | None = None
        self.probe_task: asyncio.Task[None] | None = None
        self.probe_delay = 0.0
        self.retired = False
        # Answered 429 or 503 lately: picked only when nothing else can serve,
        # until this time.monotonic() instant.
        self.shunned_until = 0.0
        # Answers in the outlier detector's current success-rate window.
        self.window_ok = 0
        self.window_failed = 0

    @property
    def in_service(self) -> bool:
        """Not ejected by outlier detection, not down by health checks, and
        accepting connections."""
        return not self.ejected_until and not self.health_down and not self.unreachable


class Balancer:
    """Chooses an endpoint; `observe` is told each request's latency."""

    __slots__ = ("all", "avoid_until", "endpoints", "name")

    needs_latency = False

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.all = tuple(endpoints)
        # The endpoints in service: `refresh` replaces this tuple when outlier
        # detection or a health check takes one out or puts it back.
        self.endpoints = self.all
        self.avoid_until = 0.0  # the latest shunned_until of its endpoints
        self.name = ""  # the cluster's, for logs
        for ep in self.all:
            ep.balancer = self

    def refresh(self) -> None:
        """Rebuild the in-service tuple from each endpoint's state: those
        in service. Never none: when every endpoint is out, all of them serve
        (a guess beats a certain 503; a connect refused is answered at once)."""
        self.endpoints = tuple(e for e in self.all if e.in_service) or self.all

    def pick(self) -> Endpoint:
        raise NotImplementedError

    def steer(self, ep: Endpoint) -> Endpoint:
        """`ep`, or another endpoint when `ep` answered 429/503 lately and
        another has not (one float compare when no endpoint did)."""
        until = self.avoid_until
        if not until:
            return ep
        now = time.monotonic()
        if now >= until:
            self.avoid_until = 0.0
            return ep
        if ep.shunned_until <= now:
            return ep
        eps = self.endpoints
        n = len(eps)
        start = random.randrange(n) if n > 1 else 0
        for k in range(n):
            other = eps[(start + k) % n]
            if other.shunned_until <= now:
                return other
        return ep

    def observe(self, endpoint: Endpoint, latency: float, now: float) -> None:
        return None


_NO_BALANCER = Balancer(())


SHUN_TIME = 5.0
"""How long an endpoint that answered 429 or 503 is avoided (unless its
Retry-After says otherwise, up to SHUN_MAX)."""
SHUN_MAX = 30.0


def shun(ep: Endpoint, seconds: float | None) -> None:
    """`ep` answered 429 or 503: steer picks away from it for a while. At most
    half of the endpoints are avoided at once (a 429 may be one tenant's
    quota, and the rest must not herd onto one endpoint)."""
    now = time.monotonic()
    balancer = ep.balancer
    if ep.shunned_until <= now:
        shunned = sum(1 for e in balancer.all if e.shunned_until > now)
        if (shunned + 1) * 2 > len(balancer.all):
            return
    until = now + min(seconds if seconds is not None else SHUN_TIME, SHUN_MAX)
    ep.shunned_until = until
    if until > balancer.avoid_until:
        balancer.avoid_until = until


class RoundRobin(Balancer):
    __slots__ = ("_next",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        super().__init__(endpoints)
        self._next = random.randrange(len(self.endpoints)) if self.endpoints else 0

    def pick(self) -> Endpoint:
        eps = self.endpoints
        i = self._next
        if i >= len(eps):
            i = 0
        self._next = i + 1
        return self.steer(eps[i])


class LeastRequest(Balancer):
    __slots__ = ()

    def pick(self) -> Endpoint:
        eps = self.endpoints
        if len(eps) == 1:
            return eps[0]
        ea, eb = _two_of(eps)
        return self.steer(ea if ea.active <= eb.active else eb)


class PeakEwma(Balancer):
    __slots__ = ("decay", "default_rtt")

    needs_latency = True

    def __init__(
        self, endpoints: Sequence[Endpoint], *, decay: float = 10.0, default_rtt: float = 0.001
    ) -> None:
        super().__init__(endpoints)
        self.decay = decay
        self.default_rtt = default_rtt

    def _cost(self, ep: Endpoint) -> float:
        rtt = ep.ewma or self.default_rtt
        return rtt * (ep.active + 1)

    def pick(self) -> Endpoint:
        eps = self.endpoints
        if len(eps) == 1:
            return eps[0]
        ea, eb = _two_of(eps)
        return self.steer(ea if self._cost(ea) <= self._cost(eb) else eb)

    def observe(self, endpoint: Endpoint, latency: float, now: float) -> None:
        if latency > endpoint.ewma:
            endpoint.ewma = latency  # the peak: react to a slowdown at once
        else:
            elapsed = max(now - endpoint.ewma_stamp, 0.0)
            w = math.exp(-elapsed / self.decay)
            endpoint.ewma = endpoint.ewma * w + latency * (1.0 - w)
        endpoint.ewma_stamp = now


BALANCERS: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "ewma": PeakEwma,
}
