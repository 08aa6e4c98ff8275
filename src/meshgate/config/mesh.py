"""`mesh.yaml`: the control plane's file, as pure data.

One schema with the gateway's: a service's traffic policy is an upstream's
(balancer, timeouts, retries, budget, breaker, outlier detection), and its
routes are gateway routes whose upstreams are mesh services. Endpoints are
not written here: they come from the registry (sidecars register their
instance) or from `instances:` for services that have no sidecar.

```yaml
trust_domain: mesh.local
mtls: strict                     # or permissive (plain traffic accepted, labelled)
control:
  listen: 127.0.0.1:15012        # the proxies' API (TLS; mTLS for everything but join)
  state_dir: .meshgate/control   # CA files and the store (relative to this file)
  store: sqlite                  # or redis://127.0.0.1:6379/0 (two or more instances)
  certificate_lifetime: 24h
  lease: 15s                     # an instance missing this long is unhealthy; 3x: removed
  debounce: 20ms                 # changes within this window go out as one version
  csr_rate: {limit: 30, period: 1m}   # certificate requests per caller
  metrics_source: reports        # or {prometheus: http://127.0.0.1:9090, interval: 5s}
attestation:                     # node-local identity, as SPIRE's unix attestor
  socket: /run/meshgate/attest.sock
  rules:
  - {uid: 1001, service: orders}
  - {exe: /usr/local/bin/payments, service: payments}
services:
  orders:
    namespace: default
    calls: [customers]           # the services it calls (absent: every service)
    traffic: {balancer: ewma, retry: {attempts: 2, on: [connect-failure]}}
    routes:                      # optional: how callers reach it (splits, canaries)
    - path: /**
      split: [{upstream: orders, weight: 90}, {upstream: orders-v2, weight: 10}]
    authz:                       # who may call it (config/authz.py)
      default: allow             # or deny
      mode: enforce              # or audit: log what would be denied
      rules:
      - {name: no-legacy, action: deny, from: ["spiffe://mesh.local/ns/legacy/*"]}
    rate_limit:                  # inbound, on the gateway's limiters
      per_source: 100/s          # each calling identity (key peer)
      service: {limit: 1000, period: 1s, policy: local}   # every caller together
  customers:
    instances: [127.0.0.1:9002]  # a service without a sidecar
```
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from meshgate.config.authz import AuthzConfig, AuthzRule
from meshgate.config.base import _Model, redact_url
from meshgate.config.schema import (
    Address,
    CircuitBreakerConfig,
    CrossReferenceError,
    Duration,
    EndpointSpec,
    ListenAddress,
    OutlierDetectionConfig,
    PoolConfig,
    RateLimitConfig,
    RateLimitSpec,
    RedisConfig,
    RetryBudgetConfig,
    RetryConfig,
    RouteConfig,
    UpstreamTimeouts,
)

__all__ = [
    "AttestationConfig",
    "AttestationRule",
    "AuthzConfig",
    "AuthzRule",
    "ControlConfig",
    "MeshConfig",
    "PrometheusSourceConfig",
    "ServiceConfig",
    "ServiceRateLimit",
    "TrafficPolicy",
]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")


def _name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be lowercase letters, digits and '-' (at most 63), "
            "as a DNS label"
        )
    return value


class TrafficPolicy(_Model):
    """How callers reach a service: an upstream's settings, without endpoints."""

    balancer: Literal["round_robin", "least_request", "ewma"] = "ewma"
    """Peak EWMA by default, as Linkerd balances."""
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    pool: PoolConfig = PoolConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    retry: RetryConfig | None = None
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    outlier_detection: OutlierDetectionConfig | None = Field(default_factory=OutlierDetectionConfig)

    @field_validator("outlier_detection", mode="before")
    @classmethod
    def _outlier_off(cls, v: Any) -> Any:
        return None if v is False else v


