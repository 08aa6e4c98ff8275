"""The config file's shape, as pydantic v2 models.

Every model is frozen and refuses unknown fields, so a typo is an error with
its line number rather than a silently ignored key. Durations accept `250ms`,
`2s`, `1m`, `1h` or a bare number of seconds; sizes accept `16KiB`, `1MiB` or
a bare number of bytes. Validation here is about shape; cross references
(a route naming an upstream that does not exist) are checked by
`Config` itself so that the error points at the route's field. What needs
the engine's code to check (route patterns, templates, JSON body maps,
aggregate plans) is compiled after validation by `meshgate.engine.load`:
this module, like the rest of `meshgate.config`, imports nothing of the
engine.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from meshgate.config.authz import AuthzConfig

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# re.ASCII: with plain IGNORECASE, "KİB" matches and its .lower() is not a key.
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def redact_url(url: str) -> str:
    """`url` without the credentials or query it may carry (for messages)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<a URL>" if "@" in url else url
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "<redacted>@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{path}"


def parse_duration(value: Any, *, allow_zero: bool = False) -> float:
    """`250ms`, `2s`, `1.5m`, `1h` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m is None:
            raise ValueError(f"expected a duration such as 250ms, 2s or 1m, found {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(
            "a duration must not be negative"
            if allow_zero
            else "a duration must be greater than zero"
        )
    return seconds


def _parse_duration_or_zero(value: Any) -> float:
    return parse_duration(value, allow_zero=True)


def parse_size(value: Any) -> int:
    """`16KiB`, `1MiB` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 8KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"expected a size such as 8KiB or 1MiB, found {value!r}")
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError("expected a size such as 8KiB or 1MiB")
    if size <= 0:
        raise ValueError("a size must be greater than zero")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
