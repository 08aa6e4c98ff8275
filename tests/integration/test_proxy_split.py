"""Traffic shifting through the real gateway: `split:` weights, `sticky:`
keys, `canary:` matches, the admin's `/routes` counts, and a reload of the
weights under load.

The upstreams' recorded requests are the truth. Many requests go over a few
keep-alive connections, pipelined, from several threads, so that 10,000 of
them take seconds.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from typing import Any

import pytest

from support.client import http_get
from support.proxy import ProxyProcess, Stack, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

NAMES = ("v1", "v2", "v3")
CONSUMERS = [f"c{i}" for i in range(24)]


def api_key(consumer: str) -> str:
    return f"key-{consumer}"


def split(*weights: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"upstream": name, "weight": w} for name, w in weights]


@pytest.fixture(scope="module")
def servers(module_stack: Stack) -> dict[str, UpstreamServer]:
    return {name: module_stack.upstream(name) for name in NAMES}


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, servers: dict[str, UpstreamServer]) -> ProxyProcess:
    canary = [
        {"header": "x-canary", "value": "1", "upstream": "v2"},
        {"cookie": "canary", "upstream": "v2"},  # present, any value
        {"header": "x-beta", "value": "yes", "upstream": "v3"},  # not among the weights
    ]
    routes = [
        {"path": "/r/**", "split": split(("v1", 90), ("v2", 10))},
        {"path": "/zero/**", "split": split(("v1", 1), ("v2", 0))},
        {"path": "/canary/**", "split": split(("v1", 1), ("v2", 0)), "canary": canary},
        {
            "path": "/sticky-canary/**",
            "split": split(("v1", 1), ("v2", 0)),
            "sticky": "header:x-user",
            "canary": canary[:1],
        },
        {"path": "/h/**", "split": split(("v1", 50), ("v2", 50)), "sticky": "header:X-User"},
        {"path": "/c/**", "split": split(("v1", 50), ("v2", 50)), "sticky": "cookie:session"},
        {"path": "/ip/**", "split": split(("v1", 50), ("v2", 50)), "sticky": "ip"},
        {
            "path": "/consumer/**",
            "split": split(("v1", 50), ("v2", 50)),
            "sticky": "consumer",
            "canary": canary[:1],
            "auth": "keys",
        },
        {"path": "/plain/**", "upstream": "v3"},
    ]
    consumers = {
        c: {"api_keys": ["sha256:" + hashlib.sha256(api_key(c).encode()).hexdigest()]}
        for c in CONSUMERS
    }
    return module_stack.proxy(
        {
            "upstreams": {name: upstream_block(servers[name]) for name in NAMES},
            "auth": {"keys": {"type": "api_key"}},
            "consumers": consumers,
            "routes": routes,
        }
    )


@pytest.fixture(autouse=True)
def _clear(servers: dict[str, UpstreamServer]) -> None:
    for s in servers.values():
        s.clear()


# --- a small keep-alive, pipelining client ----------------------------------------------


class Client:
    """One keep-alive connection that sends requests `depth` at a time and
    reads their answers (all framed by content-length)."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the gateway closed the connection")
        self.buf += data

    def response(self) -> tuple[int, dict[str, str]]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        status_line, *lines = head.split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        assert "transfer-encoding" not in headers, head
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._more()
        self.buf = self.buf[length:]
        return int(status_line.split(" ", 2)[1]), headers

    def run(self, path: str, n: int, headers: str = "", depth: int = 16) -> list[str]:
        """`n` GETs; what answered each: the upstream's name, or `status N`."""
        request = f"GET {path} HTTP/1.1\r\nhost: split.test\r\n{headers}\r\n".encode()
        out = []
        while len(out) < n:
            k = min(depth, n - len(out))
            self.sock.sendall(request * k)
            for _ in range(k):
                status, h = self.response()
                out.append(h.get("x-upstream", "?") if status == 200 else f"status {status}")
        return out


def via(port: int, path: str, n: int, headers: str = "", source: str | None = None) -> list[str]:
    client = Client(port, source)
    try:
        return client.run(path, n, headers)
    finally:
        client.close()


