"""Tracing: W3C Trace Context and B3 in, spans out over OTLP/HTTP.

(Being written: `Trace` is one sampled request's spans.)
"""

from __future__ import annotations

__all__ = ["Trace"]


class Trace:
    """One sampled request's server span and its tries' client spans."""
