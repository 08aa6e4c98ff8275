"""Upstreams: endpoints, timeouts, pools, retries, budgets, breakers, outlier
detection and health checks."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from meshgate.config.base import Duration, _Model, _parse_address


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
