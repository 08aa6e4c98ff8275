"""The `metrics:` section, the sidecar's --metrics-idle-expiry, and how
request rows expire: by group, never one row of a busy group."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import pytest

from meshgate.config.loader import ConfigError
from meshgate.engine.load import load_config_text
from meshgate.mesh.sidecar.cli import _duration
from meshgate.observability import requests
from meshgate.observability.exposition import merge
from meshgate.observability.hub import MetricsHub
from meshgate.observability.requests import RequestSeries


def test_metrics_defaults_and_durations() -> None:
    config = load_config_text("listen: 127.0.0.1:0\n", "m.yaml", env={})
    assert (config.metrics.idle_expiry, config.metrics.max_identities) == (600.0, 1000)
    text = "metrics:\n  idle_expiry: 90s\n  max_identities: 50\n"
    config = load_config_text(text, "m.yaml", env={})
    assert (config.metrics.idle_expiry, config.metrics.max_identities) == (90.0, 50)
    assert load_config_text("metrics: {idle_expiry: 2m}\n", "m.yaml", env={}).metrics.idle_expiry
    assert load_config_text("metrics: {idle_expiry: 2m}\n", "m.yaml", env={}).metrics == (
        load_config_text("metrics: {idle_expiry: 120}\n", "m.yaml", env={}).metrics
    )


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("metrics:\n  idle_expiry: 0s\n", "metrics.idle_expiry", "greater than zero"),
        ("metrics:\n  idle_expiry: soon\n", "metrics.idle_expiry", "expected a duration"),
        ("metrics:\n  max_identities: 0\n", "metrics.max_identities", "greater than or equal"),
        ("metrics:\n  idle: 2s\n", "metrics.idle", ""),
    ],
)
def test_a_bad_metrics_section_names_file_line_and_field(
    text: str, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "m.yaml", env={})
    (problem,) = info.value.problems
    assert problem.field == field
    assert problem.line == 2
    assert message in problem.message
    assert "m.yaml:2" in str(info.value)


def test_the_sidecar_flag_parses_durations() -> None:
    assert _duration("2s") == 2.0
    assert _duration("10m") == 600.0
    with pytest.raises(argparse.ArgumentTypeError):
        _duration("0")


class _Clock:
    now = 0.0


@pytest.fixture(autouse=True)
def _clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The series' clock (`requests.monotonic`), moved by hand."""
    monkeypatch.setattr(requests, "monotonic", lambda: _Clock.now)


def _ex(status: int, t: float, route: str = "a", method: bytes = b"GET") -> Any:
    """A stand-in for an exchange that ends at time `t`."""
    _Clock.now = t
    return SimpleNamespace(
        status=status,
        kind="",
        cluster=SimpleNamespace(name="up"),
        last_ep=None,
        route_label=route,
        method=method,
        t_start=t - 0.002,
        started=t - 0.001,
        try_t0=t - 0.001,
        attempt=1,
        sent_body=0,
        bytes_out=10,
        proto=SimpleNamespace(peer=None),
        trace=None,
    )


def _record(s: RequestSeries, *args: Any) -> None:
    s.record(_ex(*args))


def test_a_group_expires_whole_or_not_at_all() -> None:
    s = RequestSeries("inbound", False)
    _record(s, 201, 1.0)  # idle from t=1
    _record(s, 200, 1.0)
    _record(s, 200, 1.0, "b")  # another group, idle
    _record(s, 200, 9.0)  # the group (route a, GET) busy at t=9
    assert s.expire(5.0) == 1
    assert {k[0] for k in s.rows} == {"a"}
    assert {k[4] for k in s.rows} == {200, 201}  # the 201 row stays with its group
    total = merge([s.samples()])["meshgate_response_bytes_total"]
    assert [v for _, v, _ in total] == [30]
    assert s.expire(10.0) == 2 and not s.rows


def test_a_peers_drop_spares_a_group_touched_since() -> None:
    s = RequestSeries("inbound", False)
    _record(s, 201, 1.0)
    _record(s, 200, 6.0)
    group = ("inbound", "a", "up", "", "", "GET")
    s.drop_groups({group}, 5.0)
    assert len(s.rows) == 2
    s.drop_groups({("inbound", "b", "up", "", "", "GET")}, 7.0)
    assert len(s.rows) == 2
    s.drop_groups({group}, 7.0)
    assert not s.rows


def test_with_peers_a_worker_drops_nothing_on_its_own_while_scrapes_come() -> None:
    hub = MetricsHub()
    hub.configure(2.0, 1000)
    store = hub.series("gateway", False)
    _record(store, 200, 1.0)
    hub.peers = ["/nonexistent"]
    hub.scraped_at = 100.0
    assert hub.expire_local(now=105.0) == 0  # a scrape 5 s ago: the scrapes decide
    assert hub.expire_local(now=109.0) == 1  # none for 4x the expiry: the backstop
    hub.peers = []
    _record(store, 200, 1.0)
    assert hub.expire_local(now=3.5) == 1  # alone: its own decision at the expiry
