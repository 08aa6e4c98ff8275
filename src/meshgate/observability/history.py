"""Cumulative snapshots of one proxy's samples, kept for windows of 1, 5 and
15 minutes (a gateway's dashboard; `docs/dashboard-api.md`).

Every snapshot of the last 70 s is kept, and one per 15 s before that, up
to 16 minutes: a window is the difference (`deltas.delta`) between the
newest snapshot and the oldest one inside it, and the memory is bounded
(at most 35 recent and 60 older snapshots at one per 2 s). The control
plane keeps the same per proxy (`mesh.control.telemetry`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from meshgate.observability.deltas import Indexed, delta

__all__ = ["KEEP", "WINDOWS", "Snapshots", "Window"]

WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0, "15m": 900.0}
KEEP = 960.0
RECENT = 70.0
THIN = 15.0


@dataclass(slots=True)
class Window:
    """What the counters added over `span` seconds, and the newest samples
    (for gauges)."""

    span: float
    delta: Indexed
    newest: Indexed


class Snapshots:
    """`(monotonic time, samples)`, oldest first."""

    __slots__ = ("older", "recent")

    def __init__(self) -> None:
        self.recent: collections.deque[tuple[float, Indexed]] = collections.deque()
        self.older: collections.deque[tuple[float, Indexed]] = collections.deque()

    def add(self, at: float, samples: Indexed) -> None:
        self.recent.append((at, samples))
        while self.recent and self.recent[0][0] < at - RECENT:
            old = self.recent.popleft()
            if not self.older or old[0] - self.older[-1][0] >= THIN:
                self.older.append(old)
        while self.older and self.older[0][0] < at - KEEP:
            self.older.popleft()

    def __len__(self) -> int:
        return len(self.recent) + len(self.older)

    def window(self, seconds: float, now: float) -> Window | None:
        """The change over the last `seconds` (None when the newest
        snapshot is older than that, or there is none)."""
        if not self.recent or self.recent[-1][0] < now - seconds:
            return None
        newest = self.recent[-1]
        oldest = newest
        for snap in (*self.older, *self.recent):
            if snap[0] >= now - seconds:
                oldest = snap
                break
        before = oldest[1] if oldest is not newest else newest[1]
        return Window(newest[0] - oldest[0], delta(before, newest[1]), newest[1])
