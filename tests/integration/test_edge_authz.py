"""A route's `authz:` and limits by `peer`, through the real gateway process.

These requests are plaintext (no client certificate: `FilterRequest.peer` is
None, the source `plaintext`); the mTLS cases come with the sidecar. What
is pinned: a denial is a 403 problem naming the policy, and the upstream
receives nothing; a rule can let a plaintext caller in by method and path;
a limit keyed by peer counts plaintext callers in one bucket, beside a
second limit on the same route; /metrics counts both by source.
"""

from __future__ import annotations

import re

import pytest

from support.client import fetch
from support.proxy import Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

ORDERS = "spiffe://mesh.local/ns/default/sa/orders"


def _config(up: UpstreamServer) -> dict[str, object]:
    return {
        "upstreams": {"up": upstream_block(up)},
        "routes": [
            {
                "path": "/payments/**",
                "name": "payments",
                "upstream": "up",
                "authz": {
                    "default": "deny",
                    "rules": [{"name": "orders", "action": "allow", "from": [ORDERS]}],
                },
            },
            {
                "path": "/probes/**",
                "name": "probes",
                "upstream": "up",
                "authz": {
                    "default": "deny",
                    "rules": [
                        {
                            "name": "health",
                            "action": "allow",
                            "from": ["plaintext"],
                            "methods": ["GET"],
                            "paths": ["/probes/healthz", "/probes/ready/*"],
                        },
                        {"name": "no-debug", "action": "deny", "headers": {"x-debug": True}},
                    ],
                },
            },
            {
                "path": "/inbound/**",
                "name": "inbound",
                "upstream": "up",
                "rate_limit": [
                    {"limit": 3, "period": "1h", "key": "peer", "name": "per-source"},
                    {"limit": 100, "period": "1h", "key": "route", "name": "service"},
                ],
            },
        ],
    }


def _metric(text: str, name: str, **labels: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return int(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def test_authz_and_peer_limits_through_the_gateway(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(_config(upstream))

    # default: deny, and no rule for a plaintext caller: 403, and the upstream sees nothing.
    r = fetch(proxy.url("/payments/charge?amount=5"), "-X", "POST", "-d", "{}")
    assert r.status == 403, r.describe()
    assert (r.header("content-type") or "").startswith("application/problem+json")
    doc = r.json()
    assert doc["type"] == "https://meshgate.dev/problems/authz-denied"
    assert "'payments'" in doc["detail"] and "default is deny" in doc["detail"], doc
    assert (doc["policy"], doc["rule"], doc["decision"], doc["source"]) == (
        "payments",
        None,
        "deny",
        "plaintext",
    )
    assert doc["request_id"] == r.header("x-request-id")
    assert upstream.bytes_received == 0 and upstream.requests == []
    proxy.wait_for_log(r"authz payments: denied POST /payments/charge from plaintext")

    # A rule that lets plaintext callers in, by method and path; a deny rule on a header.
    assert fetch(proxy.url("/probes/healthz")).status == 200
    assert fetch(proxy.url("/probes/ready/db?verbose=1")).status == 200
    assert [q.path for q in upstream.requests] == ["/probes/healthz", "/probes/ready/db"]
    head = fetch(proxy.url("/probes/healthz"), "-I")
    assert head.status == 403  # HEAD is not GET
    for args in (("-X", "POST"), ("-H", "X-Debug: 1")):
        denied = fetch(proxy.url("/probes/healthz"), *args)
        assert denied.status == 403, denied.describe()
        assert denied.json()["rule"] == (None if args[0] == "-X" else "no-debug")
    assert fetch(proxy.url("/probes/other")).status == 403
    assert len(upstream.requests) == 2

    # Two limits: per source (plaintext callers share one bucket), then the route's.
    statuses = [fetch(proxy.url(f"/inbound/{i}")) for i in range(4)]
    assert [s.status for s in statuses] == [200, 200, 200, 429], statuses[-1].describe()
    ok, refused = statuses[0], statuses[3]
    assert ok.header_all("ratelimit-policy") == [
        '"per-source";q=3;w=3600',
        '"service";q=100;w=3600',
    ]
    assert ok.header_all("x-ratelimit-limit") == ["3"]  # the first limit's alone
    assert refused.json()["type"] == "https://meshgate.dev/problems/rate-limited"
    assert refused.header("retry-after") is not None
    assert refused.header("x-ratelimit-remaining") == "0"

    text = fetch(proxy.admin_url("/metrics")).body.decode()
    decisions = "meshgate_authz_decisions_total"
    assert re.search(rf"(?m)^# TYPE {decisions} counter$", text)
    assert (
        _metric(
            text,
            decisions,
            policy="payments",
            decision="deny",
            rule="(default)",
            source="plaintext",
        )
        == 1
    )
    assert (
        _metric(
            text, decisions, policy="probes", decision="allow", rule="health", source="plaintext"
        )
        == 2
    )
    assert _metric(text, decisions, policy="probes", decision="deny", rule="no-debug") == 1
    by_source = "meshgate_ratelimit_limited_by_source_total"
    assert _metric(text, by_source, route="inbound", limit="per-source", source="plaintext") == 1
    limits = "meshgate_ratelimit_decisions_total"
    assert _metric(text, limits, route="inbound", limit="per-source", outcome="limited") == 1
    assert _metric(text, limits, route="inbound", limit="service", outcome="allowed") == 3


def test_audit_mode_lets_denied_requests_through(stack: Stack, upstream: UpstreamServer) -> None:
    config = _config(upstream)
    routes = config["routes"]
    assert isinstance(routes, list)
    routes[0]["authz"]["mode"] = "audit"
    proxy = stack.proxy(config)
    r = fetch(proxy.url("/payments/charge"))
    assert r.status == 200, r.describe()
    assert [q.path for q in upstream.requests] == ["/payments/charge"]
    proxy.wait_for_log(r"authz payments: would deny GET /payments/charge from plaintext")
    text = fetch(proxy.admin_url("/metrics")).body.decode()
    assert (
        _metric(
            text,
            "meshgate_authz_decisions_total",
            policy="payments",
            decision="audit_deny",
            source="plaintext",
        )
        == 1
    )
