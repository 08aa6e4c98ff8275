"""`policy: redis`: exact limits across every gateway sharing one Redis.

Each decision is one Lua script on one key (so it works on Redis Cluster),
mirroring `meshgate.ratelimit.gcra` / `sliding_window` exactly, on the
server's clock (`TIME`, so gateways need no synchronised clocks). The read,
the decision and the write are one atomic script: there is no
read-modify-write race between gateways. Keys expire (`PEXPIREAT`, the
instant their state stops mattering) and vanish once they are back to a
full quota.

Decisions are coalesced: those asked for in one turn of the event loop go
to Redis together. On one server (`redis://`, `rediss://`, `unix://`) they
are one call of a batch script per algorithm (`lua`), on a pipelined
connection of our own (`resp`): one write, one round trip, one script call
for the turn's decisions, each request getting its own four integers. With
sentinel and cluster (keys of one batch may live on different nodes) they
are one pipeline of single-key EVALSHA calls through redis-py. Each
decision is atomic either way, so batching changes no decision; it removes
most of the per-call cost, which dominates on loopback.

Redis is never allowed to slow a request down: a decision waits at most
`RedisConfig.timeout`, then `decide` returns None and the caller applies
`on_store_error`. After a failure, decisions skip Redis (None at once) for
`down_interval`; then a single request probes it again while the others
keep skipping, so a dead Redis costs one timeout per interval, not one per
request. Going down logs one warning, coming back one info line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    InvalidResponse,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.maint_notifications import MaintNotificationsConfig

from meshgate.config.schema import RedisConfig, redact_url
from meshgate.ratelimit import Decision, LimitSpec
from meshgate.ratelimit.lua import (
    GCRA_BATCH_LUA,
    GCRA_LUA,
    SLIDING_WINDOW_BATCH_LUA,
    SLIDING_WINDOW_LUA,
)
from meshgate.ratelimit.resp import RespConnection, RespError, RespFailure, command

__all__ = ["GCRA_LUA", "SLIDING_WINDOW_LUA", "RedisLimiter", "RedisTarget", "parse_redis_url"]

log = logging.getLogger("meshgate.ratelimit")

_DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What `parse_redis_url` found in a `redis:` URL.

    `kind` is "url" for `redis://`, `rediss://` and `unix://`, which
    `Redis.from_url` understands itself (only `url` is set then).
    """

    kind: Literal["url", "sentinel", "cluster"]
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def _parse_host(text: str, default_port: int, url: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {text!r} in {redact_url(url)!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"a host is missing in {redact_url(url)!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {redact_url(url)!r}")
    return host, int(port_text)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a `RedisConfig.url`.

    `redis[s]+sentinel://[user:password@]h1:26379,h2:26379/<master>[/<db>]`
    and `redis[s]+cluster://[user:password@]h1:7000,h2:7001` are parsed here
    (the password is the Redis servers', not the sentinels'); the other
    schemes are left to redis-py. Raises ValueError for a malformed URL.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"expected a redis URL, found {redact_url(url)!r}")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(kind="url", url=url)
    base, plus, kind = scheme.partition("+")
    if not plus or base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(f"unsupported redis URL scheme {scheme!r} in {redact_url(url)!r}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"a {scheme} URL takes no query or fragment: {redact_url(url)!r}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist = netloc
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(
        _parse_host(part.strip(), _DEFAULT_PORTS[kind], url)
        for part in hostlist.split(",")
        if part.strip()
    )
    if not hosts:
        raise ValueError(f"no host in {redact_url(url)!r}")
    segments = [unquote(s) for s in path.split("/") if s]
    ssl = base == "rediss"
    if kind == "cluster":
        if segments and segments != ["0"]:
            raise ValueError(f"a cluster has no database to select: {redact_url(url)!r}")
        return RedisTarget(
            kind="cluster", url=url, hosts=hosts, username=username, password=password, ssl=ssl
        )
    if not segments or len(segments) > 2:
        raise ValueError(
            f"expected redis+sentinel://host:port,.../<master>/<db>, found {redact_url(url)!r}"
        )
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"bad database number {segments[1]!r} in {redact_url(url)!r}")
        db = int(segments[1])
    return RedisTarget(
        kind="sentinel",
        url=url,
        hosts=hosts,
        master=segments[0],
        db=db,
        username=username,
        password=password,
        ssl=ssl,
    )


_Asked = tuple[bytes, LimitSpec, Callable[[Decision | None], None], bool]
"""A decision asked for: its Redis key, its limit, who wants it, and
whether it probes a Redis taken for down."""


MAX_BATCH = 512
"""Decisions in one batch script call, at most (a turn's others go in more)."""


