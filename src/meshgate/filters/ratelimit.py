"""A route's `rate_limit:` as a filter.

The key is chosen at config load (`consumer`, `api_key`, `ip`, `route`,
`peer`, `header:<name>`, or the default ladder consumer -> API key -> token
subject -> client IP), and so is everything in the response fields but the
two numbers that change per request. `peer` counts each caller's SPIFFE ID
(its verified client certificate) apart, and every caller without one in
the bucket `plaintext`.

A route may carry several limits (`rate_limit: [...]`): one filter each, in
order, all counting the request until one refuses it. Each sends its
RateLimit-Policy and RateLimit fields (lists, in the draft: one member per
limit); the X-RateLimit-* fields, which hold one limit, are the first's.

`policy: local` decides synchronously against the worker-shared table;
`policy: redis` awaits one script call, bounded by the Redis timeout, and
applies `on_store_error` when Redis cannot answer.

Fields (draft-ietf-httpapi-ratelimit-headers-09/10, and the older ones):

    RateLimit-Policy: "orders";q=100;w=60
    RateLimit: "orders";r=57;t=26
    X-RateLimit-Limit: 100
    X-RateLimit-Remaining: 57
    X-RateLimit-Reset: 26
    Retry-After: 1                      (429 only)

`t` and `X-RateLimit-Reset` are delta-seconds until the quota is whole again
(not an epoch time, so clocks need not agree).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from meshgate.config.authz import PLAINTEXT
from meshgate.config.schema import ConsumerConfig, RateLimitConfig, RouteConfig
from meshgate.filters import FilterRequest, LocalReply
from meshgate.filters.sources import SourceCounts
from meshgate.ratelimit import Decision, LimitSpec
from meshgate.ratelimit.local import SharedTable

if TYPE_CHECKING:
    from meshgate.ratelimit.redis import RedisLimiter

__all__ = ["RateLimitFilter", "limit_id", "route_identity"]

log = logging.getLogger("meshgate.ratelimit")

_KINDS_BY_CONSUMER = ("default", "consumer", "api_key")
_POLICY_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/\[\]-]")
_PLAINTEXT_KEY = b"p:" + PLAINTEXT.encode()


def route_identity(route: RouteConfig) -> str:
    """What names a route across reloads: its `name`, or else what it matches
    (never its position, which moves when a route is inserted above it)."""
    if route.name:
        return "name:" + route.name
    return "match:" + route.model_dump_json(include={"path", "host", "methods", "headers"})


def limit_id(route_identity: str, cfg: RateLimitConfig, index: int = 0) -> str:
    """A short id for one route's limit (`index`: its place in the route's
    list). It stays the same across reloads while the route and its limit
    do, so that counts carry over."""
    text = f"{route_identity}\0{cfg.limit}\0{cfg.period}\0{cfg.key}\0{cfg.algorithm}\0{cfg.burst}"
    if index:
        text += f"\0{index}"
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _seconds(value: float) -> bytes:
    return b"%d" % max(0, math.ceil(value))


class RateLimitFilter:
    def __init__(
        self,
        route: RouteConfig,
        route_label: str,
        cfg: RateLimitConfig,
        consumers: Mapping[str, ConsumerConfig],
        *,
        table: SharedTable | None,
        redis: RedisLimiter | None,
        index: int = 0,
        by_source: bool = False,
    ) -> None:
        """`index`: the limit's place in its route's list (the first sends
        the X-RateLimit-* fields). `by_source`: count refusals by the
        caller's identity (`limited_by_source`)."""
        self.cfg = cfg
        self.id = limit_id(route_identity(route), cfg, index)
        self.prefix = self.id.encode() + b":"
        self.spec = LimitSpec.from_config(cfg)
        self.kind = cfg.key
        self.header = cfg.key[7:].encode("latin-1") if cfg.key.startswith("header:") else None
        self.table = table
        self.redis = redis
        if cfg.policy == "redis":
            assert redis is not None
        else:
            assert table is not None
        self.deny_on_error = cfg.on_store_error == "deny"
        # Outcomes, for /metrics.
        self.allowed = self.limited = self.store_errors = 0
        self.limited_by_source = SourceCounts(1) if by_source else None
        self.headers = cfg.headers
        self.legacy_fields = index == 0
        # Consumers with their own limit, where the key identifies a consumer.
        self.consumer_specs: dict[str, LimitSpec] = {}
        if cfg.key in _KINDS_BY_CONSUMER:
            for name, consumer in consumers.items():
                own = consumer.rate_limit
                if own is not None:
                    self.consumer_specs[name] = LimitSpec.from_config(
                        cfg, limit=own.limit, period=own.period
                    )
        # A route's name may hold anything: keep a token's characters.
        name = cfg.name or _POLICY_UNSAFE.sub("_", route_label)[:64]
        if index and cfg.name is None:
            name = f"{name[:60]}:{index + 1}"  # the route's second limit: `orders:2`
        self.name = name
        """The limit's name in the RateLimit fields and in /metrics."""
        self.policy_name = b'"' + name.encode("ascii") + b'"'
        # The fields of an allowed response, all but two numbers ready.
        self.templates = {spec: self._template(spec) for spec in self._specs()}
        self.redis_timeout = redis.cfg.timeout if redis is not None else 0.0

    # -- the key ---------------------------------------------------------------

    def key(self, req: FilterRequest) -> bytes:
        kind = self.kind
        if kind == "default":
            if req.consumer is not None:
                return b"c:" + req.consumer.encode()
            if req.api_key is not None:
                return b"k:" + req.api_key.encode()
            if req.subject is not None:
                return b"s:" + req.subject.encode()
        elif kind == "consumer":
            if req.consumer is not None:
                return b"c:" + req.consumer.encode()
            if req.subject is not None:
                return b"s:" + req.subject.encode()
        elif kind == "api_key":
            if req.api_key is not None:
                return b"k:" + req.api_key.encode()
        elif kind == "route":
            return b"r:"
        elif kind == "peer":
            peer = req.peer
            return _PLAINTEXT_KEY if peer is None else b"p:" + peer.encode()
        elif self.header is not None:
            value = req.header(self.header)
            if value is not None:
                # Hashed: the header may carry a credential, and the key may
                # end up in Redis in the clear.
                return b"h:" + hashlib.blake2b(value, digest_size=16).hexdigest().encode()
        return b"i:" + req.client

    def spec_for(self, req: FilterRequest) -> LimitSpec:
        if self.consumer_specs and req.consumer is not None:
            return self.consumer_specs.get(req.consumer, self.spec)
        return self.spec

    # -- the decision ------------------------------------------------------------

    def __call__(
        self, req: FilterRequest
    ) -> (
        LocalReply
        | Coroutine[Any, Any, LocalReply | None]
        | asyncio.Future[LocalReply | None]
        | None
    ):
        key = self.prefix + self.key(req)
        spec = self.spec_for(req)
        table = self.table
        if table is not None:
            return self.apply(req, table.decide(key, spec), spec)
        redis = self.redis
        assert redis is not None
        if redis.pipelined:
            # One server: a future the reply settles (no coroutine, no task).
            fut: asyncio.Future[LocalReply | None] = asyncio.get_running_loop().create_future()

            def done(decision: Decision | None) -> None:
                if not fut.done():
                    fut.set_result(self._settle(req, decision, spec))

            redis.decide_cb(key, spec, done)
            return fut
        return self._decide_redis(req, key.decode("latin-1"), spec)

    async def _decide_redis(
        self, req: FilterRequest, key: str, spec: LimitSpec
    ) -> LocalReply | None:
        redis = self.redis
        assert redis is not None
        return self._settle(req, await redis.decide(key, spec), spec)

    def _settle(
        self, req: FilterRequest, decision: Decision | None, spec: LimitSpec
    ) -> LocalReply | None:
        """A Redis decision as the filter's verdict; None (no answer) is
        what `on_store_error` says."""
        if decision is None:
            redis = self.redis
            assert redis is not None
            self.store_errors += 1
            if self.deny_on_error:
                retry = max(1.0, redis.cfg.down_interval)
                return LocalReply(
                    429,
                    "rate-limit-unavailable",
                    "the rate limit store is unavailable and this route denies requests "
                    "it cannot count",
                    [(b"retry-after", _seconds(retry))],
                )
            return None
        return self.apply(req, decision, spec)

    def _specs(self) -> set[LimitSpec]:
        return {self.spec, *self.consumer_specs.values()}

    def _template(self, spec: LimitSpec) -> bytes:
        """`%d` for remaining and reset, twice each with the X-RateLimit-*
        fields, else once (escaped otherwise)."""
        name = self.policy_name.replace(b"%", b"%%")
        limit = b"%d" % spec.limit
        window = b"%d" % max(1, spec.period_us // 1_000_000)
        fields = (
            b"ratelimit-policy: " + name + b";q=" + limit + b";w=" + window + b"\r\n"
            b"ratelimit: " + name + b";r=%d;t=%d\r\n"
        )
        if not self.legacy_fields:
            return fields
        return fields + (
            b"x-ratelimit-limit: " + limit + b"\r\n"
            b"x-ratelimit-remaining: %d\r\n"
            b"x-ratelimit-reset: %d\r\n"
        )

    def fields(self, d: Decision, spec: LimitSpec) -> list[tuple[bytes, bytes]]:
        limit = b"%d" % spec.limit
        window = b"%d" % max(1, spec.period_us // 1_000_000)
        remaining = b"%d" % max(0, d.remaining)
        reset = _seconds(d.reset)
        out = [
            (b"ratelimit-policy", self.policy_name + b";q=" + limit + b";w=" + window),
            (b"ratelimit", self.policy_name + b";r=" + remaining + b";t=" + reset),
        ]
        if self.legacy_fields:
            out += [
                (b"x-ratelimit-limit", limit),
                (b"x-ratelimit-remaining", remaining),
                (b"x-ratelimit-reset", reset),
            ]
        return out

    def apply(self, req: FilterRequest, d: Decision, spec: LimitSpec) -> LocalReply | None:
        if d.allowed:
            self.allowed += 1
            if self.headers:
                remaining = d.remaining if d.remaining > 0 else 0
                reset = math.ceil(d.reset) if d.reset > 0 else 0
                values = (
                    (remaining, reset, remaining, reset)
                    if self.legacy_fields
                    else (remaining, reset)
                )
                req.response_extra += self.templates[spec] % values
            return None
        self.limited += 1
        by_source = self.limited_by_source
        if by_source is not None:
            by_source.row(req.peer)[0] += 1
        headers = self.fields(d, spec) if self.headers else []
        retry = max(1, math.ceil(d.retry_after))
        headers.append((b"retry-after", b"%d" % retry))
        period = spec.period_us / 1_000_000
        return LocalReply(
            429,
            "rate-limited",
            f"the limit of {spec.limit} requests per {period:g}s is reached; retry in {retry}s",
            headers,
        )
