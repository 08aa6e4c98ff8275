"""JWT (compact JWS) verification for `type: jwt` auth entries.

`JwtVerifier` checks a bearer token against the keys its config names: an
HMAC secret, a PEM public key (inline or a file), and/or a JWKS fetched over
http(s) and refreshed in the background. The keys and their algorithms are
`auth.jwtkeys`; the JWKS key set, its fetch and refresh, `auth.jwks`.

Security rules, all enforced here rather than left to a library default:

* The algorithm comes from the config, never from the token. The accepted set
  is `algorithms:` or, by default, HS256/384/512 for a secret and, for public
  keys, every asymmetric algorithm that fits the key (RSA: RS*/PS*; EC P-256,
  P-384, P-521: ES256, ES384, ES512; Ed25519/Ed448: EdDSA). Each key carries
  its own set (and a JWK's `alg` narrows it to that one), so an HS256 header
  can never select an RSA key (key confusion), and `none` is never accepted.
* The compact JWS is parsed here: three base64url segments without padding,
  a JSON-object header without `crit`, a JSON-object payload. Header members
  that point at keys (`jwk`, `jku`, `x5u`, `x5c`) are ignored.
* The signature is checked with PyJWT's algorithm objects (`Algorithm.verify`)
  against the key picked by `kid` (or, for a token without `kid`, the few keys
  that accept its algorithm).
* `exp`, `nbf` and `iat` are checked when present (with `leeway`), `iss` and
  `aud` when the config names them.

Verified tokens are cached (`auth.jwtcache`: token -> claims, LRU-bounded by
`cache_size`, each entry until the token's `exp` or 5 minutes, cleared
whenever the key set changes; `exp`/`nbf` are checked again on every hit), so
a client that repeats its token costs a dict lookup instead of an RSA
verification.

Entry-level `scopes` and `required_claims` are *not* applied by `verify()`:
the caller applies them with `check_claims()` (as it does for a route's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from jwt.exceptions import PyJWTError

from meshgate.auth.jwks import JwksKeySet, _loggable, _NoDowngrade
from meshgate.auth.jwtcache import TokenCache
from meshgate.auth.jwtkeys import (
    _ALGORITHMS,
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    MAX_CANDIDATES,
    _der,
    _Key,
    _load_pem,
    _public_key_algorithms,
    _read,
)
from meshgate.config.schema import JwtAuthConfig

__all__ = ["AuthError", "JwtVerifier", "UnknownKeyId"]

log = logging.getLogger("meshgate.auth")

_JWS_RE = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")

# Client-facing descriptions (RFC 6750 `error_description`).
EXPIRED = "the token has expired"
NOT_YET_VALID = "the token is not valid yet"
ISSUED_IN_FUTURE = "the token was issued in the future"
BAD_ISSUER = "the token's issuer is not accepted"
BAD_AUDIENCE = "the token's audience is not accepted"
BAD_SIGNATURE = "the token's signature is not valid"
MALFORMED = "the token is malformed"
BAD_ALGORITHM = "the token's algorithm is not accepted"
CRITICAL_HEADER = "the token's critical header parameters are not supported"
TOO_LARGE = "the token is too large"
UNKNOWN_KID = "the token's key id is unknown"
NO_KEYS = "the signing keys are not available"


class AuthError(Exception):
    """A refused credential.

    `status` is 401 or 403 (400 for a malformed request, from the filter);
    `error` is the RFC 6750 code: "invalid_request", "invalid_token" or
    "insufficient_scope"; `description` is safe to show a client (it never
    includes key material or the token).
    """

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.error!r}, {self.description!r})"


class UnknownKeyId(AuthError):
    """401 invalid_token: no key for the token, and a JWKS refetch is allowed
    right now (`verify_async()` does it)."""


def _invalid(description: str) -> AuthError:
    return AuthError(401, "invalid_token", description)


# ---------------------------------------------------------------------------
# token parsing helpers


def _b64(segment: str) -> bytes:
    # The segment matched [A-Za-z0-9_-]+; a length of 4n+1 is not base64.
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise _invalid(MALFORMED) from None


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_b64(segment))
    except orjson.JSONDecodeError:
        raise _invalid(MALFORMED) from None
    if not isinstance(value, dict):
        raise _invalid(MALFORMED)
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"the token's {name} claim is not a number")
    return float(value)


def _words(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return (v for v in value if isinstance(v, str))
    return ()


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(have, bool):
        return type(have) is type(want) and have == want
    if isinstance(want, int | float):
        return isinstance(have, int | float) and have == want
    return type(have) is type(want) and bool(have == want)


def _one_of(value: str | list[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else value)


# ---------------------------------------------------------------------------
# the verifier


class JwtVerifier(JwksKeySet):
    """Verifies bearer tokens for one `type: jwt` entry (see the module doc)."""

    def __init__(self, name: str, cfg: JwtAuthConfig, *, base_dir: Path | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.fetches = 0
        """JWKS fetch attempts (for tests and the admin API)."""
        self._leeway = float(cfg.leeway)
        self._max_size = int(cfg.max_token_size)
        self._issuers = _one_of(cfg.issuer)
        self._audiences = _one_of(cfg.audience)
        configured: frozenset[str] | None = (
            frozenset[str](cfg.algorithms) if cfg.algorithms else None
        )
        if configured is not None and "none" in configured:  # the schema forbids it too
            raise ValueError('algorithm "none" is never accepted')

        static: list[_Key] = []
        hmac_secret = cfg.secret is not None or cfg.secret_file is not None
        if hmac_secret:
            if cfg.secret is not None:
                secret = cfg.secret.encode("utf-8")
                what = "secret"
            else:
                assert cfg.secret_file is not None
                secret = _read(cfg.secret_file, base_dir, "secret_file").rstrip(b"\r\n")
                what = "secret_file"
            if not secret:
                raise ValueError(f"{what} is empty")
            algorithms = frozenset(configured or HMAC_ALGORITHMS)
            for alg in algorithms:
                try:
                    _ALGORITHMS[alg].prepare_key(secret)
                except (PyJWTError, TypeError, ValueError):
                    raise ValueError(
                        f"{what} looks like a public key or certificate, not an HMAC secret; "
                        "use public_key for RS/PS/ES/EdDSA tokens"
                    ) from None
            if len(secret) < 32:
                log.warning(
                    "jwt %s: the HMAC secret is %d bytes long; use at least 32 random bytes",
                    name,
                    len(secret),
                )
            static.append(_Key(None, secret, algorithms, what, b""))
        for what, inline, path in (
            ("public_key", cfg.public_key, None),
            ("public_key_file", None, cfg.public_key_file),
        ):
            if inline is None and path is None:
                continue
            if inline is not None:
                data = inline.encode("utf-8")
            else:
                data = _read(path or "", base_dir, what)
            key = _load_pem(data, what)
            try:
                algorithms = _public_key_algorithms(key, configured)
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from None
            static.append(_Key(None, key, algorithms, what, _der(key)))

        self._jwks_url = cfg.jwks_url
        self._jwks_label = _loggable(cfg.jwks_url) if cfg.jwks_url else ""
        self._configured = configured
        if configured is not None:
            self._accepted = configured
        elif hmac_secret:
            self._accepted = frozenset(HMAC_ALGORITHMS)
        elif self._jwks_url is not None:
            self._accepted = frozenset(ASYMMETRIC_ALGORITHMS)
        else:
            self._accepted = frozenset().union(*(k.algorithms for k in static))

        self._static = tuple(static)
        self._static_by_alg = self._index_by_alg(self._static)
        self._jwks: tuple[_Key, ...] = ()
        self._jwks_fingerprint: tuple[bytes, ...] | None = None
        self._by_kid: dict[str, tuple[_Key, ...]] = {}
        self._by_alg = self._static_by_alg
        self.cache = TokenCache(size=cfg.cache_size)

        # JWKS fetching state
        self._opener = urllib.request.build_opener(_NoDowngrade)
        self._inflight: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refetch_at = 0.0  # monotonic time from which an unknown kid may refetch
        self._last_fetch_ok = False

    # -- public API ---------------------------------------------------------

    @property
    def needs_async(self) -> bool:
        return self._jwks_url is not None

    async def start(self) -> None:
        """First JWKS fetch, then the background refresh. Never raises: when
        the IdP is down the key set stays empty (tokens get 401 "signing keys
        are not available") until a refresh or a refetch succeeds."""
        if self._jwks_url is None or self._refresher is not None:
            return
        try:
            await asyncio.shield(self._shared_fetch())
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - _fetch() handles its errors
            log.exception("jwt %s: JWKS fetch failed", self.name)
        if not self._jwks:
            log.warning(
                "jwt %s: no signing keys from %s yet; tokens are refused until a fetch succeeds",
                self.name,
                self._jwks_label,
            )
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh_loop(), name=f"jwks-refresh-{self.name}"
        )

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, self._inflight) if t is not None]
        self._refresher = None
        self._inflight = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def verify(self, token: str, now: float | None = None) -> dict[str, Any]:
        """The token's claims, or AuthError (UnknownKeyId when a JWKS refetch
        may find its key: call `verify_async()` then)."""
        return self._verify(token, time.time() if now is None else now, refetch=True)

    async def verify_async(self, token: str) -> dict[str, Any]:
        try:
            return self._verify(token, time.time(), refetch=True)
        except UnknownKeyId:
            pass
        await self._refetch()
        return self._verify(token, time.time(), refetch=False)

    @staticmethod
    def check_claims(
        claims: Mapping[str, Any],
        scopes: Sequence[str],
        required: Sequence[str] | Mapping[str, Any],
    ) -> None:
        """403 insufficient_scope unless the token grants every scope (a
        space-separated `scope`, or an `scp` array or string) and carries every
        required claim (a list: present and not null; a mapping: that exact
        value)."""
        if scopes:
            granted = {*_words(claims.get("scope")), *_words(claims.get("scp"))}
            missing = [s for s in scopes if s not in granted]
            if missing:
                noun = "scope" if len(missing) == 1 else "scopes"
                raise AuthError(
                    403, "insufficient_scope", f"the token lacks the {noun} {', '.join(missing)}"
                )
        if isinstance(required, Mapping):
            for claim, want in required.items():
                if claims.get(claim) is None:
                    raise AuthError(
                        403, "insufficient_scope", f"the token lacks the required claim {claim}"
                    )
                if not _same(claims[claim], want):
                    raise AuthError(
                        403,
                        "insufficient_scope",
                        f"the token's claim {claim} does not have the required value",
                    )
        elif required:
            names = (required,) if isinstance(required, str) else required
            absent = [c for c in names if claims.get(c) is None]
            if absent:
                noun = "claim" if len(absent) == 1 else "claims"
                raise AuthError(
                    403,
                    "insufficient_scope",
                    f"the token lacks the required {noun} {', '.join(absent)}",
                )

    # -- verification -------------------------------------------------------

    def _verify(self, token: str, now: float, *, refetch: bool) -> dict[str, Any]:
        if len(token) > self._max_size:
            raise _invalid(TOO_LARGE)
        cached = self.cache.get(token, now)
        if cached is not None:
            try:
                self._check_window(cached.exp, cached.nbf, cached.iat, now)
            except AuthError:
                self.cache.discard(token)
                raise
            return dict(cached.claims)

        m = _JWS_RE.fullmatch(token)
        if m is None:
            raise _invalid(MALFORMED)
        header = _json_object(m[1])
        if "crit" in header:
            raise _invalid(CRITICAL_HEADER)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._accepted:
            raise _invalid(BAD_ALGORITHM)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid(MALFORMED)
        signature = _b64(m[3])
        if not signature:
            raise _invalid(BAD_SIGNATURE)
        signing_input = token[: m.end(2)].encode("ascii")

        keys: Sequence[_Key]
        if kid is not None and kid in self._by_kid:
            keys = [k for k in self._by_kid[kid] if alg in k.algorithms]
            if not keys:
                raise _invalid(BAD_ALGORITHM)  # e.g. HS256 naming an RSA key's kid
            if not self._signed_by(keys, alg, signing_input, signature):
                raise _invalid(BAD_SIGNATURE)
        else:
            # A kid the JWKS does not know may still be signed by a static
            # key (they have no kid); a token without kid tries the first few
            # keys that accept its algorithm.
            index = self._static_by_alg if kid is not None else self._by_alg
            keys = index.get(alg, ())
            if not keys or not self._signed_by(keys, alg, signing_input, signature):
                if self._jwks_url is not None:
                    raise self._no_key(kid, bool(keys), refetch)
                raise _invalid(BAD_SIGNATURE if keys else BAD_ALGORITHM)

        claims = _json_object(m[2])
        exp = _number(claims, "exp")
        nbf = _number(claims, "nbf")
        iat = _number(claims, "iat")
        self._check_window(exp, nbf, iat, now)
        if self._issuers is not None:
            iss = claims.get("iss")
            if not isinstance(iss, str) or iss not in self._issuers:
                raise _invalid(BAD_ISSUER)
        if self._audiences is not None:
            aud = claims.get("aud")
            if isinstance(aud, str):
                ok = aud in self._audiences
            elif isinstance(aud, list):
                ok = any(isinstance(a, str) and a in self._audiences for a in aud)
            else:
                ok = False
            if not ok:
                raise _invalid(BAD_AUDIENCE)

        self.cache.put(token, claims, exp=exp, nbf=nbf, iat=iat, leeway=self._leeway, now=now)
        return dict(claims)

    def _check_window(
        self, exp: float | None, nbf: float | None, iat: float | None, now: float
    ) -> None:
        if exp is not None and now >= exp + self._leeway:
            raise _invalid(EXPIRED)
        if nbf is not None and now < nbf - self._leeway:
            raise _invalid(NOT_YET_VALID)
        if iat is not None and iat > now + self._leeway:
            raise _invalid(ISSUED_IN_FUTURE)

    @staticmethod
    def _signed_by(keys: Sequence[_Key], alg: str, signing_input: bytes, signature: bytes) -> bool:
        algorithm = _ALGORITHMS[alg]
        for key in keys[:MAX_CANDIDATES]:
            try:
                if algorithm.verify(signing_input, key.key, signature):
                    return True
            except Exception:  # a malformed signature for this key type
                continue
        return False

    def _no_key(self, kid: str | None, tried: bool, refetch: bool) -> AuthError:
        if not self._jwks and not tried:
            description = NO_KEYS
        elif kid is not None:
            description = UNKNOWN_KID
        else:
            description = BAD_SIGNATURE if tried else BAD_ALGORITHM
        if refetch and self._refetch_allowed():
            return UnknownKeyId(401, "invalid_token", description)
        return _invalid(description)
