"""A route's `fault:` as a filter: failures injected on purpose, to rehearse them.

Like Envoy's fault filter: a request the fault applies to (every request, or
those matching `headers:`) is first held for `delay.duration` with
probability `delay.percent`/100, then answered by the gateway with
`abort.status` with probability `abort.percent`/100. Both draws are
independent, so a request may be delayed and then aborted.

An abort is a local reply with a `x-meshgate-fault: abort` header: a
problem+json body (`fault-injected`) for a status of 300 and above, an empty
body for a 2xx (the protocol layer answers a kind-less 2xx without a
body). A delay is a coroutine that sleeps, so that the request waits off the
hot path; a client that goes away meanwhile cancels it, and nothing goes
upstream.

`random.random() * 100 < percent`: 0 never fires, 100 always does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from meshgate.config.schema import FaultConfig
from meshgate.filters import FilterRequest, FilterResult, LocalReply
from meshgate.http.conditions import headers_match, parse_header_checks

__all__ = ["FAULT_HEADER", "FaultFilter"]

FAULT_HEADER = b"x-meshgate-fault"
ABORT_KIND = "fault-injected"


class FaultFilter:
    """One route's `fault:`; `delayed` and `aborted` count for /metrics."""

    __slots__ = (
        "abort_percent",
        "abort_status",
        "aborted",
        "cfg",
        "checks",
        "delay_percent",
        "delay_seconds",
        "delayed",
        "rand",
        "route_label",
    )

    def __init__(
        self,
        route_label: str,
        cfg: FaultConfig,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.route_label = route_label
        self.cfg = cfg
        self.rand = rand
        """A float in [0, 1) per draw (tests pass their own)."""
        where = f"{route_label}: fault"
        self.checks = parse_header_checks(cfg.headers, where)
        delay, abort = cfg.delay, cfg.abort
        self.delay_percent = delay.percent if delay is not None else 0.0
        self.delay_seconds = delay.duration if delay is not None else 0.0
        self.abort_percent = abort.percent if abort is not None else 0.0
        self.abort_status = abort.status if abort is not None else 0
        if self.abort_status == 304:
            # A 304 never has a body, and a kind-less local reply has one
            # from 300 up: the client would read it as the next response.
            raise ValueError(f"{where}: abort: status 304 cannot be injected")
        self.delayed = 0
        self.aborted = 0

    def __call__(self, req: FilterRequest) -> FilterResult:
        if self.checks and not headers_match(self.checks, req.headers):
            return None
        if self.delay_percent and self.rand() * 100 < self.delay_percent:
            self.delayed += 1
            return self._delay()
        return self._abort()

    def _abort(self) -> LocalReply | None:
        if self.abort_percent and self.rand() * 100 < self.abort_percent:
            self.aborted += 1
            status = self.abort_status
            return LocalReply(
                status,
                "" if status < 300 else ABORT_KIND,
                "the gateway injected this failure (fault: abort)",
                ((FAULT_HEADER, b"abort"),),
            )
        return None

    async def _delay(self) -> LocalReply | None:
        await asyncio.sleep(self.delay_seconds)
        return self._abort()
