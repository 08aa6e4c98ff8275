"""The proxies' reports (docs/dashboard-api.md): the authz filter's ring of
denials, the proxy's `Reporter`, and the control plane's check of a report
(`mesh.control.reports.clean`), which takes a proxy's word only about
itself and refuses every other shape."""

from __future__ import annotations

import copy
import time
from typing import Any

import orjson
import pytest

from meshgate.config.authz import AuthzConfig
from meshgate.filters import FilterRequest
from meshgate.filters.authz import DENIALS_KEPT, NO_RULE, AuthzFilter, DenialRing
from meshgate.mesh.control.reports import MAX_ROWS, Malformed, clean
from meshgate.mesh.report import Reporter
from meshgate.observability.exposition import REPORT_FAMILIES, SPECS
from meshgate.observability.hub import MetricsHub
from meshgate.observability.requests import NB

TD = "spiffe://mesh.test"
ME = f"{TD}/ns/default/sa/beta"
CALLER = f"{TD}/ns/default/sa/alpha"
OTHER = f"{TD}/ns/default/sa/gamma"


def _request(method: bytes, target: bytes, peer: str | None) -> FilterRequest:
    req = FilterRequest(method, target, [], b"127.0.0.1")
    req.peer = peer
    return req


def _filter(ring: DenialRing | None = None, mode: str = "enforce") -> AuthzFilter:
    cfg = AuthzConfig.model_validate(
        {
            "default": "deny",
            "mode": mode,
            "rules": [
                {"name": "reads", "action": "allow", "from": [CALLER], "methods": ["GET"]},
                {"name": "no-admin", "action": "deny", "paths": ["/admin/**"]},
            ],
        }
    )
    return AuthzFilter(cfg, "inbound/beta", ring)


# -- the ring ----------------------------------------------------------------------------


def test_only_denials_go_into_the_ring_with_the_path_and_not_the_query() -> None:
    f = _filter()
    assert f(_request(b"GET", b"/items/1?x=1", CALLER)) is None
    assert not f.denials.entries  # allowed: nothing kept
    before = time.time()
    assert f(_request(b"POST", b"/orders?card=4111111111111111", CALLER)) is not None
    assert f(_request(b"GET", b"/admin/panel?k=1", CALLER)) is not None
    assert f(_request(b"GET", b"/x", None)) is not None
    got, seq = f.denials.since(0)
    assert seq == 3
    assert [(d["method"], d["path"], d["rule"], d["reason"]) for d in got] == [
        ("POST", "/orders", None, NO_RULE),
        ("GET", "/admin/panel", "no-admin", "rule 'no-admin' (deny) matched"),
        ("GET", "/x", None, NO_RULE),
    ]
    assert {d["policy"] for d in got} == {"inbound/beta"}
    assert {d["destination"] for d in got} == {"beta"}
    assert [d["source"] for d in got] == [CALLER, CALLER, "plaintext"]
    assert all(before <= d["at"] <= time.time() for d in got)
    assert "4111" not in orjson.dumps(got).decode()


def test_audit_mode_keeps_no_denial() -> None:
    f = _filter(mode="audit")
    assert f(_request(b"POST", b"/orders", CALLER)) is None
    assert not f.denials.entries


def test_the_ring_keeps_the_last_50_and_a_reader_gets_each_once() -> None:
    ring = DenialRing()
    f = _filter(ring)
    for i in range(DENIALS_KEPT + 20):
        f(_request(b"POST", b"/n/%d" % i, CALLER))
    assert len(ring.entries) == DENIALS_KEPT
    got, seq = ring.since(0)
    assert [d["path"] for d in got] == [f"/n/{i}" for i in range(20, 70)]
    assert ring.since(seq) == ([], seq)
    f(_request(b"POST", b"/late", CALLER))
    got, seq2 = ring.since(seq)
    assert [d["path"] for d in got] == ["/late"] and seq2 == seq + 1


def test_a_long_path_or_method_is_cut_short() -> None:
    f = _filter()
    f(_request(b"PROPFINDXXXXXXXXXXXXXXXXXXXXXXXX", b"/" + b"a" * 10_000, CALLER))
    (d,), _ = f.denials.since(0)
    assert len(d["path"]) == 512 and len(d["method"]) == 16


def test_filters_of_one_proxy_share_its_ring_across_rebuilds() -> None:
    ring = DenialRing()
    _filter(ring)(_request(b"POST", b"/one", CALLER))
    _filter(ring)(_request(b"POST", b"/two", CALLER))  # the next snapshot's filter
    assert [d["path"] for d in ring.since(0)[0]] == ["/one", "/two"]


