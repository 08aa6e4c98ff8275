"""The edge's security config: rate limits, auth (JWT, API keys), consumers, Redis."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from meshgate.config.base import Duration, DurationOrZero, Size, _Model, redact_url

RateLimitKey = str
"""`consumer`, `api_key`, `ip`, `route`, `peer`, `header:<name>`, or
`default` (the consumer, else the API key, else the client IP)."""

_KEY_RE = re.compile(
    r"^(default|consumer|api_key|ip|route|peer|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$"
)


class RateLimitConfig(_Model):
    """`rate_limit: 100/min`, or the long form with every option."""

    limit: int = Field(ge=1)
    """Requests allowed per `period`."""
    period: Duration
    key: RateLimitKey = "default"
    """What is counted separately: `consumer`, `api_key`, `ip`, `route`
    (everyone together), `peer` (the SPIFFE ID of the caller's verified
    client certificate; every caller without one shares the bucket
    `plaintext`), `header:<name>`, or `default` (the consumer, else the API
    key, else the client IP)."""
    algorithm: Literal["gcra", "sliding_window"] = "gcra"
    """`gcra`: token bucket semantics, refilling evenly over the period.
    `sliding_window`: a weighted count over the current and last windows."""
    burst: int | None = Field(default=None, ge=1)
    """How many requests may arrive at once (gcra); defaults to `limit`."""
    policy: Literal["local", "redis"] = "local"
    """`local`: exact per gateway instance, across its workers. `redis`:
    exact across every instance sharing the top-level `redis:` server."""
    on_store_error: Literal["allow", "deny"] = "allow"
    """What a request gets when Redis cannot answer within its timeout."""
    headers: bool = True
    """Send the RateLimit-Policy, RateLimit and X-RateLimit-* fields."""
    name: str | None = None
    """The policy's name in the RateLimit fields (defaults to the route's)."""

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: str) -> str:
        if not _KEY_RE.match(v):
            raise ValueError(
                "expected consumer, api_key, ip, route, peer, default or header:<name>, "
                f"found {v!r}"
            )
        return v.lower() if not v.startswith("header:") else "header:" + v[7:].lower()

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:/-]{1,64}", v):
            raise ValueError("a policy name is 1-64 letters, digits, or _.:/-")
        return v

    @model_validator(mode="after")
    def _check_burst(self) -> RateLimitConfig:
        if self.burst is not None and self.algorithm != "gcra":
            raise ValueError("burst applies to algorithm: gcra only")
        return self


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


def _parse_rate_limit(value: Any) -> Any:
    if isinstance(value, str):
        m = _RATE_RE.match(value)
        if m is None:
            raise ValueError(f"expected a rate such as 100/min, 10/s or 5000/h, found {value!r}")
        count = int(m.group(2) or 1)
        return {"limit": int(m.group(1)), "period": float(count * _RATE_UNITS[m.group(3)])}
    return value


RateLimitSpec = Annotated[RateLimitConfig, BeforeValidator(_parse_rate_limit)]


def _header_value(value: Any) -> Any:
    # YAML reads `x-canary: 1` as the number 1; a header matcher means the
    # text "1" there, never `true` (present).
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


HeaderMatchValue = Annotated[StrictBool | str, BeforeValidator(_header_value)]


class RouteAuth(_Model):
    """A route's `auth:`: which entries admit a request, and what it needs."""

    use: list[str] = Field(min_length=1)
    """Names of top-level `auth:` entries; any one of them admits a request."""
    scopes: list[str] = Field(default_factory=list)
    """JWT scopes all required (from a space-separated `scope` or an `scp` array)."""
    required_claims: list[str] | dict[str, StrictBool | int | str] = Field(default_factory=list)
    """JWT claims that must be present (a list), or claim -> exact value."""

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"use": [value]}
        if isinstance(value, list):
            return {"use": value}
        return value


JwtAlgorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]


