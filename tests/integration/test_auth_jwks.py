"""JwtVerifier against a real JWKS endpoint: the first fetch, key rotation by
an unknown kid (one refetch), throttled single-flight refetches under
concurrency, an IdP that is down or serves garbage (the last good set stays),
and the background refresh."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshgate.auth.jwt import AuthError, JwtVerifier, UnknownKeyId
from meshgate.config.schema import JwtAuthConfig
from support.jwks import JwksServer

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_C = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private: Any, kid: str) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        d = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    return {**d, "kid": kid, "use": "sig"}


def token(private: Any, kid: str | None, **claims: Any) -> str:
    alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    payload = {"sub": "alice", "exp": time.time() + 300, **claims}
    return jwt.encode(payload, private, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [public_jwk(RSA_A, "a")]
    yield server
    server.stop()


@pytest.fixture
async def make_verifier() -> AsyncIterator[Callable[..., Awaitable[JwtVerifier]]]:
    made: list[JwtVerifier] = []

    async def make(url: str, *, start: bool = True, **kw: Any) -> JwtVerifier:
        kw.setdefault("jwks_timeout", 2.0)
        v = JwtVerifier("idp", JwtAuthConfig(type="jwt", jwks_url=url, **kw))
        made.append(v)
        if start:
            await v.start()
        return v

    yield make
    for v in made:
        await v.close()


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_start_fetches_once_and_tokens_verify(
    idp: JwksServer, make_verifier: Callable[..., Awaitable[JwtVerifier]]
) -> None:
    v = await make_verifier(idp.url)
    assert v.needs_async
    assert (v.fetches, idp.hits) == (1, 1)
    tok = token(RSA_A, "a")
    assert v.verify(tok)["sub"] == "alice"
    assert (await v.verify_async(tok))["sub"] == "alice"
    assert idp.hits == 1


async def test_rotation_new_kid_triggers_exactly_one_refetch(
    idp: JwksServer, make_verifier: Callable[..., Awaitable[JwtVerifier]]
) -> None:
    v = await make_verifier(idp.url, jwks_refetch_interval=30)
    idp.keys = [public_jwk(RSA_A, "a"), public_jwk(RSA_B, "b")]  # the IdP rotates
    tok_b = token(RSA_B, "b")
    with pytest.raises(UnknownKeyId):
        v.verify(tok_b)
    assert idp.hits == 1  # verify() itself never fetches
    assert (await v.verify_async(tok_b))["sub"] == "alice"
    assert idp.hits == 2
    assert v.verify(tok_b)["sub"] == "alice"
    assert v.verify(token(RSA_A, "a"))
    # a second unknown kid within the refetch interval: refused, no fetch
    tok_c = token(EC_C, "c")
    with pytest.raises(AuthError) as info:
        v.verify(tok_c)
    assert type(info.value) is AuthError
    with pytest.raises(AuthError) as info:
        await v.verify_async(tok_c)
    assert info.value.description == "the token's key id is unknown"
    assert (idp.hits, v.fetches) == (2, 2)


async def test_concurrent_unknown_kids_share_one_throttled_fetch(
    idp: JwksServer, make_verifier: Callable[..., Awaitable[JwtVerifier]]
) -> None:
    interval = 0.5
    v = await make_verifier(idp.url, jwks_refetch_interval=interval)
    idp.keys = [public_jwk(RSA_A, "a"), public_jwk(RSA_B, "b")]
    idp.delay = 0.2  # keep the fetch in flight while everyone arrives
    good = [token(RSA_B, "b", n=i) for i in range(25)]
    unknown = [token(EC_C, f"unknown-{i}", n=i) for i in range(25)]
    mixed = [t for pair in zip(good, unknown, strict=True) for t in pair]
    started = time.monotonic()
    results = await asyncio.gather(*(v.verify_async(t) for t in mixed), return_exceptions=True)
    assert idp.hits == 2  # the start, and one refetch for all 50
    assert all(isinstance(r, dict) for r in results[0::2])
    assert all(
        isinstance(r, AuthError) and r.description == "the token's key id is unknown"
        for r in results[1::2]
    )
    # more unknown kids inside the interval: no fetch at all
    fresh = [token(EC_C, f"later-{i}") for i in range(10)]
    results = await asyncio.gather(*(v.verify_async(t) for t in fresh), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert idp.hits == 2
    # once the interval has passed, the next burst gets exactly one more
    await asyncio.sleep(max(0.0, started + interval + 0.05 - time.monotonic()))
    idp.delay = 0.1
    results = await asyncio.gather(*(v.verify_async(t) for t in fresh), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert idp.hits == 3
    assert v.fetches == 3


async def test_idp_down_keeps_the_last_good_set(
    idp: JwksServer,
    make_verifier: Callable[..., Awaitable[JwtVerifier]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    v = await make_verifier(idp.url, jwks_refetch_interval=0.05)
    tok_a = token(RSA_A, "a")
    assert v.verify(tok_a)
    idp.stop()
    with pytest.raises(AuthError) as info:
        await v.verify_async(token(RSA_B, "b"))  # refetch: connection refused
    assert info.value.description == "the token's key id is unknown"
    assert v.fetches == 2
    assert "keeping the last good set (1 keys)" in caplog.text
    assert v.verify(tok_a)["sub"] == "alice"
    assert v.verify(token(RSA_A, "a", n=2))  # not just the cached one


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"keys": []}'),
        (200, b"<html>maintenance</html>"),
        (200, b'[{"kty": "RSA"}]'),
        (200, b'{"keys": [{"kty": "RSA", "kid": "x", "n": "AQAB"}]}'),
        (500, b'{"error": "oops"}'),
        (404, b"not found"),
    ],
)
async def test_bad_documents_keep_the_last_good_set(
    idp: JwksServer,
    make_verifier: Callable[..., Awaitable[JwtVerifier]],
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes,
) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    v = await make_verifier(idp.url, jwks_refetch_interval=0.05)
    idp.status, idp.body = status, body
    with pytest.raises(AuthError):
        await v.verify_async(token(RSA_B, "b"))
    assert idp.hits == 2
    assert "keeping the last good set" in caplog.text
    assert v.verify(token(RSA_A, "a"))


async def test_start_with_the_idp_down_never_raises_and_recovers(
    idp: JwksServer,
    make_verifier: Callable[..., Awaitable[JwtVerifier]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    idp.status, idp.body = 503, b"down"
    v = await make_verifier(idp.url, jwks_refresh=0.2, jwks_refetch_interval=60)
    assert v.fetches == 1
    assert "no signing keys" in caplog.text
    tok = token(RSA_A, "a")
    with pytest.raises(AuthError) as info:
        await v.verify_async(tok)  # one refetch, still down
    assert info.value.description == "the signing keys are not available"
    with pytest.raises(AuthError) as info:
        v.verify(tok)  # throttled now: a plain refusal
    assert type(info.value) is AuthError
    assert info.value.description == "the signing keys are not available"
    # the background refresh keeps trying and picks the keys up
    idp.status, idp.body = 200, None
    await wait_until(lambda: bool(v._jwks))
    assert v.verify(tok)["sub"] == "alice"


async def test_start_never_raises_on_a_closed_port(
    make_verifier: Callable[..., Awaitable[JwtVerifier]],
) -> None:
    dead = JwksServer()
    dead.stop()
    v = await make_verifier(dead.url)
    assert v.fetches == 1
    with pytest.raises(AuthError) as info:
        await v.verify_async(token(RSA_A, "a"))
    assert info.value.description == "the signing keys are not available"


async def test_fetch_timeout(
    idp: JwksServer,
    make_verifier: Callable[..., Awaitable[JwtVerifier]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    idp.delay = 1.5
    started = time.monotonic()
    v = await make_verifier(idp.url, jwks_timeout=0.3)
    assert time.monotonic() - started < 1.4
    assert not v._jwks
    assert "failed" in caplog.text


async def test_background_refresh_picks_up_a_new_key(
    idp: JwksServer, make_verifier: Callable[..., Awaitable[JwtVerifier]]
) -> None:
    v = await make_verifier(idp.url, jwks_refresh=0.2, jwks_refetch_interval=60)
    idp.keys = [public_jwk(RSA_A, "a"), public_jwk(EC_C, "c")]
    tok_c = token(EC_C, "c")
    await wait_until(lambda: idp.hits >= 2, timeout=3.0)
    await wait_until(lambda: "c" in v._by_kid, timeout=1.0)
    assert v.verify(tok_c)["sub"] == "alice"  # sync: no refetch involved
    # a withdrawn key stops verifying after the next refresh
    tok_a = token(RSA_A, "a")
    assert v.verify(tok_a)
    idp.keys = [public_jwk(EC_C, "c")]
    await wait_until(lambda: "a" not in v._by_kid, timeout=3.0)
    with pytest.raises(AuthError):
        v.verify(tok_a)
    # close() stops the refresh
    await v.close()
    hits = idp.hits
    await asyncio.sleep(0.5)
    assert idp.hits == hits