# -- the reporter --------------------------------------------------------------------------


def test_the_reporter_sends_its_hubs_families_and_new_denials_only() -> None:
    hub = MetricsHub()
    hub.identity(ME, lambda: 1e9)
    hub.register(
        "x",
        lambda: {
            "meshgate_endpoint_state": [[("up", "1.2.3.4:80", "serving"), 1]],
            "meshgate_pool_connections": [[("up", "1.2.3.4:80", "idle"), 3]],
        },
    )
    ring = DenialRing()
    reporter = Reporter(hub, ring, "beta")
    ring.add(CALLER, "", "gw-route", None, "GET", "/a")
    first = reporter()
    assert set(first) == {"at", "samples", "denials"}
    assert set(first["samples"]) <= set(REPORT_FAMILIES)
    assert "meshgate_pool_connections" not in first["samples"]
    assert first["samples"]["meshgate_endpoint_state"] == [[("up", "1.2.3.4:80", "serving"), 1]]
    assert first["samples"]["meshgate_identity_cert_expiration_timestamp_seconds"] == [[(ME,), 1e9]]
    # A policy that names no service (a gateway route's) is the proxy's own.
    assert [d["destination"] for d in first["denials"]] == ["beta"]
    assert reporter()["denials"] == []
    # Its own report passes the control plane's check.
    clean(orjson.loads(orjson.dumps({"type": "report", **first})), ME, "beta")


def test_a_report_is_not_a_scrape() -> None:
    hub = MetricsHub()
    hub.peers = ["/nowhere.sock"]
    hub.scraped_at = 5.0
    Reporter(hub, DenialRing(), "beta")()
    assert hub.scraped_at == 5.0  # expiry stays the scrapes' to decide
    hub.collect()
    assert hub.scraped_at > 5.0


# -- the control plane's check ---------------------------------------------------------------


def _row(direction: str, src: str, dst: str, n: int = 3) -> list[Any]:
    labels = [direction, "inbound/beta", "app", src, dst, "GET", "200", "2xx", "true", ""]
    return [labels, n, 123.4]


def _hist(direction: str, src: str, dst: str) -> list[Any]:
    labels = [direction, "inbound/beta", "app", src, dst, "GET", "2xx", "true"]
    return [labels, [1] + [0] * (NB - 1), 0.0004, 1, 123.4]


def _good() -> dict[str, Any]:
    return {
        "type": "report",
        "at": 1764790000.12,
        "samples": {
            "meshgate_requests_total": [_row("inbound", CALLER, ME), _row("outbound", ME, OTHER)],
            "meshgate_request_duration_seconds": [_hist("inbound", CALLER, ME)],
            "meshgate_authz_decisions_total": [[["inbound/beta", "deny", "(default)", CALLER], 2]],
            "meshgate_identity_cert_expiration_timestamp_seconds": [[[ME], 1764800000.0]],
            "meshgate_endpoint_state": [[["app", "127.0.0.1:9", "serving"], 1]],
        },
        "denials": [
            {
                "at": 1764790000.1,
                "source": CALLER,
                "destination": "beta",
                "policy": "inbound/beta",
                "rule": None,
                "reason": NO_RULE,
                "method": "POST",
                "path": "/orders",
            }
        ],
    }


def test_a_good_report_is_kept_as_sent() -> None:
    msg = _good()
    msg["extra"] = "x" * 100  # not the contract's: not kept
    msg["samples"]["meshgate_some_future_total"] = [[["a"], 1]]  # a newer proxy's: left out
    got = clean(msg, ME, "beta")
    assert set(got) == {"type", "at", "samples", "denials"}
    assert set(got["samples"]) == set(_good()["samples"])
    for name, rows in _good()["samples"].items():
        assert [[list(r[0]), *r[1:]] for r in got["samples"][name]] == rows
    assert got["denials"] == _good()["denials"]


def _broken(edit: Any) -> dict[str, Any]:
    msg = copy.deepcopy(_good())
    edit(msg)
    return msg


def _samples(msg: dict[str, Any]) -> dict[str, Any]:
    samples: dict[str, Any] = msg["samples"]
    return samples


