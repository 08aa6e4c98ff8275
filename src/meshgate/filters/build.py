"""Compile a config's `cors:`, `auth:`, `authz:`, `fault:`, `consumers:`,
`rate_limit:` and `transform:` into route filter chains.

`FilterServices` holds what outlives one runtime: the JWT verifiers (with
their JWKS refresh tasks), the Redis clients, and the table that `policy:
local` limits share across workers. A reload reuses an object whose config
did not change, so a JWKS is not refetched and counts are not reset, and the
worker closes the ones the new runtime no longer uses once it is swapped in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshgate.auth.jwt import JwtVerifier
from meshgate.config.schema import (
    ApiKeyAuthConfig,
    Config,
    JwtAuthConfig,
    RedisConfig,
    RouteConfig,
)
from meshgate.filters import Chain, Filter
from meshgate.filters.auth import (
    CONSUMER_HEADER,
    ApiKeyAuthenticator,
    Authenticator,
    AuthFilter,
    JwtAuthenticator,
)
from meshgate.filters.authz import AuthzFilter, DenialRing
from meshgate.filters.cors import CorsFilter
from meshgate.filters.deprecation import DeprecationFilter
from meshgate.filters.fault import FaultFilter
from meshgate.filters.ratelimit import RateLimitFilter
from meshgate.filters.transform import compile_transform
from meshgate.filters.xfcc import XfccFilter
from meshgate.http.paths import route_params
from meshgate.ratelimit.local import SharedTable

if TYPE_CHECKING:
    from meshgate.ratelimit.redis import RedisLimiter

__all__ = ["CompiledFilters", "FilterServices", "compile_filters"]

log = logging.getLogger("meshgate.filters")


class FilterServices:
    """Long-lived objects that route filters share, one set per worker."""

    def __init__(self, table: SharedTable | None = None) -> None:
        self.table = table
        self.denials = DenialRing()
        """The proxy's last denials, which its authz filters share."""
        self.verifiers: dict[tuple[str, str, str], JwtVerifier] = {}
        self.limiters: dict[str, RedisLimiter] = {}
        self.started: set[int] = set()

    def shared_table(self, slots: int) -> SharedTable:
        if self.table is None:
            # One process: a private table, without the cross-process lock
            # (the supervisor makes a shared one before it forks workers).
            self.table = SharedTable(slots, shared=False)
        return self.table

    def verifier(self, name: str, cfg: JwtAuthConfig, base_dir: pathlib.Path) -> JwtVerifier:
        # A key file's content is part of what identifies the verifier: a
        # reload after the file changed builds a new one.
        files = []
        for path in (cfg.secret_file, cfg.public_key_file):
            if path is not None:
                try:
                    data = (base_dir / path).read_bytes()
                except OSError:
                    data = b""  # JwtVerifier names the problem below
                files.append(hashlib.sha256(data).hexdigest())
        key = (name, cfg.model_dump_json() + "\0".join(files), str(base_dir))
        verifier = self.verifiers.get(key)
        if verifier is None:
            try:
                verifier = JwtVerifier(name, cfg, base_dir=base_dir)
            except (ValueError, OSError) as exc:
                raise ValueError(f"auth.{name}: {exc}") from exc
            self.verifiers[key] = verifier
        return verifier

    def redis_limiter(self, cfg: RedisConfig) -> RedisLimiter:
        key = cfg.model_dump_json()
        limiter = self.limiters.get(key)
        if limiter is None:
            # Imported here: a process that limits nothing in Redis (most
            # sidecars) never loads the Redis client (about 6 MiB).
            from meshgate.ratelimit.redis import RedisLimiter

            limiter = self.limiters[key] = RedisLimiter(cfg)
        return limiter

    async def prepare(self, used: CompiledFilters) -> None:
        """Start what `used` needs and is not started yet (a first JWKS fetch)."""
        starting = [v.start() for v in used.verifiers if id(v) not in self.started]
        self.started.update(id(v) for v in used.verifiers)
        if starting:
            await asyncio.gather(*starting)

    async def activate(self, used: CompiledFilters) -> None:
        """`prepare`, then close what `used` does not use. The verifiers kept
        forget the tokens they verified: after a reload a token is checked
        again, once, under the config now served."""
        await self.prepare(used)
        for verifier in used.verifiers:
            verifier.cache.clear()
        keep = {id(v) for v in used.verifiers} | {id(r) for r in used.limiters}
        closing = []
        for key, verifier in list(self.verifiers.items()):
            if id(verifier) not in keep:
                del self.verifiers[key]
                self.started.discard(id(verifier))
                closing.append(verifier.close())
        for rkey, limiter in list(self.limiters.items()):
            if id(limiter) not in keep:
                del self.limiters[rkey]
                closing.append(limiter.close())
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)

    async def close(self) -> None:
        await self.activate(CompiledFilters())