def _pipelinable(url: str) -> bool:
    """Whether `resp.RespConnection` speaks to this server: `redis://` or
    `unix://`, with no query but `db`. TLS (`rediss://`, with its CA and
    certificate options) and anything else stay with redis-py."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "unix"):
        return False
    return all(k == "db" for k in parse_qs(parts.query, keep_blank_values=True))


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _sha(script: str) -> bytes:
    """A script's SHA1, as Redis names it (hex)."""
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest().encode()


def _ignore(reply: Any) -> None:
    """A SCRIPT LOAD's reply: the EVALSHA after it says whether it worked."""


# What "Redis could not answer" looks like. RedisClusterException is not a
# RedisError; TimeoutError is asyncio.timeout's.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


def _reply(raw: Any) -> tuple[int, int, int, int]:
    if (
        not isinstance(raw, list)
        or len(raw) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        raise InvalidResponse(f"unexpected rate limit script reply {raw!r}")
    return raw[0], raw[1], raw[2], raw[3]


class RedisLimiter:
    """Rate limit decisions in Redis, for every gateway sharing it."""

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self.errors = 0
        """Decisions Redis failed to answer (error or timeout)."""
        self.skipped = 0
        """Decisions that did not ask Redis because it was down."""
        self._timeout = cfg.timeout
        self._prefix = cfg.key_prefix
        self._sentinel: Sentinel | None = None
        self._client = self._build_client(cfg)
        self._gcra: AsyncScript = self._client.register_script(GCRA_LUA)
        self._sliding: AsyncScript = self._client.register_script(SLIDING_WINDOW_LUA)
        # At most max_connections calls in flight: a busy pool then waits (up
        # to the timeout) rather than failing with "Too many connections",
        # whichever client kind this is.
        self._slots = asyncio.Semaphore(cfg.max_connections)
        self._down = False
        self._epoch = 0
        self._retry_at = 0.0
        self._probing = False
        self._batch: list[tuple[list[bytes], asyncio.Future[tuple[int, int, int, int]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._shas = {
            "gcra": self._gcra.sha.encode(),
            "sliding_window": self._sliding.sha.encode(),
        }
        # One server: decisions go through a pipelined connection of our
        # own (`resp`); sentinel and cluster stay with redis-py.
        self._resp: RespConnection | None = None
        if _pipelinable(cfg.url):
            self._resp = RespConnection(cfg.url, cfg.timeout)
        self._prefix_bytes = cfg.key_prefix.encode()
        self._turn: list[_Asked] = []
        """The decisions asked for in this turn of the loop (`decide_cb`)."""
        self._args: dict[LimitSpec, bytes] = {}
        self._batch_scripts = {
            name: (_sha(lua), command(b"SCRIPT", b"LOAD", lua.encode()))
            for name, lua in (
                ("gcra", GCRA_BATCH_LUA),
                ("sliding_window", SLIDING_WINDOW_BATCH_LUA),
            )
        }
        """Per algorithm: its batch script's SHA1, and its SCRIPT LOAD (for a
        server that does not have it)."""

    def _build_client(self, cfg: RedisConfig) -> Redis | RedisCluster:
        target = parse_redis_url(cfg.url)
        # No retries: a retried script may have run already (and counted),
        # and the deadline leaves no time for one anyway. The pool checks a
        # connection before handing it out (see below), so a restarted server
        # is no error.
        common: dict[str, Any] = {
            "socket_timeout": cfg.timeout,
            "socket_connect_timeout": cfg.timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if not cfg.url.lower().startswith("unix:"):
            # With maintenance notifications on ("auto" in redis-py 8), the
            # pool skips its check of a pooled connection before handing it
            # out, and the first call after a Redis restart fails on a
            # connection the old server closed.
            common["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        if target.kind == "url":
            return Redis.from_url(cfg.url, max_connections=cfg.max_connections, **common)
        auth: dict[str, Any] = {"username": target.username, "password": target.password}
        if target.kind == "cluster":
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
                max_connections=cfg.max_connections,
                ssl=target.ssl,
                **auth,
                **common,
            )
        assert target.master is not None
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": cfg.timeout,
            "socket_connect_timeout": cfg.timeout,
        }
        if target.ssl:
            sentinel_kwargs["ssl"] = True
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=sentinel_kwargs
        )
        client: Redis = self._sentinel.master_for(
            target.master,
            db=target.db,
            max_connections=cfg.max_connections,
            ssl=target.ssl,
            **auth,
            **common,
        )
        return client

    async def evaluate(
        self, key: str, spec: LimitSpec, now_us: int | None = None
    ) -> tuple[int, int, int, int]:
        """Run the script for `spec.algorithm` on `key_prefix + key`:
        (allowed, remaining, reset_us, retry_us). No deadline and no error
        handling (that is `decide`). `now_us` replaces the server's clock
        (for tests comparing the script with the Python functions)."""
        name = self._prefix + key
        extra = [] if now_us is None else [now_us]
        if spec.algorithm == "gcra":
            raw = await self._gcra(keys=[name], args=[spec.interval_us, spec.burst, *extra])
        else:
            raw = await self._sliding(
                keys=[name], args=[spec.tick_us, spec.period_ticks, spec.limit, *extra]
            )
        return _reply(raw)

    async def decide(self, key: str, spec: LimitSpec) -> Decision | None:
        """The decision for `key`, or None when Redis could not answer
        within `cfg.timeout` (or is being skipped after a failure)."""
        if self._resp is not None:
            return await self._decide_resp(key, spec)
        probe = self._may_ask()
        if probe is None:
            return None
        epoch = self._epoch
        name = (self._prefix + key).encode()
        if spec.algorithm == "gcra":
            args = [self._shas["gcra"], b"1", name, b"%d" % spec.interval_us, b"%d" % spec.burst]
        else:
            args = [
                self._shas["sliding_window"],
                b"1",
                name,
                b"%d" % spec.tick_us,
                b"%d" % spec.period_ticks,
                b"%d" % spec.limit,
            ]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, int, int, int]] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._flush)
        self._batch.append((args, fut))
        try:
            # The batch's deadline (in `_send`, the same timeout, which also
            # bounds the wait for a free connection) settles this future.
            allowed, remaining, reset_us, retry_us = await fut
        except ResponseError as exc:
            # This call's own error (OOM, a key of another type): the server
            # answers, so it is not marked down for everyone.
            self.errors += 1
            log.warning("rate limit store redis refused a decision: %s", exc)
            return None
        except _FAILURES as exc:
            self.errors += 1
            self._failed(exc, epoch)
            return None
        finally:
            if probe:
                self._probing = False
        if probe:
            self._answered(epoch)
        return Decision(bool(allowed), remaining, reset_us / 1e6, retry_us / 1e6, spec.limit)

    def _may_ask(self) -> bool | None:
        """Whether a decision may go to Redis now: None when it is skipped
        (Redis is taken for down, and not yet due for a probe, or another
        decision probes it), else whether this one is the probe."""
        if not self._down:
            return False
        if self._probing or time.monotonic() < self._retry_at:
            self.skipped += 1
            return None
        self._probing = True
        return True

    def _answered(self, epoch: int) -> None:
        """A probe was answered: Redis is up again (unless it changed state
        since the probe was sent)."""
        if self._down and self._epoch == epoch:
            self._down = False
            self._epoch += 1
            log.info("rate limit store redis answers again; redis limits are enforced again")

    @property
    def pipelined(self) -> bool:
        """Decisions can be asked with a callback (`decide_cb`): one server."""
        return self._resp is not None

    def decide_cb(self, key: bytes, spec: LimitSpec, cb: Callable[[Decision | None], None]) -> None:
        """`decide` without a coroutine (`pipelined` only): `cb` gets the
        decision, or None, once Redis answers (at once when it is skipped).
        The decision joins this turn's batch (`_send_batches`)."""
        probe = self._may_ask()
        if probe is None:
            cb(None)
            return
        batch = self._turn
        if not batch:
            asyncio.get_running_loop().call_soon(self._send_batches)
        batch.append((self._prefix_bytes + key, spec, cb, probe))

    def _send_batches(self) -> None:
        """This turn's decisions: one batch script call per algorithm."""
        batch, self._turn = self._turn, []
        gcra = [d for d in batch if d[1].algorithm == "gcra"]
        sliding = [d for d in batch if d[1].algorithm != "gcra"] if len(gcra) < len(batch) else []
        for group, name in ((gcra, "gcra"), (sliding, "sliding_window")):
            for at in range(0, len(group), MAX_BATCH):
                self._send_batch(group[at : at + MAX_BATCH], name)

    def _send_batch(self, group: list[_Asked], algorithm: str) -> None:
        resp = self._resp
        assert resp is not None
        sha, load = self._batch_scripts[algorithm]
        parts = [
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n"
            % (3 + len(group) * (3 if algorithm == "gcra" else 4), sha),
            _bulk(b"%d" % len(group)),
        ]
        for name, _, _, _ in group:
            parts.append(b"$%d\r\n%s\r\n" % (len(name), name))
        for _, spec, _, _ in group:
            parts.append(self._batch_args(spec))
        cmd = b"".join(parts)
        epoch = self._epoch
        retried = False

        def settle(reply: Any) -> None:
            nonlocal retried
            if isinstance(reply, RespError) and not retried and str(reply).startswith("NOSCRIPT"):
                retried = True  # a NOSCRIPT call did not run: running it again is safe
                resp.submit(load, _ignore)
                resp.submit(cmd, settle)
                return
            self._settle_batch(group, reply, epoch)

        resp.submit(cmd, settle)

    def _settle_batch(self, group: list[_Asked], reply: Any, epoch: int) -> None:
        if any(d[3] for d in group):
            self._probing = False
        failure: BaseException | None = None
        if isinstance(reply, RespError):
            # The script's own error (OOM, a key of another type): the
            # server answers, so it is not marked down for everyone.
            self.errors += len(group)
            log.warning("rate limit store redis refused a decision: %s", reply)
            reply = None
        elif isinstance(reply, BaseException):
            failure = reply
        elif (
            not isinstance(reply, list)
            or len(reply) != 4 * len(group)
            or not all(type(v) is int for v in reply)
        ):
            failure = InvalidResponse(f"unexpected rate limit script reply {reply!r:.200}")
        if failure is not None:
            self.errors += len(group)
            self._failed(failure, epoch)
            reply = None
        if reply is None:
            for d in group:
                d[2](None)
            return
        if any(d[3] for d in group):
            self._answered(epoch)
        for i, (_, spec, cb, _) in enumerate(group):
            j = 4 * i
            cb(
                Decision(
                    bool(reply[j]),
                    reply[j + 1],
                    reply[j + 2] / 1e6,
                    reply[j + 3] / 1e6,
                    spec.limit,
                )
            )

    def _batch_args(self, spec: LimitSpec) -> bytes:
        """A limit's arguments in a batch call, as RESP (made once per limit)."""
        got = self._args.get(spec)
        if got is None:
            if spec.algorithm == "gcra":
                values: tuple[int, ...] = (spec.interval_us, spec.burst)
            else:
                values = (spec.tick_us, spec.period_ticks, spec.limit)
            got = self._args[spec] = b"".join(_bulk(b"%d" % v) for v in values)
        return got

    async def _decide_resp(self, key: str, spec: LimitSpec) -> Decision | None:
        fut: asyncio.Future[Decision | None] = asyncio.get_running_loop().create_future()

        def done(decision: Decision | None) -> None:
            if not fut.done():
                fut.set_result(decision)

        self.decide_cb(key.encode("latin-1"), spec, done)
        return await fut

    def _flush(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, batch: list[tuple[list[bytes], asyncio.Future[tuple[int, int, int, int]]]]
    ) -> None:
        """Run a batch of scripts in one pipeline; settle every future."""
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                results = await self._pipeline([args for args, _ in batch])
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:
                    # A restarted (or new) server has no scripts yet; a
                    # NOSCRIPT call did not run, so running it again is safe.
                    await self._client.script_load(GCRA_LUA)
                    await self._client.script_load(SLIDING_WINDOW_LUA)
                    again = await self._pipeline([batch[i][0] for i in missing])
                    for i, r in zip(missing, again, strict=True):
                        results[i] = r
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RedisError(str(exc)))
                    fut.exception()  # retrieved: a caller that timed out never awaits it
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), raw in zip(batch, results, strict=True):
            if fut.done():
                continue
            try:
                if isinstance(raw, Exception):
                    raise raw
                fut.set_result(_reply(raw))
            except Exception as exc:
                fut.set_exception(exc)
                fut.exception()

    async def _pipeline(self, commands: list[list[bytes]]) -> list[Any]:
        client = self._client
        if isinstance(client, RedisCluster):
            # Keys of one batch may live on different nodes: the cluster
            # pipeline routes each call.
            pipe = client.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command("EVALSHA", *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results
        # One server: what redis-py's pipeline does, on a pooled connection,
        # without its per-call bookkeeping (a third of the cost per decision).
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(
                conn.pack_commands([("EVALSHA", *args) for args in commands])
            )
            results = []
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except ResponseError as exc:
                    results.append(exc)
        except BaseException:
            # A half-read reply stream cannot be reused.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return results

    @property
    def down(self) -> bool:
        """Redis is taken for down (decisions skip it until a probe answers)."""
        return self._down

    def _failed(self, exc: BaseException, epoch: int) -> None:
        if self._epoch != epoch:
            return  # started before the last up/down change; says nothing new
        self._retry_at = time.monotonic() + self.cfg.down_interval
        if self._down:
            return
        self._down = True
        self._epoch += 1
        if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
            reason = f"no answer within {self._timeout:g}s"
        else:
            kind = "ConnectionError" if isinstance(exc, RespFailure) else type(exc).__name__
            reason = f"{kind}: {exc}"
        log.warning(
            "rate limit store redis is down (%s); redis limits apply on_store_error "
            "and redis is retried every %gs",
            reason,
            self.cfg.down_interval,
        )

    async def close(self) -> None:
        """Fail what is queued, stop the batches in flight, and close the
        connections (and the sentinels')."""
        if self._resp is not None:
            await self._resp.close()
        batch, self._batch = self._batch, []
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(RedisError("the rate limit store was closed"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