BROKEN = {
    "at is text": lambda m: m.update(at="now"),
    "at is missing": lambda m: m.pop("at"),
    "at is a bool": lambda m: m.update(at=True),
    "samples is a list": lambda m: m.update(samples=[]),
    "a family is an object": lambda m: _samples(m).update(meshgate_requests_total={}),
    "a sample is not a list": lambda m: _samples(m)["meshgate_requests_total"].append("x"),
    "an inbound request to another proxy": lambda m: _samples(m)["meshgate_requests_total"].append(
        _row("inbound", CALLER, OTHER)
    ),
    "an outbound request of another proxy": lambda m: _samples(m)["meshgate_requests_total"].append(
        _row("outbound", OTHER, CALLER)
    ),
    "another proxy's latency": lambda m: _samples(m)["meshgate_request_duration_seconds"].append(
        _hist("inbound", CALLER, OTHER)
    ),
    "a direction of its own": lambda m: _samples(m)["meshgate_requests_total"].append(
        _row("sideways", ME, ME)
    ),
    "another proxy's certificate": lambda m: _samples(m)[
        "meshgate_identity_cert_expiration_timestamp_seconds"
    ].append([[OTHER], 1.0]),
    "too few labels": lambda m: _samples(m)["meshgate_endpoint_state"].append([["app"], 1]),
    "a label that is a number": lambda m: _samples(m)["meshgate_endpoint_state"].append(
        [["app", 9, "serving"], 1]
    ),
    "a label too long": lambda m: _samples(m)["meshgate_endpoint_state"].append(
        [["app", "x" * 5000, "serving"], 1]
    ),
    "a negative value": lambda m: _samples(m)["meshgate_endpoint_state"].append(
        [["app", "b", "serving"], -1]
    ),
    "a value that is text": lambda m: _samples(m)["meshgate_endpoint_state"].append(
        [["app", "b", "serving"], "1"]
    ),
    "a value that is a list": lambda m: _samples(m)["meshgate_endpoint_state"].append(
        [["app", "b", "serving"], [1]]
    ),
    "a counter with extra values": lambda m: _samples(m)["meshgate_endpoint_state"].append(
        [["app", "b", "serving"], 1, 2, 3]
    ),
    "a histogram short of buckets": lambda m: _samples(m)[
        "meshgate_request_duration_seconds"
    ].append([_hist("inbound", CALLER, ME)[0], [1], 0.1, 1]),
    "a histogram bucket that is text": lambda m: _samples(m)[
        "meshgate_request_duration_seconds"
    ].append([_hist("inbound", CALLER, ME)[0], ["1"] * NB, 0.1, 1]),
    "a histogram without its count": lambda m: _samples(m)[
        "meshgate_request_duration_seconds"
    ].append([_hist("inbound", CALLER, ME)[0], [0] * NB, 0.1]),
    "denials is an object": lambda m: m.update(denials={}),
    "denials is missing": lambda m: m.pop("denials"),
    "51 denials": lambda m: m.update(denials=m["denials"] * (DENIALS_KEPT + 1)),
    "a denial that is text": lambda m: m["denials"].append("denied"),
    "a denial of another service": lambda m: m["denials"][0].update(destination="gamma"),
    "a denial without a destination": lambda m: m["denials"][0].pop("destination"),
    "a denial under another service's policy": lambda m: m["denials"][0].update(
        policy="inbound/gamma"
    ),
    "decisions of another service's policy": lambda m: _samples(m)[
        "meshgate_authz_decisions_total"
    ].append([["inbound/gamma", "deny", "(default)", CALLER], 2]),
    "a denial's path too long": lambda m: m["denials"][0].update(path="/" + "p" * 600),
    "a denial's rule a number": lambda m: m["denials"][0].update(rule=7),
    "a denial without its time": lambda m: m["denials"][0].pop("at"),
    "a denial's method an object": lambda m: m["denials"][0].update(method={}),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_malformed_report_is_refused(what: str) -> None:
    with pytest.raises(Malformed):
        clean(_broken(BROKEN[what]), ME, "beta")


def test_too_many_rows_are_refused() -> None:
    row = [["app", "127.0.0.1:9", "serving"], 1]
    msg = _good()
    msg["samples"]["meshgate_endpoint_state"] = [row] * (MAX_ROWS + 1)
    with pytest.raises(Malformed, match="samples"):
        clean(msg, ME, "beta")


def test_every_reported_family_is_a_known_one() -> None:
    assert set(REPORT_FAMILIES) <= set(SPECS)
    assert SPECS["meshgate_consumer_requests_total"].labels == ("route", "consumer")
