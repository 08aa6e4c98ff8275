"""The golden signals of every request: counts, latency, upstream latency,
bytes and tries, by labels that come from config and identities only.

One `RequestSeries` per listener role and transport (a gateway's listener,
a sidecar's inbound TLS listener, its outbound one): every exchange that
ends is `record`ed into one row, found by one dict lookup on a tuple of
values that are already interned (the route's label, the upstream's name,
the peer's SPIFFE ID, a method from a fixed set, the status, a refusal
reason from a fixed set). Nothing from the request line or the Host header
becomes a label, so random paths and Hosts add no series.

Bounds, by construction:
- routes and upstreams are the config's names (a 404 has route "(none)");
- methods outside the standard ones are "other";
- refusal reasons are a fixed set (`REASONS`); an unknown kind is "other";
- peer identities are at most `max_identities` per series store, then
  "other";
- a group of rows (a route, upstream, peer and method) idle for
  `idle_expiry` seconds is dropped (`expire`), so series of a route, a peer
  or a status that went away do not live forever.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any

__all__ = [
    "BUCKETS",
    "REASONS",
    "RequestSeries",
    "code_class",
    "reason_of",
]

# Seconds: 1 ms to 30 s, as Linkerd's and Istio's latency buckets span.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
NB = len(BUCKETS) + 1  # the last one is +Inf

_METHODS = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}

# A local answer's problem type -> the refusal reason label.
REASONS: dict[str, str] = {
    "missing-credentials": "auth",
    "invalid-credentials": "auth",
    "invalid-token": "auth",
    "expired-token": "auth",
    "forbidden": "auth",
    "insufficient-scope": "auth",
    "authz-denied": "authz",
    "rate-limited": "ratelimit",
    "rate-limit-unavailable": "ratelimit",
    "upstream-overloaded": "breaker",
    "no-route": "no_route",
    "no-endpoints": "no_endpoints",
    "upstream-timeout": "timeout",
    "handler-timeout": "timeout",
    "request-timeout": "timeout",
    "body-timeout": "timeout",
    "upstream-connect-failed": "upstream_unavailable",
    "upstream-connect-timeout": "upstream_unavailable",
    "upstream-unavailable": "upstream_unavailable",
    "upstream-reset": "upstream_error",
    "upstream-bad-response": "upstream_error",
    "upstream-body-too-large": "upstream_error",
    "upstream-bad-json": "upstream_error",
    "upstream-encoding-unsupported": "upstream_error",
    "bad-host": "bad_request",
    "bad-path": "bad_request",
    "bad-target": "bad_request",
    "bad-framing": "bad_request",
    "missing-host": "bad_request",
    "body-too-large": "bad_request",
    "expectation-failed": "bad_request",
    "bad-request": "bad_request",
    "headers-too-large": "bad_request",
    "uri-too-long": "bad_request",
    "bad-transfer-encoding": "bad_request",
    "upgrade-unsupported": "bad_request",
    "incomplete-body": "bad_request",
    "bad-json": "bad_request",
    "compressed-body": "bad_request",
    "invalid-request": "auth",
    "aggregate-timeout": "timeout",
    "aggregate-backend-failed": "upstream_error",
    "aggregate-dependency-failed": "upstream_error",
    "backend-not-json": "upstream_error",
    "backend-status": "upstream_error",
    "cors-refused": "cors",
    "fault-injected": "fault",
    "filter-error": "internal",
    "filter-unavailable": "internal",
    "handler-error": "internal",
    "internal": "internal",
    "client-closed": "client_closed",
    "": "",
}


def reason_of(kind: str, status: int) -> str:
    """The refusal reason of a local answer's problem type (`kind`)."""
    reason = REASONS.get(kind)
    if reason is not None:
        return reason
    if status == 401:
        return "auth"
    if status == 403:
        return "auth"
    if status == 429:
        return "ratelimit"
    return "other"


_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def code_class(code: int) -> str:
    c = code // 100
    return _CLASSES[c] if 0 <= c < len(_CLASSES) else "other"


# Row layout (a list, for speed): the counters, the time it was last
# touched, then the request's and the upstream part's bucket counts.
_COUNT, _SUM, _UP_COUNT, _UP_SUM, _IN, _OUT, _TRIES, _LAST = range(8)
_B = 8
_U = _B + NB
_ROW_LEN = _U + NB

