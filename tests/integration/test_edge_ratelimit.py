"""Rate limits at the edge, end to end: real `meshgate run` processes (several
instances, several workers), a real redis-server, real sockets.

- exactness: one Redis shared by two instances of two workers each, and the
  worker-shared table of `policy: local`, both under hundreds of requests in
  flight at once;
- the response fields (RateLimit-Policy, RateLimit, X-RateLimit-*,
  Retry-After, the problem+json body), `headers: false` and `name:`;
- what is counted together (`key:` ip, header, route, default, consumer
  overrides);
- limited requests on one keep-alive connection (pipelined, with bodies);
- `sliding_window` through the gateway;
- Redis stopped and restarted under a steady stream (`on_store_error` allow
  and deny);
- a reload that keeps a limit keeps its count.

Two regressions are pinned: a quiet Redis restart used to make the first
decision fail (stale pooled connections), and inserting a route above an
unnamed one used to move counts between routes (`limit_id` used `routes[i]`).

Limits use periods of an hour or a day on purpose: a GCRA limit of 100/min
refills one request every 600 ms, so a burst that takes longer than that on
a slow machine would (correctly) let a 101st request through. With 100/h the
refill interval is 36 s and "exactly the limit" is deterministic.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.client import IncompleteResponse, RawConnection, parse_response, wait_until
from support.proxy import ProxyProcess, Stack, socket_owners, upstream_block
from support.redis import RedisServer
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

LIMIT_FIELDS = (
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
PROBLEM_BASE = "https://meshgate.dev/problems/"
API_KEYS = {"alice": "ak-alice-7f3a91", "bob": "ak-bob-22c0d4", "big": "ak-big-9e18b6"}
AUTH = {"keys": {"type": "api_key"}}


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def consumers(**extra: dict[str, Any]) -> dict[str, Any]:
    """Every consumer in API_KEYS with its key, plus `extra[name]` fields."""
    return {
        name: {"api_keys": [digest(key)], **extra.get(name, {})} for name, key in API_KEYS.items()
    }


def key_header(consumer: str) -> dict[str, str]:
    return {"X-API-Key": API_KEYS[consumer]}


def route(path: str, rate_limit: dict[str, Any] | str, **options: Any) -> dict[str, Any]:
    return {"path": path, "upstream": "up", "rate_limit": rate_limit, **options}


def gateway(upstream: UpstreamServer, routes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {"upstreams": {"up": upstream_block(upstream)}, "routes": routes, **top}


def redis_block(server: RedisServer, **options: Any) -> dict[str, Any]:
    return {"url": server.url, **options}


# ---------------------------------------------------------------------------
# responses


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    client_port: int = 0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def limit_fields(self) -> list[str]:
        return [name for name in LIMIT_FIELDS if self.header(name) is not None]

    def problem_kind(self) -> str | None:
        """The problem type's last part (`rate-limited`), None unless problem+json."""
        ctype = (self.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/problem+json":
            return None
        doc = json.loads(self.body)
        assert doc.get("status") == self.status, doc
        assert isinstance(doc.get("detail"), str) and doc["detail"], doc
        kind = doc.get("type", "")
        assert kind.startswith(PROBLEM_BASE), doc
        return str(kind[len(PROBLEM_BASE) :])

    def ratelimit(self, policy: str | None = None) -> tuple[int, int]:
        """(r, t) from the RateLimit field, checked against X-RateLimit-*."""
        value = self.header("ratelimit")
        assert value is not None, self.describe()
        m = re.fullmatch(r'"([^"]*)";r=(\d+);t=(\d+)', value)
        assert m is not None, value
        if policy is not None:
            assert m.group(1) == policy, value
        remaining, reset = int(m.group(2)), int(m.group(3))
        assert self.header("x-ratelimit-remaining") == str(remaining), self.describe()
        assert self.header("x-ratelimit-reset") == str(reset), self.describe()
        return remaining, reset

    def policy(self) -> tuple[str, int, int]:
        """(name, q, w) from RateLimit-Policy, q checked against X-RateLimit-Limit."""
        value = self.header("ratelimit-policy")
        assert value is not None, self.describe()
        m = re.fullmatch(r'"([^"]*)";q=(\d+);w=(\d+)', value)
        assert m is not None, value
        assert self.header("x-ratelimit-limit") == m.group(2), self.describe()
        return m.group(1), int(m.group(2)), int(m.group(3))

    def retry_after(self) -> int:
        value = self.header("retry-after")
        assert value is not None and value.isdigit(), self.describe()
        return int(value)

    def describe(self) -> str:
        return f"{self.status} {self.headers} {self.body[:300]!r}"


def get(
    port: int, path: str, headers: dict[str, str] | None = None, *, source: str = "127.0.0.1"
) -> Reply:
    """One GET on a new connection from `source` (any 127.0.0.0/8 address)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], body)
    finally:
        conn.close()


def statuses(port: int, path: str, n: int, headers: dict[str, str] | None = None,
             *, source: str = "127.0.0.1") -> list[int]:  # fmt: skip
    return [get(port, path, headers, source=source).status for _ in range(n)]


@dataclass(frozen=True)
class Req:
    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    source: str = "127.0.0.1"

    def encode(self) -> bytes:
        lines = [f"GET {self.path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    buf = b""
    eof = False
    while True:
        try:
            return parse_response(buf, eof=eof)[0]
        except IncompleteResponse:
            if eof:
                raise
        chunk = await reader.read(65536)
        eof = not chunk
        buf += chunk


async def _burst(reqs: list[Req], while_open: Callable[[list[int]], None] | None) -> list[Reply]:
    opened = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", r.port, local_addr=(r.source, 0)) for r in reqs),
        return_exceptions=True,
    )
    writers = [c[1] for c in opened if isinstance(c, tuple)]
    try:
        failed = [c for c in opened if not isinstance(c, tuple)]
        if failed:
            raise AssertionError(f"{len(failed)} connections failed, first: {failed[0]!r}")

        async def one(req: Req, reader: asyncio.StreamReader, writer: Any) -> Reply:
            writer.write(req.encode())
            await writer.drain()
            resp = await _read_reply(reader)
            headers = [(k.lower(), v) for k, v in resp.headers]
            return Reply(resp.status, headers, resp.body, writer.get_extra_info("sockname")[1])

        # Every connection is open before the first request is written: all
        # of them are in flight together.
        replies = await asyncio.wait_for(
            asyncio.gather(*(one(r, *c) for r, c in zip(reqs, opened, strict=True))),  # type: ignore[misc]
            timeout=60,
        )
        if while_open is not None:
            while_open([r.client_port for r in replies])
        return list(replies)
    finally:
        for w in writers:
            w.close()


def burst(reqs: list[Req], while_open: Callable[[list[int]], None] | None = None) -> list[Reply]:
    """Open one connection per request, then send them all at once; the
    replies in request order. `while_open(client_ports)` runs once every
    reply is in, before the connections are closed."""
    return asyncio.run(_burst(reqs, while_open))


def server_side_owners(proxy: ProxyProcess, client_ports: list[int]) -> dict[int, int]:
    """Client port -> pid of the gateway process holding the accepted socket."""
    return socket_owners(client_ports, proxy.pids(), accepted_on=proxy.port)


def away_from_window_edge(period_s: float, clock: Callable[[], float], margin_s: float) -> None:
    """Sliding windows start at multiples of the period (CLOCK_MONOTONIC for
    `local`, the Redis server's TIME for `redis`; both this host's clocks).
    Wait out an edge so that a burst stays inside one window."""
    left = period_s - clock() % period_s
    if left < margin_s:
        time.sleep(left + 0.05)


def wait_reloaded(proxy: ProxyProcess, count: int) -> None:
    wait_until(
        lambda: proxy.stderr_text().count("reloaded ") >= count,
        timeout=15,
        what=f"{count} 'reloaded' log lines; stderr:\n{proxy.stderr_text()[-2000:]}",
    )


def assert_rate_limited(reply: Reply) -> None:
    assert reply.status == 429, reply.describe()
    assert reply.problem_kind() == "rate-limited", reply.describe()
    assert reply.retry_after() >= 1, reply.describe()


# ---------------------------------------------------------------------------
# 1. exact across instances sharing Redis


@pytest.mark.parametrize(
    ("period", "algorithm"),
    [
        ("1h", "gcra"),
        # The bar's own figure, 100/min: a sliding window counts exactly
        # `limit` in its window however long the burst takes (GCRA would
        # refill one request every 600 ms of it).
        ("1m", "sliding_window"),
    ],
)
def test_redis_limit_is_exact_across_two_instances_of_two_workers(
    stack: Stack, redis_server: RedisServer, period: str, algorithm: str
) -> None:
    up = stack.upstream("up")
    limit = {
        "limit": 100,
        "period": period,
        "key": "api_key",
        "policy": "redis",
        "algorithm": algorithm,
    }
    config = gateway(
        up,
        [route("/orders/**", limit, name="orders", auth="keys")],
        redis=redis_block(redis_server, timeout="2s"),
        auth=AUTH,
        consumers=consumers(),
    )
    a = stack.proxy(config, workers=2)
    b = stack.proxy(config, workers=2)
    window = 3600 if period == "1h" else 60
    if algorithm == "sliding_window":
        away_from_window_edge(window, time.time, margin_s=15)
    reqs = [Req((a, b)[i % 2].port, f"/orders/{i}", key_header("alice")) for i in range(400)]
    replies = burst(reqs)

    assert Counter(r.status for r in replies) == {200: 100, 429: 300}, Counter(
        (r.status, r.problem_kind()) for r in replies
    )
    allowed = [r for r in replies if r.status == 200]
    # Every allowed request was decided by Redis (none waved through on a
    # store error), and each remaining count was handed out exactly once.
    assert sorted(r.ratelimit("orders")[0] for r in allowed) == list(range(100))
    assert all(r.policy() == ("orders", 100, window) for r in allowed)
    for r in replies:
        if r.status == 429:
            assert_rate_limited(r)
            assert r.ratelimit("orders")[0] == 0
    # Each instance answered its half; only the allowed requests reached the upstream.
    assert Counter(r.port for r in reqs) == {a.port: 200, b.port: 200}
    assert len(up.requests) == 100
    assert len({q.path for q in up.requests}) == 100


# ---------------------------------------------------------------------------
# 2. exact across the workers of one instance


def test_local_limit_is_exact_across_two_workers(stack: Stack) -> None:
    up = stack.upstream("up")
    proxy = stack.proxy(gateway(up, [route("/local/**", {"limit": 50, "period": "1h"})]), workers=2)
    owners: dict[int, int] = {}
    replies = burst(
        [Req(proxy.port, f"/local/{i}") for i in range(200)],
        while_open=lambda ports: owners.update(server_side_owners(proxy, ports)),
    )
    assert Counter(r.status for r in replies) == {200: 50, 429: 150}
    assert sorted(r.ratelimit()[0] for r in replies if r.status == 200) == list(range(50))
    for r in replies:
        if r.status == 429:
            assert_rate_limited(r)
    # Both workers answered requests (each connection's accepted socket is
    # held by one worker process): with a table per worker, each of them
    # would have allowed its own 50.
    assert len(owners) == 200, f"found the server side of {len(owners)} of 200 connections"
    per_worker = Counter(owners.values())
    assert len(per_worker) == 2 and proxy.pid not in per_worker, per_worker
    assert len(up.requests) == 50


# ---------------------------------------------------------------------------
# 3 and 4: one single-worker gateway with local limits, shared by the tests
# below (each on routes of its own).


@pytest.fixture(scope="module")
def local_gateway(module_stack: Stack) -> Iterator[ProxyProcess]:
    up = module_stack.upstream("up")
    hour = {"period": "1h"}
    routes = [
        route("/named/**", {"limit": 5, **hour, "name": "orders"}, name="catalog"),
        route("/route-named/**", {"limit": 3, **hour}, name="catalog"),
        route("/unnamed/**", {"limit": 3, **hour}),
        route("/quiet/**", {"limit": 2, **hour, "headers": False}),
        route("/by-ip/**", {"limit": 3, **hour, "key": "ip"}),
        route("/by-tenant/**", {"limit": 3, **hour, "key": "header:X-Tenant"}),
        route("/by-route/**", {"limit": 3, **hour, "key": "route"}),
        route("/default-auth/**", {"limit": 3, **hour}, auth="keys"),
        route("/default-open/**", {"limit": 3, **hour}),
        route("/per-consumer/**", {"limit": 3, **hour, "key": "consumer"}, auth="keys"),
        route("/per-consumer-ip/**", {"limit": 3, **hour, "key": "ip"}, auth="keys"),
        route("/short/**", "3/h"),
    ]
    config = gateway(up, routes, auth=AUTH, consumers=consumers(big={"rate_limit": "10/h"}))
    yield module_stack.proxy(config)


def test_fields_on_allowed_and_limited_responses(local_gateway: ProxyProcess) -> None:
    port = local_gateway.port
    seen = []
    for k in range(1, 6):
        r = get(port, f"/named/{k}")
        assert r.status == 200, r.describe()
        assert r.policy() == ("orders", 5, 3600)  # `name:` beats the route's name
        remaining, reset = r.ratelimit("orders")
        # gcra: 5/h refills one request every 720 s; after k requests the
        # quota is whole again in k * 720 s (less the time these took).
        assert remaining == 5 - k
        assert 720 * (k - 1) < reset <= 720 * k, (k, reset)
        seen.append((remaining, reset))
    assert [r for r, _ in seen] == [4, 3, 2, 1, 0]
    limited = get(port, "/named/6")
    assert_rate_limited(limited)
    assert limited.policy() == ("orders", 5, 3600)
    remaining, reset = limited.ratelimit("orders")
    assert remaining == 0 and 0 < reset <= 3600
    assert 1 <= limited.retry_after() <= 720
    # The 429 tells how many requests per how long.
    assert "5 requests per 3600s" in json.loads(limited.body)["detail"]


def test_policy_name_defaults_to_the_route(local_gateway: ProxyProcess) -> None:
    r = get(local_gateway.port, "/route-named/x")
    assert r.status == 200 and r.policy() == ("catalog", 3, 3600)
    assert r.ratelimit("catalog")[0] == 2
    r = get(local_gateway.port, "/unnamed/x")
    assert r.status == 200 and r.policy() == ("routes[2]", 3, 3600)
    # The short form `3/h` is the same limit.
    r = get(local_gateway.port, "/short/x")
    assert r.status == 200 and r.policy() == ("routes[11]", 3, 3600)


def test_headers_false_sends_no_fields(local_gateway: ProxyProcess) -> None:
    port = local_gateway.port
    for _ in range(2):
        r = get(port, "/quiet/x")
        assert r.status == 200 and r.limit_fields() == [], r.describe()
    limited = get(port, "/quiet/x")
    assert_rate_limited(limited)  # still Retry-After and the problem body
    assert limited.limit_fields() == [], limited.describe()


def test_key_ip_counts_each_client_address(local_gateway: ProxyProcess) -> None:
    port = local_gateway.port
    assert statuses(port, "/by-ip/x", 4) == [200, 200, 200, 429]
    assert statuses(port, "/by-ip/x", 4, source="127.0.0.2") == [200, 200, 200, 429]
    # Neither an API key nor a tenant header makes a client another one.
    assert get(port, "/by-ip/x", {**key_header("bob"), "X-Tenant": "t"}).status == 429


def test_key_header_counts_each_value_and_falls_back_to_the_ip(
    local_gateway: ProxyProcess,
) -> None:
    port = local_gateway.port
    path = "/by-tenant/x"
    assert statuses(port, path, 4, {"X-Tenant": "acme"}) == [200, 200, 200, 429]
    # Another tenant, from the same address: counted separately.
    assert statuses(port, path, 4, {"x-tenant": "globex"}) == [200, 200, 200, 429]
    # Header names are case-insensitive; values are not.
    assert get(port, path, {"X-TENANT": "acme"}).status == 429
    assert get(port, path, {"X-Tenant": "ACME"}).status == 200
    # No header: the client's address is the key, separate from every tenant,
    # even from a tenant whose name is that address.
    assert statuses(port, path, 4) == [200, 200, 200, 429]
    assert get(port, path, {"X-Tenant": "127.0.0.1"}).status == 200
    assert statuses(port, path, 4, source="127.0.0.2") == [200, 200, 200, 429]
    assert get(port, path, {"X-Tenant": "acme"}, source="127.0.0.2").status == 429


def test_key_route_is_shared_by_everyone(local_gateway: ProxyProcess) -> None:
    port = local_gateway.port
    path = "/by-route/x"
    assert get(port, path).status == 200
    assert get(port, path, source="127.0.0.2").status == 200
    assert (
        get(port, path, {"X-Tenant": "a", **key_header("alice")}, source="127.0.0.3").status == 200
    )
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.4"):
        assert_rate_limited(get(port, path, source=source))


def test_default_key_is_the_consumer_else_the_ip(local_gateway: ProxyProcess) -> None:
    port = local_gateway.port
    # Authenticated: each consumer has its own count, from the same address.
    assert statuses(port, "/default-auth/x", 4, key_header("alice")) == [200, 200, 200, 429]
    assert statuses(port, "/default-auth/x", 4, key_header("bob")) == [200, 200, 200, 429]
    assert get(port, "/default-auth/x").status == 401  # no credentials: never counted
    # Without `auth:` there is no consumer: an API key header is just a
    # header, and the address is the key.
    path = "/default-open/x"
    assert get(port, path, key_header("alice")).status == 200
    assert get(port, path, key_header("bob")).status == 200
    assert get(port, path).status == 200
    assert_rate_limited(get(port, path, key_header("big")))
    assert statuses(port, path, 4, key_header("alice"), source="127.0.0.2") == [200] * 3 + [429]


def test_consumer_rate_limit_overrides_the_route(local_gateway: ProxyProcess) -> None:
    port = local_gateway.port
    path = "/per-consumer/x"
    replies = [get(port, path, key_header("big")) for _ in range(11)]
    assert [r.status for r in replies] == [200] * 10 + [429]
    assert all(r.policy()[1:] == (10, 3600) for r in replies)
    assert [r.ratelimit()[0] for r in replies] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    assert_rate_limited(replies[-1])
    # Another consumer keeps the route's limit.
    replies = [get(port, path, key_header("alice")) for _ in range(4)]
    assert [r.status for r in replies] == [200, 200, 200, 429]
    assert all(r.policy()[1:] == (3, 3600) for r in replies)
    # A limit keyed on something else than the consumer ignores the override.
    assert statuses(port, "/per-consumer-ip/x", 4, key_header("big")) == [200, 200, 200, 429]


@pytest.mark.parametrize("policy", ["local", "redis"])
def test_limited_requests_on_one_keepalive_connection(
    stack: Stack, redis_server: RedisServer, policy: str
) -> None:
    """Pipelined requests, a limited request with a body, chunked or with
    `Expect: 100-continue`: answered in order, the body skipped, the
    connection still usable after a body that was sent (Redis decisions are
    awaited; local ones are not). After refusing a body the client was told
    to wait for, the gateway closes: it cannot know whether the body comes."""
    up = stack.upstream("up")
    rl = {"limit": 5, "period": "1h", "key": "route", "policy": policy}
    proxy = stack.proxy(
        gateway(up, [route("/p/**", rl)], redis=redis_block(redis_server, timeout="2s"))
    )
    with RawConnection(proxy.port) as conn:
        conn.send(b"".join(b"GET /p/%d HTTP/1.1\r\nHost: p\r\n\r\n" % i for i in range(8)))
        replies = [conn.read_response() for _ in range(8)]
        # In order: each allowed answer is its own request's.
        for i, r in enumerate(replies):
            assert r.status == 429 or r.header("x-target") == f"/p/{i}", (i, r)
        assert Counter(r.status for r in replies) == {200: 5, 429: 3}
        body = b"x" * 5000
        conn.send(
            b"POST /p/a HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
            + b"POST /p/b HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
            + b"POST /p/c HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        for expect_continue in (False, False, True):
            r = conn.read_response()
            assert r.status == 429 and r.interim == [], r
            closes = (r.header("connection") or "").lower() == "close"
            assert closes == expect_continue, r
        rest = conn.read_until_closed(timeout=5)
        assert rest.closed and rest == b"", rest
    # Only the allowed requests went upstream; no limited body did.
    allowed = sorted(r.header("x-target") or "" for r in replies if r.status == 200)
    assert sorted(q.target for q in up.requests) == allowed
    assert all(q.method == "GET" for q in up.requests)


# ---------------------------------------------------------------------------
# 5. sliding_window


@pytest.mark.parametrize("policy", ["local", "redis"])
def test_sliding_window_burst_allows_exactly_the_limit(
    stack: Stack, redis_server: RedisServer, policy: str
) -> None:
    up = stack.upstream("up")
    rl = {"limit": 20, "period": "24h", "algorithm": "sliding_window", "policy": policy}
    config = gateway(
        up,
        [route("/window/**", rl, name="window")],
        redis=redis_block(redis_server, timeout="2s"),
    )
    proxy = stack.proxy(config, workers=2)
    clock = time.monotonic if policy == "local" else time.time
    away_from_window_edge(86_400, clock, margin_s=30)
    replies = burst([Req(proxy.port, f"/window/{i}") for i in range(60)])
    assert Counter(r.status for r in replies) == {200: 20, 429: 40}
    allowed = [r for r in replies if r.status == 200]
    assert sorted(r.ratelimit("window")[0] for r in allowed) == list(range(20))
    for r in replies:
        assert r.policy() == ("window", 20, 86_400)
        # sliding_window: t is the time left in the current window.
        assert 0 < r.ratelimit("window")[1] <= 86_400
        if r.status == 429:
            assert_rate_limited(r)
    assert len(up.requests) == 20


# ---------------------------------------------------------------------------
# 6. Redis stopped and restarted under load


class Stream:
    """A few clients sending requests in a loop (keep-alive, a short pause
    between requests) until stopped or `cap` requests each."""

    def __init__(self, port: int, path: str, clients: int = 3, cap: int = 800) -> None:
        self.port = port
        self.path = path
        self.cap = cap
        self.records: list[tuple[float, float, Reply | str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, client: int) -> None:
        conn: http.client.HTTPConnection | None = None
        for n in range(self.cap):
            if self._stop.is_set():
                break
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            started = time.monotonic()
            outcome: Reply | str
            try:
                conn.request("GET", f"{self.path}{client}-{n}")
                resp = conn.getresponse()
                body = resp.read()
                outcome = Reply(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], body)
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"client {client} request {n}: {exc!r}"
                conn.close()
                conn = None
            with self._lock:
                self.records.append((started, time.monotonic(), outcome))
            self._stop.wait(0.01)
        if conn is not None:
            conn.close()

    def replies(
        self, started_after: float = 0.0, ended_before: float = float("inf")
    ) -> list[Reply]:
        with self._lock:
            records = list(self.records)
        return [
            r
            for s, e, r in records
            if isinstance(r, Reply) and s >= started_after and e <= ended_before
        ]

    def failures(self) -> list[str]:
        with self._lock:
            return [r for _, _, r in self.records if isinstance(r, str)]


@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_redis_stop_and_restart_under_load(
    stack: Stack, redis_server: RedisServer, on_error: str
) -> None:
    up = stack.upstream("up")
    common = {"period": "1h", "key": "route", "policy": "redis", "on_store_error": on_error}
    config = gateway(
        up,
        [
            route("/stream/**", {"limit": 1_000_000, **common}, name="stream"),
            route("/small/**", {"limit": 5, **common}, name="small"),
        ],
        redis=redis_block(redis_server, timeout="300ms", down_interval="500ms"),
    )
    proxy = stack.proxy(config)

    def decided(r: Reply) -> bool:
        return r.status == 200 and r.header("ratelimit") is not None

    with Stream(proxy.port, "/stream/") as stream:
        wait_until(
            lambda: sum(map(decided, stream.replies())) >= 30, timeout=20, what="30 decisions"
        )
        redis_server.stop()
        outage_start = time.monotonic()
        wait_until(
            lambda: len(stream.replies(started_after=outage_start)) >= 45,
            timeout=20,
            what="45 answers while Redis is down",
        )
        outage_end = time.monotonic()
        redis_server.start()  # same port, empty
        # Back to Redis decisions once the gateway has probed it again.
        wait_until(
            lambda: any(map(decided, stream.replies(started_after=outage_end))),
            timeout=20,
            what="a decision by Redis after its restart",
        )
    assert stream.failures() == [], stream.failures()[:5]
    everything = stream.replies()
    assert everything and all(r.status < 500 for r in everything), Counter(
        r.status for r in everything
    )

    during = stream.replies(started_after=outage_start, ended_before=outage_end)
    assert len(during) >= 30
    kinds = Counter((r.status, r.problem_kind()) for r in during)
    if on_error == "allow":
        # Waved through, and nothing claims a count it does not know.
        assert kinds == {(200, None): len(during)}, kinds
        assert all(r.limit_fields() == [] for r in during)
        assert {r.status for r in everything} == {200}
    else:
        assert kinds == {(429, "rate-limit-unavailable"): len(during)}, kinds
        assert all(r.retry_after() >= 1 for r in during)
        assert {r.status for r in everything} <= {200, 429}

    # Once a request on its own (the pool's most recently used connection,
    # which the probe reconnected) is decided by Redis again, limiting works
    # again, on an empty Redis: exactly the limit passes. (Concurrent requests
    # right after the restart may still pick up connections from before it:
    # see test_first_decision_after_a_redis_restart_is_made_by_redis.)
    wait_until(
        lambda: decided(get(proxy.port, "/stream/probe")),
        timeout=20,
        interval=0.1,
        what="a decision by Redis on a lone request",
    )
    replies = [get(proxy.port, f"/small/{i}") for i in range(10)]
    assert [r.status for r in replies] == [200] * 5 + [429] * 5, [r.describe() for r in replies]
    assert [r.ratelimit("small")[0] for r in replies[:5]] == [4, 3, 2, 1, 0]
    for r in replies[5:]:
        assert_rate_limited(r)
    proxy.wait_for_log(r"rate limit store redis is down")
    proxy.wait_for_log(r"rate limit store redis answers again")


def test_first_decision_after_a_redis_restart_is_made_by_redis(
    stack: Stack, redis_server: RedisServer
) -> None:
    up = stack.upstream("up")
    rl = {"limit": 5, "period": "1h", "key": "route", "policy": "redis", "on_store_error": "deny"}
    proxy = stack.proxy(
        gateway(
            up,
            [route("/q/**", rl, name="q")],
            redis=redis_block(redis_server, timeout="2s", down_interval="30s"),
        )
    )
    first = get(proxy.port, "/q/1")
    assert first.status == 200 and first.ratelimit("q")[0] == 4, first.describe()
    # A restart while the gateway is idle: it answers PING again before
    # start() returns, and the gateway never saw it gone.
    redis_server.stop()
    redis_server.start()
    after = get(proxy.port, "/q/2")
    assert after.status == 200, after.describe()
    assert after.ratelimit("q")[0] == 4  # an empty Redis: a fresh count


# ---------------------------------------------------------------------------
# 7. reload


@pytest.mark.parametrize(
    ("policy", "workers", "via"),
    [("local", 2, "sighup"), ("local", None, "edit"), ("redis", 2, "sighup")],
    ids=["local-2workers-sighup", "local-1worker-edit", "redis-2workers-sighup"],
)
def test_reload_with_the_same_limit_keeps_the_count(
    stack: Stack, redis_server: RedisServer, policy: str, workers: int | None, via: str
) -> None:
    up = stack.upstream("up")
    redis = redis_block(redis_server, timeout="2s")

    def config(limit: int, *, extra_route: bool) -> dict[str, Any]:
        routes = [
            route("/counted/**", {"limit": limit, "period": "1h", "key": "route", "policy": policy})
        ]
        if extra_route:
            routes.append({"path": "/added/**", "upstream": "up"})
        return gateway(up, routes, redis=redis)

    proxy = stack.proxy(config(5, extra_route=False), workers=workers)
    processes = workers or 1
    replies = [get(proxy.port, f"/counted/{i}") for i in range(3)]
    assert [r.ratelimit()[0] for r in replies if r.status == 200] == [4, 3, 2]

    proxy.reload(config(5, extra_route=True), via=via)
    wait_reloaded(proxy, processes)
    assert get(proxy.port, "/added/x").status == 200  # the new config is in use
    replies = [get(proxy.port, f"/counted/{i}") for i in range(3, 6)]
    assert [r.status for r in replies] == [200, 200, 429], [r.describe() for r in replies]
    assert [r.ratelimit()[0] for r in replies] == [1, 0, 0]

    # A different limit is a different count (documented on `limit_id`).
    proxy.reload(config(7, extra_route=True), via=via)
    wait_reloaded(proxy, 2 * processes)
    assert statuses(proxy.port, "/counted/x", 8) == [200] * 7 + [429]


def test_reload_inserting_a_route_does_not_move_counts_between_routes(stack: Stack) -> None:
    up = stack.upstream("up")
    a = route("/a/**", {"limit": 3, "period": "1h", "key": "route"})
    b = route("/b/**", {"limit": 3, "period": "1h", "key": "route"})
    proxy = stack.proxy(gateway(up, [a, b]))
    assert statuses(proxy.port, "/b/x", 4) == [200, 200, 200, 429]
    proxy.reload(gateway(up, [{"path": "/new/**", "upstream": "up"}, a, b]))
    wait_reloaded(proxy, 1)
    assert get(proxy.port, "/new/x").status == 200
    # /a and /b are unchanged: /a was never used, /b is spent.
    assert get(proxy.port, "/a/x").status == 200
    assert get(proxy.port, "/b/x").status == 429