DurationOrZero = Annotated[float, BeforeValidator(_parse_duration_or_zero)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _parse_address(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """`host:port`, `:port`, `port` or `[v6]:port` -> (host, port)."""
    text = value.strip()
    if text.isdigit():
        host, port_s = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [ipv6]:port, found {value!r}")
        host, port_s = text[1:end], text[end + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, found {value!r}")
        host = host or default_host
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"expected a port number from 0 to 65535, found {port_s!r}")
    return host, int(port_s)


class Address(_Model):
    """A socket address to listen on."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, str | int):
            host, port = _parse_address(str(value))
            return {"host": host, "port": port}
        return value

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ListenAddress = Annotated[Address, BeforeValidator(Address.parse)]


class Endpoint(_Model):
    """One upstream endpoint: `host:port` or a URL `http://host[:port]`."""

    host: str
    port: int
    scheme: Literal["http"] = "http"
    identity: str | None = None
    """The SPIFFE ID expected at this endpoint: the connection is mutual TLS
    (TLS 1.3, with the proxy's own mesh certificate), and a server that
    presents any other identity is refused. Only a proxy in the mesh (a
    sidecar, or a gateway with `mesh:`) can reach such an endpoint."""

    @field_validator("identity")
    @classmethod
    def _spiffe(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)+", v):
            raise ValueError(f"{v!r} is not a SPIFFE ID (spiffe://trust-domain/path)")
        return v

    @classmethod
    def parse(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        scheme = "http"
        if "://" in text:
            scheme, _, text = text.partition("://")
            scheme = scheme.lower()
            if scheme != "http":
                raise ValueError(
                    f"expected an http:// URL or host:port, found scheme {scheme!r} "
                    "(upstream TLS arrives with the mesh)"
                )
            text = text.rstrip("/")
            if "/" in text:
                raise ValueError(f"an endpoint URL has no path, found {value!r}")
            if ":" not in text.rpartition("]")[2]:
                text += ":80"
        host, port = _parse_address(text, default_host="")
        if not host:
            raise ValueError(f"expected host:port, found {value!r}")
        if port == 0:
            raise ValueError("an endpoint's port cannot be 0")
        return {"host": host, "port": port, "scheme": scheme}

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


EndpointSpec = Annotated[Endpoint, BeforeValidator(Endpoint.parse)]


class UpstreamTimeouts(_Model):
    """How long the gateway waits on an upstream."""

    connect: Duration = 2.0
    """Time to open a TCP connection to one endpoint."""
    read: Duration = 30.0
    """Longest silence while waiting for response bytes (read-idle)."""
    total: Duration = 60.0
    """Whole exchange, from picking an endpoint to the last response byte."""


class PoolConfig(_Model):
    """The keep-alive pool kept for each endpoint."""

    max_connections: int = Field(default=1024, ge=1)
    """Open connections per endpoint; past it, requests wait for one to free up."""
    max_idle: int = Field(default=256, ge=0)
    """Idle keep-alive connections kept per endpoint."""
    idle_timeout: Duration = 60.0
    """An idle connection older than this is closed rather than reused."""
    acquire_timeout: Duration | None = None
    """How long a request waits for a free connection when the pool is full
    (defaults to the connect timeout); past it the answer is 503."""


RetryOn = Literal[
    "connect-failure",
    "reset",
    "timeout",
    "gateway-error",
    "5xx",
    "retriable-4xx",
    "500",
    "502",
    "503",
    "504",
    "429",
    "409",
]


_DEFAULT_RETRY_ON: tuple[RetryOn, ...] = ("connect-failure", "reset", "gateway-error")


def _statuses_as_text(value: Any) -> Any:
    # `on: [503]` reads as a number in YAML; the status is meant.
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


class RetryBackoff(_Model):
    base: Duration = 0.025
    """The first retry waits up to this (full jitter: a random time from 0)."""
    max: Duration = 0.25
    """Each further retry doubles the bound, up to this."""


class RetryConfig(_Model):
    """Retries of one request (per route, or the default of an upstream)."""

    attempts: int = Field(default=3, ge=1, le=10)
    """Tries in all, the first one included."""
    on: Annotated[list[RetryOn], BeforeValidator(_statuses_as_text)] = Field(
        default_factory=lambda: list(_DEFAULT_RETRY_ON)
    )
    """What is retried: connect-failure (nothing was sent), reset (the
    connection dropped before an answer), timeout (per_try_timeout), a status,
    `gateway-error` (502, 503, 504), `5xx`, `retriable-4xx` (409)."""
    per_try_timeout: Duration | None = None
    """Each try's own deadline; the route's total still bounds them all."""
    backoff: RetryBackoff = RetryBackoff()
    non_idempotent: bool = False
    """Also retry POST/PATCH/... after bytes were sent. Off: those are retried
    only when nothing was sent (connect failures)."""


class RetryBudgetConfig(_Model):
    """Linkerd's retry budget, per upstream and worker: retries may add at most
    `ratio` of the requests, plus `min_per_second`, over `window`."""

    ratio: float = Field(default=0.2, ge=0, le=10, allow_inf_nan=False)
    min_per_second: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    window: Duration = 10.0


class CircuitBreakerConfig(_Model):
    """Limits per upstream (per worker); past one, a request gets an immediate
    503 with `x-meshgate-overloaded: 1` instead of queueing (Envoy's
    circuit breakers)."""

    max_requests: int | None = Field(default=None, ge=1)
    """Requests in flight to this upstream at once."""
    max_pending: int | None = Field(default=None, ge=0)
    """Requests waiting for a connection (every pool full) at once."""
    max_retries: int | None = Field(default=None, ge=0)
    """Retries in flight at once; past it a failed try is not retried."""


class OutlierDetectionConfig(_Model):
    """Passive health: endpoints that keep failing are taken out for a while."""

    consecutive_5xx: int | None = Field(default=5, ge=1)
    """Eject after this many 5xx answers (or gateway failures) in a row."""
    consecutive_gateway_failure: int | None = Field(default=3, ge=1)
    """Eject after this many connect failures, resets or timeouts in a row."""
    base_ejection_time: Duration = 30.0
    """The first ejection lasts this; each further one of the same endpoint
    lasts one more multiple (30 s, 60 s, 90 s ...), up to max_ejection_time."""
    max_ejection_time: Duration = 300.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)
    """Never eject more than this share of the endpoints (at least one stays)."""
    success_rate_minimum: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    """Also eject an endpoint whose share of answers that are not 5xx (nor
    gateway failures) falls below this over `success_rate_interval`, once it
    had `success_rate_request_volume` requests in it (e.g. 0.9). Off if absent."""
    success_rate_request_volume: int = Field(default=100, ge=1)
    success_rate_interval: Duration = 10.0


_HEALTH_TEXT_RE = re.compile(r"[\x21-\x7e]+")


class HealthCheckConfig(_Model):
    """Active health: each endpoint is sent `GET <path>` every `interval`, on
    a connection of its own; one that keeps failing is taken out until it
    passes again."""

    path: str
    """The request target, starting with `/` (a query is allowed)."""
    interval: Duration = 10.0
    """Time between the starts of two checks of one endpoint."""
    timeout: Duration = 2.0
    """For the whole check, from connecting to the end of the response; past it,
    the check failed."""
    healthy_threshold: int = Field(default=2, ge=1)
    """Passes in a row that put an endpoint that is down back in service."""
    unhealthy_threshold: int = Field(default=3, ge=1)
    """Failures in a row that take an endpoint out of service."""
    expected: list[Annotated[int, Field(ge=100, le=599)]] | None = Field(default=None, min_length=1)
    """Statuses that pass; absent means any 2xx or 3xx."""
    host: str | None = None
    """The Host header; defaults to the endpoint's host:port."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"a health check path starts with '/', found {v!r}")
        if not _HEALTH_TEXT_RE.fullmatch(v):
            raise ValueError(f"a health check path is printable ASCII without spaces, found {v!r}")
        return v

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str | None) -> str | None:
        if v is not None and not _HEALTH_TEXT_RE.fullmatch(v):
            raise ValueError(f"a Host is printable ASCII without spaces, found {v!r}")
        return v

    def passes(self, status: int) -> bool:
        """Whether a check answered `status` passed."""
        if self.expected is None:
            return 200 <= status < 400
        return status in self.expected


HostPolicy = Literal["preserve", "rewrite"]


class UpstreamConfig(_Model):
    """A named group of endpoints that routes send traffic to."""

    endpoints: list[EndpointSpec] = Field(default_factory=list)
    balancer: Literal["round_robin", "least_request", "ewma"] = "round_robin"
    """`round_robin`; `least_request` (power of two choices on in-flight
    requests); `ewma` (power of two choices on peak-EWMA latency x load)."""
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    pool: PoolConfig = PoolConfig()
    host: str = "preserve"
    """`preserve` sends the client's Host; `rewrite` sends the endpoint's
    host:port; any other value is sent as the Host verbatim."""
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    retry: RetryConfig | None = None
    """Retries for routes to this upstream that have no `retry:` of their own."""
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    """On by default: retries never add more than 20% + 10/s of load."""
    outlier_detection: OutlierDetectionConfig | None = Field(default_factory=OutlierDetectionConfig)
    """Failure accrual, on by default with these defaults (as Linkerd has it);
    `outlier_detection: false` (or `null`) turns it off."""
    health_check: HealthCheckConfig | None = None
    """Active health checks; off unless given."""
    service: str | None = None
    """A mesh service: its endpoints come from the control plane's snapshot
    (the proxy must be in the mesh), and are reached over mutual TLS with
    the service's identity checked. While it has no live instance, its
    routes answer 503 `no-endpoints`."""

    @field_validator("endpoints")
    @classmethod
    def _some_endpoints(cls, v: list[Endpoint]) -> list[Endpoint]:
        if not v:
            # Given, and empty (a mesh upstream leaves `endpoints` out).
            raise ValueError("an upstream needs at least one endpoint")
        return v

    @model_validator(mode="after")
    def _has_endpoints(self) -> UpstreamConfig:
        if not self.endpoints and self.service is None:
            raise ValueError(
                "an upstream needs at least one endpoint (or `service:`, a mesh service "
                "whose endpoints the control plane sends)"
            )
        return self

    @field_validator("outlier_detection", mode="before")
    @classmethod
    def _outlier_off(cls, v: Any) -> Any:
        return None if v is False else v


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


class SplitBackend(_Model):
    """One weighted backend of a route's `split:`."""

    upstream: str
    weight: int = Field(ge=0, le=1_000_000)
    """Relative share of requests; 0 takes none (but keeps the entry)."""


class CanaryMatch(_Model):
    """Requests that always go to one backend, whatever the weights say:
    `{header: x-canary, value: "1", upstream: order-service-v2}` or
    `{cookie: canary, value: always, upstream: order-service-v2}`."""

    header: str | None = None
    cookie: str | None = None
    value: Annotated[str | None, BeforeValidator(_header_value)] = None
    """The exact value; absent means "present with any value"."""
    upstream: str

    @model_validator(mode="after")
    def _one_source(self) -> CanaryMatch:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("a canary match names exactly one of header or cookie")
        if self.header is not None and not _TOKEN_RE.fullmatch(self.header):
            raise ValueError(f"{self.header!r} is not a header name")
        return self


_STICKY_RE = re.compile(
    r"^(consumer|ip|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$"
)


class FaultDelay(_Model):
    percent: float = Field(ge=0, le=100)
    duration: Duration


class FaultAbort(_Model):
    percent: float = Field(ge=0, le=100)
    status: int = Field(ge=200, le=599)


class FaultConfig(_Model):
    """Failures injected on purpose, to rehearse them (Envoy's fault filter)."""

    delay: FaultDelay | None = None
    """Hold `percent` of requests for `duration` before they go upstream."""
    abort: FaultAbort | None = None
    """Answer `percent` of requests with `status` from the gateway."""
    headers: dict[str, HeaderMatchValue] | None = None
    """Only requests matching these headers (exact value, true = present,
    false = absent) are affected; absent means every request."""

    @model_validator(mode="after")
    def _something(self) -> FaultConfig:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort, or both")
        return self


_ORIGIN_RE = re.compile(
    r"^(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>\d{1,5}))?$"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _check_origin(value: str) -> str:
    """`https://App.example.com:443` -> `https://app.example.com` (as browsers send it)."""
    if value == "*":
        return value
    text = value.strip().lower()
    m = _ORIGIN_RE.fullmatch(text)
    if m is None:
        _, sep, rest = text.partition("://")
        if sep and "/" in rest:
            raise ValueError(
                f"an origin is scheme://host[:port] with no path (not even '/'), found {value!r}"
            )
        raise ValueError(
            "expected an origin such as https://app.example.com, https://*.example.com "
            f"or *, found {value!r}"
        )
    port = m.group("port")
    if port is not None and not 0 < int(port) <= 65535:
        raise ValueError(f"an origin's port is 1 to 65535, found {value!r}")
    if port is not None and _DEFAULT_PORTS.get(m.group("scheme")) == port:
        text = text[: -len(port) - 1]  # browsers leave the default port out
    return text


def _check_method_token(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"expected an HTTP method such as GET, found {value!r}")
    return value.upper()


class CorsConfig(_Model):
    """Cross-origin resource sharing, answered at the gateway."""

    origins: list[str] = Field(min_length=1)
    """Exact origins (`https://app.example.com`), `*` (any origin), or one
    wildcard label (`https://*.example.com`: `https://a.example.com`, not
    `https://example.com` nor `https://a.b.example.com`)."""
    methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST"], min_length=1)
    """Methods a preflight may ask for."""
    headers: list[str] = Field(default_factory=list)
    """Request headers a preflight may ask for (`*`: any, without credentials)."""
    expose_headers: list[str] = Field(default_factory=list)
    """Response headers scripts may read (`*`: any, without credentials)."""
    credentials: bool = False
    """Allow cookies and Authorization (`Access-Control-Allow-Credentials`);
    the request's origin is then echoed, never `*`."""
    max_age: Duration | None = None
    """How long a browser may cache a preflight's answer."""

    @field_validator("origins")
    @classmethod
    def _check_origins(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(_check_origin(o) for o in v))

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(_check_method_token(m) for m in v))

    @field_validator("headers", "expose_headers")
    @classmethod
    def _check_headers(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            if name != "*" and not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            out.append(name.lower())
        return list(dict.fromkeys(out))

    @model_validator(mode="after")
    def _check_credentials(self) -> CorsConfig:
        if self.credentials:
            if "*" in self.origins:
                raise ValueError(
                    "origins: '*' cannot go with credentials: true (browsers refuse it); "
                    "list the origins"
                )
            for name in ("headers", "expose_headers"):
                if "*" in getattr(self, name):
                    raise ValueError(
                        f"{name}: '*' cannot go with credentials: true (browsers read it as "
                        "a header named '*'); list the headers"
                    )
        return self


def _route_cors(value: Any) -> Any:
    if value is True:
        raise ValueError(
            "cors: true says nothing about which origins; give a cors block "
            "({origins: [...]}), or false to turn the top-level cors: off for this route"
        )
    if value is not False and isinstance(value, int | float | str):  # not 0, nor "no"
        raise ValueError("expected a cors block ({origins: [...]}) or false")
    return value


class RouteTimeouts(_Model):
    """A route's own timeouts; each one absent uses its upstream's."""

    read: Duration | None = None
    """Longest silence while waiting for response bytes (read-idle)."""
    total: Duration | None = None
    """The whole exchange, retries included."""


class DeprecationConfig(_Model):
    """Tell clients a route is going away: `Deprecation` (RFC 9745),
    `Sunset` (RFC 8594) and a `Link` to what replaces it, on every response."""

    since: datetime.datetime
    """When it was (or will be) deprecated: `2025-06-30` or `2025-06-30T12:00:00Z`."""
    sunset: datetime.datetime | None = None
    """When it stops answering."""
    link: str | None = None
    """Where the replacement is documented (`rel="deprecation"`)."""

    @field_validator("since", "sunset")
    @classmethod
    def _aware(cls, v: Any) -> Any:
        if isinstance(v, datetime.datetime) and v.tzinfo is None:
            return v.replace(tzinfo=datetime.UTC)
        return v

    @field_validator("link")
    @classmethod
    def _check_link(cls, v: str | None) -> str | None:
        if v is not None and (not re.fullmatch(r"[\x21-\x7e]+", v) or ">" in v):
            raise ValueError(f"expected a URL without spaces, found {v!r}")
        return v


_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_JSON_POINTER_RE = re.compile(r"^(/([^~/]|~[01])*)+$")


def _check_token(value: str, what: str) -> str:
    if not _HEADER_NAME_RE.match(value):
        raise ValueError(f"expected a {what} (letters, digits and -), found {value!r}")
    return value


def check_pointer(value: str) -> str:
    """A JSON pointer (RFC 6901) naming a member: `/customer/id`; a segment
    `*` means every element of an array."""
    if not _JSON_POINTER_RE.match(value):
        raise ValueError(f"expected a JSON pointer such as /customer/id, found {value!r}")
    return value


Pointer = Annotated[str, AfterValidator(check_pointer)]


class HeaderOps(_Model):
    """Header edits, applied in this order: remove, rename, set, add.
    Values are templates: `{path.<param>}`, `{query.<name>}`,
    `{header.<name>}`, `{claims.<name>}` (dots reach into objects),
    `{consumer}`, `{request_id}` and `{client_ip}`; `{{` and `}}` are
    literal braces. A header whose template names a missing value is not
    sent."""

    remove: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict)
    """Old name -> new name (all of its values move)."""
    set: dict[str, str] = Field(default_factory=dict)
    """Name -> value, replacing every value the header had."""
    add: dict[str, str] = Field(default_factory=dict)
    """Name -> value, as one more line (existing values are kept)."""

    @model_validator(mode="after")
    def _check_names(self) -> HeaderOps:
        names = [*self.remove, *self.rename, *self.rename.values(), *self.set, *self.add]
        for name in names:
            _check_token(name, "header name")
            if name.lower() in _FRAMING_HEADERS:
                raise ValueError(
                    f"{name!r} is set by the gateway from the message itself and cannot be edited"
                )
        return self


_FRAMING_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "host",
        "proxy-connection",
    }
)


