"""The config file's shape, as pydantic v2 models: the whole file (`Config`),
and every model of it, re-exported from where they live (`base`: durations,
sizes, addresses; `upstream`; `edge`: auth, consumers, limits, Redis;
`route`: matching, splits, faults, CORS, transforms, aggregation;
`tracing`).

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

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from meshgate.config.base import (
    Address,
    Duration,
    DurationOrZero,
    ListenAddress,
    Size,
    _Model,
    parse_duration,
    parse_size,
    redact_url,
)
from meshgate.config.edge import (
    ApiKeyAuthConfig,
    AuthEntry,
    ConsumerConfig,
    ConsumerRate,
    HeaderMatchValue,
    JwtAlgorithm,
    JwtAuthConfig,
    RateLimitConfig,
    RateLimitKey,
    RateLimitSpec,
    RedisConfig,
    RouteAuth,
)
from meshgate.config.route import (
    AggregateBackend,
    AggregateConfig,
    BodyMap,
    CanaryMatch,
    CorsConfig,
    DeprecationConfig,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    HeaderOps,
    PathRewrite,
    Pointer,
    QueryOps,
    RequestTransform,
    ResponseTransform,
    RouteConfig,
    RouteTimeouts,
    SplitBackend,
    StatusCode,
    TransformConfig,
    check_pointer,
)
from meshgate.config.tracing import TracingBatch, TracingConfig
from meshgate.config.upstream import (
    CircuitBreakerConfig,
    Endpoint,
    EndpointSpec,
    HealthCheckConfig,
    HostPolicy,
    OutlierDetectionConfig,
    PoolConfig,
    RetryBackoff,
    RetryBudgetConfig,
    RetryConfig,
    RetryOn,
    UpstreamConfig,
    UpstreamTimeouts,
)

# The config's models live in base, upstream, edge and route; this module is
# the whole file's model, and the one place the rest of meshgate imports them from.
__all__ = [
    "AccessLogConfig",
    "Address",
    "AggregateBackend",
    "AggregateConfig",
    "ApiKeyAuthConfig",
    "AuthEntry",
    "BodyMap",
    "CanaryMatch",
    "CircuitBreakerConfig",
    "Config",
    "ConsumerConfig",
    "ConsumerRate",
    "CorsConfig",
    "CrossReferenceError",
    "DeprecationConfig",
    "Duration",
    "DurationOrZero",
    "Endpoint",
    "EndpointSpec",
    "FaultAbort",
    "FaultConfig",
    "FaultDelay",
    "GatewayMeshConfig",
    "HeaderMatchValue",
    "HeaderOps",
    "HealthCheckConfig",
    "HostPolicy",
    "JwtAlgorithm",
    "JwtAuthConfig",
    "ListenAddress",
    "MetricsConfig",
    "OutlierDetectionConfig",
    "PathRewrite",
    "Pointer",
    "PoolConfig",
    "QueryOps",
    "RateLimitConfig",
    "RateLimitKey",
    "RateLimitSpec",
    "RedisConfig",
    "RequestTransform",
    "ResponseTransform",
    "RetryBackoff",
    "RetryBudgetConfig",
    "RetryConfig",
    "RetryOn",
    "RouteAuth",
    "RouteConfig",
    "RouteTimeouts",
    "ServerLimits",
    "Size",
    "SplitBackend",
    "StatusCode",
    "TracingBatch",
    "TracingConfig",
    "TransformConfig",
    "UpstreamConfig",
    "UpstreamTimeouts",
    "admin_left_open",
    "check_pointer",
    "is_loopback",
    "parse_duration",
    "parse_size",
    "redact_url",
]


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
    body_timeout: Duration = 60.0
    """Longest silence between two reads of a request body (slow POST): past
    it the answer is 408 and the connection closes. Time during which the
    gateway itself stopped reading (the upstream is slower) does not count."""
    write_timeout: Duration = 60.0
    """Longest time a client may leave its response unread (the gateway's
    write buffer full, no byte taken): past it the connection is reset and
    the upstream connection closed."""
    max_connections: int = Field(default=0, ge=0)
    """Open client connections per listener and worker; one more is closed
    as soon as it is accepted (0: no limit)."""
    max_connections_per_ip: int = Field(default=0, ge=0)
    """Open client connections from one client address, per listener and
    worker; one more is closed as soon as it is accepted (0: no limit)."""
    max_requests_per_connection: int = Field(default=0, ge=0)
    """Requests one client connection may carry; the last one's response says
    `Connection: close` (0: no limit)."""
    max_body: Size | None = None
    """The largest request body a route takes, unless it sets its own
    `max_body:` (413); absent: no limit."""
    max_response_header_bytes: Size = 61440
    """All the header lines of an upstream's response head together (60 KiB,
    Envoy's default); past it the client gets 502 and that upstream
    connection is closed."""
    rate_limit_slots: int = Field(default=65536, ge=64, le=1 << 24)
    """Keys the shared table of `policy: local` limits holds (32 bytes each);
    a full table forgets the key closest to being refilled."""


class AccessLogConfig(_Model):
    """`access_log:` as a mapping: one JSON line per request, written by a
    thread of its own (`observability.accesslog`)."""

    path: str = "-"
    """`-` (stdout), `stderr`, or a file (relative to this file), opened
    for appending and reopened on reload (SIGHUP), for log rotation."""
    sample_2xx: float = Field(default=1.0, ge=0.0, le=1.0)
    """The share of 2xx answers logged (0 logs none); every other status is
    always logged."""
    buffer_lines: int = Field(default=65536, ge=16, le=1 << 24)
    """Lines waiting for the writer; past it new lines are dropped (and
    counted), so that a stalled stdout never holds up a response."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected '-' (stdout), 'stderr' or a file path")
        return v


