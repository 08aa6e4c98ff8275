"""What `meshgate stats` and `meshgate top` show, computed from scrapes of
an admin listener's /metrics (`observability.scrape`): documents of plain
data (what `--json` prints) and their text form, in aligned columns that
fit an 80-column terminal.

Traffic is grouped by direction and one more name: the route, the
destination (the peer's identity, or the upstream outside the mesh) or the
source identity. A request succeeds unless its status is 5xx (Linkerd's
definition): a local refusal (401, 403, 429...) is not the service
failing, and shows as its reason instead. Latency quantiles are PromQL's
`histogram_quantile` over the merged buckets: since the process started
for `stats`, over the last interval for `top`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshgate.observability.scrape import (
    Sample,
    Scrape,
    bucket_increase,
    increase,
    quantiles,
)

__all__ = [
    "BY",
    "Traffic",
    "render_stats",
    "render_top",
    "stats_doc",
    "top_doc",
    "traffic",
]

REQUESTS = "meshgate_requests_total"
DURATION = "meshgate_request_duration_seconds"
QS = (0.5, 0.95, 0.99)
NAME_WIDTH = 30  # longer names are cut in the text form (never in --json)


def _destination(s: Sample) -> str:
    return s.label("destination_identity") or s.label("upstream") or "-"


BY: dict[str, Callable[[Sample], str]] = {
    "route": lambda s: s.label("route") or "-",
    "destination": _destination,
    "source": lambda s: s.label("source_identity") or "-",
}


@dataclass(slots=True)
class Traffic:
    """The requests of one direction and name."""

    direction: str
    name: str
    requests: float = 0.0
    failures: float = 0.0  # 5xx
    codes: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)  # cumulative
    upstreams: set[str] = field(default_factory=set)

    @property
    def success_rate(self) -> float | None:
        return None if not self.requests else (self.requests - self.failures) / self.requests

    def latency(self) -> list[float]:
        """p50, p95, p99 in seconds (NaN without observations)."""
        return quantiles(self.buckets, QS)


def _key(s: Sample, *drop: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv for kv in s.labels if kv[0] not in drop))


def traffic(now: Scrape, by: str = "route", before: Scrape | None = None) -> list[Traffic]:
    """The traffic of `now` grouped `by` (a key of `BY`): all of it, or what
    came since `before`. Sorted by direction, then name."""
    name_of = BY[by]
    rows: dict[tuple[str, str], Traffic] = {}

    def row(s: Sample) -> Traffic:
        k = (s.label("direction"), name_of(s))
        t = rows.get(k)
        if t is None:
            t = rows[k] = Traffic(*k)
        return t

    then = {_key(s): s.value for s in before.samples(REQUESTS)} if before else {}
    for s in now.samples(REQUESTS):
        n = increase(then.get(_key(s)), s.value)
        t = row(s)
        if s.label("upstream"):
            t.upstreams.add(s.label("upstream"))
        if not n:
            continue
        t.requests += n
        code = s.label("code")
        t.codes[code] = t.codes.get(code, 0.0) + n
        if s.label("code_class") == "5xx":
            t.failures += n
        reason = s.label("reason")
        if reason:
            t.reasons[reason] = t.reasons.get(reason, 0.0) + n
    old_histograms = _histograms(before) if before else {}
    for series, (sample, buckets) in _histograms(now).items():
        old = old_histograms.get(series)
        grown = bucket_increase(old[1] if old else None, buckets)
        into = row(sample).buckets
        for le, n in grown.items():
            into[le] = into.get(le, 0.0) + n
    return [rows[k] for k in sorted(rows)]


def _histograms(
    scrape: Scrape,
) -> dict[tuple[tuple[str, str], ...], tuple[Sample, dict[float, float]]]:
    """Each request duration series' buckets (le -> cumulative count), with
    one of its samples (for its labels)."""
    out: dict[tuple[tuple[str, str], ...], tuple[Sample, dict[float, float]]] = {}
    for s in scrape.samples(DURATION, "_bucket"):
        le = s.label("le")
        bound = math.inf if le == "+Inf" else float(le)
        k = _key(s, "le")
        entry = out.get(k)
        if entry is None:
            entry = out[k] = (s, {})
        entry[1][bound] = s.value
    return out


# -- documents ---------------------------------------------------------------------


def _num(v: float | None) -> float | int | None:
    if v is None or math.isnan(v):
        return None
    return int(v) if v.is_integer() else round(v, 6)


def _by_labels(scrape: Scrape, name: str, *labels: str) -> dict[str, float]:
    """`name`'s values keyed by its labels' values joined with '/'."""
    out: dict[str, float] = {}
    for s in scrape.samples(name):
        k = "/".join(s.label(n) for n in labels)
        out[k] = out.get(k, 0.0) + s.value
    return out


def _traffic_doc(t: Traffic, seconds: float | None = None) -> dict[str, Any]:
    latency = dict(zip(("p50", "p95", "p99"), map(_num, t.latency()), strict=True))
    doc: dict[str, Any] = {"direction": t.direction, "name": t.name}
    if seconds is not None:
        doc["rps"] = round(t.requests / seconds, 3) if seconds > 0 else 0.0
    doc |= {
        "requests": _num(t.requests),
        "failures": _num(t.failures),
        "success_rate": None if t.success_rate is None else round(t.success_rate, 6),
        "latency_seconds": latency,
        "codes": {k: _num(v) for k, v in sorted(t.codes.items())},
        "reasons": {k: _num(v) for k, v in sorted(t.reasons.items(), key=lambda kv: -kv[1])},
    }
    return doc


def _process(scrape: Scrape, wall: float) -> dict[str, Any]:
    identities = [
        {
            "identity": s.label("identity"),
            "expires": _num(s.value),
            "days_left": round((s.value - wall) / 86400, 2),
        }
        for s in scrape.samples("meshgate_identity_cert_expiration_timestamp_seconds")
        if s.value > 0
    ]
    reloads = _by_labels(scrape, "meshgate_config_reloads_total", "outcome")
    handshakes = _by_labels(scrape, "meshgate_tls_handshakes_total", "direction", "outcome")
    return {
        "config_generation": _num(scrape.value("meshgate_config_generation")),
        "reloads": {
            "ok": _num(reloads.get("ok", 0.0)),
            "refused": _num(reloads.get("refused", 0.0)),
        },
        "identities": identities,
        "connections": {
            k: _num(v)
            for k, v in _by_labels(scrape, "meshgate_tcp_connections_active", "direction").items()
        },
        "in_flight": {
            k: _num(v)
            for k, v in _by_labels(scrape, "meshgate_requests_in_flight", "direction").items()
        },
        "tls_handshakes": {k: _num(v) for k, v in sorted(handshakes.items())},
        "workers": _num(scrape.value("meshgate_workers_scraped")),
    }


def _upstreams(scrape: Scrape) -> list[dict[str, Any]]:
    ups: dict[str, dict[str, Any]] = {}

    def up(name: str) -> dict[str, Any]:
        u = ups.get(name)
        if u is None:
            u = ups[name] = {
                "name": name,
                "endpoints": {},
                "breaker_open": False,
                "retry_budget_exhausted": 0,
                "try_failures": {},
            }
        return u

    def endpoint(s: Sample) -> dict[str, Any]:
        eps: dict[str, dict[str, Any]] = up(s.label("upstream"))["endpoints"]
        address = s.label("endpoint")
        return eps.setdefault(
            address, {"endpoint": address, "state": "", "ewma_seconds": None, "active": None}
        )

    for s in scrape.samples("meshgate_endpoint_state"):
        ep = endpoint(s)
        if s.value >= 1:
            ep["state"] = s.label("state")
    for s in scrape.samples("meshgate_endpoint_ewma_seconds"):
        endpoint(s)["ewma_seconds"] = _num(s.value)
    for s in scrape.samples("meshgate_endpoint_active_requests"):
        endpoint(s)["active"] = _num(s.value)
    for s in scrape.samples("meshgate_circuit_breaker_open"):
        up(s.label("upstream"))["breaker_open"] = s.value >= 1
    for s in scrape.samples("meshgate_retry_budget_exhausted_total"):
        up(s.label("upstream"))["retry_budget_exhausted"] = _num(s.value)
    for s in scrape.samples("meshgate_upstream_try_failures_total"):
        causes: dict[str, dict[str, Any]] = up(s.label("upstream"))["try_failures"]
        c = causes.setdefault(s.label("cause"), {"failures": 0, "retried": 0})
        c["failures"] = _num(c["failures"] + s.value)
        if s.label("retried") == "true":
            c["retried"] = _num(c["retried"] + s.value)
    out = []
    for name in sorted(ups):
        u = ups[name]
        u["endpoints"] = [u["endpoints"][a] for a in sorted(u["endpoints"])]
        out.append(u)
    return out


def stats_doc(scrape: Scrape, url: str, wall: float | None = None) -> dict[str, Any]:
    """What `meshgate stats --json` prints for one scrape of `url`."""
    return {
        "admin": url,
        "process": _process(scrape, time.time() if wall is None else wall),
        "routes": [_traffic_doc(t) for t in traffic(scrape, "route")],
        "upstreams": _upstreams(scrape),
    }


def top_doc(before: Scrape, now: Scrape, url: str, by: str) -> dict[str, Any]:
    """What one refresh of `meshgate top` shows: the traffic between two
    scrapes, by `by`, with the in-flight gauges of `now`."""
    seconds = now.at - before.at
    rows = traffic(now, by, before)
    active: dict[str, float] = {}
    for s in now.samples("meshgate_endpoint_active_requests"):
        active[s.label("upstream")] = active.get(s.label("upstream"), 0.0) + s.value
    # In flight per row: at its upstreams, when no other row sends to them
    # (the metrics count requests in flight per direction and per endpoint,
    # not per route or identity).
    owners: dict[str, int] = {}
    for t in rows:
        for u in t.upstreams:
            owners[u] = owners.get(u, 0) + 1
    docs = []
    for t in sorted(rows, key=lambda t: (t.direction, -t.requests, t.name)):
        if not t.requests:
            continue
        doc = _traffic_doc(t, seconds)
        alone = t.upstreams and all(owners[u] == 1 and u in active for u in t.upstreams)
        doc["in_flight"] = _num(sum(active[u] for u in t.upstreams)) if alone else None
        docs.append(doc)
    return {
        "admin": url,
        "by": by,
        "seconds": round(seconds, 3),
        "identities": _process(now, time.time())["identities"],
        "in_flight": {
            k: _num(v)
            for k, v in _by_labels(now, "meshgate_requests_in_flight", "direction").items()
        },
        "rows": docs,
    }


# -- text --------------------------------------------------------------------------


_DIR = {"inbound": "in", "outbound": "out"}


def _cut(name: str, width: int = NAME_WIDTH, trust_domain: str | None = None) -> str:
    """A name for a table: an identity without its `spiffe://` (and without
    its trust domain when it is this proxy's), and one too long cut at its
    start (the end of a SPIFFE ID or a route name tells them apart)."""
    if trust_domain and name.startswith(f"spiffe://{trust_domain}/"):
        name = name[len(trust_domain) + 10 :]
    name = name.removeprefix("spiffe://")
    return name if len(name) <= width else "~" + name[len(name) - width + 1 :]


def _trust_domain(identities: list[dict[str, Any]]) -> str | None:
    for ident in identities:
        td = str(ident["identity"]).removeprefix("spiffe://").partition("/")[0]
        if td:
            return td
    return None


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def _dur(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.2f}s"


def _count(v: float | None) -> str:
    if v is None:
        return "-"
    return str(int(v)) if float(v).is_integer() else f"{v:.2f}"


def _table(head: list[str], rows: Iterable[list[str]], right: set[int]) -> list[str]:
    """Aligned columns, two spaces apart; columns in `right` right-aligned."""
    body = [head, *rows]
    widths = [max(len(r[i]) for r in body) for i in range(len(head))]
    out = []
    for r in body:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _reasons(reasons: dict[str, Any], top: int = 3) -> str:
    items = list(reasons.items())
    text = ", ".join(f"{k} {_count(v)}" for k, v in items[:top])
    return text + (f", {len(items) - top} more" if len(items) > top else "")


def _dirs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k or '-'} {_count(v)}" for k, v in sorted(values.items())) or "-"


def render_stats(doc: dict[str, Any]) -> str:
    """The text form of a `stats_doc`."""
    p = doc["process"]
    lines = [f"meshgate at {doc['admin']}"]
    facts = [
        (
            "config",
            f"generation {_count(p['config_generation'])}; reloads "
            f"{_count(p['reloads']['ok'])} ok, {_count(p['reloads']['refused'])} refused",
        ),
    ]
    for ident in p["identities"]:
        facts.append(("identity", ident["identity"]))
        facts.append(("certificate", f"expires in {ident['days_left']:.1f} days"))
    facts.append(("connections", _dirs(p["connections"])))
    facts.append(("in flight", _dirs(p["in_flight"])))
    failed = {k: v for k, v in p["tls_handshakes"].items() if not k.endswith("/ok") and v}
    if failed:
        facts.append(("tls failures", _dirs(failed)))
    if p["workers"] is not None:
        facts.append(("workers", _count(p["workers"])))
    lines += [f"  {k:<13}{v}" for k, v in facts]

    lines.append("")
    routes = doc["routes"]
    td = _trust_domain(p["identities"])
    if not routes:
        lines.append("no requests yet")
    else:
        rows = []
        for r in routes:
            lat = r["latency_seconds"]
            rows.append(
                [
                    _cut(r["name"], trust_domain=td),
                    _DIR.get(r["direction"], r["direction"]),
                    _count(r["requests"]),
                    _pct(r["success_rate"]),
                    _dur(lat["p50"]),
                    _dur(lat["p95"]),
                    _dur(lat["p99"]),
                ]
            )
        head = ["ROUTE", "DIR", "REQUESTS", "SUCCESS", "P50", "P95", "P99"]
        table = _table(head, rows, {2, 3, 4, 5, 6})
        lines.append(table[0])
        for line, r in zip(table[1:], routes, strict=True):
            lines.append(line)
            if r["reasons"]:
                lines.append(f"    reasons: {_reasons(r['reasons'])}")

    for u in doc["upstreams"]:
        eps = u["endpoints"]
        serving = sum(1 for e in eps if e["state"] == "serving")
        notes = [f"{serving}/{len(eps)} serving" if eps else "no endpoints reported"]
        notes.append("breaker OPEN" if u["breaker_open"] else "breaker closed")
        if u["retry_budget_exhausted"]:
            notes.append(f"retry budget exhausted {_count(u['retry_budget_exhausted'])}")
        lines += ["", f"upstream {u['name']}: {', '.join(notes)}"]
        if eps:
            rows = [
                [
                    _cut(e["endpoint"], 40),
                    e["state"] or "-",
                    _dur(e["ewma_seconds"] or None),
                    _count(e["active"]),
                ]
                for e in eps
            ]
            lines += [
                "  " + t for t in _table(["ENDPOINT", "STATE", "EWMA", "ACTIVE"], rows, {2, 3})
            ]
        if u["try_failures"]:
            causes = ", ".join(
                f"{cause} {_count(c['failures'])}"
                + (f" ({_count(c['retried'])} retried)" if c["retried"] else "")
                for cause, c in sorted(u["try_failures"].items())
            )
            lines.append(f"  try failures: {causes}")
    return "\n".join(lines) + "\n"


def render_top(doc: dict[str, Any], max_rows: int | None = None) -> str:
    """The text form of a `top_doc`: a header line and the table."""
    when = time.strftime("%H:%M:%S")
    td = _trust_domain(doc["identities"])
    lines = [
        f"meshgate top  {doc['admin'].removesuffix('/metrics')}  by {doc['by']}, "
        f"last {doc['seconds']:.1f}s  {when}",
        f"in flight: {_dirs(doc['in_flight'])}"
        + (f"  (identities: spiffe://{td}/...)" if td else ""),
        "",
    ]
    rows = doc["rows"]
    if not rows:
        lines.append("no requests in this interval")
        return "\n".join(lines) + "\n"
    shown = rows if max_rows is None else rows[:max_rows]
    table = [
        [
            _cut(r["name"], trust_domain=td),
            _DIR.get(r["direction"], r["direction"]),
            f"{r['rps']:.1f}",
            _pct(r["success_rate"]),
            _dur(r["latency_seconds"]["p50"]),
            _dur(r["latency_seconds"]["p99"]),
            _count(r["in_flight"]),
        ]
        for r in shown
    ]
    head = [doc["by"].upper(), "DIR", "RPS", "SUCCESS", "P50", "P99", "IN-FLIGHT"]
    lines += _table(head, table, {2, 3, 4, 5, 6})
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more")
    return "\n".join(lines) + "\n"