def blast(port: int, path: str, n: int, headers: str = "", clients: int = 4) -> Counter[str]:
    """`n` GETs over `clients` connections, one thread each."""
    results: list[list[str]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = via(port, path, n // clients + (i < n % clients), headers)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    seen = Counter(name for r in results for name in r)
    assert sum(seen.values()) == n, seen
    return seen


def recorded(servers: dict[str, UpstreamServer]) -> dict[str, int]:
    return {name: len(s.requests) for name, s in servers.items()}


def route_stats(proxy: ProxyProcess, path: str) -> dict[str, Any]:
    status, body = http_get(proxy.admin_port, "/routes")
    assert status == 200, body
    for route in json.loads(body)["routes"]:
        if route["path"] == path:
            return dict(route)
    raise AssertionError(f"no route {path} in /routes: {body!r}")


# --- weights ---------------------------------------------------------------------------


def test_ten_thousand_requests_split_90_10(
    proxy: ProxyProcess, servers: dict[str, UpstreamServer]
) -> None:
    n = 10_000
    seen = blast(proxy.port, "/r/fixed", n)
    truth = recorded(servers)
    assert truth == {"v1": seen["v1"], "v2": seen["v2"], "v3": 0}, (truth, seen)
    share = truth["v2"] / n
    assert abs(share - 0.10) <= 0.015, truth
    # The admin listener counted the same (one worker).
    stats = route_stats(proxy, "/r/**")
    assert stats["target"] == "split(v1:90, v2:10)"
    backends = {b["upstream"]: (b["weight"], b["requests"]) for b in stats["split"]["backends"]}
    assert backends == {"v1": (90, truth["v1"]), "v2": (10, truth["v2"])}
    assert stats["split"]["requests"] == n
    status, metrics = http_get(proxy.admin_port, "/metrics")
    assert status == 200
    text = metrics.decode()
    for name in ("v1", "v2"):
        # Summed over workers: the figure has no worker label.
        line = f'meshgate_split_requests_total{{route="{stats["route"]}",upstream="{name}"}} '
        assert f"\n{line}{truth[name]}\n" in text, text
        # And the golden signals say the same, by upstream.
        golden = f'meshgate_requests_total{{direction="inbound",route="{stats["route"]}",'
        golden += f'upstream="{name}",'
        rows = [ln for ln in text.splitlines() if ln.startswith(golden)]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in rows) == truth[name], rows


def test_weight_zero_gets_nothing(proxy: ProxyProcess, servers: dict[str, UpstreamServer]) -> None:
    assert blast(proxy.port, "/zero/fixed", 1000) == {"v1": 1000}
    assert recorded(servers) == {"v1": 1000, "v2": 0, "v3": 0}


def test_plain_routes_have_no_split_stats(proxy: ProxyProcess) -> None:
    stats = route_stats(proxy, "/plain/**")
    assert stats == {"route": stats["route"], "path": "/plain/**", "target": "v3"}
    assert via(proxy.port, "/plain/fixed", 3) == ["v3"] * 3


# --- canary ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("x-canary: 1\r\n", "v2"),
        ("x-canary: 2\r\n", "v1"),
        ("cookie: a=b; canary=yes\r\n", "v2"),
        ("cookie: canary=\r\n", "v2"),
        ("cookie: a=b\r\ncookie: canary=1\r\n", "v2"),
        ("cookie: xcanary=1; a=canary\r\n", "v1"),
        ("x-beta: yes\r\n", "v3"),
        ("x-beta: no\r\n", "v1"),
        ("", "v1"),
    ],
)
def test_canary_header_and_cookie_override_the_weights(
    proxy: ProxyProcess, servers: dict[str, UpstreamServer], headers: str, expected: str
) -> None:
    assert via(proxy.port, "/canary/fixed", 50, headers) == [expected] * 50
    assert recorded(servers)[expected] == 50


def test_canary_beats_sticky(proxy: ProxyProcess) -> None:
    assert via(proxy.port, "/sticky-canary/fixed", 20, "x-user: u1\r\nx-canary: 1\r\n") == (
        ["v2"] * 20
    )
    assert via(proxy.port, "/sticky-canary/fixed", 20, "x-user: u1\r\n") == ["v1"] * 20
    stats = route_stats(proxy, "/sticky-canary/**")["split"]
    assert stats["canary"][0]["requests"] >= 20


