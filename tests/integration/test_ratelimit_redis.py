"""RedisLimiter against a real redis-server (support.redis).

Several RedisLimiter instances (and processes) stand for several gateways
sharing one Redis. The Lua scripts are checked against the Python functions
decision by decision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from meshgate.config.schema import RedisConfig
from meshgate.ratelimit import Decision, LimitSpec, gcra, sliding_window
from meshgate.ratelimit.redis import RedisLimiter
from support.limits import SECOND, spec
from support.redis import RedisServer
from support.redis_fixtures import module_redis, redis_server  # noqa: F401


def config(url: str, **kwargs: object) -> RedisConfig:
    return RedisConfig.model_validate({"url": url, **kwargs})


def away_from_window_edge(period_s: float, margin_s: float = 5.0) -> None:
    """Sliding windows are aligned to multiples of the period (server time:
    here the same host's clock). Wait out an edge so a test's burst stays
    within one window."""
    left = period_s - time.time() % period_s
    if left < margin_s:
        time.sleep(left + 0.01)


@pytest.fixture
async def limiters(module_redis: RedisServer) -> AsyncIterator[list[RedisLimiter]]:  # noqa: F811
    """Four limiters with their own clients: four gateways."""
    made = [RedisLimiter(config(module_redis.url, timeout=5)) for _ in range(4)]
    yield made
    for limiter in made:
        await limiter.close()


@pytest.fixture
def sync_client(module_redis: RedisServer) -> Iterator[object]:  # noqa: F811
    client = module_redis.client()
    yield client
    client.close()


def unique(name: str) -> str:
    return f"{name}:{time.time_ns()}:{random.randrange(1 << 30)}"


# ---------------------------------------------------------------------------
# exactness across gateways


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
async def test_exactly_the_limit_across_concurrent_gateways(
    limiters: list[RedisLimiter], algorithm: str
):
    s = spec(50, 86_400 if algorithm == "sliding_window" else 3600, algorithm=algorithm)
    if algorithm == "sliding_window":
        away_from_window_edge(86_400)
    key = unique("concurrent")
    decisions = await asyncio.gather(
        *(limiters[i % len(limiters)].decide(key, s) for i in range(400))
    )
    assert all(d is not None for d in decisions)
    allowed = [d for d in decisions if d is not None and d.allowed]
    assert len(allowed) == 50
    # Each remaining count 0..49 was handed out exactly once.
    assert sorted(d.remaining for d in allowed) == list(range(50))
    assert all(d.limit == 50 for d in allowed)
    assert sum(lim.errors for lim in limiters) == 0


_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from meshgate.config.schema import RedisConfig
    from meshgate.ratelimit import LimitSpec
    from meshgate.ratelimit.redis import RedisLimiter

    url, key, algorithm, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

    async def main():
        spec = LimitSpec(limit=60, period_us=86_400_000_000, burst=60, algorithm=algorithm)
        limiters = [RedisLimiter(RedisConfig(url=url, timeout=5)) for _ in range(2)]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        results = await asyncio.gather(
            *(limiters[i % 2].decide(key, spec) for i in range(100))
        )
        for limiter in limiters:
            await limiter.close()
        print(json.dumps({
            "allowed": sum(1 for d in results if d is not None and d.allowed),
            "failed": sum(1 for d in results if d is None),
        }))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
def test_exactly_the_limit_across_gateway_processes(
    module_redis: RedisServer,  # noqa: F811
    algorithm: str,
):
    away_from_window_edge(86_400, margin_s=30)
    key = unique("processes")
    start_at = time.time() + 2.0  # all processes imported and ready by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, module_redis.url, key, algorithm, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))
    assert sum(o["failed"] for o in outputs) == 0
    assert sum(o["allowed"] for o in outputs) == 60


# ---------------------------------------------------------------------------
# Lua == Python


def python_model(s: LimitSpec) -> object:
    if s.algorithm == "gcra":
        tat = 0

        def step_gcra(now: int) -> Decision:
            nonlocal tat
            d, new = gcra(now, tat, s)
            if new is not None:
                tat = new
            return d

        return step_gcra
    state = (0, 0, 0)

    def step_sliding(now: int) -> Decision:
        nonlocal state
        d, new_state = sliding_window(now, *state, s)
        if new_state is not None:
            state = new_state
        return d

    return step_sliding


@pytest.mark.parametrize(
    "s",
    [
        spec(5, 1),
        spec(3, 1, burst=7),
        spec(7, 0.333333),
        spec(1, 86_400),
        spec(2_000, 1, burst=50),
        spec(5, 1, algorithm="sliding_window"),
        spec(3, 0.7, algorithm="sliding_window"),
        spec(1, 86_400, algorithm="sliding_window"),
        spec(200, 1, algorithm="sliding_window"),
        spec(10_000_000, 86_400, algorithm="sliding_window"),  # a coarser clock
    ],
    ids=lambda s: f"{s.algorithm}-{s.limit}/{s.period_us}us-burst{s.burst}",
)
async def test_lua_takes_the_same_decisions_as_python(limiters: list[RedisLimiter], s: LimitSpec):
    """The same sequence of instants through the script (the server clock
    replaced by each instant) and through the Python function: the same
    decisions, field by field."""
    rng = random.Random(s.limit * 31 + s.period_us)
    model = python_model(s)
    key = unique("mirror")
    # Simulated time runs an hour ahead of the real clock: the scripts'
    # absolute expiries (PEXPIREAT) then never remove a key the simulation
    # still needs. (Expiry itself is tested on the real clock below.)
    now = time.time_ns() // 1000 + 3600 * SECOND
    mean_gap = max(1, s.period_us // s.limit)
    allowed = denied = 0
    for n in range(600):
        if n % 300 == 0:
            now += rng.randrange(0, 3 * s.period_us)  # now and then, a quiet spell
        # Twice the rate on average, half of the requests at the same instant.
        now += rng.randrange(0, 2 * mean_gap) if rng.random() < 0.5 else 0
        a, remaining, reset_us, retry_us = await limiters[n % 4].evaluate(key, s, now)
        got = Decision(bool(a), remaining, reset_us / 1e6, retry_us / 1e6, s.limit)
        expected = model(now)  # type: ignore[operator]
        assert got == expected, f"decision {n} at {now}"
        allowed += got.allowed
        denied += not got.allowed
    assert allowed
    if s.limit <= 200:
        assert denied  # both paths were exercised


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_window"])
async def test_server_clock_burst_then_denied(limiters: list[RedisLimiter], algorithm: str):
    s = spec(10, 3600, algorithm=algorithm)
    away_from_window_edge(3600)
    key = unique("burst")
    got = [await limiters[0].decide(key, s) for _ in range(13)]
    assert all(d is not None for d in got)
    decisions = [d for d in got if d is not None]
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 3
    assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0]
    assert all(d.retry_after == 0.0 for d in decisions[:10])
    assert all(0 < d.retry_after <= 3600 and 0 < d.reset <= 3600 for d in decisions[10:])


# ---------------------------------------------------------------------------
# keys


async def test_keys_are_prefixed_and_expire(module_redis: RedisServer):  # noqa: F811
    limiter = RedisLimiter(config(module_redis.url, timeout=5, key_prefix="test:rl:"))
    client = module_redis.client()
    try:
        key = unique("ttl")
        g = spec(2, 0.4)  # a token every 200 ms
        assert (await limiter.decide(key + ":g", g)).allowed  # type: ignore[union-attr]
        ttl = client.pttl("test:rl:" + key + ":g")
        # PEXPIREAT is the refill instant rounded up to a millisecond: read
        # within the same millisecond, a TTL of 201.
        assert 0 < ttl <= 201
        w = spec(2, 0.4, algorithm="sliding_window")
        assert (await limiter.decide(key + ":w", w)).allowed  # type: ignore[union-attr]
        ttl = client.pttl("test:rl:" + key + ":w")
        assert 0 < ttl <= 801
        deadline = time.monotonic() + 5
        while client.exists("test:rl:" + key + ":g", "test:rl:" + key + ":w"):
            assert time.monotonic() < deadline, "rate limit keys never expired"
            await asyncio.sleep(0.05)
        # Gone means refilled: a full quota again.
        got = [await limiter.decide(key + ":g", g) for _ in range(3)]
        assert [d.allowed for d in got if d is not None] == [True, True, False]
    finally:
        client.close()
        await limiter.close()


async def test_denied_requests_do_not_extend_the_key(module_redis: RedisServer):  # noqa: F811
    limiter = RedisLimiter(config(module_redis.url, timeout=5))
    client = module_redis.client()
    try:
        key = unique("denied")
        s = spec(1, 60)
        assert (await limiter.decide(key, s)).allowed  # type: ignore[union-attr]
        stored = client.get("meshgate:rl:" + key)
        for _ in range(20):
            assert not (await limiter.decide(key, s)).allowed  # type: ignore[union-attr]
        assert client.get("meshgate:rl:" + key) == stored
    finally:
        client.close()
        await limiter.close()


# ---------------------------------------------------------------------------
# Redis down, slow, back


async def test_redis_down_then_back(redis_server: RedisServer, caplog: pytest.LogCaptureFixture):  # noqa: F811
    caplog.set_level(logging.INFO, logger="meshgate.ratelimit")
    limiter = RedisLimiter(config(redis_server.url, timeout=0.5, down_interval=0.5))
    s = spec(100, 60)
    try:
        assert (await limiter.decide("k", s)).allowed  # type: ignore[union-attr]
        redis_server.stop()

        started = time.monotonic()
        assert await limiter.decide("k", s) is None
        assert time.monotonic() - started < 2.0
        assert limiter.errors == 1

        # Within down_interval: skipped at once, Redis not asked.
        started = time.monotonic()
        for _ in range(50):
            assert await limiter.decide("k", s) is None
        assert time.monotonic() - started < 0.5
        assert (limiter.errors, limiter.skipped) == (1, 50)

        # After it, one more try (still down): one more error.
        await asyncio.sleep(0.6)
        assert await limiter.decide("k", s) is None
        assert limiter.errors == 2

        redis_server.start()  # same port, empty (no persistence)
        await asyncio.sleep(0.6)
        d = await limiter.decide("k", s)
        assert d is not None and d.allowed and d.remaining == 99
        assert limiter.errors == 2
        assert (await limiter.decide("k", s)) is not None

        records = [r for r in caplog.records if r.name == "meshgate.ratelimit"]
        assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
        assert "down" in records[0].getMessage()
        assert "ConnectionError" in records[0].getMessage()
        assert "again" in records[1].getMessage()
    finally:
        await limiter.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


async def test_a_silent_redis_costs_at_most_the_timeout(
    silent_server: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="meshgate.ratelimit")
    limiter = RedisLimiter(config(silent_server, timeout=0.2, down_interval=0.3))
    s = spec(5, 1)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(limiter.decide("k", s) for _ in range(10)))
        assert time.monotonic() - started < 2.0
        assert results == [None] * 10
        assert limiter.errors == 10  # all were in flight when it failed

        # After down_interval a single request probes; the others skip.
        await asyncio.sleep(0.35)
        started = time.monotonic()
        results = await asyncio.gather(*(limiter.decide("k", s) for _ in range(10)))
        assert time.monotonic() - started < 2.0
        assert results == [None] * 10
        assert (limiter.errors, limiter.skipped) == (11, 9)

        records = [r for r in caplog.records if r.name == "meshgate.ratelimit"]
        assert len(records) == 1
        assert records[0].levelno == logging.WARNING
        assert "no answer within 0.2s" in records[0].getMessage()
    finally:
        await limiter.close()


async def test_a_turns_decisions_are_one_script_call_per_algorithm_and_exact(
    module_redis: RedisServer,  # noqa: F811
):
    """Forty decisions asked in one turn, on two keys of each algorithm: one
    batch call per algorithm (INFO commandstats), and exactly the limit
    allowed on every key, in the order they were asked."""
    away_from_window_edge(60)
    limiter = RedisLimiter(config(module_redis.url, timeout=5))
    client = module_redis.client()
    try:
        # One warm-up call per algorithm loads the batch scripts.
        g, w = spec(5, 60), spec(5, 60, algorithm="sliding_window")
        await asyncio.gather(limiter.decide(unique("warm"), g), limiter.decide(unique("warm"), w))
        client.config_resetstat()
        keys = [(unique(f"batch-{i}"), s) for i in range(2) for s in (g, w)]
        asked = [keys[n % 4] for n in range(40)]
        got = await asyncio.gather(*(limiter.decide(k, s) for k, s in asked))
        calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls")
        assert calls == 2, client.info("commandstats")
        for key, s in keys:
            allowed = [d.allowed for (k, _), d in zip(asked, got, strict=True) if k == key]  # type: ignore[union-attr]
            assert allowed == [True] * 5 + [False] * 5, (key, s.algorithm, allowed)
    finally:
        client.close()
        await limiter.close()


def test_which_urls_take_the_pipelined_connection() -> None:
    from meshgate.ratelimit.redis import _pipelinable

    assert _pipelinable("redis://127.0.0.1:6379/0")
    assert _pipelinable("redis://:secret@127.0.0.1:6379/2")
    assert _pipelinable("unix:///run/redis.sock?db=1")
    # TLS and its options, sentinel, cluster, other options: redis-py.
    assert not _pipelinable("rediss://127.0.0.1:6380/0")
    assert not _pipelinable("redis://127.0.0.1:6379/0?socket_keepalive=true")
    assert not _pipelinable("redis+sentinel://127.0.0.1:26379/mymaster")
    assert not _pipelinable("redis+cluster://127.0.0.1:7000")


async def test_a_turn_past_the_batch_size_goes_in_several_calls_and_stays_exact(
    module_redis: RedisServer,  # noqa: F811
):
    from meshgate.ratelimit.redis import MAX_BATCH

    limiter = RedisLimiter(config(module_redis.url, timeout=5))
    client = module_redis.client()
    try:
        g = spec(300, 60)
        await limiter.decide(unique("warm"), g)
        client.config_resetstat()
        key = unique("big")
        got = await asyncio.gather(*(limiter.decide(key, g) for _ in range(2 * MAX_BATCH + 10)))
        calls = client.info("commandstats")["cmdstat_evalsha"]["calls"]
        assert calls == 3
        allowed = [d.allowed for d in got]  # type: ignore[union-attr]
        assert allowed == [True] * 300 + [False] * (2 * MAX_BATCH + 10 - 300)
    finally:
        client.close()
        await limiter.close()
