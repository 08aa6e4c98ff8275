"""The JWKS half of a `JwtVerifier`: the key set fetched over http(s) from
`jwks_url`, refreshed in the background every `jwks_refresh`, and installed
(each usable signing key, by `kid` and by algorithm) when it changes.

An unknown `kid` makes `verify()` raise `UnknownKeyId` when a JWKS refetch is
allowed right now; `verify_async()` then refetches (single-flight, at most once
per `jwks_refetch_interval`) and verifies again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from email.message import Message
from typing import IO, Any

import orjson
from jwt import PyJWK

from meshgate.auth.jwtcache import TokenCache
from meshgate.auth.jwtkeys import (
    _ALGORITHMS,
    HMAC_ALGORITHMS,
    MAX_CANDIDATES,
    _der,
    _Key,
    _public,
    _public_key_algorithms,
)
from meshgate.config.schema import JwtAuthConfig

__all__ = ["MAX_JWKS_BYTES", "MAX_JWKS_KEYS", "JwksKeySet"]

log = logging.getLogger("meshgate.auth")

_JWK_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100


class _Skip(Exception):
    """A JWKS entry that is not used; the message says why."""


def _loggable(url: str) -> str:
    """`url` without credentials or query (they may hold a secret)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
    except ValueError:
        return "<jwks_url>"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to http."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        if req.full_url.lower().startswith("https:") and not newurl.lower().startswith("https:"):
            raise urllib.error.HTTPError(
                req.full_url, code, "refusing a redirect from https to http", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]