class QueryOps(_Model):
    """Query parameter edits, in this order: remove, rename, set, add
    (values are templates, as for headers)."""

    remove: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict)
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)


class PathRewrite(_Model):
    """Envoy's `regex_rewrite`: every match of `pattern` in the upstream
    path is replaced by `substitution` (`\\1` or `\\g<name>` insert captures)."""

    pattern: str
    substitution: str

    @model_validator(mode="after")
    def _compiles(self) -> PathRewrite:
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {exc}") from None
        for m in _GROUP_REF_RE.finditer(self.substitution):
            ref = m.group(1) or m.group(2)
            if ref.isdigit():
                if int(ref) > compiled.groups:
                    raise ValueError(
                        f"substitution uses group {ref}; the pattern has {compiled.groups}"
                    )
            elif ref not in compiled.groupindex:
                raise ValueError(f"substitution uses group {ref!r}, which the pattern lacks")
        return self


_GROUP_REF_RE = re.compile(r"\\g<(\w+)>|\\(\d+)")


class BodyMap(_Model):
    """A JSON body mapping, applied in this order: allow, deny, rename,
    move, defaults, set, drop_nulls. Pointers are RFC 6901; a `*` segment
    means every element of an array. A body that is not JSON is left alone.
    Contradictory rules (a move out of a denied member...) are refused when
    the config loads: `meshgate.engine.load` compiles each map after
    validation and points at its line."""

    allow: list[Pointer] | None = None
    """Keep only these members (and what is under them)."""
    deny: list[Pointer] = Field(default_factory=list)
    """Remove these members."""
    rename: dict[Pointer, str] = Field(default_factory=dict)
    """Pointer -> new member name in the same object: `{/customer: customer_id}`."""
    move: dict[Pointer, Pointer] = Field(default_factory=dict)
    """Pointer -> pointer; objects on the way are created (nesting)."""
    defaults: dict[Pointer, Any] = Field(default_factory=dict)
    """Pointer -> value, set only where the member is absent."""
    set: dict[Pointer, Any] = Field(default_factory=dict)
    """Pointer -> value, always set."""
    drop_nulls: bool = False
    """Remove members whose value is null, at every depth."""

    @field_validator("rename")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v.values():
            if not name or "/" in name:
                raise ValueError(
                    f"rename gives a member name (no '/'), found {name!r}; use move: to nest"
                )
        return v


