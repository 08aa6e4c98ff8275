"""The buffered upstream client (`meshgate.upstream.client.send`), over real sockets.

The upstreams are the recording test servers of `support.upstream`, on their
own threads; the client runs on the test's event loop with a real `Cluster`
built from an `UpstreamConfig`. Nothing here blocks the test's loop while
waiting for an upstream (the client's writes leave on that loop): waits poll
with `asyncio.sleep`. Timings are asserted only as generous upper bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop

from meshgate.config.schema import RetryConfig, UpstreamConfig
from meshgate.upstream.client import Response, UpstreamFailure, send
from meshgate.upstream.cluster import Cluster, PoolRegistry
from meshgate.upstream.retry import RetryPolicy
from support.client import free_port
from support.upstream import UpstreamServer, iter_pattern

MakeCluster = Callable[..., Cluster]


@pytest.fixture
async def make_cluster() -> AsyncIterator[MakeCluster]:
    """`make_cluster(*servers_or_addresses, **upstream_options)`: a cluster
    named `up`; its pools' idle connections are closed at teardown."""
    registries: list[PoolRegistry] = []

    def make(*servers: UpstreamServer | str, **options: Any) -> Cluster:
        registry = PoolRegistry(asyncio.get_running_loop())
        registries.append(registry)
        endpoints = [s if isinstance(s, str) else s.address for s in servers]
        cfg = UpstreamConfig.model_validate({"endpoints": endpoints, **options})
        return Cluster("up", cfg, registry)

    yield make
    for registry in registries:
        registry.close_idle()
    await asyncio.sleep(0.01)  # let the transports close


def _policy(**options: Any) -> RetryPolicy:
    options.setdefault("backoff", {"base": "1ms", "max": "5ms"})
    return RetryPolicy(RetryConfig.model_validate(options))


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _get(cluster: Cluster, target: str, **kwargs: Any) -> Response:
    kwargs.setdefault("host", b"api.example")
    kwargs.setdefault("timeout", 10.0)
    return await send(cluster, b"GET", target.encode(), [], **kwargs)


def _doc(resp: Response) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(resp.body)
    return doc


def _sent(doc: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in doc["headers"] if k.lower() == name]


def _settled(cluster: Cluster) -> None:
    """Nothing of a finished call is still counted."""
    assert cluster.active == 0
    assert cluster.pending == 0
    assert cluster.retries_active == 0
    assert [ep.active for ep in cluster.endpoints] == [0] * len(cluster.endpoints)


async def _closed(cluster: Cluster) -> None:
    """Every connection of the cluster was closed (an aborted one goes a
    loop turn or so later)."""
    await _until(lambda: all(p.open_count == 0 for p in cluster.pools()), "connections to close")


# -- requests and responses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("preserve", "api.example"), ("rewrite", "127.0.0.1:{port}"), ("v.example", "v.example")],
)
async def test_get_returns_the_json_answer_with_clean_headers(
    make_upstream: Callable[..., UpstreamServer],
    make_cluster: MakeCluster,
    policy: str,
    expected: str,
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up, host=policy)
    resp = await send(
        cluster,
        b"GET",
        b"/echo?x=1",
        [
            (b"Accept", b"application/json"),
            (b"Host", b"caller.example"),  # written by the client, not copied
            (b"content-length", b"5"),
            (b"x-meshgate-deadline", b"1"),
            (b"Transfer-Encoding", b"chunked"),
        ],
        host=b"api.example",
        timeout=5.0,
    )
    assert resp.status == 200
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"Content-Type") == b"application/json"
    assert resp.header(b"x-upstream") == b"up"
    names = [name for name, _ in resp.headers]
    assert names == [n.lower() for n in names]
    assert b"content-length" not in names and b"connection" not in names
    doc = _doc(resp)
    assert doc["method"] == "GET"
    assert doc["target"] == "/echo?x=1"
    assert doc["framing"] == "none"
    assert _sent(doc, "host") == [expected.format(port=up.port)]
    assert _sent(doc, "accept") == ["application/json"]
    assert _sent(doc, "content-length") == []
    assert _sent(doc, "transfer-encoding") == []
    (deadline,) = _sent(doc, "x-meshgate-deadline")
    assert 0 < int(deadline) <= 5000
    _settled(cluster)