@dataclass
class CompiledFilters:
    chains: list[Chain | None] = field(default_factory=list)
    """One per route, in order; None for a route without filters."""
    identity_headers: frozenset[bytes] = frozenset()
    """Headers only the gateway sets; a client's copies are removed everywhere."""
    verifiers: list[JwtVerifier] = field(default_factory=list)
    limiters: list[RedisLimiter] = field(default_factory=list)
    auth_filters: list[tuple[str, AuthFilter]] = field(default_factory=list)
    authz_filters: list[tuple[str, AuthzFilter]] = field(default_factory=list)
    limit_filters: list[tuple[str, RateLimitFilter]] = field(default_factory=list)
    fault_filters: list[tuple[str, FaultFilter]] = field(default_factory=list)
    cors_filters: list[tuple[str, CorsFilter]] = field(default_factory=list)


def compile_filters(
    config: Config,
    services: FilterServices,
    labels: Iterable[str],
    *,
    base_dir: pathlib.Path,
) -> CompiledFilters:
    out = CompiledFilters()
    authenticators: dict[str, Authenticator] = {}
    identity = {CONSUMER_HEADER} if (config.auth or config.consumers) else set()
    for name, entry in config.auth.items():
        if isinstance(entry, JwtAuthConfig):
            verifier = services.verifier(name, entry, base_dir)
            out.verifiers.append(verifier)
            authenticators[name] = JwtAuthenticator(name, entry, verifier, config.consumers)
            identity.update(h.lower().encode("latin-1") for h in entry.forward_claims.values())
        elif isinstance(entry, ApiKeyAuthConfig):
            authenticators[name] = ApiKeyAuthenticator(name, entry, config.consumers)
    # Spellings with `_` for `-` (which CGI-style servers read as the same
    # header) are matched by the protocol layer, against these dash forms.
    out.identity_headers = frozenset(identity)
    limiter = services.redis_limiter(config.redis) if config.redis is not None else None
    if limiter is not None:
        out.limiters.append(limiter)
    for route, label in zip(config.routes, labels, strict=True):
        out.chains.append(_chain(config, route, label, authenticators, services, limiter, out))
    return out


def _chain(
    config: Config,
    route: RouteConfig,
    label: str,
    authenticators: dict[str, Authenticator],
    services: FilterServices,
    limiter: RedisLimiter | None,
    out: CompiledFilters,
) -> Chain | None:
    filters: list[tuple[str, Filter]] = []
    cors_cfg = config.route_cors(route)
    if cors_cfg is not None:
        # First: a preflight carries no credentials, and is answered before
        # auth, faults or limits could refuse it.
        cors = CorsFilter(cors_cfg)
        filters.append(("cors", cors))
        out.cors_filters.append((label, cors))
    if route.auth is not None:
        auth = AuthFilter(
            [authenticators[name] for name in route.auth.use],
            scopes=route.auth.scopes,
            required_claims=route.auth.required_claims,
        )
        filters.append(("auth", auth))
        out.auth_filters.append((label, auth))
    if route.authz is not None:
        # After auth (it may refuse with a challenge first), before faults
        # and limits: a denied caller triggers no fault and spends no quota.
        authz = AuthzFilter(route.authz, label, services.denials)
        filters.append(("authz", authz))
        out.authz_filters.append((label, authz))
    if route.deprecation is not None:
        filters.append(("deprecation", DeprecationFilter(route.deprecation)))
    if route.fault is not None:
        # After auth, as in Istio: a rehearsed outage still refuses strangers
        # with 401 (as a real one would), and they cannot trigger faults.
        # Before the limit: an aborted request is not counted.
        fault = FaultFilter(label, route.fault)
        filters.append(("fault", fault))
        out.fault_filters.append((label, fault))
    for index, rl in enumerate(route.rate_limits()):
        table = (
            services.shared_table(config.limits.rate_limit_slots) if rl.policy == "local" else None
        )
        redis = limiter if rl.policy == "redis" else None
        limit = RateLimitFilter(
            route,
            label,
            rl,
            config.consumers,
            table=table,
            redis=redis,
            index=index,
            # Refusals by caller where callers have identities: a limit by
            # peer, or a route with a policy on who calls it (a sidecar's inbound).
            by_source=rl.key == "peer" or route.authz is not None,
        )
        filters.append(("rate_limit", limit))
        out.limit_filters.append((label, limit))
    transform = compile_transform(
        route.transform,
        label,
        params=route_params(route.path),
        identity=out.identity_headers,
    )
    if transform is not None:
        # Last: values render with the consumer and claims auth found, and
        # a refused request costs no rendering.
        filters.append(("transform", transform))
    if route.forward_client_cert is not None:
        filters.append(("xfcc", XfccFilter(route.forward_client_cert)))
    return Chain(filters) if filters else None


def compile_check(config: Config, path: str) -> str | None:
    """Compile `config`'s filters as a worker would (key files, limit bounds;
    no network): the first problem, or None. What only fails here is then
    refused before a worker starts or reloads."""
    labels = [r.name or f"routes[{i}]" for i, r in enumerate(config.routes)]
    try:
        compile_filters(
            config, FilterServices(), labels, base_dir=pathlib.Path(path).resolve().parent
        )
    except ValueError as exc:
        return f"{path}: {exc}"
    return None
