"""JWT (compact JWS) verification for `type: jwt` auth entries.

`JwtVerifier` checks a bearer token against the keys its config names: an
HMAC secret, a PEM public key (inline or a file), and/or a JWKS fetched over
http(s) and refreshed in the background.

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

An unknown `kid` makes `verify()` raise `UnknownKeyId` when a JWKS refetch is
allowed right now; `verify_async()` then refetches (single-flight, at most once
per `jwks_refetch_interval`) and verifies again.

Entry-level `scopes` and `required_claims` are *not* applied by `verify()`:
the caller applies them with `check_claims()` (as it does for a route's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any

import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from jwt import PyJWK
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import PyJWTError

from meshgate.auth.jwtcache import TokenCache
from meshgate.config.schema import JwtAuthConfig

__all__ = ["AuthError", "JwtVerifier", "UnknownKeyId"]

log = logging.getLogger("meshgate.auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS = (*RSA_ALGORITHMS, "ES256", "ES384", "ES512", "EdDSA")

# One shared, stateless instance per algorithm name; "none" is left out.
_ALGORITHMS: dict[str, Algorithm] = {
    name: algorithm
    for name, algorithm in get_default_algorithms().items()
    if name in HMAC_ALGORITHMS or name in ASYMMETRIC_ALGORITHMS
}
_JWK_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

MIN_RSA_BITS = 2048
MAX_CANDIDATES = 8
"""Keys tried for a token without `kid` (they all accept its algorithm)."""
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100

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


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: Any
    """bytes (HMAC) or a cryptography public key."""
    algorithms: frozenset[str]
    label: str
    fingerprint: bytes


class _Skip(Exception):
    """A JWKS entry that is not used; the message says why."""


# ---------------------------------------------------------------------------
# keys


def _describe(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA {key.key_size}-bit key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey):
        return "an Ed448 key"
    return f"a {type(key).__name__}"


def _public(key: Any) -> Any:
    """The public half of a key (a JWKS may, wrongly, publish private keys)."""
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        return key.public_key()
    return key


def _compatible(key: Any) -> tuple[str, ...]:
    """Every supported algorithm that can verify with `key`."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def _public_key_algorithms(key: Any, accepted: frozenset[str] | None) -> frozenset[str]:
    """The algorithms `key` is used with; ValueError when it cannot be used."""
    compatible = _compatible(key)
    if not compatible:
        raise ValueError(f"{_describe(key)} cannot verify any supported JWT algorithm")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{_describe(key)} is too short (at least {MIN_RSA_BITS} bits)")
    algorithms = frozenset(compatible if accepted is None else accepted.intersection(compatible))
    if not algorithms:
        raise ValueError(
            f"{_describe(key)} fits none of the accepted algorithms "
            f"({', '.join(sorted(accepted or ()))}); it needs one of {', '.join(compatible)}"
        )
    for name in algorithms:  # PyJWT's own type and curve checks
        try:
            _ALGORITHMS[name].prepare_key(key)
        except (PyJWTError, TypeError, ValueError) as exc:
            raise ValueError(f"{_describe(key)} cannot be used with {name}: {exc}") from None
    return algorithms


def _der(key: Any) -> bytes:
    der: bytes = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der


def _load_pem(data: bytes, what: str) -> Any:
    if b"PRIVATE KEY-----" in data:
        raise ValueError(
            f"{what} holds a private key; give the gateway the public key only "
            "(openssl pkey -in key.pem -pubout)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"{what} is not a PEM public key (-----BEGIN PUBLIC KEY-----) or certificate"
        ) from None


def _read(path_text: str, base_dir: Path | None, what: str) -> bytes:
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


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


# ---------------------------------------------------------------------------
# the verifier


class JwtVerifier:
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

    def _refetch_allowed(self) -> bool:
        return self._jwks_url is not None and (
            self._inflight is not None or time.monotonic() >= self._refetch_at
        )

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