async def test_post_body_arrives_whole_with_a_content_length(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    body = os.urandom(300_000)
    resp = await send(
        cluster,
        b"POST",
        b"/echo",
        [(b"content-type", b"application/octet-stream")],
        body,
        host=b"h",
        timeout=10.0,
    )
    doc = _doc(resp)
    assert resp.status == 200
    assert doc["framing"] == "length"
    assert _sent(doc, "content-length") == [str(len(body))]
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["body_complete"] is True
    # An empty POST still says so; an empty DELETE does not.
    empty = _doc(await send(cluster, b"POST", b"/echo", [], host=b"h", timeout=10.0))
    assert _sent(empty, "content-length") == ["0"]
    gone = _doc(await send(cluster, b"DELETE", b"/echo", [], host=b"h", timeout=10.0))
    assert _sent(gone, "content-length") == []
    _settled(cluster)


async def test_keep_alive_connection_is_reused_across_calls(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    pool = cluster.endpoints[0].pool
    first = _doc(await _get(cluster, "/echo"))
    assert pool.stats()["open"] == 1 and pool.stats()["idle"] == 1
    second = _doc(await _get(cluster, "/echo"))
    assert second["conn_id"] == first["conn_id"]
    assert second["seq"] == 1
    assert up.connection_count == 1
    assert pool.stats()["open"] == 1 and pool.stats()["idle"] == 1
    _settled(cluster)


async def test_head_204_and_304_have_empty_bodies_and_keep_the_connection(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    head = await send(cluster, b"HEAD", b"/download?size=5000", [], host=b"h", timeout=10.0)
    assert (head.status, head.body) == (200, b"")
    assert head.header(b"content-type") == b"application/octet-stream"
    no_content = await _get(cluster, "/status/204")
    assert (no_content.status, no_content.body) == (204, b"")
    not_modified = await _get(cluster, "/status/304?cl=5")
    assert (not_modified.status, not_modified.body) == (304, b"")
    assert not_modified.header(b"etag") == b'"v1"'
    after = _doc(await _get(cluster, "/echo"))
    assert after["seq"] == 3  # all on one connection, framing kept in step
    assert up.connection_count == 1
    _settled(cluster)


@pytest.mark.parametrize("mode", ["chunked", "close"])
async def test_chunked_and_close_delimited_bodies_are_read_whole(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster, mode: str
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    resp = await _get(cluster, f"/download?size=200000&mode={mode}")
    assert resp.status == 200
    assert resp.body == b"".join(iter_pattern(200000))
    assert resp.header(b"transfer-encoding") is None
    _settled(cluster)


async def test_5xx_and_429_are_returned_not_raised(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    for code in (500, 503, 429):
        resp = await _get(cluster, f"/status/{code}?retry_after=1")
        assert resp.status == code
        assert resp.body == f"status {code}\n".encode()
        assert resp.header(b"retry-after") == b"1"
    _settled(cluster)


async def test_a_head_that_would_smuggle_is_refused_before_sending(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    with pytest.raises(ValueError):
        await send(cluster, b"GET", b"/", [(b"x", b"a\r\nevil: 1")], host=b"h", timeout=5.0)
    with pytest.raises(ValueError):
        await send(cluster, b"GET", b"/ HTTP/1.1\r\n", [], host=b"h", timeout=5.0)
    with pytest.raises(ValueError):
        await send(cluster, b"GET", b"/", [], host=b"h\r\nx: y", timeout=5.0)
    assert up.connection_count == 0
    _settled(cluster)


# -- failures ------------------------------------------------------------------------


async def test_connection_refused_everywhere_is_a_503(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(f"127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamFailure) as info:
        await _get(cluster, "/")
    assert info.value.status == 503
    assert info.value.kind == "upstream-unavailable"
    assert "accepts connections" in info.value.detail
    _settled(cluster)
    assert cluster.endpoints[0].pool.open_count == 0


async def test_a_refused_endpoint_is_retried_on_the_live_one(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(
        f"127.0.0.1:{free_port()}",
        up,
        retry={"on": ["connect-failure"], "backoff": {"base": "1ms"}},
    )
    for _ in range(4):
        assert (await _get(cluster, "/echo")).status == 200
    # The dead one leaves rotation on its first refused connect: one retry.
    assert cluster.retried == 1
    _settled(cluster)


async def test_slow_upstream_is_a_504_within_the_timeout(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    start = time.monotonic()
    with pytest.raises(UpstreamFailure) as info:
        await _get(cluster, "/slow?headers_delay=5", timeout=0.5)
    elapsed = time.monotonic() - start
    assert (info.value.status, info.value.kind) == (504, "upstream-timeout")
    assert 0.4 <= elapsed < 3.0, elapsed
    (rec,) = up.requests
    assert 0 < int(rec.header("x-meshgate-deadline") or 0) <= 500
    _settled(cluster)
    await _closed(cluster)  # the connection was reset, not pooled


async def test_a_per_try_timeout_is_retried_on_another_endpoint(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    slow = make_upstream("slow")
    slow.forced = ("slow", {"headers_delay": "5"})
    fast = make_upstream("fast")
    cluster = make_cluster(slow, fast)
    policy = _policy(on=["timeout"], attempts=2, per_try_timeout="300ms")
    # Round robin: one of the two calls tries the slow endpoint first.
    for _ in range(2):
        resp = await _get(cluster, "/echo", retry=policy, timeout=10.0)
        assert resp.status == 200
        assert resp.header(b"x-upstream") == b"fast"
    assert len(slow.requests) == 1
    assert cluster.retried == 1
    # The try's own deadline went to the next hop, not the call's.
    assert 0 < int(slow.requests[0].header("x-meshgate-deadline") or 0) <= 300
    _settled(cluster)


async def test_503_is_retried_on_another_endpoint(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    bad = make_upstream("bad")
    bad.forced = ("status", {"code": "503"})
    good = make_upstream("good")
    cluster = make_cluster(bad, good, retry={"on": ["503"], "backoff": {"base": "1ms"}})
    for _ in range(2):
        resp = await _get(cluster, "/echo")
        assert resp.status == 200
        assert resp.header(b"x-upstream") == b"good"
    # One call tried the bad endpoint first (and it was shunned after).
    assert len(bad.requests) == 1
    assert cluster.retried == 1
    _settled(cluster)
    # The dropped answer's connection was reset, not pooled.
    (bad_ep,) = [e for e in cluster.endpoints if e.pool.port == bad.port]
    await _until(lambda: bad_ep.pool.open_count == 0, "the dropped answer's connection")


async def test_a_sent_post_is_not_retried(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    ups = [make_upstream("a"), make_upstream("b")]
    for up in ups:
        up.forced = ("close", {})
    cluster = make_cluster(*ups)
    policy = _policy(on=["reset", "gateway-error"], attempts=3)
    with pytest.raises(UpstreamFailure) as info:
        await send(
            cluster, b"POST", b"/orders", [], b'{"n": 1}', host=b"h", timeout=10.0, retry=policy
        )
    assert (info.value.status, info.value.kind) == (502, "upstream-reset")
    assert sum(len(up.requests) for up in ups) == 1
    assert cluster.retried == 0
    # The same failure on a GET is retried, up to the attempts.
    with pytest.raises(UpstreamFailure):
        await _get(cluster, "/orders", retry=policy)
    assert sum(len(up.requests) for up in ups) == 1 + 3
    assert cluster.retried == 2
    # A 503 answer to a POST is returned as it is.
    for up in ups:
        up.forced = ("status", {"code": "503"})
    resp = await send(
        cluster, b"POST", b"/orders", [], b"{}", host=b"h", timeout=10.0, retry=policy
    )
    assert resp.status == 503
    assert sum(len(up.requests) for up in ups) == 1 + 3 + 1
    _settled(cluster)


async def test_a_stale_pooled_connection_is_retried_once_on_a_new_one(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)  # no retry policy: this is not a retry
    assert _doc(await _get(cluster, "/close-reused"))["seq"] == 0
    # The pooled connection now reads the request and closes unanswered.
    doc = _doc(await _get(cluster, "/close-reused"))
    assert doc["seq"] == 0
    assert len(up.requests) == 3
    assert up.connection_count == 2
    assert cluster.retried == 0
    _settled(cluster)


async def test_a_malformed_response_is_a_502(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    with pytest.raises(UpstreamFailure) as info:
        await _get(cluster, "/bad-response?kind=garbage")
    assert (info.value.status, info.value.kind) == (502, "upstream-bad-response")
    _settled(cluster)
    await _closed(cluster)


@pytest.mark.parametrize("mode", ["length", "chunked", "close"])
async def test_a_body_past_max_body_is_a_502(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster, mode: str
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    exact = await _get(cluster, f"/download?size=1000&mode={mode}", max_body=1000)
    assert len(exact.body) == 1000
    with pytest.raises(UpstreamFailure) as info:
        await _get(cluster, f"/download?size=100000&mode={mode}", max_body=1000)
    assert (info.value.status, info.value.kind) == (502, "upstream-body-too-large")
    _settled(cluster)
    await _closed(cluster)  # not pooled with the rest of the body unread


# -- circuit breakers and cancellation ------------------------------------------------


async def test_max_requests_refuses_with_503(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up, circuit_breaker={"max_requests": 1})
    first = asyncio.create_task(_get(cluster, "/slow?headers_delay=0.5"))
    await _until(lambda: len(up.requests) == 1, "the first request")
    with pytest.raises(UpstreamFailure) as info:
        await _get(cluster, "/echo")
    assert (info.value.status, info.value.kind) == (503, "upstream-overloaded")
    assert "max_requests" in info.value.detail
    assert cluster.overloaded == 1
    assert (await first).status == 200
    assert len(up.requests) == 1
    _settled(cluster)


async def test_max_pending_refuses_with_503(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up, pool={"max_connections": 1}, circuit_breaker={"max_pending": 0})
    first = asyncio.create_task(_get(cluster, "/slow?headers_delay=0.5"))
    await _until(lambda: len(up.requests) == 1, "the first request")
    with pytest.raises(UpstreamFailure) as info:
        await _get(cluster, "/echo")
    assert (info.value.status, info.value.kind) == (503, "upstream-overloaded")
    assert "max_pending" in info.value.detail
    assert (await first).status == 200
    _settled(cluster)


async def test_a_call_waiting_for_a_full_pool_gets_the_freed_connection(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up, pool={"max_connections": 1, "acquire_timeout": "10s"})
    first = asyncio.create_task(_get(cluster, "/slow?headers_delay=0.3"))
    await _until(lambda: len(up.requests) == 1, "the first request")
    second = asyncio.create_task(_get(cluster, "/echo"))
    await _until(lambda: cluster.pending == 1, "the second call to wait")
    assert (await first).status == 200
    assert _doc(await second)["seq"] == 1  # on the connection the first released
    assert up.connection_count == 1
    _settled(cluster)


async def test_cancelling_mid_flight_gives_everything_back(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up)
    task = asyncio.create_task(_get(cluster, "/slow?headers_delay=5"))
    await _until(lambda: len(up.requests) == 1, "the request")
    assert cluster.active == 1 and cluster.endpoints[0].active == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _settled(cluster)
    await _closed(cluster)
    await _until(lambda: all(c.closed for c in up.connections), "the upstream to see the reset")


async def test_cancelling_a_call_waiting_for_a_connection(
    make_upstream: Callable[..., UpstreamServer], make_cluster: MakeCluster
) -> None:
    up = make_upstream("up")
    cluster = make_cluster(up, pool={"max_connections": 1, "acquire_timeout": "10s"})
    first = asyncio.create_task(_get(cluster, "/slow?headers_delay=5"))
    await _until(lambda: len(up.requests) == 1, "the first request")
    second = asyncio.create_task(_get(cluster, "/echo"))
    await _until(lambda: cluster.pending == 1, "the second call to wait")
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert cluster.pending == 0 and cluster.active == 1
    assert not cluster.endpoints[0].pool.waiters
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    _settled(cluster)
    await _closed(cluster)
    assert len(up.requests) == 1


def test_under_uvloop(make_upstream: Callable[..., UpstreamServer]) -> None:
    """The production loop: a reused connection, a timeout, a cancellation."""
    up = make_upstream("up")

    async def main() -> None:
        registry = PoolRegistry(asyncio.get_running_loop())
        cfg = UpstreamConfig.model_validate({"endpoints": [up.address]})
        cluster = Cluster("up", cfg, registry)
        try:
            a = _doc(await _get(cluster, "/echo"))
            b = _doc(
                await send(cluster, b"POST", b"/echo", [], b"x" * 70000, host=b"h", timeout=10.0)
            )
            assert (a["conn_id"], b["seq"], b["body_len"]) == (b["conn_id"], 1, 70000)
            with pytest.raises(UpstreamFailure) as info:
                await _get(cluster, "/slow?headers_delay=5", timeout=0.3)
            assert info.value.status == 504
            task = asyncio.create_task(_get(cluster, "/slow?headers_delay=5"))
            await _until(lambda: len(up.requests) == 4, "the request")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            _settled(cluster)
            await _closed(cluster)
        finally:
            registry.close_idle()

    uvloop.run(main())
