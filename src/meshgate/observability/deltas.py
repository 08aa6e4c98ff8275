"""What changed between two sets of samples, and the golden signals of it.

The dashboard's numbers come from cumulative samples (a `MetricsHub.collect()`,
or what a proxy reports of it) taken at two moments: a counter's increase
between them (a value that went down counts from 0: the process restarted),
a histogram's bucket increases (a reset, its count gone down, counts the
whole of the newer one), and a gauge's newer value. From those: requests,
the rate, the share not answered 5xx, and quantiles as PromQL's
`histogram_quantile` computes them over the buckets of the window.

Pure functions over plain data: the control plane (every proxy's reports)
and a gateway alone (its own samples, kept by a sampler) both use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshgate.observability.exposition import SPECS, Samples
from meshgate.observability.requests import BUCKETS, NB
from meshgate.observability.scrape import histogram_quantile, increase

__all__ = [
    "Hist",
    "Indexed",
    "delta",
    "golden",
    "index",
    "label_index",
    "quantile_ms",
]

Labels = tuple[str, ...]
Hist = tuple[list[float], float, float]
"""A histogram's value: per-bucket counts (not cumulative; `BUCKETS`, then
+Inf), its sum and its count."""
Indexed = dict[str, dict[Labels, Any]]
"""family -> labels -> a number (counter, gauge) or a `Hist`."""

_BOUNDS = (*BUCKETS, math.inf)
MAX_ROWS = 50_000
"""Rows kept of one set of samples, all families together (a proxy that
sends more is cut there)."""


def label_index(family: str, name: str) -> int | None:
    """Where label `name` is in `family`'s labels (`exposition.SPECS`)."""
    spec = SPECS.get(family)
    if spec is None or name not in spec.labels:
        return None
    return spec.labels.index(name)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _hist(v: Any) -> Hist | None:
    if not isinstance(v, list | tuple) or len(v) < 3:
        return None
    buckets, total, count = v[0], _number(v[1]), _number(v[2])
    if not isinstance(buckets, list | tuple) or len(buckets) != NB:
        return None
    if total is None or count is None:
        return None
    nums = [_number(b) for b in buckets]
    if any(n is None or n < 0 for n in nums):
        return None
    return [float(n or 0.0) for n in nums], total, count


def index(samples: Any, *, families: Iterable[str] | None = None) -> Indexed:
    """Samples (`{family: [[labels, value], ...]}`, from a report's JSON or
    a hub's collect) as `Indexed`, checked: families known to `SPECS` only
    (or those of `families`), labels of the right number, all strings, and
    values of the family's type; anything else is left out. Rows of the
    same labels add up (a hub's several stores)."""
    out: Indexed = {}
    if not isinstance(samples, Mapping):
        return out
    wanted = set(families) if families is not None else None
    rows = 0
    for name, series in samples.items():
        spec = SPECS.get(name) if isinstance(name, str) else None
        if spec is None or (wanted is not None and name not in wanted):
            continue
        if not isinstance(series, list):
            continue
        into: dict[Labels, Any] = out.setdefault(name, {})
        for sample in series:
            if rows >= MAX_ROWS:
                return out
            if not isinstance(sample, list | tuple) or len(sample) < 2:
                continue
            labels = sample[0]
            if not isinstance(labels, list | tuple) or len(labels) != len(spec.labels):
                continue
            if not all(isinstance(x, str) and len(x) <= 512 for x in labels):
                continue
            key = tuple(labels)
            if spec.type == "histogram":
                h = _hist(sample[1:])
                if h is None:
                    continue
                have = into.get(key)
                if have is not None:
                    h = (
                        [a + b for a, b in zip(have[0], h[0], strict=True)],
                        have[1] + h[1],
                        have[2] + h[2],
                    )
                into[key] = h
            else:
                n = _number(sample[1])
                if n is None:
                    continue
                if key in into:
                    n = n + into[key] if spec.merge == "sum" else max(n, into[key])
                into[key] = n
            rows += 1
    return out


def _hist_increase(before: Hist | None, now: Hist) -> Hist:
    if before is None or now[2] < before[2]:
        return now
    return (
        [increase(b, n) for b, n in zip(before[0], now[0], strict=True)],
        increase(before[1], now[1]),
        increase(before[2], now[2]),
    )