# --- sticky ----------------------------------------------------------------------------


def _sticky(proxy: ProxyProcess, path: str, keys: list[tuple[str, str | None]]) -> None:
    """The first key, 200 times, on one backend; every key always on the same
    one; the keys together on both."""
    first_headers, first_source = keys[0]
    assert len(set(via(proxy.port, path, 200, first_headers, first_source))) == 1
    landed = []
    for headers, source in keys:
        got = set(via(proxy.port, path, 5, headers, source))
        assert len(got) == 1, (headers, source, got)
        landed.append(got.pop())
    assert set(landed) == {"v1", "v2"}, landed


def test_sticky_header(proxy: ProxyProcess) -> None:
    _sticky(proxy, "/h/fixed", [(f"x-user: user-{i}\r\n", None) for i in range(40)])


def test_sticky_cookie(proxy: ProxyProcess) -> None:
    _sticky(proxy, "/c/fixed", [(f"cookie: theme=dark; session=s{i}\r\n", None) for i in range(40)])


def test_sticky_ip(proxy: ProxyProcess) -> None:
    # Every 127.0.0.0/8 address is loopback: one client address per key.
    _sticky(proxy, "/ip/fixed", [("", f"127.0.0.{i}") for i in range(2, 42)])


def test_sticky_consumer_after_auth(proxy: ProxyProcess) -> None:
    """The key is the consumer the API key identified (every request comes
    from 127.0.0.1), and a canary header still wins."""
    _sticky(proxy, "/consumer/fixed", [(f"x-api-key: {api_key(c)}\r\n", None) for c in CONSUMERS])
    assert via(proxy.port, "/consumer/fixed", 5, "x-canary: 1\r\nx-api-key: key-c0\r\n") == (
        ["v2"] * 5
    )
    assert via(proxy.port, "/consumer/fixed", 3) == ["status 401"] * 3


# --- reload ----------------------------------------------------------------------------


def test_reload_changes_the_weights_under_load_without_a_failure(
    stack: Stack,
) -> None:
    ups = {name: stack.upstream(name) for name in ("v1", "v2")}

    def config(w1: int, w2: int) -> dict[str, Any]:
        return {
            "upstreams": {name: upstream_block(s) for name, s in ups.items()},
            "routes": [{"path": "/**", "split": split(("v1", w1), ("v2", w2))}],
        }

    proxy = stack.proxy(config(90, 10))
    stop = threading.Event()
    # (time sent, who answered) per request, per client connection.
    results: list[list[tuple[float, str]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            client = Client(proxy.port)
            try:
                while not stop.is_set():
                    sent = time.monotonic()
                    results[i] += [(sent, who) for who in client.run("/fixed", 4, depth=4)]
            finally:
                client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        reloading = time.monotonic()
        proxy.reload(config(50, 50))
        proxy.wait_for_log(r"reloaded")
        swapped = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    answers = [r for rs in results for r in rs]
    failed = Counter(who for _, who in answers if who not in ("v1", "v2"))
    assert not failed, failed
    before = [who for sent, who in answers if sent < reloading]
    after = [who for sent, who in answers if sent > swapped]
    assert len(before) > 300 and len(after) > 300, (len(before), len(after))
    # The same keep-alive connections, before and after the swap.
    assert abs(before.count("v2") / len(before) - 0.10) < 0.05, Counter(before)
    assert abs(after.count("v2") / len(after) - 0.50) < 0.08, Counter(after)
    assert sum(len(s.requests) for s in ups.values()) == len(answers)
    # Fresh connections, many requests: the new ratio.
    seen = blast(proxy.port, "/fixed", 4000)
    assert abs(seen["v2"] / 4000 - 0.50) < 0.04, seen
    stats = route_stats(proxy, "/**")["split"]
    assert [(b["upstream"], b["weight"]) for b in stats["backends"]] == [("v1", 50), ("v2", 50)]
