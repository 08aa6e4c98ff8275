"""The verified-token cache through the real gateway, with a real JWKS server
and a real recording upstream: a token used again is a cache hit (the
metrics say so), per-route scopes still apply to it, and a JWKS rotation
that withdraws its key refuses it at once, although it was cached."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from support.client import fetch
from support.jwks import JwksServer
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
"""Published as kid "a", then withdrawn."""
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
"""Published as kid "b" by the rotation."""


def public_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    d = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return {**d, "kid": kid, "use": "sig", "alg": "RS256"}


def token(private: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
    payload = {"sub": "alice", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, private, algorithm="RS256", headers={"kid": kid})


def bearer(tok: str) -> tuple[str, str]:
    return "-H", f"Authorization: Bearer {tok}"


def lookups(proxy: ProxyProcess, outcome: str) -> int:
    text = fetch(proxy.admin_url("/metrics")).body.decode()
    for line in text.splitlines():
        if line.startswith('meshgate_jwt_cache_lookups_total{auth="idp",outcome="' + outcome):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError(f"no meshgate_jwt_cache_lookups_total for {outcome} in:\n{text}")


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    server = JwksServer([public_jwk(RSA_A, "a")])
    yield server
    server.stop()


@pytest.fixture
def proxy(stack: Stack, upstream: UpstreamServer, idp: JwksServer) -> ProxyProcess:
    config = {
        "upstreams": {"up": upstream_block(upstream)},
        "auth": {
            "idp": {
                "type": "jwt",
                "jwks_url": idp.url,
                "jwks_refresh": "1h",  # only the unknown kid below refetches
                "jwks_refetch_interval": "1s",
            }
        },
        "routes": [
            {"path": "/open/**", "upstream": "up", "auth": "idp"},
            {"path": "/write/**", "upstream": "up", "auth": {"use": ["idp"], "scopes": ["w"]}},
        ],
    }
    # One worker: the refetch the rotation triggers is that worker's.
    return stack.proxy(config, workers=1)


def test_a_rotation_refuses_a_cached_token_of_the_withdrawn_key(
    proxy: ProxyProcess, upstream: UpstreamServer, idp: JwksServer
) -> None:
    tok = token(RSA_A, "a", scope="r")
    for _ in range(3):
        assert fetch(proxy.url("/open/x"), *bearer(tok)).status == 200
    assert len(upstream.wait_for_requests(3)) == 3
    assert lookups(proxy, "hit") == 2
    assert lookups(proxy, "miss") == 1
    # The route's scopes apply to the cached claims, request by request.
    assert fetch(proxy.url("/write/x"), *bearer(tok)).status == 403
    assert lookups(proxy, "hit") == 3

    # The IdP rotates: a is withdrawn, b published. A token of b (a kid the
    # gateway does not know) makes it refetch before it answers.
    idp.set_keys([public_jwk(RSA_B, "b")])
    time.sleep(1.1)  # past jwks_refetch_interval since the first fetch
    fetched = idp.hit_count()
    assert fetch(proxy.url("/open/x"), *bearer(token(RSA_B, "b"))).status == 200
    assert idp.hit_count() == fetched + 1

    # The cached token of a is refused at once, and stays refused.
    hits = lookups(proxy, "hit")
    upstream.clear()
    for _ in range(2):
        resp = fetch(proxy.url("/open/x"), *bearer(tok))
        assert resp.status == 401, resp.describe()
        assert "key id is unknown" in (resp.header("www-authenticate") or "")
    assert lookups(proxy, "hit") == hits
    assert upstream.requests == []
