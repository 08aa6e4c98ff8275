"""A route's `deprecation:` as response fields, built once at load.

Deprecation: @1735689600                      (RFC 9745: a structured date)
Sunset: Wed, 31 Dec 2025 23:59:59 GMT         (RFC 8594: an HTTP-date)
Link: <https://example.com/v2>; rel="deprecation"
"""

from __future__ import annotations

import datetime
from email.utils import format_datetime

from meshgate.config.schema import DeprecationConfig
from meshgate.filters import FilterRequest

__all__ = ["DeprecationFilter"]


class DeprecationFilter:
    __slots__ = ("fields",)

    def __init__(self, cfg: DeprecationConfig) -> None:
        lines = [b"deprecation: @%d\r\n" % int(cfg.since.timestamp())]
        if cfg.sunset is not None:
            date = format_datetime(cfg.sunset.astimezone(datetime.UTC), usegmt=True)
            lines.append(b"sunset: " + date.encode("ascii") + b"\r\n")
        if cfg.link is not None:
            lines.append(b"link: <" + cfg.link.encode("ascii") + b'>; rel="deprecation"\r\n')
        self.fields = b"".join(lines)

    def __call__(self, req: FilterRequest) -> None:
        req.response_extra += self.fields
        return None
