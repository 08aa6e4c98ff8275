"""A proxy's `report` (docs/dashboard-api.md), checked before it is kept.

A report is what a proxy says of its own traffic, so it is hostile input
like any other line of its stream: its size is bounded by the stream's
line limit (`wire.MAX_BODY`), and `clean` takes only the shape the
contract gives, with every type, count and length checked. Anything else
makes the whole report malformed: it is ignored (and counted by the
caller), and the stream goes on.

A proxy speaks only for itself: the stream's identity, proven by its
client certificate, is the one its rows must name where they name the
proxy (the destination of its inbound requests, the source of its
outbound ones, its certificate's identity), and the service its denials
and its inbound policy (`inbound/<service>`) are for. A report that speaks
for another proxy is malformed. Its `at` is the proxy's clock: the control
plane's own time of a report is `ProxyStream.report_at`. A family
the contract does not list is left out (a newer proxy may report more).
"""

from __future__ import annotations

import math
from typing import Any

from meshgate.filters.authz import DENIALS_KEPT
from meshgate.observability.exposition import REPORT_FAMILIES, SPECS
from meshgate.observability.requests import NB

__all__ = ["MAX_ROWS", "Malformed", "clean"]

MAX_ROWS = 50_000
"""Samples in one report, at most (all families)."""
MAX_LABEL = 2048
"""Characters of a label value (a SPIFFE ID may be that long)."""
_FAMILIES = frozenset(REPORT_FAMILIES)
_DENIAL_TEXT = {"source": MAX_LABEL, "policy": 512, "reason": 512, "method": 16, "path": 512}

# Where a family's labels name the reporting proxy itself.
_SELF_BY_DIRECTION = {
    "meshgate_requests_total": (3, 4),
    "meshgate_request_duration_seconds": (3, 4),
}
_SELF = {"meshgate_identity_cert_expiration_timestamp_seconds": 0}
_INBOUND = "inbound/"


class Malformed(ValueError):
    """Why a report is not taken."""


def _number(v: Any, where: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise Malformed(f"{where}: not a finite number >= 0")
    return float(v) if type(v) is float else int(v)


def _text(v: Any, limit: int, where: str) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise Malformed(f"{where}: not a string of at most {limit} characters")
    return v


def _labels(v: Any, n: int, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) != n:
        raise Malformed(f"{where}: labels are not a list of {n}")
    return tuple(_text(x, MAX_LABEL, where) for x in v)


def _own_policy(policy: str, service: str, where: str) -> None:
    """A sidecar's policy is `inbound/<its service>`: never another's."""
    if policy.startswith(_INBOUND) and policy != _INBOUND + service:
        raise Malformed(f"{where}: the policy of another service ({policy!r})")


def _sample(name: str, row: Any, identity: str, service: str, where: str) -> list[Any]:
    spec = SPECS[name]
    if not isinstance(row, list) or not row:
        raise Malformed(f"{where}: a sample is not a list")
    labels = _labels(row[0], len(spec.labels), where)
    if name in _SELF_BY_DIRECTION:
        src, dst = _SELF_BY_DIRECTION[name]
        own = dst if labels[0] == "inbound" else src if labels[0] == "outbound" else None
        if own is None:
            raise Malformed(f"{where}: direction {labels[0]!r}")
        if labels[own] != identity:
            raise Malformed(f"{where}: a request of another proxy ({labels[own]!r})")
    elif name in _SELF and labels[_SELF[name]] != identity:
        raise Malformed(f"{where}: the certificate of another proxy")
    elif name == "meshgate_authz_decisions_total":
        _own_policy(labels[0], service, where)
    if spec.type == "histogram":
        # [labels, buckets, sum, count] (+ last)
        if len(row) not in (4, 5):
            raise Malformed(f"{where}: a histogram sample is [labels, buckets, sum, count]")
        buckets = row[1]
        if not isinstance(buckets, list) or len(buckets) != NB:
            raise Malformed(f"{where}: a histogram has {NB} buckets")
        values: list[Any] = [[_number(b, where) for b in buckets]]
        values += [_number(v, where) for v in row[2:]]
        return [labels, *values]
    if len(row) not in (2, 3):
        raise Malformed(f"{where}: a sample is [labels, value]")
    return [labels, *(_number(v, where) for v in row[1:])]


def _denial(d: Any, service: str, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise Malformed(f"{where}: not an object")
    out: dict[str, Any] = {"at": _number(d.get("at"), f"{where}.at")}
    for key, limit in _DENIAL_TEXT.items():
        out[key] = _text(d.get(key), limit, f"{where}.{key}")
    rule = d.get("rule")
    out["rule"] = None if rule is None else _text(rule, 512, f"{where}.rule")
    if d.get("destination") != service:
        raise Malformed(f"{where}: a denial of another service")
    _own_policy(out["policy"], service, where)
    out["destination"] = service
    return out


def clean(msg: dict[str, Any], identity: str, service: str) -> dict[str, Any]:
    """The report `msg` of the proxy `identity` (of `service`), as kept:
    only the contract's keys and families; Malformed when it is not one."""
    at = _number(msg.get("at"), "at")
    samples = msg.get("samples")
    if not isinstance(samples, dict):
        raise Malformed("samples: not an object")
    kept: dict[str, list[Any]] = {}
    rows = 0
    for name, family in samples.items():
        if name not in _FAMILIES:
            continue
        if not isinstance(family, list):
            raise Malformed(f"samples.{name}: not a list")
        rows += len(family)
        if rows > MAX_ROWS:
            raise Malformed(f"more than {MAX_ROWS} samples")
        kept[name] = [
            _sample(name, row, identity, service, f"samples.{name}[{i}]")
            for i, row in enumerate(family)
        ]
    denials = msg.get("denials")
    if not isinstance(denials, list) or len(denials) > DENIALS_KEPT:
        raise Malformed(f"denials: not a list of at most {DENIALS_KEPT}")
    return {
        "type": "report",
        "at": at,
        "samples": kept,
        "denials": [_denial(d, service, f"denials[{i}]") for i, d in enumerate(denials)],
    }