class JwksKeySet:
    """The JWKS key set of a `JwtVerifier` and its fetching; the verifier's
    `__init__` sets up the state declared here."""

    name: str
    cfg: JwtAuthConfig
    fetches: int
    cache: TokenCache
    _jwks_url: str | None
    _jwks_label: str
    _configured: frozenset[str] | None
    _static: tuple[_Key, ...]
    _jwks: tuple[_Key, ...]
    _jwks_fingerprint: tuple[bytes, ...] | None
    _by_kid: dict[str, tuple[_Key, ...]]
    _by_alg: dict[str, tuple[_Key, ...]]
    _opener: urllib.request.OpenerDirector
    _inflight: asyncio.Task[None] | None
    _refetch_at: float
    _last_fetch_ok: bool

    # -- key sets -----------------------------------------------------------

    @staticmethod
    def _index_by_alg(keys: Iterable[_Key]) -> dict[str, tuple[_Key, ...]]:
        index: dict[str, list[_Key]] = {}
        for key in keys:
            for alg in key.algorithms:
                index.setdefault(alg, []).append(key)
        return {alg: tuple(found[:MAX_CANDIDATES]) for alg, found in index.items()}

    def _install(self, keys: Sequence[_Key]) -> bool:
        """Use `keys` as the JWKS key set; False when it did not change."""
        fingerprint = tuple(sorted(k.fingerprint for k in keys))
        if fingerprint == self._jwks_fingerprint:
            return False
        by_kid: dict[str, list[_Key]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self._jwks = tuple(keys)
        self._jwks_fingerprint = fingerprint
        self._by_kid = {kid: tuple(found) for kid, found in by_kid.items()}
        self._by_alg = self._index_by_alg([*self._static, *keys])
        self.cache.clear()
        return True

    def _load_jwk(self, jwk: Any) -> _Key | None:
        """A signing key from one JWKS entry; None for a key that is not for
        signatures; _Skip for an unusable one."""
        if not isinstance(jwk, dict):
            raise _Skip("not a JSON object")
        use = jwk.get("use")
        if use is not None and use != "sig":
            return None
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return None
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Skip("its kid is not a string")
        alg = jwk.get("alg")
        if alg is not None and (
            not isinstance(alg, str) or alg not in _ALGORITHMS or alg in HMAC_ALGORITHMS
        ):
            raise _Skip(f"its alg {alg!r} is not a supported signature algorithm")
        kty = jwk.get("kty")
        build: str | None
        if kty == "RSA":
            build = alg or "RS256"
        elif kty == "EC":
            crv = jwk.get("crv")
            build = alg or (_JWK_CURVES.get(crv) if isinstance(crv, str) else None)
            if build is None:
                raise _Skip(f"its curve {crv!r} is not supported")
        elif kty == "OKP":
            build = alg or "EdDSA"
        elif kty == "oct":
            raise _Skip("symmetric (oct) keys are not accepted from a JWKS")
        else:
            raise _Skip(f"its key type {kty!r} is not supported")
        try:
            key = _public(PyJWK(jwk, build).key)
        except Exception as exc:
            raise _Skip(f"the key cannot be loaded: {str(exc)[:200]}") from None
        accepted = self._configured
        if alg is not None:
            accepted = frozenset([alg]) if accepted is None else accepted & {alg}
        try:
            algorithms = _public_key_algorithms(key, accepted)
        except ValueError as exc:
            raise _Skip(str(exc)) from None
        label = f"JWKS kid {kid!r}" if kid is not None else "JWKS key without kid"
        tag = orjson.dumps([kid, sorted(algorithms)])
        return _Key(kid, key, algorithms, label, tag + _der(key))

    def _parse_jwks(self, body: bytes) -> list[_Key]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("the JWKS is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError('the JWKS is not a JSON object with a "keys" array')
        entries: list[Any] = doc["keys"]
        if len(entries) > MAX_JWKS_KEYS:
            log.warning(
                "jwt %s: the JWKS has %d keys; only the first %d are used",
                self.name,
                len(entries),
                MAX_JWKS_KEYS,
            )
        keys: list[_Key] = []
        for i, jwk in enumerate(entries[:MAX_JWKS_KEYS]):
            try:
                key = self._load_jwk(jwk)
            except _Skip as exc:
                kid = jwk.get("kid") if isinstance(jwk, dict) else None
                what = f"kid {kid!r}" if isinstance(kid, str) else f"#{i}"
                log.warning("jwt %s: JWKS key %s skipped: %s", self.name, what, exc)
                continue
            if key is not None:
                keys.append(key)
        if not keys:
            raise ValueError("the JWKS has no usable signing key")
        return keys

    def _apply_jwks(self, body: bytes) -> int:
        """Parse and install a JWKS document; the number of keys in use.
        ValueError (and no change) when it has no usable key."""
        keys = self._parse_jwks(body)
        if self._install(keys):
            kids = ", ".join(sorted(k.kid or "-" for k in keys))
            log.info("jwt %s: JWKS loaded, %d signing keys (kid %s)", self.name, len(keys), kids)
        return len(keys)

    # -- fetching -----------------------------------------------------------

    def _download(self) -> bytes:
        """Runs in a worker thread."""
        assert self._jwks_url is not None
        request = urllib.request.Request(
            self._jwks_url,
            headers={
                "Accept": "application/jwk-set+json, application/json",
                "User-Agent": "meshgate",
            },
        )
        try:
            response = self._opener.open(request, timeout=self.cfg.jwks_timeout)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection
            raise ValueError(f"HTTP status {exc.code}") from None
        with response:
            status = getattr(response, "status", 200)
            if status != 200:
                raise ValueError(f"HTTP status {status}")
            body: bytes = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        return body

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            body = await asyncio.wait_for(
                asyncio.to_thread(self._download), self.cfg.jwks_timeout + 1.0
            )
            self._apply_jwks(body)
            self._last_fetch_ok = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._last_fetch_ok = False
            reason = (
                "timed out"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {str(exc)[:200]}"
            )
            log.warning(
                "jwt %s: JWKS fetch from %s failed (%s); keeping the last good set (%d keys)",
                self.name,
                self._jwks_label,
                reason,
                len(self._jwks),
            )
        finally:
            if self._inflight is asyncio.current_task():
                self._inflight = None

    def _shared_fetch(self) -> asyncio.Task[None]:
        """The fetch in flight, or a new one."""
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch())
            self._inflight = task
        return task

    def _refetch_allowed(self) -> bool:
        return self._jwks_url is not None and (
            self._inflight is not None or time.monotonic() >= self._refetch_at
        )

    async def _refetch(self) -> None:
        """Refetch for an unknown kid: join the fetch in flight, or start one
        unless one started less than jwks_refetch_interval ago."""
        if self._inflight is None:
            now = time.monotonic()
            if now < self._refetch_at:
                return
            self._refetch_at = now + self.cfg.jwks_refetch_interval
        await asyncio.shield(self._shared_fetch())

    async def _refresh_loop(self) -> None:
        while True:
            period = self.cfg.jwks_refresh
            if not self._last_fetch_ok:  # retry sooner while the IdP is failing
                period = min(period, self.cfg.jwks_refetch_interval)
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            with contextlib.suppress(Exception):
                await asyncio.shield(self._shared_fetch())
