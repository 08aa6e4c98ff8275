"""Authentication at the edge: API keys held by consumers, and JWT bearer tokens.

A route's `auth:` names one or more entries of the top-level `auth:`; any
one of them admits the request. Each entry is an authenticator that looks at
the request and says one of: no credentials of mine here (`None`), admitted
(`True`, with the identity set on the request), or refused (`AuthError`).
The route's filter tries them in order:

- all say "no credentials" -> 401 with one `WWW-Authenticate` challenge per
  scheme (RFC 6750 section 3: no error code when nothing was presented);
- one refuses and none admits -> the first refusal (401 `invalid_token`
  for a bad token or key, 400 `invalid_request` for a malformed one);
- one admits -> the route's `scopes` and `required_claims` are checked
  (403 `insufficient_scope`), identity headers are set, and credentials the
  config hides are removed.

Whatever a client sends in the identity headers (`X-Consumer` and the
headers claims are forwarded in) is removed on every route, authenticated or
not, so an upstream can trust them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from meshgate.auth.jwt import AuthError, JwtVerifier, UnknownKeyId
from meshgate.config.schema import ApiKeyAuthConfig, ConsumerConfig, JwtAuthConfig
from meshgate.filters import FilterRequest, LocalReply

__all__ = ["CONSUMER_HEADER", "ApiKeyAuthenticator", "AuthFilter", "JwtAuthenticator"]

log = logging.getLogger("meshgate.auth")

CONSUMER_HEADER = b"x-consumer"
_AUTHORIZATION = b"authorization"
_REALM = b'realm="meshgate"'
_BAD_HEADER_CHARS = frozenset(b"\r\n\x00")


def _unquote(raw: bytes) -> bytes:
    """Form-decode a query name or value to bytes (never fails)."""
    return unquote_to_bytes(raw.replace(b"+", b" "))


def _problem_kind(error: str) -> str:
    return {
        "invalid_request": "invalid-request",
        "insufficient_scope": "insufficient-scope",
    }.get(error, "invalid-credentials")


def _quote(text: str) -> bytes:
    """A quoted-string for an auth-param (RFC 9110 section 5.6.4)."""
    safe = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else " " for c in text)
    return b'"' + safe.encode("ascii") + b'"'


class ApiKeyAuthenticator:
    """`type: api_key`: a key one of the consumers holds, compared by its SHA-256."""

    scheme = b"ApiKey"

    def __init__(
        self, name: str, cfg: ApiKeyAuthConfig, consumers: Mapping[str, ConsumerConfig]
    ) -> None:
        self.name = name
        self.header = cfg.header.encode("latin-1")
        scheme = cfg.authorization_scheme
        self.auth_prefix = scheme.lower().encode("latin-1") + b" " if scheme else None
        self.query = cfg.query.encode("latin-1") if cfg.query else None
        self.hide = cfg.hide_credentials
        self.owners: dict[str, str] = {}
        for consumer, ccfg in consumers.items():
            for digest in ccfg.api_keys:
                self.owners[digest] = consumer

    def authenticate(self, req: FilterRequest) -> bool | None:
        # The route's filter took every credential parameter out of the
        # query before any entry ran (see `take_query_credentials`).
        found = req.query_credentials
        from_query = found.get(self.query) if found and self.query else None
        key: bytes | None = None
        count = req.header_count(self.header)
        if count > 1:
            raise AuthError(400, "invalid_request", f"more than one {self.header.decode()} header")
        if count:
            key = req.header(self.header)
            if self.hide:
                req.drop.add(self.header)
        prefix = self.auth_prefix
        if prefix is not None:
            value = req.header(_AUTHORIZATION)
            if value is not None and value[: len(prefix)].lower() == prefix:
                if req.header_count(_AUTHORIZATION) > 1:
                    raise AuthError(400, "invalid_request", "more than one Authorization header")
                if key is None:
                    key = value[len(prefix) :]
                if self.hide:
                    req.drop.add(_AUTHORIZATION)
        if key is None and from_query is not None:
            key = _unquote(from_query)
        if key is None:
            return None
        key = key.strip()
        if not key:
            raise AuthError(401, "invalid_token", "the API key is empty")
        digest = "sha256:" + hashlib.sha256(key).hexdigest()
        consumer = self.owners.get(digest)
        if consumer is None:
            raise AuthError(401, "invalid_token", "the API key is not valid")
        req.api_key = digest
        req.consumer = consumer
        return True


class JwtAuthenticator:
    """`type: jwt`: `Authorization: Bearer <token>`, verified by `JwtVerifier`."""

    scheme = b"Bearer"

    def __init__(
        self,
        name: str,
        cfg: JwtAuthConfig,
        verifier: JwtVerifier,
        consumers: Mapping[str, ConsumerConfig],
    ) -> None:
        self.name = name
        self.verifier = verifier
        self.strip = cfg.strip_authorization
        self.consumer_claim = cfg.consumer_claim
        self.forward = tuple(
            (claim, header.lower().encode("latin-1"))
            for claim, header in cfg.forward_claims.items()
        )
        self.scopes = tuple(cfg.scopes)
        self.required = cfg.required_claims
        self.checks = bool(self.scopes) or bool(self.required)
        self.subjects: dict[str, str] = {}
        for consumer, ccfg in consumers.items():
            for subject in ccfg.jwt_subjects:
                self.subjects.setdefault(subject, consumer)

    def token(self, req: FilterRequest) -> str | None:
        value: bytes | None = None
        for name, v in req.headers:
            if name == _AUTHORIZATION:
                if value is not None:
                    raise AuthError(400, "invalid_request", "more than one Authorization header")
                value = v
        if value is None or value[:7].lower() != b"bearer ":
            return None  # none, or another scheme: not a credential of this entry
        token = value[7:].strip()
        if not token:
            raise AuthError(400, "invalid_request", "the bearer token is empty")
        return token.decode("latin-1")

    def admit(self, req: FilterRequest, claims: dict[str, Any]) -> bool:
        if self.checks:
            JwtVerifier.check_claims(claims, self.scopes, self.required)
        req.claims = claims
        subject = claims.get(self.consumer_claim)
        if isinstance(subject, str | int) and not isinstance(subject, bool):
            req.subject = str(subject)
            req.consumer = self.subjects.get(req.subject)
        for claim, header in self.forward:
            value = claims.get(claim)
            if value is None:
                continue
            if isinstance(value, str):
                raw = value.encode("utf-8")
            else:
                raw = orjson.dumps(value)
                if raw[:1] == b'"':
                    raw = raw[1:-1]
            if _BAD_HEADER_CHARS.isdisjoint(raw):
                req.add.append((header, raw))
        if self.strip:
            req.drop.add(_AUTHORIZATION)
        return True

    def authenticate(self, req: FilterRequest) -> bool | None:
        token = self.token(req)
        if token is None:
            return None
        return self.admit(req, self.verifier.verify(token))

    async def authenticate_async(self, req: FilterRequest) -> bool | None:
        token = self.token(req)
        if token is None:
            return None
        return self.admit(req, await self.verifier.verify_async(token))


def take_query_credentials(req: FilterRequest, names: frozenset[bytes]) -> None:
    """Remove the parameters named `names` from the request target, keeping
    the first value of each in `req.query_credentials`. It runs before any
    entry of the route does, so that a key never goes upstream, whichever
    entry admits the request."""
    path, sep, qs = req.target.partition(b"?")
    if not sep:
        return
    found: dict[bytes, bytes] = {}
    kept = []
    for part in qs.split(b"&"):
        raw_name, _, value = part.partition(b"=")
        name = _unquote(raw_name) if b"%" in raw_name or b"+" in raw_name else raw_name
        if name in names:
            found.setdefault(name, value)
            continue
        kept.append(part)
    if found:
        req.target = path + (b"?" + b"&".join(kept) if kept else b"")
        req.query_credentials = found


Authenticator = ApiKeyAuthenticator | JwtAuthenticator
_Refusal = tuple[AuthError, bytes]  # the error, and the scheme that refused


class AuthFilter:
    """A route's `auth:`: any one of its authenticators admits the request."""

    def __init__(
        self,
        authenticators: Sequence[Authenticator],
        *,
        scopes: Sequence[str] = (),
        required_claims: Sequence[str] | Mapping[str, Any] = (),
    ) -> None:
        self.authenticators = tuple(authenticators)
        keys = [a for a in self.authenticators if isinstance(a, ApiKeyAuthenticator)]
        self.query_names = frozenset(a.query for a in keys if a.query)
        # Key headers that are never forwarded, whichever entry admits.
        self.hidden = frozenset(a.header for a in keys if a.hide)
        # Outcomes, for /metrics: admitted, no credentials, refused (401/400), forbidden (403).
        self.admitted = self.missing = self.refused = self.forbidden = 0
        self.consumers: dict[str, int] = {}
        """Requests admitted per consumer (the config's names: bounded)."""
        # Refusals by their RFC 6750 error code (a fixed set: invalid_token,
        # invalid_request, insufficient_scope), for /metrics.
        self.failures: dict[str, int] = {}
        self.scopes = tuple(scopes)
        self.required = required_claims
        self.route_checks = bool(scopes) or bool(required_claims)
        challenges = []
        for a in self.authenticators:
            challenge = a.scheme + b" " + _REALM
            if challenge not in challenges:
                challenges.append(challenge)
        self.challenges = tuple(challenges)

    def __call__(
        self, req: FilterRequest
    ) -> LocalReply | Coroutine[Any, Any, LocalReply | None] | None:
        if self.query_names:
            take_query_credentials(req, self.query_names)
        refusal: _Refusal | None = None
        for i, a in enumerate(self.authenticators):
            try:
                admitted = a.authenticate(req)
            except UnknownKeyId:
                return self._continue_async(req, i, refusal)
            except AuthError as exc:
                refusal = refusal or (exc, a.scheme)
                continue
            if admitted:
                return self._admitted(req)
        return self._refuse(refusal)

    async def _continue_async(
        self, req: FilterRequest, start: int, refusal: _Refusal | None
    ) -> LocalReply | None:
        for i in range(start, len(self.authenticators)):
            a = self.authenticators[i]
            try:
                if isinstance(a, JwtAuthenticator):
                    # Async for every JWT entry from here on: a later one
                    # may need a refetch too.
                    admitted = await a.authenticate_async(req)
                else:
                    admitted = a.authenticate(req)
            except AuthError as exc:
                refusal = refusal or (exc, a.scheme)
                continue
            if admitted:
                return self._admitted(req)
        return self._refuse(refusal)

    def _admitted(self, req: FilterRequest) -> LocalReply | None:
        if self.hidden:
            req.drop |= self.hidden
        if self.route_checks:
            claims = req.claims
            if claims is None:
                return self._reply(
                    (
                        AuthError(
                            403,
                            "insufficient_scope",
                            "this route requires token scopes or claims; an API key carries none",
                        ),
                        ApiKeyAuthenticator.scheme,
                    )
                )
            try:
                JwtVerifier.check_claims(claims, self.scopes, self.required)
            except AuthError as exc:
                return self._reply((exc, JwtAuthenticator.scheme))
        self.admitted += 1
        consumer = req.consumer
        if consumer is not None:
            consumers = self.consumers
            consumers[consumer] = consumers.get(consumer, 0) + 1
            req.add.append((CONSUMER_HEADER, consumer.encode("utf-8")))
        return None

    def _refuse(self, refusal: _Refusal | None) -> LocalReply:
        if refusal is None:
            self.missing += 1
            return LocalReply(
                401,
                "missing-credentials",
                "this route requires credentials: "
                + " or ".join(c.split(b" ")[0].decode() for c in self.challenges),
                [(b"www-authenticate", c) for c in self.challenges],
            )
        return self._reply(refusal)

    def _reply(self, refusal: _Refusal) -> LocalReply:
        exc, scheme = refusal
        if exc.status == 403:
            self.forbidden += 1
        else:
            self.refused += 1
        self.failures[exc.error] = self.failures.get(exc.error, 0) + 1
        challenge = (
            scheme
            + b" "
            + _REALM
            + b", error="
            + _quote(exc.error)
            + b", error_description="
            + _quote(exc.description)
        )
        if exc.error == "insufficient_scope" and self.scopes:
            challenge += b", scope=" + _quote(" ".join(self.scopes))
        headers = [(b"www-authenticate", challenge)]
        headers += [(b"www-authenticate", c) for c in self.challenges if not c.startswith(scheme)]
        return LocalReply(exc.status, _problem_kind(exc.error), exc.description, headers)
