"""What the proxies report, kept for the dashboard: per proxy, its cumulative
snapshots of the last 16 minutes, and the last denials across proxies.

A proxy's `report` (on its push stream, every 2 s) carries its own
`MetricsHub.collect()` of a few families and its denials since the previous
one (`docs/dashboard-api.md`). The samples are checked and indexed as they
come (`observability.deltas.index`: a proxy's word is telemetry, never
config; the target of what it counts is its certificate's service, never a
label it sends). Every report of the last 70 s is kept, and one per 15 s
before that, up to 16 minutes: enough for windows of 1, 5 and 15 minutes
(the difference between the newest snapshot and the oldest one inside the
window), and a bounded memory per proxy.

The snapshots come from the reports, or, with `control.metrics_source:
prometheus`, from a Prometheus that scrapes the proxies
(`control.promsource`): the same cumulative numbers, at the scrape's time;
the denials always come from the reports.

A proxy's history goes when its instance is gone for good (the registry
removed it) and its stream is closed, or, for a proxy without an instance
(a gateway), once it has sent nothing for the longest window.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshgate.observability.deltas import Indexed, delta, index
from meshgate.observability.exposition import REPORT_FAMILIES

__all__ = ["WINDOWS", "History", "ProxyWindow", "Telemetry"]

WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0, "15m": 900.0}
KEEP = 960.0  # 16 minutes
RECENT = 70.0
THIN = 15.0
MAX_DENIALS = 50
MAX_FIELD = 256


@dataclass(slots=True)
class History:
    """One proxy's snapshots, oldest first: `(monotonic time, samples)`."""

    proxy_id: str
    service: str
    identity: str
    instance: bool
    """Whether the proxy registered an instance (a sidecar; a gateway does not)."""
    recent: collections.deque[tuple[float, Indexed]] = field(default_factory=collections.deque)
    older: collections.deque[tuple[float, Indexed]] = field(default_factory=collections.deque)
    last: float = 0.0

    def add(self, at: float, samples: Indexed) -> None:
        self.recent.append((at, samples))
        self.last = at
        while self.recent and self.recent[0][0] < at - RECENT:
            old = self.recent.popleft()
            if not self.older or old[0] - self.older[-1][0] >= THIN:
                self.older.append(old)
        while self.older and self.older[0][0] < at - KEEP:
            self.older.popleft()

    def snapshots(self) -> Iterable[tuple[float, Indexed]]:
        yield from self.older
        yield from self.recent

    def newest(self) -> tuple[float, Indexed] | None:
        return self.recent[-1] if self.recent else None


@dataclass(slots=True)
class ProxyWindow:
    """One proxy over one window: what its counters added (`delta`), over
    `span` seconds, and its newest samples (for gauges)."""

    proxy_id: str
    service: str
    identity: str
    instance: bool
    span: float
    delta: Indexed
    newest: Indexed


class Telemetry:
    """Every proxy's history and the last denials (see the module)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.proxies: dict[str, History] = {}
        self.denials: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_DENIALS)
        self.reports = 0

    def add(
        self,
        proxy_id: str,
        service: str,
        identity: str,
        report: dict[str, Any],
        *,
        instance: bool = True,
        at: float | None = None,
    ) -> None:
        """Take one report of a proxy (its identity and service are its
        certificate's): its samples and its denials."""
        self.add_samples(
            proxy_id, service, identity, report.get("samples"), instance=instance, at=at
        )
        self.add_denials(proxy_id, service, report.get("denials"))

    def add_samples(
        self,
        proxy_id: str,
        service: str,
        identity: str,
        samples: Any,
        *,
        instance: bool = True,
        at: float | None = None,
    ) -> bool:
        """Keep one cumulative snapshot of a proxy, taken at `at` (this
        clock; now without one). One older than the proxy's newest is not
        kept (False): windows need snapshots in order."""
        now = self.clock() if at is None else at
        hist = self.proxies.get(proxy_id)
        if hist is None or hist.service != service:
            hist = self.proxies[proxy_id] = History(proxy_id, service, identity, instance)
        elif hist.recent and now < hist.last:
            return False
        hist.instance = instance
        hist.add(now, index(samples, families=REPORT_FAMILIES))
        self.reports += 1
        return True

    def add_denials(self, proxy_id: str, service: str, denials: Any) -> None:
        """Keep a proxy's new denials (those of its report)."""
        if isinstance(denials, list):
            for d in denials[-MAX_DENIALS:]:
                if isinstance(d, dict):
                    self.denials.append(_denial(d, service, proxy_id))

    def forget(self, keep: Callable[[History], bool]) -> None:
        """Drop the histories `keep` says are gone for good, and those
        silent for longer than they are kept."""
        now = self.clock()
        for pid, hist in list(self.proxies.items()):
            if now - hist.last > KEEP or not keep(hist):
                del self.proxies[pid]

    def window(self, seconds: float, now: float | None = None) -> list[ProxyWindow]:
        """Each proxy's change over the last `seconds` (those whose newest
        report is older than that are left out)."""
        now = self.clock() if now is None else now
        out = []
        for hist in self.proxies.values():
            newest = hist.newest()
            if newest is None or newest[0] < now - seconds:
                continue
            oldest = newest
            for snap in hist.snapshots():
                if snap[0] >= now - seconds:
                    oldest = snap
                    break
            span = newest[0] - oldest[0]
            d = delta(oldest[1], newest[1]) if oldest is not newest else delta(newest[1], newest[1])
            out.append(
                ProxyWindow(
                    hist.proxy_id, hist.service, hist.identity, hist.instance, span, d, newest[1]
                )
            )
        return out

    def recent_denials(self) -> list[dict[str, Any]]:
        """The last denials across proxies, newest first."""
        return sorted(self.denials, key=lambda d: float(d["at"]), reverse=True)


def _text(v: Any) -> str | None:
    return v[:MAX_FIELD] if isinstance(v, str) else None


def _denial(d: dict[str, Any], service: str, proxy_id: str) -> dict[str, Any]:
    at = d.get("at")
    return {
        "at": float(at) if isinstance(at, int | float) and not isinstance(at, bool) else 0.0,
        "source_identity": _text(d.get("source")),
        "destination": service,
        "policy": _text(d.get("policy")),
        "rule": _text(d.get("rule")),
        "reason": _text(d.get("reason")),
        "method": _text(d.get("method")),
        "path": _text(d.get("path")),
        "proxy": proxy_id,
    }
