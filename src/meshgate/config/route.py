"""Routes: matching, splits and canaries, faults, CORS, timeouts, deprecation,
transformation and aggregation."""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from meshgate.config.authz import AuthzConfig
from meshgate.config.base import Duration, Size, _Model
from meshgate.config.edge import (
    _TOKEN_RE,
    HeaderMatchValue,
    RateLimitConfig,
    RateLimitSpec,
    RouteAuth,
    _header_value,
)
from meshgate.config.upstream import RetryConfig


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
    max_body: Size | None = None
    """The largest request body this route takes (else `limits.max_body`):
    a larger `Content-Length` is answered 413 before a byte of the body is
    read; a chunked body that grows past it is cut off (the upstream request
    is reset) with 413, or the connection closed if the answer had begun.
    A route that buffers bodies (`aggregate:`, a body `transform:`) keeps
    its own buffering limit too."""

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
