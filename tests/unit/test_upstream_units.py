"""Unit tests of single upstream classes: balancers, the endpoint pool, the
write batcher. Integration tests prove the behaviour over real sockets; these
pin down the algorithms."""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import pytest

from meshgate.http.batch import WriteBatcher
from meshgate.upstream.balancer import Endpoint, LeastRequest, PeakEwma, RoundRobin
from meshgate.upstream.pool import EndpointPool, PoolTimeout, UpstreamConnection


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def writelines(self, data: Any) -> None:
        self.written.extend(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _endpoints(n: int, pool: Any = None) -> list[Endpoint]:
    return [Endpoint(pool, f"10.0.0.{i}:80".encode()) for i in range(n)]


def test_round_robin_visits_every_endpoint_in_turn() -> None:
    eps = _endpoints(3)
    rr = RoundRobin(eps)
    picks = [rr.pick() for _ in range(9)]
    assert collections.Counter(id(p) for p in picks) == {id(e): 3 for e in eps}
    assert picks[:3] == picks[3:6]


def test_least_request_prefers_the_idle_endpoint() -> None:
    random.seed(7)
    eps = _endpoints(2)
    eps[0].active = 10
    lr = LeastRequest(eps)
    assert all(lr.pick() is eps[1] for _ in range(50))


def test_least_request_never_picks_the_most_loaded_of_three() -> None:
    random.seed(1)
    eps = _endpoints(3)
    eps[0].active, eps[1].active, eps[2].active = 0, 1, 50
    lr = LeastRequest(eps)
    assert all(lr.pick() is not eps[2] for _ in range(200))


def test_peak_ewma_reacts_to_a_slow_response_at_once_and_decays() -> None:
    eps = _endpoints(2)
    ewma = PeakEwma(eps, decay=10.0)
    ewma.observe(eps[0], 0.001, now=0.0)
    ewma.observe(eps[1], 0.001, now=0.0)
    ewma.observe(eps[0], 0.500, now=1.0)  # a peak is taken as is
    assert eps[0].ewma == pytest.approx(0.5)
    assert all(ewma.pick() is eps[1] for _ in range(50))
    ewma.observe(eps[0], 0.001, now=100.0)  # ten decay periods later
    assert eps[0].ewma < 0.01


def _pool(loop: asyncio.AbstractEventLoop, **kw: Any) -> EndpointPool:
    opts: dict[str, Any] = dict(
        host="127.0.0.1",
        port=1,
        max_connections=2,
        max_idle=1,
        idle_timeout=10.0,
        connect_timeout=1.0,
        loop=loop,
    )
    opts.update(kw)
    return EndpointPool(**opts)


def _conn(pool: EndpointPool) -> UpstreamConnection:
    conn = UpstreamConnection(pool)
    conn.transport = FakeTransport()  # type: ignore[assignment]
    pool.open_count += 1
    return conn


async def test_pool_reuses_the_most_recent_idle_connection() -> None:
    pool = _pool(asyncio.get_running_loop(), max_idle=4)
    a, b = _conn(pool), _conn(pool)
    pool.release(a)
    pool.release(b)
    assert pool.take_idle() is b
    assert pool.take_idle() is a
    assert pool.take_idle() is None
    assert a.reused and b.reused


async def test_pool_drops_closed_and_expired_connections() -> None:
    pool = _pool(asyncio.get_running_loop(), max_idle=4, idle_timeout=5.0)
    old, closed = _conn(pool), _conn(pool)
    pool.release(old)
    pool.release(closed)
    closed.transport.closing = True  # type: ignore[union-attr]
    old.idle_since -= 60  # idle for a minute
    assert pool.take_idle() is None
    assert old.transport.closing  # type: ignore[union-attr]


async def test_pool_keeps_at_most_max_idle() -> None:
    pool = _pool(asyncio.get_running_loop(), max_idle=1)
    a, b = _conn(pool), _conn(pool)
    pool.release(a)
    pool.release(b)
    assert len(pool.idle) == 1
    assert b.transport.closing  # type: ignore[union-attr]


async def test_pool_waiter_times_out_when_full() -> None:
    pool = _pool(asyncio.get_running_loop(), max_connections=1)
    _conn(pool)
    assert not pool.has_capacity()
    with pytest.raises(PoolTimeout):
        await pool.wait_for_capacity(0.05)


async def test_pool_waiter_wakes_when_a_connection_closes() -> None:
    pool = _pool(asyncio.get_running_loop(), max_connections=1)
    conn = _conn(pool)
    waiter = asyncio.ensure_future(pool.wait_for_capacity(5.0))
    await asyncio.sleep(0)
    conn.connection_lost(None)
    await asyncio.wait_for(waiter, 1.0)
    assert pool.has_capacity()


async def test_batcher_writes_once_per_loop_turn_in_order() -> None:
    loop = asyncio.get_running_loop()
    pool = _pool(loop)
    pool.batcher = WriteBatcher(loop)
    conn = _conn(pool)
    conn.write(b"a")
    conn.writelines([b"b", b"c"])
    transport = conn.transport
    assert transport.written == []  # type: ignore[union-attr]
    await asyncio.sleep(0)
    assert transport.written == [b"a", b"b", b"c"]  # type: ignore[union-attr]
    conn.write(b"d")
    conn.close()  # close flushes first
    assert transport.written[-1] == b"d"  # type: ignore[union-attr]


async def test_retired_pool_keeps_its_waiters_waiting_for_room() -> None:
    """A reload that changes a pool's settings retires it: requests already
    waiting on it are served when room frees up, not failed."""
    pool = _pool(asyncio.get_running_loop(), max_connections=1)
    busy = _conn(pool)
    waiter = asyncio.ensure_future(pool.wait_for_capacity(5.0))
    await asyncio.sleep(0)
    pool.retire()
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.release(busy)  # a retired pool closes what comes back...
    assert busy.transport.closing  # type: ignore[union-attr]
    busy.connection_lost(None)  # ...and the close makes room
    await asyncio.wait_for(waiter, 1.0)
    assert pool.has_capacity()


async def test_a_cold_pool_opens_at_most_max_connecting_at_once() -> None:
    """A burst on a cold pool waits for the connections being opened (each a
    TLS handshake in the mesh) instead of opening one per request; each
    connect that ends lets the next waiter in. A real server on loopback
    accepts them, slowly."""
    from meshgate.upstream.pool import MAX_CONNECTING

    accepted: list[asyncio.StreamWriter] = []
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(
        lambda r, w: accepted.append(w), "127.0.0.1", 0, backlog=128
    )
    port = server.sockets[0].getsockname()[1]
    pool = _pool(loop, port=port, max_connections=100, connect_timeout=5.0)
    peak = 0
    real_create = loop.create_connection

    async def slow_create(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()  # held, as a slow handshake would be
        return await real_create(*args, **kwargs)

    loop.create_connection = slow_create  # type: ignore[method-assign]

    async def one() -> None:
        nonlocal peak
        while not pool.has_capacity():
            await pool.wait_for_capacity(5.0)
        task = pool.connect()
        peak = max(peak, pool.connecting + 1)
        await task

    try:
        tasks = [asyncio.ensure_future(one()) for _ in range(30)]
        await asyncio.sleep(0.05)
        assert pool.connecting == MAX_CONNECTING
        assert len(pool.waiters) == 30 - MAX_CONNECTING
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert pool.open_count == 30
        assert peak <= MAX_CONNECTING
    finally:
        loop.create_connection = real_create  # type: ignore[method-assign]
        for w in accepted:
            w.close()
        server.close()
        pool.close_idle()
