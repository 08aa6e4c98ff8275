"""`deprecation:` on a route: Deprecation (RFC 9745), Sunset (RFC 8594) and Link."""

from __future__ import annotations

import pytest

from support.client import fetch
from support.proxy import Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine


def test_a_deprecated_route_says_so_on_every_answer(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(
        {
            "upstreams": {"up": upstream_block(upstream)},
            "routes": [
                {
                    "path": "/v1/**",
                    "upstream": "up",
                    "deprecation": {
                        "since": "2025-06-30",
                        "sunset": "2026-12-31T23:59:59Z",
                        "link": "https://example.com/docs/v2",
                    },
                    "rate_limit": "1/h",
                },
                {"path": "/v2/**", "upstream": "up"},
            ],
        }
    )
    for expected in (200, 429):  # the gateway's own answers say it too
        r = fetch(proxy.url("/v1/orders/7"))
        assert r.status == expected, r.describe()
        assert r.header("deprecation") == "@1751241600"
        assert r.header("sunset") == "Thu, 31 Dec 2026 23:59:59 GMT"
        assert r.header("link") == '<https://example.com/docs/v2>; rel="deprecation"'
    current = fetch(proxy.url("/v2/orders/7"))
    assert current.status == 200 and current.header("deprecation") is None
    assert current.header("sunset") is None