def _status_map(value: Any) -> Any:
    if isinstance(value, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
    return value


StatusCode = Annotated[int, Field(ge=200, le=599)]


class RequestTransform(_Model):
    headers: HeaderOps | None = None
    path: PathRewrite | None = None
    query: QueryOps | None = None
    body: BodyMap | None = None


class ResponseTransform(_Model):
    headers: HeaderOps | None = None
    status: Annotated[dict[StatusCode, StatusCode], BeforeValidator(_status_map)] = Field(
        default_factory=dict
    )
    """Upstream status -> the status sent to the client: `{404: 410}`."""
    body: BodyMap | None = None

    @field_validator("status")
    @classmethod
    def _no_bodiless(cls, v: dict[int, int]) -> dict[int, int]:
        for src, dst in v.items():
            if (src in (204, 304)) != (dst in (204, 304)):
                raise ValueError(
                    f"{src} -> {dst}: a status with no body (204, 304) maps only to another"
                )
        return v


class TransformConfig(_Model):
    """Request and response transformation on a route (Kong's
    request-transformer and response-transformer, plus JSON body mapping)."""

    request: RequestTransform | None = None
    response: ResponseTransform | None = None
    max_body: Size = 1024 * 1024
    """Largest body buffered for a body mapping (413 for a larger request,
    502 for a larger response)."""

    def buffers(self) -> bool:
        """Whether bodies must be buffered (a body mapping is configured)."""
        return (self.request is not None and self.request.body is not None) or (
            self.response is not None and self.response.body is not None
        )


_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_RESERVED_GROUPS = frozenset({"query", "header", "path"})


class AggregateBackend(_Model):
    """One call of an aggregation."""

    upstream: str
    path: str
    """The request target, a template: `{id}` is the route's path parameter,
    `{query.<name>}` and `{header.<name>}` the client's, and
    `{<group>.<field>...}` a field of another backend's result (that
    backend is then called first)."""
    method: str = "GET"
    group: str | None = None
    """The key the result lands under; absent merges its members into the
    top level."""
    target: Pointer | None = None
    """A JSON pointer: only this part of the backend's response is used."""
    required: bool = True
    """A required backend that fails fails the whole response (502);
    an optional one is left out and reported under `errors`."""
    timeout: Duration | None = None
    """This call's own timeout (within the aggregation's)."""
    encoding: Literal["json", "string"] = "json"
    """`json`: the response must be JSON; `string`: its text is used as a
    JSON string."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"a backend path starts with '/', found {v!r}")
        return v

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z]+", v):
            raise ValueError(f"expected an HTTP method such as GET, found {v!r}")
        return v.upper()

    @field_validator("group")
    @classmethod
    def _check_group(cls, v: str | None) -> str | None:
        if v is not None:
            if not _GROUP_RE.match(v):
                raise ValueError(f"expected a group name (letters, digits, _ and -), found {v!r}")
            if v in _RESERVED_GROUPS:
                raise ValueError(f"{v!r} names a template source; choose another group name")
        return v


class AggregateConfig(_Model):
    """One client request answered from several backend calls (the seed's
    aggregation)."""

    backends: list[AggregateBackend] = Field(min_length=1)
    timeout: Duration = 3.0
    """The whole aggregation: every call ends by then."""
    errors_key: str = "errors"
    """Where optional backends' failures are listed (RFC 9457 objects)."""
    forward_headers: list[str] = Field(
        default_factory=lambda: ["accept-language", "authorization", "traceparent", "tracestate"]
    )
    """Client headers sent on to every backend (identity headers set by the
    gateway's auth, and X-Request-Id, always are)."""

    @field_validator("forward_headers")
    @classmethod
    def _check_names(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_token(name, "header name")
        return [name.lower() for name in v]

    @model_validator(mode="after")
    def _unique_groups(self) -> AggregateConfig:
        seen: set[str] = set()
        for b in self.backends:
            if b.group is not None:
                if b.group in seen:
                    raise ValueError(f"two backends use the group {b.group!r}")
                seen.add(b.group)
            if b.group == self.errors_key:
                raise ValueError(f"group {b.group!r} is also the errors_key")
        return self


class RouteConfig(_Model):
    """One route: what it matches, and where it sends the request."""

    path: str
    """`/exact`, `/prefix/**` (any depth, also the prefix itself), `*` for one
    segment, `{name}` for one named segment."""
    name: str | None = None
    host: str | list[str] | None = None
    """Exact host (`api.example.com`) or wildcard (`*.example.com`); a list
    means any of them; absent means every host."""
    methods: list[str] | None = None
    headers: dict[str, HeaderMatchValue] | None = None
    """Header name -> exact value, or `true` (present) / `false` (absent)."""
    upstream: str | None = None
    """The upstream that serves the route; or use `split:`."""
    split: list[SplitBackend] | None = Field(default=None, min_length=1)
    """Weighted backends instead of one upstream (canary releases):
    `[{upstream: orders, weight: 90}, {upstream: orders-v2, weight: 10}]`."""
    sticky: str | None = None
    """With `split:`, keep a client on one backend: `consumer`, `ip`,
    `header:<name>` or `cookie:<name>` is hashed onto the weights, so a
    client moves only when the weights move past it."""
    canary: list[CanaryMatch] | None = None
    """With `split:`, requests matching one of these go to its upstream."""
    fault: FaultConfig | None = None
    retry: RetryConfig | None = None
    """Retries for this route (else the upstream's `retry:`; else none)."""
    timeouts: RouteTimeouts | None = None
    """Read-idle and total timeouts for this route (connect timeouts belong to
    the upstream's pools; per-try timeouts to `retry:`)."""
    strip_prefix: bool | str = False
    """`true` strips the literal part of `path` before the first wildcard;
    a string strips that exact prefix."""
    rewrite: str | None = None
    """Replacement path; `{name}` inserts a captured segment and `{**}` what
    the trailing `**` matched."""
    auth: Annotated[RouteAuth | None, BeforeValidator(RouteAuth.parse)] = None
    """Name of an `auth:` entry, a list of names (any one of them admits the
    request), or `{use: [...], scopes: [...], required_claims: [...]}`."""
    rate_limit: RateLimitSpec | list[RateLimitSpec] | None = None
    """`100/min`, the long form, or a list of limits that all apply (each
    counts the request; the first to refuse answers 429): say, one per
    caller and one for the route as a whole. Read it with `rate_limits()`."""
    authz: AuthzConfig | None = None
    """Who may call this route, by the SPIFFE ID of the caller's client
    certificate, method, path and headers (`config.authz`): the mesh's
    inbound policy, which a sidecar's inbound route carries, compiled as
    `auth:` is. It runs after `auth:` and before faults and limits, so a
    denied caller spends no one's quota."""
    forward_client_cert: str | None = None
    """This proxy's SPIFFE ID: requests whose TLS handshake verified a client
    certificate go upstream with `X-Forwarded-Client-Cert: By=<this>;URI=<the
    caller's SPIFFE ID>` (Envoy's format). A sidecar's inbound route sets
    it, so the app learns who called; a client's own header is never
    forwarded."""
    cors: Annotated[CorsConfig | Literal[False] | None, BeforeValidator(_route_cors)] = None
    """CORS for this route (else the top-level `cors:`); `false` turns the
    top-level one off here."""
    deprecation: DeprecationConfig | None = None
    """`Deprecation`, `Sunset` and `Link` response fields for a route going away."""
    aggregate: AggregateConfig | None = None
    """Answer from several backend calls instead of one `upstream:`."""
    transform: TransformConfig | None = None
    """Request and response transformation (headers, path, query, JSON
    bodies, status)."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"a route path starts with '/', found {v!r}")
        return v

    @field_validator("sticky")
    @classmethod
    def _check_sticky(cls, v: str | None) -> str | None:
        if v is not None and not _STICKY_RE.match(v):
            raise ValueError(f"expected consumer, ip, header:<name> or cookie:<name>, found {v!r}")
        return v

    @model_validator(mode="after")
    def _target(self) -> RouteConfig:
        if (self.upstream is not None) + (self.split is not None) + (
            self.aggregate is not None
        ) != 1:
            raise ValueError("a route has exactly one of upstream:, split: or aggregate:")
        if self.aggregate is not None:
            # The plan itself (groups, parameters, cycles) is compiled after
            # validation, by `meshgate.engine.load`.
            t = self.transform
            if t is not None and t.request is not None and t.request.body is not None:
                raise ValueError(
                    "transform.request.body does not apply to aggregate: (its backends "
                    "are called without the client's body)"
                )
        if self.split is not None and not any(b.weight for b in self.split):
            raise ValueError("split: at least one backend needs a weight above 0")
        if self.split is None and (self.sticky is not None or self.canary):
            raise ValueError("sticky: and canary: go with split:")
        if isinstance(self.rate_limit, list):
            if not self.rate_limit:
                raise ValueError("rate_limit: is an empty list (omit it for no limit)")
            names = [rl.name for rl in self.rate_limit if rl.name is not None]
            for name in names:
                if names.count(name) > 1:
                    raise ValueError(f"rate_limit: two limits are named {name!r}")
        return self

    def rate_limits(self) -> list[RateLimitConfig]:
        """The route's limits, in order (none, one, or its list)."""
        rl = self.rate_limit
        if rl is None:
            return []
        return list(rl) if isinstance(rl, list) else [rl]

    def target_label(self) -> str:
        """`orders`, or `split(orders:90, orders-v2:10)`, for tables and logs."""
        if self.aggregate is not None:
            return "aggregate(" + ", ".join(b.upstream for b in self.aggregate.backends) + ")"
        if self.split is None:
            return self.upstream or "?"
        return "split(" + ", ".join(f"{b.upstream}:{b.weight}" for b in self.split) + ")"

    def upstream_names(self) -> list[str]:
        """Every upstream this route may send to, in config order."""
        names = [self.upstream] if self.upstream is not None else []
        names += [b.upstream for b in self.split or ()]
        names += [c.upstream for c in self.canary or ()]
        if self.aggregate is not None:
            names += [b.upstream for b in self.aggregate.backends]
        return list(dict.fromkeys(names))

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = []
        for m in v:
            if not re.fullmatch(r"[A-Za-z]+", m):
                raise ValueError(f"expected an HTTP method such as GET, found {m!r}")
            out.append(m.upper())
        return out


class ServerLimits(_Model):
    """Limits applied to every client connection."""

    max_request_line: Size = 8192
    """Longest request target; past it the answer is 414."""
    max_header_bytes: Size = 32768
    """All request header lines together; past it the answer is 431."""
    header_timeout: Duration = 10.0
    """A client must send its whole request head within this time (408)."""
    keepalive_timeout: Duration = 75.0
    """An idle client connection is closed after this."""
    drain_timeout: Duration = 30.0
    """On SIGTERM, how long requests in flight may take to finish."""
    rate_limit_slots: int = Field(default=65536, ge=64, le=1 << 24)
    """Keys the shared table of `policy: local` limits holds (32 bytes each);
    a full table forgets the key closest to being refilled."""


class GatewayMeshConfig(_Model):
    """`mesh:`: this gateway joins the mesh with an identity of its own
    (`spiffe://<trust_domain>/ns/<namespace>/sa/<service>`), and reaches
    the upstreams that name a `service:` through their sidecars, over
    mutual TLS. Each worker makes its own key, in `state_dir/worker-N`."""

    control: str
    """The control plane's proxy API: `host:port`, or several, comma-separated."""
    service: str = "gateway"
    namespace: str = "edge"
    trust_domain: str = "mesh.local"
    state_dir: str = ".meshgate/gateway"
    """Relative to this file: the key (0600), certificate, bundle and last snapshot."""
    token_file: str | None = None
    """A reusable join token (`meshgate token create --service gateway`),
    read at start; or `attest_socket`."""
    attest_socket: str | None = None
    trust_bundle: str | None = None
    """The mesh's root(s), to trust the control plane the first time."""

    @model_validator(mode="after")
    def _credential(self) -> GatewayMeshConfig:
        if self.token_file is None and self.attest_socket is None:
            raise ValueError("mesh: needs token_file: or attest_socket: to join the mesh")
        return self


class Config(_Model):
    """The whole file."""

    listen: ListenAddress = Address(host="0.0.0.0", port=8080)
    admin: ListenAddress | None = None
    workers: int = Field(default=1, ge=1, le=256)
    limits: ServerLimits = ServerLimits()
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    access_log: bool = False
    """One line per request on stderr."""
    redis: Annotated[RedisConfig | None, BeforeValidator(RedisConfig.parse)] = None
    auth: dict[str, AuthEntry] = Field(default_factory=dict)
    """Named authentication entries that routes refer to."""
    consumers: dict[str, ConsumerConfig] = Field(default_factory=dict)
    cors: CorsConfig | None = None
    """CORS for every route without a `cors:` of its own."""
    mesh: GatewayMeshConfig | None = None

    def route_cors(self, route: RouteConfig) -> CorsConfig | None:
        """The CORS a route applies: its own, else the top-level one; None if off."""
        if route.cors is False:
            return None
        return route.cors if route.cors is not None else self.cors

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        known = ", ".join(sorted(self.upstreams)) or "none defined"
        for i, route in enumerate(self.routes):
            targets: list[tuple[tuple[str | int, ...], str]] = []
            if route.upstream is not None:
                targets.append((("routes", i, "upstream"), route.upstream))
            for j, b in enumerate(route.split or ()):
                targets.append((("routes", i, "split", j, "upstream"), b.upstream))
            for j, c in enumerate(route.canary or ()):
                targets.append((("routes", i, "canary", j, "upstream"), c.upstream))
            if route.aggregate is not None:
                for j, ab in enumerate(route.aggregate.backends):
                    targets.append(
                        (("routes", i, "aggregate", "backends", j, "upstream"), ab.upstream)
                    )
            for loc, name in targets:
                if name not in self.upstreams:
                    errors.append(
                        (
                            loc,
                            f"upstream {name!r} is not defined under upstreams: (known: {known})",
                        )
                    )
            errors += self._route_refs(i, route)
        seen: dict[str, str] = {}
        for name, consumer in self.consumers.items():
            for j, digest in enumerate(consumer.api_keys):
                other = seen.setdefault(digest, name)
                if other != name or consumer.api_keys.index(digest) != j:
                    errors.append(
                        (
                            ("consumers", name, "api_keys", j),
                            f"this key is already listed for consumer {other!r}",
                        )
                    )
        if errors:
            raise CrossReferenceError(errors)
        return self

    def _route_refs(self, i: int, route: RouteConfig) -> list[tuple[tuple[str | int, ...], str]]:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if route.auth is not None:
            for j, name in enumerate(route.auth.use):
                if name not in self.auth:
                    known = ", ".join(sorted(self.auth)) or "none defined"
                    errors.append(
                        (
                            ("routes", i, "auth", "use", j),
                            f"auth {name!r} is not defined under the top-level auth: "
                            f"(known: {known}); a route is never served without the "
                            "authentication it names",
                        )
                    )
        many = isinstance(route.rate_limit, list)
        for j, rl in enumerate(route.rate_limits()):
            if rl.policy == "redis" and self.redis is None:
                loc: tuple[str | int, ...] = ("routes", i, "rate_limit")
                errors.append(
                    (
                        (*loc, j, "policy") if many else (*loc, "policy"),
                        "policy: redis needs a top-level `redis:` (for example "
                        "redis: redis://127.0.0.1:6379/0)",
                    )
                )
        return errors


class CrossReferenceError(ValueError):
    """Raised by `Config` when a field names something that does not exist.

    It carries each error's location so the loader can point at the line.
    """

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(msg for _, msg in errors))
        self.errors = errors