def _access_log(value: Any) -> Any:
    if isinstance(value, bool | dict):
        return value
    raise ValueError(
        "expected true (JSON lines on stdout), false, or a mapping such as "
        "{path: /var/log/meshgate/access.log, sample_2xx: 0.1}"
    )


class MetricsConfig(_Model):
    """`metrics:`: how long request series live, and how many peer
    identities they may name (labels never come from paths or Hosts)."""

    idle_expiry: Duration = 600.0
    """A request series untouched this long (in every worker) is dropped
    from /metrics, so routes, peers and statuses that went away do not
    stay forever."""
    max_identities: int = Field(default=1000, ge=1, le=1_000_000)
    """Peer SPIFFE IDs a listener's series name at most; later ones are
    counted as "other"."""
    enabled: bool = True
    """False: requests are not counted (`meshgate_requests_total` and the
    other request series stay empty; the access log and traces still
    see every request). For measuring what counting costs."""


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


_TOKEN_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_left_open(bound: Address | None, config: Config) -> str | None:
    """Why a process whose admin listener is at `bound` (its address changes
    only on restart) must refuse `config`: it would drop the token a
    non-loopback listener needs."""
    if bound is None or config.admin_token is not None or is_loopback(bound.host):
        return None
    return (
        f"the admin API listens on {bound} until a restart, and this config has no "
        "admin_token: that would open it to other hosts"
    )


class Config(_Model):
    """The whole file."""

    listen: ListenAddress = Address(host="0.0.0.0", port=8080)
    admin: ListenAddress | None = None
    admin_token: str | None = None
    """The bearer token the admin API asks for, stored as its digest
    (`sha256:<64 hex>`, made by `meshgate hash-key`); required when `admin`
    is not a loopback address."""
    workers: int = Field(default=1, ge=1, le=256)
    limits: ServerLimits = ServerLimits()
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    access_log: Annotated[bool | AccessLogConfig, BeforeValidator(_access_log)] = False
    """One JSON line per request: true (on stdout), or an `AccessLogConfig`."""
    redis: Annotated[RedisConfig | None, BeforeValidator(RedisConfig.parse)] = None
    auth: dict[str, AuthEntry] = Field(default_factory=dict)
    """Named authentication entries that routes refer to."""
    consumers: dict[str, ConsumerConfig] = Field(default_factory=dict)
    cors: CorsConfig | None = None
    """CORS for every route without a `cors:` of its own."""
    mesh: GatewayMeshConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig | None = None
    """Spans over OTLP/HTTP; absent: no tracing, at no cost."""

    @property
    def access_log_config(self) -> AccessLogConfig | None:
        """The access log's settings, or None when it is off."""
        got = self.access_log
        if got is True:
            return AccessLogConfig()
        return got or None

    def route_cors(self, route: RouteConfig) -> CorsConfig | None:
        """The CORS a route applies: its own, else the top-level one; None if off."""
        if route.cors is False:
            return None
        return route.cors if route.cors is not None else self.cors

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, v: str | None) -> str | None:
        if v is not None and not _TOKEN_DIGEST_RE.match(v.lower()):
            raise ValueError(
                "the admin token is stored as its digest, sha256:<64 hex digits> "
                "(make one with `meshgate hash-key --generate`), never the token itself "
                "(found something else, not shown here)"
            )
        return v.lower() if v is not None else None

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if self.admin is not None and self.admin_token is None and not is_loopback(self.admin.host):
            errors.append(
                (
                    ("admin",),
                    f"the admin API on {self.admin} is reachable from other hosts: "
                    "set admin_token: (sha256:..., from `meshgate hash-key --generate`) "
                    "or listen on loopback (127.0.0.1, ::1, localhost)",
                )
            )
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
