"""Edge security across reloads: key files are read again; names stay safe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshgate.config.schema import RateLimitConfig, RouteConfig
from meshgate.filters.ratelimit import RateLimitFilter
from meshgate.ratelimit.local import SharedTable
from support.client import fetch, wait_until
from support.proxy import Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine


def _key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _token(key: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "s", "iat": now, "exp": now + 600}, key, algorithm="RS256")


def test_a_reload_reads_a_rotated_key_file_again(
    stack: Stack, upstream: UpstreamServer, tmp_path: Path
) -> None:
    old, new = _key(), _key()
    key_file = stack.directory / "idp.pem"
    key_file.write_bytes(_pem(old))
    config = {
        "auth": {"idp": {"type": "jwt", "public_key_file": str(key_file)}},
        "upstreams": {"up": upstream_block(upstream)},
        "routes": [{"path": "/**", "upstream": "up", "auth": "idp"}],
    }
    proxy = stack.proxy(config)
    bearer_old = f"Authorization: Bearer {_token(old)}"
    bearer_new = f"Authorization: Bearer {_token(new)}"
    assert fetch(proxy.url("/x"), "-H", bearer_old).status == 200
    assert fetch(proxy.url("/x"), "-H", bearer_new).status == 401
    key_file.write_bytes(_pem(new))
    proxy.reload(config)  # the same config text: only the key file changed
    wait_until(
        lambda: fetch(proxy.url("/x"), "-H", bearer_new).status == 200,
        timeout=15,
        what="the rotated key to be accepted after SIGHUP",
    )
    assert fetch(proxy.url("/x"), "-H", bearer_old).status == 401


def test_a_route_name_cannot_inject_response_fields() -> None:
    route = RouteConfig.model_validate(
        {"path": "/x", "upstream": "u", "name": 'a"\r\nSet-Cookie: x=1'}
    )
    table = SharedTable(64, shared=False)
    limit = RateLimitFilter(
        route,
        route.name or "",
        RateLimitConfig.model_validate({"limit": 5, "period": 60}),
        {},
        table=table,
        redis=None,
    )
    for template in limit.templates.values():
        assert b"\r\nset-cookie" not in template.lower()
        assert template.count(b"\r\n") == 5
    assert limit.policy_name == b'"a___Set-Cookie:_x_1"'