class ServiceRateLimit(_Model):
    """A service's inbound limits, which its sidecar's inbound route applies
    with the gateway's limiters (`policy: local`: per instance; `policy:
    redis`: across the service's instances, on `redis:`)."""

    per_source: RateLimitSpec | None = None
    """Each calling identity on its own (key `peer`; callers without a
    client certificate share one bucket, `plaintext`)."""
    service: RateLimitSpec | None = None
    """Every caller together (key `route`)."""
    redis: Annotated[RedisConfig | None, BeforeValidator(RedisConfig.parse)] = None
    """The Redis server that `policy: redis` limits count on."""

    @field_validator("per_source", "service")
    @classmethod
    def _check_key(cls, rl: RateLimitConfig | None, info: ValidationInfo) -> RateLimitConfig | None:
        key = "peer" if info.field_name == "per_source" else "route"
        if rl is not None and "key" in rl.model_fields_set and rl.key != key:
            raise ValueError(f"this limit counts by {key} (leave its key: out), found {rl.key!r}")
        return rl

    @model_validator(mode="after")
    def _check(self) -> ServiceRateLimit:
        if self.per_source is None and self.service is None:
            raise ValueError("rate_limit: needs per_source:, service: or both")
        for field, rl in (("per_source", self.per_source), ("service", self.service)):
            if rl is not None and rl.policy == "redis" and self.redis is None:
                raise ValueError(
                    f"{field}: policy: redis needs rate_limit.redis (for example "
                    "redis: redis://127.0.0.1:6379/0)"
                )
        return self

    def route_limits(self) -> list[RateLimitConfig]:
        """The limits for the inbound route's `rate_limit:` list: per source
        first (its X-RateLimit-* fields are the ones a caller reads), each
        with its key and a name for the RateLimit fields and metrics."""
        out: list[RateLimitConfig] = []
        for rl, key, name in (
            (self.per_source, "peer", "per-source"),
            (self.service, "route", "service"),
        ):
            if rl is not None:
                out.append(rl.model_copy(update={"key": key, "name": rl.name or name}))
        return out


class ServiceConfig(_Model):
    """One service of the mesh."""

    namespace: str = "default"
    calls: list[str] | None = None
    """The services it calls, so its proxy gets only those (absent: every service)."""
    traffic: TrafficPolicy = TrafficPolicy()
    routes: list[RouteConfig] = Field(default_factory=list)
    authz: AuthzConfig = AuthzConfig()
    """Who may call it (its sidecar's inbound enforces it; `config.authz`)."""
    rate_limit: ServiceRateLimit | None = None
    """Its inbound limits: `{per_source: 100/s, service: 1000/s}`."""
    instances: list[EndpointSpec] = Field(default_factory=list)
    """Static instances, for a service that has no sidecar (plain HTTP)."""

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, v: str) -> str:
        return _name(v, "namespace")


class CsrRate(_Model):
    limit: int = Field(default=30, ge=1)
    period: Duration = 60.0


class PrometheusSourceConfig(_Model):
    """`metrics_source: {prometheus: URL}`: the dashboard's numbers from a
    Prometheus that scrapes the proxies' admin listeners, as Kiali reads
    them (`mesh/control/promsource.py`)."""

    prometheus: str
    """The Prometheus server's base URL (its HTTP API is `<URL>/api/v1/`)."""
    interval: Duration = 5.0
    """How often it is asked (each answer is kept once per scrape it holds)."""
    timeout: Duration | None = None
    """How long one query may take (default: the interval, at most 3 s); a
    slower one counts as an error."""

    @field_validator("prometheus")
    @classmethod
    def _check_url(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in ("http", "https") or not rest.split("/", 1)[0]:
            raise ValueError(f"expected an http:// or https:// URL, found {redact_url(v)!r}")
        if "?" in rest or "#" in rest:
            raise ValueError("the URL is Prometheus's base, without a query or fragment")
        return v.rstrip("/")

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, v: float) -> float:
        if not 0.2 <= v <= 300:
            raise ValueError("an interval is between 200ms and 5m")
        return v

    @model_validator(mode="after")
    def _check_timeout(self) -> PrometheusSourceConfig:
        if self.timeout is not None and self.timeout > self.interval:
            raise ValueError(
                f"timeout ({self.timeout:g}s) is longer than interval ({self.interval:g}s)"
            )
        return self

    @property
    def query_timeout(self) -> float:
        return self.timeout if self.timeout is not None else min(self.interval, 3.0)


def _metrics_source(v: Any) -> Any:
    """`reports` (None) or `{prometheus: URL, ...}`."""
    if v is None or v == "reports":
        return None
    if v == "prometheus":
        raise ValueError(
            "prometheus needs its URL: metrics_source: {prometheus: http://127.0.0.1:9090}"
        )
    if not isinstance(v, dict):
        raise ValueError(f"expected reports or {{prometheus: URL, interval: 5s}}, found {v!r}")
    return v


