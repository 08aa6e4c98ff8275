"""The config file's shape, as pydantic v2 models.

Every model is frozen and refuses unknown fields, so a typo is an error with
its line number rather than a silently ignored key. Durations accept `250ms`,
`2s`, `1m`, `1h` or a bare number of seconds; sizes accept `16KiB`, `1MiB` or
a bare number of bytes. Validation here is about shape; cross references
(a route naming an upstream that does not exist) are checked by
`Config` itself so that the error points at the route's field.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

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


def parse_duration(value: Any) -> float:
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
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


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


HostPolicy = Literal["preserve", "rewrite"]


class UpstreamConfig(_Model):
    """A named group of endpoints that routes send traffic to."""

    endpoints: list[EndpointSpec] = Field(min_length=1)
    balancer: Literal["round_robin", "least_request", "ewma"] = "round_robin"
    """`round_robin`; `least_request` (power of two choices on in-flight
    requests); `ewma` (power of two choices on peak-EWMA latency x load)."""
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    pool: PoolConfig = PoolConfig()
    host: str = "preserve"
    """`preserve` sends the client's Host; `rewrite` sends the endpoint's
    host:port; any other value is sent as the Host verbatim."""


class RateLimitShort(_Model):
    """`rate_limit: 100/min`, parsed; enforced by the edge-security filters."""

    limit: int = Field(ge=1)
    period: float = Field(gt=0, allow_inf_nan=False)


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


def _header_value(value: Any) -> Any:
    # YAML reads `x-canary: 1` as the number 1; a header matcher means the
    # text "1" there, never `true` (present).
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


HeaderMatchValue = Annotated[StrictBool | str, BeforeValidator(_header_value)]


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
    upstream: str
    strip_prefix: bool | str = False
    """`true` strips the literal part of `path` before the first wildcard;
    a string strips that exact prefix."""
    rewrite: str | None = None
    """Replacement path; `{name}` inserts a captured segment and `{**}` what
    the trailing `**` matched."""
    auth: str | list[str] | None = None
    """Names of `auth:` entries; enforced by the edge-security filters."""
    rate_limit: Annotated[RateLimitShort | None, BeforeValidator(_parse_rate_limit)] = None

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"a route path starts with '/', found {v!r}")
        return v

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

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for i, route in enumerate(self.routes):
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams)) or "none defined"
                errors.append(
                    (
                        ("routes", i, "upstream"),
                        f"upstream {route.upstream!r} is not defined under upstreams: "
                        f"(known: {known})",
                    )
                )
        if errors:
            raise CrossReferenceError(errors)
        return self


class CrossReferenceError(ValueError):
    """Raised by `Config` when a field names something that does not exist.

    It carries each error's location so the loader can point at the line.
    """

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(msg for _, msg in errors))
        self.errors = errors
