"""Passive health (outlier detection): endpoints that keep failing are ejected.

Each answer an endpoint gives is reported here by the exchange: a success
resets its counters; a 5xx, or a gateway failure (connect failure, reset,
timeout, an unparsable response), adds one. After `consecutive_5xx` failures
in a row (or `consecutive_gateway_failure` gateway failures in a row) the
endpoint is ejected: the balancer's endpoint list is rebuilt without it
(`Balancer.refresh`, shared with active health checks), so picking costs
nothing more per request. The n-th ejection of an endpoint lasts n x
`base_ejection_time` (up to `max_ejection_time`); then a timer puts it back
(unless its health checks hold it out). At most `max_ejection_percent` of
the endpoints are ejected at once, and never all of them.

Every ejection and return is logged, and visible in `GET /upstreams`.
State lives with the cluster's endpoints, so a reload starts it afresh.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshgate.config.schema import OutlierDetectionConfig

if TYPE_CHECKING:
    from meshgate.upstream.balancer import Balancer, Endpoint

__all__ = ["OutlierDetector"]

log = logging.getLogger("meshgate.upstream")


class OutlierDetector:
    __slots__ = (
        "all",
        "balancer",
        "base",
        "cluster",
        "limit_5xx",
        "limit_gateway",
        "loop",
        "max_ejected",
        "max_time",
        "rate_interval",
        "rate_minimum",
        "rate_volume",
        "timers",
        "window_end",
    )

    def __init__(
        self,
        cluster: str,
        cfg: OutlierDetectionConfig,
        balancer: Balancer,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.cluster = cluster
        self.balancer = balancer
        self.all = balancer.all
        self.loop = loop
        self.limit_5xx = cfg.consecutive_5xx or 0
        self.limit_gateway = cfg.consecutive_gateway_failure or 0
        self.base = cfg.base_ejection_time
        self.max_time = cfg.max_ejection_time
        n = len(self.all)
        self.max_ejected = min(n - 1, n * cfg.max_ejection_percent // 100)
        self.timers: list[asyncio.TimerHandle] = []
        self.rate_minimum = cfg.success_rate_minimum
        self.rate_volume = cfg.success_rate_request_volume
        self.rate_interval = cfg.success_rate_interval
        self.window_end = loop.time() + self.rate_interval

    def success(self, ep: Endpoint) -> None:
        ep.failures_5xx = 0
        ep.failures_gateway = 0
        if self.rate_minimum is not None:
            ep.window_ok += 1
            self._window()

    def _window(self) -> None:
        """At the end of each success-rate window (checked as answers come,
        no timer), eject the endpoints whose rate fell below the minimum."""
        now = self.loop.time()
        if now < self.window_end:
            return
        self.window_end = now + self.rate_interval
        minimum = self.rate_minimum
        assert minimum is not None
        for ep in self.all:
            total = ep.window_ok + ep.window_failed
            rate = ep.window_ok / total if total else 1.0
            ep.window_ok = ep.window_failed = 0
            if total >= self.rate_volume and rate < minimum and not ep.ejected_until:
                self.eject(
                    ep, f"a success rate of {rate:.0%} over {total} answers, below {minimum:.0%}"
                )

    def failure(self, ep: Endpoint, *, gateway: bool) -> None:
        """A 5xx answer (`gateway=False`) or a gateway failure (`True`, which
        also counts as a 5xx, as in Envoy)."""
        if self.rate_minimum is not None:
            ep.window_failed += 1
            self._window()
        ep.failures_5xx += 1
        if gateway:
            ep.failures_gateway += 1
        if ep.ejected_until:
            return
        if (self.limit_5xx and ep.failures_5xx >= self.limit_5xx) or (
            self.limit_gateway and gateway and ep.failures_gateway >= self.limit_gateway
        ):
            self.eject(ep, "consecutive gateway failures" if gateway else "consecutive 5xx answers")

    def eject(self, ep: Endpoint, why: str) -> None:
        # Endpoints out for any reason count, health checks' included.
        ejected = sum(1 for e in self.all if not e.in_service)
        if ejected >= self.max_ejected:
            # Counted afresh: the next warning comes after as many failures.
            ep.failures_5xx = ep.failures_gateway = 0
            log.warning(
                "upstream %s: %s is failing (%s) but stays in: %d of %d endpoints are "
                "already ejected (max_ejection_percent)",
                self.cluster,
                ep.authority.decode(),
                why,
                ejected,
                len(self.all),
            )
            return
        ep.ejections += 1
        duration = min(self.base * ep.ejections, self.max_time)
        ep.ejected_until = self.loop.time() + duration
        ep.failures_5xx = ep.failures_gateway = 0
        self.balancer.refresh()
        self.timers.append(self.loop.call_later(duration, self.restore, ep))
        log.warning(
            "upstream %s: ejected %s for %gs after %s (ejection #%d)",
            self.cluster,
            ep.authority.decode(),
            duration,
            why,
            ep.ejections,
        )

    def restore(self, ep: Endpoint) -> None:
        if not ep.ejected_until:
            return
        ep.ejected_until = 0.0
        ep.failures_5xx = ep.failures_gateway = 0
        self.balancer.refresh()
        if ep.health_down:
            log.info(
                "upstream %s: the ejection of %s ended; it stays out while its health checks fail",
                self.cluster,
                ep.authority.decode(),
            )
            return
        log.info("upstream %s: %s is back after its ejection", self.cluster, ep.authority.decode())

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
