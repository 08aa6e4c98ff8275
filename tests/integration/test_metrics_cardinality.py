"""The cardinality of /metrics is bounded by construction, idle series
expire, and N workers answer one exact scrape.

- 10,000 requests with random paths (under a route and outside every
  route), Host headers, methods (non-standard ones too), query strings and
  forwarded or identity-looking headers add no series: labels come from
  config names and identities only.
- With `metrics: {idle_expiry: 2s}` and 2 workers, a series idle past the
  expiry disappears while a busy one stays, and no busy series ever goes
  down between scrapes (a group is dropped only once idle in every worker,
  and only whole).
- N requests over fresh connections, spread over both workers: one
  scrape shows exactly N.
"""

from __future__ import annotations

import http.client
import random
import socket
import string
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.client import fetch, wait_until
from support.proxy import ProxyProcess, Stack, descendants, socket_owners

pytestmark = pytest.mark.engine

# Parsed by the gateway (llhttp): the standard ones, and some it knows
# that are not ("other"); FOO and BREW it refuses (400, then it closes).
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "PURGE")
UNPARSED = ("FOO", "BREW")
_ALNUM = string.ascii_letters + string.digits


Series = dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]]


def scrape(proxy: ProxyProcess) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """/metrics parsed: family -> {(sample name, labels): value}."""
    r = fetch(proxy.admin_url("/metrics"))
    assert r.status == 200, r.body
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(r.body.decode()):
        rows = out.setdefault(family.name, {})
        for s in family.samples:
            rows[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(metrics: dict[str, dict[Any, float]]) -> Series:
    return {name: set(rows) for name, rows in metrics.items()}


def requests_by(metrics: dict[str, dict[Any, float]], *names: str) -> Counter[tuple[str, ...]]:
    out: Counter[tuple[str, ...]] = Counter()
    for (_, labels), v in metrics.get("meshgate_requests", {}).items():
        d = dict(labels)
        out[tuple(d[n] for n in names)] += int(v)
    return out


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(rng.randint(1, n)))


