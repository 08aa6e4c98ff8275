"""The admin listener with edge security: /metrics counts outcomes, /config hides secrets."""

from __future__ import annotations

import hashlib
import re

import pytest

from support.client import fetch
from support.proxy import Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

SECRET = "an-hmac-secret-that-is-long-enough-1234"
KEY = "metrics-key"


def _config(up: UpstreamServer) -> dict[str, object]:
    return {
        "auth": {
            "hs": {"type": "jwt", "secret": SECRET},
            "keys": {"type": "api_key"},
        },
        "consumers": {"acme": {"api_keys": ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]}},
        "upstreams": {"up": upstream_block(up)},
        "routes": [
            {
                "path": "/m/**",
                "name": "metered",
                "upstream": "up",
                "auth": ["hs", "keys"],
                "rate_limit": "2/min",
            }
        ],
    }


def _metric(text: str, name: str, **labels: str) -> int:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return int(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def test_metrics_count_auth_and_rate_limit_outcomes(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(_config(upstream))
    assert fetch(proxy.url("/m/1")).status == 401
    assert fetch(proxy.url("/m/1"), "-H", "X-API-Key: wrong").status == 401
    assert fetch(proxy.url("/m/1"), "-H", "Authorization: Bearer not.a.jwt").status == 401
    statuses = [fetch(proxy.url("/m/1"), "-H", f"X-API-Key: {KEY}").status for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = fetch(proxy.admin_url("/metrics"))
    assert r.status == 200
    assert (r.header("content-type") or "").startswith("text/plain")
    text = r.body.decode()
    auth = "meshgate_auth_requests_total"
    assert _metric(text, auth, route="metered", outcome="missing_credentials") == 1
    assert _metric(text, auth, route="metered", outcome="refused") == 2
    failures = "meshgate_auth_failures_total"
    assert _metric(text, failures, route="metered", reason="missing_credentials") == 1
    assert _metric(text, failures, route="metered", reason="invalid_token") == 2
    # Every request is in the golden signals, by the reason of its refusal.
    requests = "meshgate_requests_total"
    assert _metric(text, requests, route="metered", code="401", reason="auth") == 3
    assert _metric(text, requests, route="metered", code="429", reason="ratelimit") == 1
    assert _metric(text, requests, route="metered", code="200", reason="", upstream="up") == 2
    assert _metric(text, auth, route="metered", outcome="admitted") == 3
    # Per consumer: the 429 was admitted by auth before the limit refused it.
    consumers = "meshgate_consumer_requests_total"
    assert _metric(text, consumers, route="metered", consumer="acme") == 3
    decisions = "meshgate_ratelimit_decisions_total"
    assert _metric(text, decisions, route="metered", outcome="allowed") == 2
    assert _metric(text, decisions, route="metered", outcome="limited") == 1
    assert re.search(r"(?m)^# TYPE meshgate_auth_requests_total counter$", text)


def test_admin_config_redacts_secrets(stack: Stack, upstream: UpstreamServer) -> None:
    config = _config(upstream)
    config["redis"] = "redis://user:hunter2@127.0.0.1:1/0"
    proxy = stack.proxy(config)
    r = fetch(proxy.admin_url("/config"))
    assert r.status == 200
    body = r.body.decode()
    assert SECRET not in body and "hunter2" not in body, body
    doc = r.json()["config"]
    assert doc["auth"]["hs"]["secret"] == "<redacted>"
    assert doc["redis"]["url"] == "redis://<redacted>@127.0.0.1:1/0"