class ControlConfig(_Model):
    """The control plane process."""

    listen: ListenAddress = Address(host="127.0.0.1", port=15012)
    admin: ListenAddress | None = None
    """Plain HTTP, keep it on loopback: `/metrics`, `/status`, and `PUT
    /config` (a new generation) with `admin_token_file`'s bearer token."""
    admin_token_file: str | None = None
    state_dir: str = ".meshgate/control"
    store: str = "sqlite"
    """`sqlite` (one file in state_dir) or a `redis://` URL."""
    certificate_lifetime: Duration = 86400.0
    lease: Duration = 15.0
    debounce: Duration = 0.02
    csr_rate: CsrRate = CsrRate()
    metrics_source: Annotated[PrometheusSourceConfig | None, BeforeValidator(_metrics_source)] = (
        None
    )
    """Where the dashboard's numbers come from: `reports` (None, the
    default: the proxies' reports on their push streams) or `{prometheus:
    URL, interval: 5s, timeout: 3s}`. Denials always come from the reports."""

    @field_validator("store")
    @classmethod
    def _check_store(cls, v: str) -> str:
        if v != "sqlite" and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected sqlite or a redis:// URL, found {v!r}")
        return v

    @field_validator("certificate_lifetime")
    @classmethod
    def _check_lifetime(cls, v: float) -> float:
        if not 60 <= v <= 30 * 86400:
            raise ValueError("a certificate lifetime is between 1m and 30d")
        return v


class AttestationRule(_Model):
    """A caller on this node, by uid or executable, is this service."""

    service: str
    uid: int | None = Field(default=None, ge=0)
    exe: str | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> AttestationRule:
        if (self.uid is None) == (self.exe is None):
            raise ValueError("a rule names exactly one of uid: or exe:")
        if self.exe is not None and not self.exe.startswith("/"):
            raise ValueError(f"exe: {self.exe!r} must be an absolute path")
        return self


class AttestationConfig(_Model):
    socket: str
    rules: list[AttestationRule] = Field(default_factory=list)


def _trust_domain(v: Any) -> Any:
    if isinstance(v, str) and not _TRUST_DOMAIN.fullmatch(v):
        raise ValueError(f"{v!r} is not a trust domain (lowercase letters, digits, '.', '-', '_')")
    return v


class MeshConfig(_Model):
    """The whole mesh.yaml."""

    trust_domain: Annotated[str, BeforeValidator(_trust_domain)] = "mesh.local"
    mtls: Literal["strict", "permissive"] = "strict"
    control: ControlConfig = ControlConfig()
    attestation: AttestationConfig | None = None
    services: dict[str, ServiceConfig] = Field(default_factory=dict)

    @field_validator("services")
    @classmethod
    def _check_names(cls, v: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        for name in v:
            _name(name, "service name")
        return v

    @model_validator(mode="after")
    def _check_references(self) -> MeshConfig:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        known = ", ".join(sorted(self.services)) or "none defined"

        def ref(loc: tuple[str | int, ...], name: str) -> None:
            if name not in self.services:
                errors.append((loc, f"service {name!r} is not defined under services: ({known})"))

        for name, svc in self.services.items():
            for j, callee in enumerate(svc.calls or ()):
                ref(("services", name, "calls", j), callee)
            for i, route in enumerate(svc.routes):
                base: tuple[str | int, ...] = ("services", name, "routes", i)
                if route.upstream is not None:
                    ref((*base, "upstream"), route.upstream)
                for j, b in enumerate(route.split or ()):
                    ref((*base, "split", j, "upstream"), b.upstream)
                for j, c in enumerate(route.canary or ()):
                    ref((*base, "canary", j, "upstream"), c.upstream)
                if route.auth is not None or route.aggregate is not None:
                    errors.append(
                        (base, "mesh routes carry no edge auth or aggregation: use authz:")
                    )
                if route.authz is not None:
                    errors.append(
                        (
                            (*base, "authz"),
                            f"a service's routes are how callers reach it: its policy is "
                            f"services.{name}.authz, which its own sidecar enforces",
                        )
                    )
        if self.attestation is not None:
            for j, rule in enumerate(self.attestation.rules):
                ref(("attestation", "rules", j, "service"), rule.service)
        if errors:
            raise CrossReferenceError(errors)
        return self

    def identity(self, service: str) -> str:
        """The SPIFFE ID of a service of this mesh."""
        ns = self.services[service].namespace if service in self.services else "default"
        return f"spiffe://{self.trust_domain}/ns/{ns}/sa/{service}"

    def callees(self, service: str) -> list[str]:
        """The services whose endpoints and policies `service`'s proxy gets,
        the ones its routes split to included."""
        svc = self.services.get(service)
        names = list(self.services) if svc is None or svc.calls is None else list(svc.calls)
        out: list[str] = []
        for name in names:
            if name in out:
                continue
            out.append(name)
            for route in self.services[name].routes:
                for target in route.upstream_names():
                    if target not in out and target in self.services:
                        out.append(target)
        return out