def random_request(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    """A method, a target and headers, all random but parseable."""
    segments = [_word(rng, 12) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.3:
        segments.append(rng.choice(("%20", "%41", "%7E", "%C3%A9", "a%2Bb")))
    path = "/" + "/".join(segments)
    if rng.random() < 0.6:
        path = "/api" + path  # under the route; else outside every route
    if rng.random() < 0.7:
        path += "?" + "&".join(
            f"{_word(rng, 6)}={_word(rng, 20)}" for _ in range(rng.randint(1, 4))
        )
    host = ".".join(_word(rng, 10).lower() for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.3:
        host += f":{rng.randint(1, 65535)}"
    elif rng.random() < 0.2:
        host = f"{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.1"
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    who = f"spiffe://{_word(rng, 8)}.test/ns/{_word(rng, 6)}/sa/{_word(rng, 8)}"
    headers = {"Host": host}
    for name, value in (
        ("x-forwarded-for", ip),
        ("x-forwarded-host", _word(rng, 12) + ".example"),
        ("x-forwarded-proto", rng.choice(("http", "https", _word(rng, 5)))),
        ("x-forwarded-client-cert", f"By={who};URI={who}"),
        ("x-spiffe-id", who),
        ("x-client-id", _word(rng, 16)),
        ("x-consumer", _word(rng, 10)),
        ("x-request-id", _word(rng, 32)),
        ("user-agent", _word(rng, 20)),
    ):
        if rng.random() < 0.5:
            headers[name] = value
    return rng.choice(METHODS), path, headers


def unparsed(proxy: ProxyProcess, method: str, path: str) -> None:
    """A request the gateway cannot parse (an unknown method), on a
    connection of its own: answered 400, then closed."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x.test\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data[:200]


def test_random_paths_hosts_methods_and_headers_add_no_series(stack: Stack) -> None:
    up = stack.upstream("up")
    proxy = stack.proxy(
        {
            "upstreams": {"up": {"endpoints": [up.address]}},
            "routes": [{"name": "api", "path": "/api/**", "upstream": "up"}],
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    sent: Counter[tuple[str, str]] = Counter()

    def send(method: str, path: str, headers: dict[str, str]) -> None:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 404), (method, path, resp.status)
        assert not resp.will_close
        sent[("api" if path.startswith("/api/") else "(none)", str(resp.status))] += 1

    # The first few: every method, on the route and off it, and an
    # unparseable one.
    for method in METHODS:
        send(method, "/api/first", {"Host": "first.test"})
        send(method, "/first", {"Host": "first.test"})
    unparsed(proxy, "FOO", "/api/first")
    before = scrape(proxy)
    rng = random.Random(14)
    started = time.monotonic()
    for _ in range(10_000):
        send(*random_request(rng))
    for method in UNPARSED:
        for _ in range(10):
            unparsed(proxy, method, "/api/" + _word(rng, 20))
    elapsed = time.monotonic() - started
    conn.close()
    after = scrape(proxy)
    assert series(after) == series(before), "new series:\n" + "\n".join(
        f"{name}: {sorted(set(after[name]) - set(before.get(name, {})))[:5]}"
        for name in after
        if set(after[name]) != set(before.get(name, {}))
    )
    # ... and every request is in them, under the route's name or "(none)".
    got = requests_by(after, "route", "code")
    assert got[("(none)", "400")] == 21
    del got[("(none)", "400")]
    assert got == sent, (got, sent)
    assert sum(sent.values()) == 10_000 + 2 * len(METHODS)
    assert elapsed < 90, f"10,000 requests took {elapsed:.1f}s"


class Fresh:
    """Requests over fresh connections, each one's worker read from /proc."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.workers = descendants(proxy.pid)
        assert len(self.workers) == 2, self.workers
        self.served: Counter[tuple[int, str]] = Counter()

    def owner(self, conn: http.client.HTTPConnection) -> int:
        """The worker that accepted `conn` (once it has: the kernel completes
        the handshake before the worker's accept)."""
        port = conn.sock.getsockname()[1]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            owners = socket_owners([port], self.workers, accepted_on=self.proxy.port)
            if port in owners:
                return owners[port]
            time.sleep(0.002)
        raise AssertionError(f"no worker accepted the connection from port {port}")

    def send(self, path: str) -> int:
        """One request on a new connection; the pid of the worker that served it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
        conn.connect()
        owner = self.owner(conn)
        conn.request("GET", path, headers={"connection": "close"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 200, (path, resp.status)
        self.served[(owner, path)] += 1
        return owner

    def keep_alive_on(self, pid: int) -> http.client.HTTPConnection:
        """A keep-alive connection that worker `pid` serves."""
        for _ in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
            conn.connect()
            if self.owner(conn) == pid:
                return conn
            conn.close()
        raise AssertionError(f"no connection landed on worker {pid}")


def _route_rows(metrics: dict[str, dict[Any, float]], route: str) -> dict[Any, float]:
    """Every sample of every request family whose route is `route`."""
    return {
        (name, key): v
        for name, rows in metrics.items()
        for key, v in rows.items()
        if ("route", route) in key[1]
    }


def test_an_idle_series_expires_in_every_worker_and_a_busy_one_never_goes_down(
    stack: Stack,
) -> None:
    up = stack.upstream("up")
    expiry = 2.0
    proxy = stack.proxy(
        {
            "workers": 2,
            "metrics": {"idle_expiry": f"{expiry:g}s"},
            "upstreams": {"up": {"endpoints": [up.address], "outlier_detection": False}},
            "routes": [
                {"name": "idle", "path": "/idle/**", "upstream": "up"},
                {"name": "busy", "path": "/busy/**", "upstream": "up"},
            ],
        }
    )
    wait_until(lambda: len(descendants(proxy.pid)) == 2, timeout=10, what="two workers")
    fresh = Fresh(proxy)

    # Both routes' series in both workers; the busy route also once with a
    # status it never answers again: a row of its group that goes idle, in
    # the same class as the busy row (their histogram adds both up, so
    # dropping it alone would take 20 from a busy histogram's count).
    def everywhere(path: str) -> bool:
        return {pid for pid, p in fresh.served if p == path} == set(fresh.workers)

    for _ in range(20):
        r = fetch(f"http://127.0.0.1:{proxy.port}/busy/status?code=201")
        assert r.status == 201
    while not (everywhere("/idle/x") and everywhere("/busy/x")):
        fresh.send("/busy/x")
        fresh.send("/idle/x")
        idle_touched = time.monotonic()
        assert sum(fresh.served.values()) < 200, fresh.served
    # From now on, the busy route is served by one worker only: its rows in
    # the other worker are idle, and must not be dropped while this one counts.
    pinned = fresh.keep_alive_on(fresh.workers[0])
    seen_idle_at: list[float] = []
    gone_at = None
    last: dict[Any, float] = {}
    busy_sent = sum(n for (_, path), n in fresh.served.items() if path == "/busy/x")
    deadline = time.monotonic() + 4 * expiry + 8  # past the old backstop (4x) and a sweep
    while time.monotonic() < deadline:
        for _ in range(5):
            pinned.request("GET", "/busy/x")
            resp = pinned.getresponse()
            resp.read()
            assert resp.status == 200
            busy_sent += 1
        metrics = scrape(proxy)
        now = time.monotonic()
        if _route_rows(metrics, "idle"):
            assert gone_at is None, "the idle series came back"
            seen_idle_at.append(now - idle_touched)
        elif gone_at is None:
            gone_at = now - idle_touched
        busy = _route_rows(metrics, "busy")
        down = {k: (v, busy[k]) for k, v in last.items() if k in busy and busy[k] < v}
        assert not down, f"busy series went down: {down}"
        gone = [k for k in last if k not in busy]
        assert not gone, f"series of the busy route disappeared: {gone}"
        last = busy
        counts = requests_by(metrics, "route", "code")
        assert counts[("busy", "200")] == busy_sent
        assert counts[("busy", "201")] == 20
        time.sleep(0.25)
    pinned.close()
    assert gone_at is not None, "the idle series never expired"
    assert gone_at >= expiry, f"gone after {gone_at:.2f}s, before the {expiry}s expiry"
    assert gone_at < expiry + 2.0, f"still there {gone_at:.2f}s after its last request"
    assert seen_idle_at and seen_idle_at[0] < expiry - 0.5, seen_idle_at
    # A new request to the expired route starts its series from one.
    assert fetch(f"http://127.0.0.1:{proxy.port}/idle/again").status == 200
    assert requests_by(scrape(proxy), "route")[("idle",)] == 1


def test_one_scrape_of_two_workers_is_exact(stack: Stack) -> None:
    up = stack.upstream("up")
    proxy = stack.proxy(
        {
            "workers": 2,
            "upstreams": {"up": {"endpoints": [up.address]}},
            "routes": [{"name": "exact", "path": "/exact/**", "upstream": "up"}],
        }
    )
    wait_until(lambda: len(descendants(proxy.pid)) == 2, timeout=10, what="two workers")
    fresh = Fresh(proxy)
    n = 200
    for i in range(n):
        fresh.send("/exact/x")
        if i % 50 == 49:
            # Exact at every moment, not only at the end.
            assert requests_by(scrape(proxy), "route")[("exact",)] == i + 1
    per_worker = Counter(pid for pid, _ in fresh.served.elements())
    assert len(per_worker) == 2 and min(per_worker.values()) > 0, per_worker
    metrics = scrape(proxy)
    assert requests_by(metrics, "route", "code") == {("exact", "200"): n}
    assert metrics["meshgate_workers_scraped"][("meshgate_workers_scraped", ())] == 2
    hist = metrics["meshgate_request_duration_seconds"]
    counts = [v for (name, _), v in hist.items() if name.endswith("_count")]
    inf = [v for (name, labels), v in hist.items() if ("le", "+Inf") in labels]
    assert sum(counts) == n and sum(inf) == n
    opened = metrics["meshgate_tcp_connections_opened"]
    assert sum(opened.values()) == n
