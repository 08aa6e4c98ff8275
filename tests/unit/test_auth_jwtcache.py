"""TokenCache (auth/jwtcache.py) on its own: expiry at min(exp + leeway,
verified + max_age), the LRU bound, clear; and FilterServices clearing the
caches of the verifiers a reload keeps. The verifier's use of it (nbf, rotation,
per-route scopes) is in test_auth_jwt.py."""

from __future__ import annotations

import asyncio
from typing import Any

from meshgate.auth.jwt import JwtVerifier
from meshgate.auth.jwtcache import DEFAULT_SIZE, TokenCache
from meshgate.config.schema import JwtAuthConfig
from meshgate.filters.build import CompiledFilters, FilterServices

NOW = 1_700_000_000.0


def put(cache: TokenCache, token: str, *, exp: float | None = None, now: float = NOW) -> None:
    cache.put(token, {"sub": token}, exp=exp, nbf=None, iat=None, leeway=10.0, now=now)


def test_default_bound() -> None:
    assert TokenCache().size == DEFAULT_SIZE == 10_000
    assert JwtAuthConfig(type="jwt", secret="x" * 32).cache_size == DEFAULT_SIZE


def test_entry_lives_until_exp_plus_leeway_or_max_age() -> None:
    cache = TokenCache(max_age=300.0)
    put(cache, "soon", exp=NOW + 20)  # exp + leeway: NOW + 30
    put(cache, "late", exp=NOW + 10_000)  # max_age: NOW + 300
    put(cache, "never")  # no exp: max_age
    assert cache.get("soon", NOW + 29.9) is not None
    assert cache.get("soon", NOW + 30) is None
    assert "soon" not in cache
    assert cache.get("late", NOW + 299.9) is not None
    assert cache.get("late", NOW + 300) is None
    assert cache.get("never", NOW + 300) is None
    assert (cache.hits, cache.misses) == (2, 3)


def test_an_entry_already_expired_is_not_stored() -> None:
    cache = TokenCache()
    put(cache, "old", exp=NOW - 10)  # exp + leeway == now
    assert len(cache) == 0


def test_least_recently_used_goes_first() -> None:
    cache = TokenCache(size=3)
    for t in "abc":
        put(cache, t)
    assert cache.get("a", NOW) is not None  # a is now the most recent
    put(cache, "d")
    assert [t for t in "abcd" if t in cache] == ["a", "c", "d"]
    put(cache, "c")  # stored again: moves to the end too
    put(cache, "e")
    assert [t for t in "acde" if t in cache] == ["c", "d", "e"]


def test_size_zero_stores_nothing() -> None:
    cache = TokenCache(size=0)
    put(cache, "a")
    assert len(cache) == 0 and cache.get("a", NOW) is None


def test_clear_and_discard() -> None:
    cache = TokenCache()
    for t in "abc":
        put(cache, t)
    cache.discard("b")
    cache.discard("zz")
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def _verifier(**kw: Any) -> JwtVerifier:
    return JwtVerifier("idp", JwtAuthConfig(type="jwt", secret="s" * 40, **kw))


def test_a_reload_clears_the_caches_of_the_verifiers_it_keeps() -> None:
    services = FilterServices()
    kept = _verifier()
    put(kept.cache, "token")
    asyncio.run(services.activate(CompiledFilters(verifiers=[kept])))
    assert len(kept.cache) == 0
