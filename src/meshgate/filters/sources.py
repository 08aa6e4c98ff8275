"""Counters by source identity, for /metrics, with a bounded number of labels.

A request's source is the SPIFFE ID of its caller's verified client
certificate, or `plaintext` without one. The identities of a mesh are
finite, but a counter keyed by whatever a certificate says must not grow
without end: past `MAX_SOURCES` distinct sources, new ones count as `other`.
"""

from __future__ import annotations

from meshgate.config.authz import PLAINTEXT

__all__ = ["MAX_SOURCES", "OTHER", "SourceCounts", "source_label"]

MAX_SOURCES = 1000
OTHER = "other"


def source_label(peer: str | None) -> str:
    """A request's source, as logs and metrics name it."""
    return PLAINTEXT if peer is None else peer


class SourceCounts:
    """Rows of `width` counters, one row per source (at most `limit`, then `other`)."""

    __slots__ = ("limit", "rows", "width")

    def __init__(self, width: int, limit: int = MAX_SOURCES) -> None:
        self.width = width
        self.limit = limit
        self.rows: dict[str, list[int]] = {}

    def row(self, peer: str | None) -> list[int]:
        """The counters of `peer`'s source (created on first use)."""
        source = PLAINTEXT if peer is None else peer
        row = self.rows.get(source)
        if row is None:
            if len(self.rows) >= self.limit:
                source = OTHER
                row = self.rows.get(OTHER)
            if row is None:
                row = self.rows[source] = [0] * self.width
        return row
