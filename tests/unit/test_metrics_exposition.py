"""The request series, the merge of workers' samples, and the text format.

The format is checked with prometheus-client's own parser: what meshgate
renders must be what Prometheus reads.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshgate.observability import requests
from meshgate.observability.exposition import SPECS, merge, render
from meshgate.observability.requests import BUCKETS, RequestSeries, code_class, reason_of


class _Loop:
    """The clock the series reads (`requests.monotonic`), moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests, "monotonic", lambda: _CLOCK.now)


_CLOCK = _Loop()


def _exchange(loop: _Loop, **kw: Any) -> SimpleNamespace:
    ep = SimpleNamespace(pool=SimpleNamespace(identity=kw.pop("dst", None), address="10.0.0.1:80"))
    fields: dict[str, Any] = {
        "loop": loop,
        "status": 200,
        "kind": "",
        "cluster": SimpleNamespace(name="orders"),
        "last_ep": ep,
        "proto": SimpleNamespace(peer=kw.pop("peer", None)),
        "route_label": "orders",
        "method": b"GET",
        "t_start": loop.now - 0.003,
        "started": loop.now - 0.002,
        "try_t0": loop.now - 0.002,
        "attempt": 1,
        "sent_body": 10,
        "bytes_out": 120,
        "trace": None,
    }
    fields.update(kw)
    return SimpleNamespace(**fields)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_rows_are_keyed_by_config_names_never_by_the_request() -> None:
    loop = _CLOCK
    series = RequestSeries("inbound", False)
    for i in range(50):
        series.record(_exchange(loop, method=f"M{i}".encode()))
    series.record(_exchange(loop, method=b"POST"))
    # Fifty non-standard methods are one row ("other"); POST is another.
    assert len(series.rows) == 2
    methods = sorted(k[3] for k in series.rows)
    assert methods == [b"POST", b"other"]


def test_identities_are_capped_then_other() -> None:
    loop = _CLOCK
    series = RequestSeries("inbound", True, max_identities=3)
    for i in range(10):
        series.record(_exchange(loop, peer=f"spiffe://td/ns/x/sa/s{i}"))
    sources = {k[2] for k in series.rows}
    assert len(sources) == 4
    assert "other" in sources


def test_render_is_what_prometheus_parses_with_exact_counts_and_buckets() -> None:
    loop = _CLOCK
    series = RequestSeries("outbound", True)
    series.local_identity = "spiffe://td/ns/a/sa/a"
    for _ in range(7):
        series.record(_exchange(loop, dst="spiffe://td/ns/b/sa/b"))
    series.record(_exchange(loop, status=503, kind="upstream-overloaded", started=0.0))
    fams = _families(render(merge([series.samples()])))
    total = fams["meshgate_requests"]  # the parser drops _total
    by_code = {s.labels["code"]: s.value for s in total.samples if s.name.endswith("_total")}
    assert by_code == {"200": 7.0, "503": 1.0}
    refused = next(s for s in total.samples if s.labels["code"] == "503")
    assert refused.labels["reason"] == "breaker"
    assert refused.labels["source_identity"] == "spiffe://td/ns/a/sa/a"
    ok = next(s for s in total.samples if s.labels["code"] == "200")
    assert ok.labels["destination_identity"] == "spiffe://td/ns/b/sa/b"
    assert ok.labels["tls"] == "true"
    hist = fams["meshgate_request_duration_seconds"]
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    le_inf = [s for s in buckets if s.labels["le"] == "+Inf"]
    assert sum(s.value for s in le_inf) == 8
    # 3 ms falls in the 5 ms bucket, not the 2.5 ms one.
    ok_buckets = {s.labels["le"]: s.value for s in buckets if s.labels["code_class"] == "2xx"}
    assert ok_buckets["0.0025"] == 0
    assert ok_buckets["0.005"] == 7
    # A local answer has no upstream part.
    up = fams["meshgate_upstream_duration_seconds"]
    up_counts = {s.labels["code_class"]: s.value for s in up.samples if s.name.endswith("_count")}
    assert up_counts == {"2xx": 7.0}


def test_merge_adds_workers_up_and_keeps_the_largest_of_max_gauges() -> None:
    loop = _CLOCK
    a, b = RequestSeries("inbound", False), RequestSeries("inbound", False)
    for _ in range(3):
        a.record(_exchange(loop))
    for _ in range(4):
        b.record(_exchange(loop))
    pa = a.samples()
    pa["meshgate_config_generation"] = [[(), 2]]
    pb = orjson.loads(orjson.dumps(b.samples()))  # as a peer sends it
    pb["meshgate_config_generation"] = [[[], 5]]
    merged = merge([pa, pb])
    assert merged["meshgate_requests_total"][0][1] == 7
    hist = merged["meshgate_request_duration_seconds"][0]
    assert hist[3] == 7 and sum(hist[1]) == 7
    assert merged["meshgate_config_generation"][0][1] == 5


def test_idle_rows_expire_and_busy_ones_stay() -> None:
    loop = _CLOCK
    series = RequestSeries("inbound", False)
    series.record(_exchange(loop, route_label="quiet"))
    loop.now += 50
    series.record(_exchange(loop, route_label="busy"))
    assert series.expire(loop.now - 10) == 1
    assert [k[0] for k in series.rows] == ["busy"]


def test_every_family_has_help_and_type_even_when_empty() -> None:
    fams = _families(render({}))
    assert set(SPECS) <= {f.name + ("_total" if f.type == "counter" else "") for f in fams.values()}


def test_reasons_and_classes_are_a_fixed_set() -> None:
    assert reason_of("authz-denied", 403) == "authz"
    assert reason_of("something-new", 401) == "auth"
    assert reason_of("something-new", 500) == "other"
    assert code_class(204) == "2xx" and code_class(999) == "other"
    assert tuple(sorted(BUCKETS)) == BUCKETS


def test_a_problem_type_of_its_own_is_reason_other_in_one_row() -> None:
    series = RequestSeries("inbound", False)
    for kind in ("aggregate-template", "aggregate-bad-input", "something-else"):
        series.record(_exchange(_CLOCK, status=500, kind=kind, started=0.0))
    assert len(series.rows) == 1
    (key,) = series.rows
    assert series.labels(key)[-1] == "other"


def test_not_counting_still_hands_the_exchange_on() -> None:
    series = RequestSeries("inbound", False)
    seen: list[str] = []
    series.then = lambda ex, now, reason: seen.append(reason)
    series.pass_on(_exchange(_CLOCK, status=429, kind="rate-limited"))
    assert seen == ["ratelimit"]
    assert series.rows == {}