class JwtAuthConfig(_Model):
    """`type: jwt`: a bearer token signed by a key that the config names."""

    type: Literal["jwt"]
    issuer: str | list[str] | None = None
    """Accepted `iss` values; when set, a token without `iss` is refused."""
    audience: str | list[str] | None = None
    """Accepted `aud` values; when set, a token must name one of them."""
    algorithms: list[JwtAlgorithm] | None = None
    """Accepted algorithms. By default: HS256/384/512 with `secret`, every
    asymmetric algorithm that fits the key otherwise. Never `none`."""
    secret: str | None = None
    """HMAC secret (HS*), inline; prefer `${ENV}`."""
    secret_file: str | None = None
    public_key: str | None = None
    """A PEM public key, inline."""
    public_key_file: str | None = None
    jwks_url: str | None = None
    """An http(s) URL serving a JWKS; fetched at start and refreshed."""
    jwks_refresh: Duration = 300.0
    """How often the JWKS is refreshed in the background."""
    jwks_refetch_interval: Duration = 30.0
    """A token with an unknown `kid` refetches the JWKS at most this often."""
    jwks_timeout: Duration = 5.0
    leeway: DurationOrZero = 30.0
    """Clock skew allowed on `exp`, `nbf` and `iat`."""
    scopes: list[str] = Field(default_factory=list)
    required_claims: list[str] | dict[str, StrictBool | int | str] = Field(default_factory=list)
    forward_claims: dict[str, str] = Field(default_factory=dict)
    """Claim -> request header sent upstream (client copies are removed)."""
    strip_authorization: bool = False
    """Remove the Authorization header before the request goes upstream."""
    consumer_claim: str = "sub"
    """The claim matched against each consumer's `jwt_subjects`."""
    max_token_size: Size = 8192
    cache_size: int = Field(default=10_000, ge=0)
    """Verified tokens remembered per worker (least recently used first out;
    0: verify every request). An entry lasts until the token's `exp`, or 5
    minutes, and a JWKS rotation drops them all."""

    @model_validator(mode="after")
    def _check_keys(self) -> JwtAuthConfig:
        sources = [
            name
            for name in ("secret", "secret_file", "public_key", "public_key_file", "jwks_url")
            if getattr(self, name) is not None
        ]
        if not sources:
            raise ValueError(
                "a jwt entry needs a key: jwks_url, public_key, public_key_file, "
                "secret or secret_file"
            )
        hmac = any(s.startswith("secret") for s in sources)
        if hmac and len(sources) > 1:
            raise ValueError(
                "an HMAC secret cannot share an entry with public keys "
                "(that is how HS/RS key confusion happens); use two entries"
            )
        for alg in self.algorithms or ():
            if alg.startswith("HS") and not hmac:
                raise ValueError(f"algorithm {alg} needs `secret` or `secret_file`")
            if not alg.startswith("HS") and hmac:
                raise ValueError(f"algorithm {alg} needs a public key or jwks_url, not a secret")
        if self.jwks_url is not None and not re.match(r"^https?://", self.jwks_url):
            raise ValueError(
                f"jwks_url must be an http:// or https:// URL, found {redact_url(self.jwks_url)!r}"
            )
        for header in self.forward_claims.values():
            _check_header_name(
                header, "forward_claims", extra=frozenset({"authorization", "cookie"})
            )
        for name in ("issuer", "audience"):
            if getattr(self, name) == []:
                raise ValueError(f"{name}: an empty list would refuse every token; omit it instead")
        return self


class ApiKeyAuthConfig(_Model):
    """`type: api_key`: a key that one of the `consumers:` holds."""

    type: Literal["api_key"]
    header: str = "x-api-key"
    """The header that carries the key."""
    authorization_scheme: str | None = "ApiKey"
    """Also read `Authorization: <scheme> <key>`; null turns it off."""
    query: str | None = None
    """Also read the key from this query parameter (off by default). The
    parameter is always removed before the request goes upstream."""
    hide_credentials: bool = True
    """Remove the key's header before the request goes upstream."""

    @field_validator("header")
    @classmethod
    def _check_header(cls, v: str) -> str:
        return _check_header_name(v, "header", extra=frozenset({"cookie"}))


AuthEntry = Annotated[JwtAuthConfig | ApiKeyAuthConfig, Field(discriminator="type")]

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers a credential or a forwarded claim may not use: message framing,
# hop-by-hop fields, and those the gateway sets or reads itself.
_RESERVED_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "expect",
        "via",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-consumer",
    }
)


def _check_header_name(value: str, what: str, *, extra: frozenset[str] = frozenset()) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{what}: {value!r} is not a header name")
    lowered = value.lower()
    if lowered in _RESERVED_HEADERS or lowered in extra:
        raise ValueError(f"{what}: {value!r} is a header the gateway owns or frames messages with")
    return lowered


_KEY_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ConsumerRate(_Model):
    """A consumer's own rate: the route's limit keeps its other settings."""

    limit: int = Field(ge=1)
    period: Duration


class ConsumerConfig(_Model):
    """A named client of the gateway."""

    api_keys: list[str] = Field(default_factory=list)
    """SHA-256 digests of its keys, `sha256:<64 hex>` (`meshgate hash-key`)."""
    jwt_subjects: list[str] = Field(default_factory=list)
    """Token subjects (`sub`, or the entry's consumer_claim) that are this consumer."""
    rate_limit: Annotated[ConsumerRate | None, BeforeValidator(_parse_rate_limit)] = None
    """Replaces the limit and period of every route limit keyed on this
    consumer (`1000/h`, or `{limit, period}`)."""

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: list[str]) -> list[str]:
        for key in v:
            if not _KEY_HASH_RE.match(key.lower()):
                raise ValueError(
                    "an API key is stored as its digest, sha256:<64 hex digits> "
                    "(make one with `meshgate hash-key`), found "
                    + repr(key[:12] + "..." if len(key) > 12 else key)
                )
        return [key.lower() for key in v]


_REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)


class RedisConfig(_Model):
    """The Redis server that `policy: redis` limits share."""

    url: str
    """`redis://[:password@]host:port/db`, `rediss://...`, `unix:///path`,
    `redis+sentinel://host:26379,host2:26379/<master>/<db>` or
    `redis+cluster://host:7000,host:7001`."""
    timeout: Duration = 0.1
    """Longest a decision may wait on Redis; past it `on_store_error` decides."""
    max_connections: int = Field(default=64, ge=1)
    key_prefix: str = "meshgate:rl:"
    down_interval: Duration = 1.0
    """After an error, how long decisions skip Redis before trying it again."""

    @classmethod
    def parse(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        scheme = v.partition("://")[0].lower()
        if "://" not in v or scheme not in _REDIS_SCHEMES:
            raise ValueError(
                "expected a URL such as redis://127.0.0.1:6379/0 "
                f"(schemes: {', '.join(_REDIS_SCHEMES)}), found {redact_url(v)!r}"
            )
        return v