def delta(before: Indexed | None, now: Indexed) -> Indexed:
    """What `now` adds to `before`: counters' and histograms' increases (a
    series that went down, or is new, counts from 0), gauges' values now."""
    out: Indexed = {}
    old = before or {}
    for name, rows in now.items():
        spec = SPECS.get(name)
        if spec is None:
            continue
        prev = old.get(name, {})
        if spec.type == "gauge":
            out[name] = dict(rows)
        elif spec.type == "histogram":
            out[name] = {k: _hist_increase(prev.get(k), v) for k, v in rows.items()}
        else:
            out[name] = {k: increase(prev.get(k), v) for k, v in rows.items()}
    return out


def quantile_ms(q: float, buckets: list[float]) -> float | None:
    """`histogram_quantile(q)` of per-bucket counts, in milliseconds (None
    without observations)."""
    acc = 0.0
    pairs = []
    for bound, n in zip(_BOUNDS, buckets, strict=True):
        acc += n
        pairs.append((bound, acc))
    if acc <= 0:
        return None
    v = histogram_quantile(q, pairs)
    return None if math.isnan(v) else round(v * 1000, 3)


@dataclass(slots=True)
class Golden:
    """The golden signals of some requests over a window."""

    requests: float = 0.0
    errors: float = 0.0
    """Answered 5xx."""
    rate: float = 0.0
    buckets: list[float] | None = None

    def add(self, requests: float, errors: float, span: float) -> None:
        self.requests += requests
        self.errors += errors
        if span > 0:
            self.rate += requests / span

    def add_buckets(self, buckets: list[float]) -> None:
        if self.buckets is None:
            self.buckets = [0.0] * NB
        for i, n in enumerate(buckets):
            self.buckets[i] += n

    def doc(self) -> dict[str, Any]:
        has = self.requests > 0
        buckets = self.buckets or [0.0] * NB
        return {
            "rps": round(self.rate, 3),
            "requests": int(self.requests),
            "success": round(1 - self.errors / self.requests, 4) if has else None,
            "p50_ms": quantile_ms(0.5, buckets) if has else None,
            "p99_ms": quantile_ms(0.99, buckets) if has else None,
        }


def golden(
    requests: Mapping[Labels, float],
    durations: Mapping[Labels, Hist],
    span: float,
    *,
    match: Any = None,
) -> Golden:
    """The golden signals of `meshgate_requests_total` and
    `meshgate_request_duration_seconds` deltas over `span` seconds, of the
    rows `match(labels, family)` accepts (all without one)."""
    g = Golden()
    cls = SPECS["meshgate_requests_total"].labels.index("code_class")
    for labels, n in requests.items():
        if match is None or match(labels, "meshgate_requests_total"):
            g.add(n, n if labels[cls] == "5xx" else 0.0, span)
    for labels, h in durations.items():
        if match is None or match(labels, "meshgate_request_duration_seconds"):
            g.add_buckets(h[0])
    return g


def samples_of(indexed: Indexed) -> Samples:
    """`Indexed` back as samples (histograms as `[buckets, sum, count]`)."""
    out: Samples = {}
    for name, rows in indexed.items():
        out[name] = [
            [list(k), *(list(v) if isinstance(v, tuple) else [v])] for k, v in rows.items()
        ]
    return out


def route_row(label: str, route: Any, shares: Mapping[tuple[str, str], float]) -> dict[str, Any]:
    """A route as the dashboard lists it: its upstream, or its split with
    each backend's weight, requests and live share (`shares`: requests by
    route label and upstream, from `meshgate_split_requests_total`)."""
    if not route.split:
        return {"route": label, "path": route.path, "upstream": route.upstream}
    total = sum(shares.get((label, b.upstream), 0.0) for b in route.split)
    split = [
        {
            "upstream": b.upstream,
            "weight": b.weight,
            "requests": int(shares.get((label, b.upstream), 0.0)),
            "share": round(shares.get((label, b.upstream), 0.0) / total, 4) if total else None,
        }
        for b in route.split
    ]
    return {"route": label, "path": route.path, "split": split}
