"""The control plane's /metrics text, rendered from its state (one function,
driven by a stand-in for the control plane)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from meshgate.mesh.control.admin import render_metrics


def _metrics(streams: list[Any], now: float) -> str:
    push: Any = SimpleNamespace(
        streams=list(streams),
        version=7,
        nacks=2,
        propagation=[0.01, 0.02],
        reports={"accepted": 4, "malformed": 1, "too_often": 0},
    )
    cp: Any = SimpleNamespace(
        generation=3, issued=5, refused=1, metrics_source_state=lambda: {"kind": "reports"}
    )
    return render_metrics(cp, push, now=now)


def _stream(proxy_id: str, identity: str, not_before: float, not_after: float) -> Any:
    cert = {"not_before": not_before, "not_after": not_after, "serial": "ab"}
    return SimpleNamespace(proxy_id=proxy_id, identity=identity, cert=cert)


def test_a_certificate_in_its_last_fifth_is_expiring() -> None:
    fresh = _stream("p1", "spiffe://td/ns/default/sa/a", 1000.0, 2000.0)
    late = _stream("p2", 'spiffe://td/ns/default/sa/"b"', 1000.0, 2000.0)
    text = _metrics([fresh], 1500.0)
    assert (
        'meshgate_identity_cert_expiring{identity="spiffe://td/ns/default/sa/a",proxy="p1"} 0'
        in text
    )
    text = _metrics([fresh, late], 1850.0)
    assert 'proxy="p1"} 1' in text and 'proxy="p2"} 1' in text
    assert '\\"b\\"' in text  # label values are escaped
    text = _metrics([fresh], 1790.0)
    assert 'proxy="p1"} 0' in text


def test_counters_and_the_propagation_summary() -> None:
    text = _metrics([], 0.0)
    assert "meshgate_control_proxies_connected 0" in text
    assert "meshgate_control_config_generation 3" in text
    assert "meshgate_control_nacks_total 2" in text
    assert 'meshgate_control_certificates_total{outcome="refused"} 1' in text
    assert "meshgate_control_propagation_seconds_count 2" in text
    assert 'meshgate_control_reports_total{outcome="malformed"} 1' in text
    for line in text.splitlines():
        assert line.startswith("#") or " " in line