# A row's key: the route's label, the upstream's name, the peer's identity
# (the source of an inbound request, the destination of an outbound one),
# the method, the status and the local answer's problem type, as the
# exchange holds them (`record`).


class RequestSeries:
    """The request rows of one listener role and transport (see the module)."""

    __slots__ = (
        "direction",
        "identities",
        "inbound",
        "local_identity",
        "max_identities",
        "rows",
        "then",
        "tls",
    )

    def __init__(
        self,
        direction: str,
        tls: bool,
        *,
        max_identities: int = 1000,
    ) -> None:
        self.direction = direction
        self.inbound = direction == "inbound"
        self.tls = tls
        self.local_identity = ""
        """This proxy's own SPIFFE ID: the source of an outbound request,
        the destination of an inbound one."""
        self.max_identities = max_identities
        self.identities: set[str] = set()
        self.rows: dict[tuple[str, ...], list[Any]] = {}
        self.then: Callable[[Any, float, str], None] | None = None
        """Called after the row is updated (the access log):
        `then(ex, now, reason)`, or None. A sampled request's trace ends
        there too (`ex.trace.end(ex, now, reason)`)."""

    def record(self, ex: Any) -> None:
        """One exchange ended (a `stream.exchange.ProxyExchange`): count it.
        This is the hot path: one tuple of values the exchange holds, one
        dict lookup; what they become as labels is worked out once per row
        (`_new_row`) and per scrape (`samples`)."""
        now = monotonic()
        cluster = ex.cluster
        if self.inbound:
            peer = ex.proto.peer
        else:
            ep = ex.last_ep
            peer = ep.pool.identity if ep is not None else None
        key = (
            ex.route_label,
            cluster.name if cluster is not None else "",
            peer,
            ex.method,
            ex.status,
            ex.kind,
        )
        row = self.rows.get(key)
        if row is None:
            row = self._new_row(key)
        elapsed = now - ex.t_start
        row[_COUNT] += 1
        row[_SUM] += elapsed
        row[_B + bisect_left(BUCKETS, elapsed)] += 1
        if ex.started:
            up = now - ex.try_t0
            row[_UP_COUNT] += 1
            row[_UP_SUM] += up
            row[_U + bisect_left(BUCKETS, up)] += 1
            row[_TRIES] += ex.attempt
        row[_IN] += ex.sent_body
        row[_OUT] += ex.bytes_out
        row[_LAST] = now
        then = self.then
        trace = ex.trace
        if then is not None or trace is not None:
            kind = ex.kind
            reason = reason_of(kind, ex.status) if kind else ""
            if then is not None:
                then(ex, now, reason)
            if trace is not None:
                trace.end(ex, now, reason)

    def pass_on(self, ex: Any) -> None:
        """`record` without counting (`metrics: {enabled: false}`): the
        access log and the trace still get the exchange."""
        then = self.then
        trace = ex.trace
        if then is not None or trace is not None:
            now = monotonic()
            kind = ex.kind
            reason = reason_of(kind, ex.status) if kind else ""
            if then is not None:
                then(ex, now, reason)
            if trace is not None:
                trace.end(ex, now, reason)

    def _new_row(self, key: tuple[Any, ...]) -> list[Any]:
        """The row of a key seen for the first time. A method outside the
        standard ones and a peer past `max_identities` share the row of
        "other": their raw key is never stored (each such request comes
        here again, which costs that request, not memory)."""
        route, upstream, peer, method, status, kind = key
        canonical = key
        if method not in _METHODS:
            canonical = (route, upstream, peer, b"other", status, kind)
        if peer and peer not in self.identities:
            if len(self.identities) >= self.max_identities:
                canonical = (route, upstream, "other", canonical[3], status, kind)
            else:
                self.identities.add(peer)
        if status >= 1000 or status < 0:
            canonical = (*canonical[:4], 0, kind)
        if kind not in REASONS:
            # A problem type of its own (the reason is then "other", or
            # what its status says): one row for all of them.
            canonical = (*canonical[:5], "unknown")
        row = self.rows.get(canonical)
        if row is None:
            row = self.rows[canonical] = [0, 0.0, 0, 0.0, 0, 0, 0, 0.0] + [0] * (2 * NB)
        return row

    def _groups(self) -> dict[tuple[str, ...], list[tuple[Any, ...]]]:
        """The rows' keys by group: the labels every request family's
        series have (direction, route, upstream, identities, method; the
        store's tls is the same for all)."""
        out: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for k in self.rows:
            out.setdefault(self.labels(k)[:6], []).append(k)
        return out

    def _drop_idle(self, groups: Iterable[list[tuple[Any, ...]]], before: float) -> int:
        rows = self.rows
        gone = 0
        for keys in groups:
            if all(rows[k][_LAST] < before for k in keys):
                for k in keys:
                    del rows[k]
                gone += len(keys)
        if gone:
            # Identities no row names any more stop counting toward the cap.
            self.identities &= {k[2] for k in rows}
        return gone

    def expire(self, before: float) -> int:
        """Drop the groups whose rows were all last touched before `before`;
        how many rows went.

        A group goes whole or not at all: the byte counters and the
        histograms add up the rows of a group (every status of a class), so
        dropping one idle row of a busy group would make them go down."""
        return self._drop_idle(self._groups().values(), before)

    def labels(self, key: tuple[Any, ...]) -> tuple[str, ...]:
        """A row's `meshgate_requests_total` labels (`exposition.SPECS`)."""
        route, upstream, peer, method, status, kind = key
        peer = peer or ""
        local = self.local_identity
        src, dst = (peer, local) if self.inbound else (local, peer)
        return (
            self.direction,
            route or "(none)",
            upstream,
            src,
            dst,
            _METHODS.get(method, "other"),
            str(status),
            code_class(status),
            "true" if self.tls else "false",
            reason_of(kind, status) if kind else "",
        )

    def drop_groups(self, idle: set[tuple[str, ...]], before: float) -> None:
        """Drop the groups (`_groups`) in `idle` (idle in every worker),
        unless one of their rows was touched since `before`."""
        groups = self._groups()
        self._drop_idle((groups[g] for g in idle if g in groups), before)

    def samples(self) -> dict[str, list[Any]]:
        """The rows as plain data (for a scrape, and for the other workers'
        merge): each row's labels (direction and tls first) and values."""
        tls = "true" if self.tls else "false"
        out: dict[str, list[Any]] = {
            "meshgate_requests_total": [],
            "meshgate_request_duration_seconds": [],
            "meshgate_upstream_duration_seconds": [],
            "meshgate_request_bytes_total": [],
            "meshgate_response_bytes_total": [],
            "meshgate_upstream_tries_total": [],
        }
        hist: dict[tuple[str, ...], list[Any]] = {}
        up_hist: dict[tuple[str, ...], list[Any]] = {}
        for key, row in self.rows.items():
            labels = self.labels(key)
            base = labels[:6]
            cls = labels[7]
            out["meshgate_requests_total"].append([labels, row[_COUNT], row[_LAST]])
            out["meshgate_request_bytes_total"].append([(*base, tls), row[_IN], row[_LAST]])
            out["meshgate_response_bytes_total"].append([(*base, tls), row[_OUT], row[_LAST]])
            hkey = (*base, cls, tls)
            _add_hist(hist, hkey, row, _B, row[_COUNT], row[_SUM])
            if row[_UP_COUNT]:
                _add_hist(up_hist, hkey, row, _U, row[_UP_COUNT], row[_UP_SUM])
                out["meshgate_upstream_tries_total"].append([hkey, row[_TRIES], row[_LAST]])
        out["meshgate_request_duration_seconds"] = [[k, *v] for k, v in hist.items()]
        out["meshgate_upstream_duration_seconds"] = [[k, *v] for k, v in up_hist.items()]
        return out


def _add_hist(
    into: dict[tuple[str, ...], list[Any]],
    key: tuple[str, ...],
    row: list[Any],
    at: int,
    count: int,
    total: float,
) -> None:
    """Add a row's buckets (at `at`) to a histogram entry: [buckets, sum,
    count, last]."""
    entry = into.get(key)
    if entry is None:
        into[key] = [row[at : at + NB], total, count, row[_LAST]]
        return
    buckets = entry[0]
    for i in range(NB):
        buckets[i] += row[at + i]
    entry[1] += total
    entry[2] += count
    if row[_LAST] > entry[3]:
        entry[3] = row[_LAST]
