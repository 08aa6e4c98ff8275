"""The gateway process's life: health and readiness, SIGTERM drain, reload by
SIGHUP and by editing the file (with requests running throughout), refusal of
an invalid reload, and `--workers 2`."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from support.client import curl, curl_popen, fetch, free_port, http_get, wait_until
from support.proxy import ProxyProcess, Stack, run_meshgate, socket_owners, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine


def routed_to(name: str, *servers: UpstreamServer) -> dict[str, Any]:
    """`/svc/**` to an upstream named `name` made of `servers`."""
    return {
        "upstreams": {name: upstream_block(*servers)},
        "routes": [{"path": "/svc/**", "upstream": name}],
    }


# ---------------------------------------------------------------------------
# health


def test_healthz_and_readyz(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(routed_to("a", upstream))
    for path in ("/healthz", "/readyz"):
        r = fetch(proxy.admin_url(path))
        assert r.returncode == 0 and r.status == 200, r.describe()


def test_sigterm_with_nothing_in_flight_exits_0(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(routed_to("a", upstream))
    assert fetch(proxy.url("/svc/x")).status == 200
    assert proxy.stop(timeout=15) == 0


def test_sigterm_closes_idle_keepalive_connections_promptly(
    stack: Stack, upstream: UpstreamServer
) -> None:
    """An idle keep-alive client must not hold the drain for drain_timeout."""
    proxy = stack.proxy({**routed_to("a", upstream), "limits": {"drain_timeout": "30s"}})
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        sock.sendall(b"GET /svc/fixed HTTP/1.1\r\nHost: p\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert proxy.stop(timeout=25) == 0
        assert time.monotonic() - start < 10
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# drain


def test_sigterm_drains_in_flight_request(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy({**routed_to("a", upstream), "limits": {"drain_timeout": "20s"}})
    slow = curl_popen(
        "-o", "-", "-w", "\n%{http_code}", proxy.url("/svc/slow?headers_delay=4&chunks=3")
    )
    try:
        upstream.wait_for_requests(1)
        proxy.signal(signal.SIGTERM)

        # While draining: readiness says 503, and new connections are refused.
        def readyz() -> int | None:
            try:
                return http_get(proxy.admin_port, "/readyz", timeout=1)[0]
            except OSError:
                return None

        wait_until(lambda: readyz() == 503, timeout=3, what="/readyz 503 while draining")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, timeout=3, what="new connections refused while draining")
        assert slow.poll() is None, "the in-flight request ended before its answer"
        out, err = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert out == b"x" * 48 + b"\n200", (out, err)
    assert proxy.wait(timeout=20) == 0


def test_drain_timeout_bounds_the_drain(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy({**routed_to("a", upstream), "limits": {"drain_timeout": "1s"}})
    slow = curl_popen("-o", "/dev/null", proxy.url("/svc/slow?headers_delay=60"))
    try:
        upstream.wait_for_requests(1)
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        proxy.wait(timeout=15)
        assert time.monotonic() - start < 10
    finally:
        slow.kill()
        slow.wait()


# ---------------------------------------------------------------------------
# reload


class RequestLoop:
    """Requests in a loop on two real clients until stopped: curl with a new
    connection each time, and one keep-alive connection (http.client)."""

    def __init__(self, proxy: ProxyProcess, path: str) -> None:
        self.proxy = proxy
        self.path = path
        self.new_conn: list[tuple[str, str]] = []  # (status, upstream) in order
        self.keepalive: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._curl_loop, daemon=True),
            threading.Thread(target=self._keepalive_loop, daemon=True),
        ]

    def __enter__(self) -> RequestLoop:
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.new_conn) >= 3 and len(self.keepalive) >= 3, what="loop")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _curl_loop(self) -> None:
        while not self._stop.is_set() and len(self.new_conn) < 2000:
            cp = curl(
                "-o", "/dev/null", "-w", "%{http_code} %header{x-upstream}",
                self.proxy.url(self.path), timeout=30,
            )  # fmt: skip
            text = cp.stdout.decode()
            if cp.returncode != 0 or not text.startswith("200 "):
                self.failures.append(f"curl rc={cp.returncode} {text!r} {cp.stderr[-300:]!r}")
            status, _, name = text.partition(" ")
            self.new_conn.append((status, name))

    def _keepalive_loop(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        try:
            while not self._stop.is_set() and len(self.keepalive) < 20000:
                try:
                    conn.request("GET", self.path)
                    resp = conn.getresponse()
                    resp.read()
                    name = resp.getheader("x-upstream") or ""
                    if resp.status != 200:
                        self.failures.append(f"keep-alive: {resp.status}")
                    self.keepalive.append((str(resp.status), name))
                    if resp.will_close:
                        self.failures.append("keep-alive: the proxy closed the connection")
                        conn.close()
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(f"keep-alive: {exc!r}")
                    conn.close()
                time.sleep(0.005)
        finally:
            conn.close()

    @staticmethod
    def _tail_is(results: list[tuple[str, str]], name: str, n: int) -> bool:
        tail = [u for _, u in results[-n:]]
        return len(tail) == n and set(tail) == {name}

    def switched_to(self, name: str, n: int = 5) -> bool:
        """The last `n` requests of both clients went to `name`."""
        return self._tail_is(self.new_conn, name, n) and self._tail_is(self.keepalive, name, n)


@pytest.mark.parametrize(
    ("via", "atomic"),
    [("sighup", False), ("edit", False), ("edit", True)],
    ids=["sighup", "edit-in-place", "edit-rename"],
)
def test_reload_changes_routing_without_failed_requests(
    stack: Stack, via: str, atomic: bool
) -> None:
    a, b = stack.upstream("a"), stack.upstream("b")
    proxy = stack.proxy(routed_to("first", a))
    with RequestLoop(proxy, "/svc/fixed") as loop:
        proxy.reload(routed_to("second", b), via=via, atomic=atomic)
        # New connections and the open keep-alive connection both move to b.
        wait_until(lambda: loop.switched_to("b"), timeout=15, what="routing to switch to b")
    assert loop.failures == [], loop.failures[:10]
    for results in (loop.new_conn, loop.keepalive):
        names = [u for _, u in results]
        first_b = names.index("b")
        assert set(names[:first_b]) == {"a"} and set(names[first_b:]) == {"b"}, names
    assert proxy.alive and proxy.stop() == 0


def test_reload_lets_in_flight_request_finish(stack: Stack) -> None:
    a, b = stack.upstream("a"), stack.upstream("b")
    proxy = stack.proxy(routed_to("first", a))
    slow = curl_popen(
        "-o", "-", "-w", "\n%{http_code}", proxy.url("/svc/slow?headers_delay=1.5&chunks=2")
    )
    try:
        a.wait_for_requests(1)
        proxy.reload(routed_to("second", b), via="sighup")
        wait_until(lambda: fetch(proxy.url("/svc/fixed")).header("x-upstream") == "b", timeout=15)
        out, err = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert out == b"x" * 32 + b"\n200", (out, err)


INVALID = {
    # (config text, the line the error is on, a word the message should name)
    "schema": ("upstreams:\n  a:\n    endpoints: [{a}]\n    balancer: fastest\n", 4, "balancer"),
    "unknown-key": ("upstreams:\n  a:\n    endpoints: [{a}]\n    timeout: {{read: 1s}}\n", 4,
                    "timeout"),
    "yaml-syntax": ("upstreams:\n  a:\n    endpoints: [{a}\n    balancer: round_robin\n", 4, ""),
    "dangling-upstream": ("upstreams:\n  a:\n    endpoints: [{a}]\nroutes:\n- path: /svc/**\n"
                          "  upstream: nowhere\n", 6, "nowhere"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(INVALID))
@pytest.mark.parametrize("via", ["sighup", "edit"])
def test_invalid_reload_refused_old_config_keeps_serving(
    stack: Stack, upstream: UpstreamServer, kind: str, via: str
) -> None:
    proxy = stack.proxy(routed_to("a", upstream))
    assert fetch(proxy.url("/svc/fixed")).status == 200
    text, line, word = INVALID[kind]
    if kind != "dangling-upstream":
        text += "routes:\n- path: /other/**\n  upstream: a\n"
    proxy.reload(text.format(a=upstream.address), via=via)
    path = re.escape(str(proxy.config_path))
    logged = proxy.wait_for_log(rf"{path}(:| line |\", line ){line}\b", timeout=15)
    assert word in logged or word in proxy.stderr_text(), proxy.stderr_text()
    # The old routes keep serving, on new connections too.
    for _ in range(3):
        r = fetch(proxy.url("/svc/fixed"))
        assert r.status == 200 and r.header("x-upstream") == "up", r.describe()
    assert fetch(proxy.url("/other/fixed")).status == 404
    assert http_get(proxy.admin_port, "/readyz")[0] == 200
    # ...and a valid config after that is taken.
    proxy.reload(
        {"upstreams": {"a": upstream_block(upstream)}, "routes": [{"path": "/other/**",
                                                                    "upstream": "a"}]},
        via=via,
    )  # fmt: skip
    wait_until(lambda: fetch(proxy.url("/other/fixed")).status == 200, timeout=15,
               what="the valid reload")  # fmt: skip
    assert proxy.alive


# ---------------------------------------------------------------------------
# workers


def test_two_workers_both_serve(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(routed_to("a", upstream), workers=2)
    for i in range(20):
        r = fetch(proxy.url(f"/svc/fixed?i={i}"))
        assert r.status == 200, r.describe()
    # 16 concurrent slow requests, each on its own client connection: while
    # they are in flight, see which proxy process owns each upstream socket.
    urls = [proxy.url(f"/svc/slow?headers_delay=1&i={i}") for i in range(16)]
    slow = [curl_popen("-o", "/dev/null", "-w", "%{http_code}", url) for url in urls]
    try:
        upstream.wait_for(
            lambda s: sum(1 for r in s.requests if r.path == "/svc/slow") == 16,
            what="16 slow requests in flight",
        )
        ports = [c.peer[1] for c in upstream.connections if not c.closed]
        owners = socket_owners(ports, proxy.pids())
    finally:
        codes = [p.communicate(timeout=30)[0] for p in slow]
    assert codes == [b"200"] * 16
    per_pid = Counter(owners.values())
    assert len(per_pid) >= 2, f"all upstream connections owned by {per_pid} (pids {proxy.pids()})"
    assert proxy.stop() == 0


def test_two_workers_reload_reaches_every_worker(stack: Stack) -> None:
    a, b = stack.upstream("a"), stack.upstream("b")
    proxy = stack.proxy(routed_to("first", a), workers=2)
    proxy.reload(routed_to("second", b), via="sighup")

    def all_b() -> bool:
        names = [fetch(proxy.url("/svc/fixed")).header("x-upstream") for _ in range(20)]
        return set(names) == {"b"}

    wait_until(all_b, timeout=15, interval=0.2, what="20 new connections all routed to b")


def test_access_log_line_per_request(stack: Stack, upstream: UpstreamServer) -> None:
    """`access_log: true`: a JSON line per request on stdout (the fields:
    test_access_log.py)."""
    proxy = stack.proxy({**routed_to("a", upstream), "access_log": True})
    r = fetch(proxy.url("/svc/fixed?marker=access-log-check"))
    wait_until(
        lambda: proxy.stdout_path.read_text().endswith("\n"), timeout=5, what="an access log line"
    )
    (line,) = [json.loads(t) for t in proxy.stdout_path.read_text().splitlines()]
    assert line["request_id"] == r.header("x-request-id"), line
    assert (line["status"], line["path"], line["upstream"]) == (200, "/svc/**", "a"), line
    assert "marker" not in proxy.stdout_path.read_text()


def test_refuses_to_start_on_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: 127.0.0.1:0\nupstreams:\n  a:\n    endpoints: []\n")
    proc = run_meshgate("run", "-c", str(path))
    assert proc.returncode != 0
    assert f"{path}:4" in proc.stderr, proc.stderr


def test_a_second_gateway_on_an_address_in_use_is_refused(
    stack: Stack, upstream: UpstreamServer, tmp_path: Path
) -> None:
    """Workers share their port with SO_REUSEPORT. A second `meshgate run`
    on the same listen or admin address must not join the first (the
    kernel would split the connections between two gateways, each with its
    own config): it exits at once, naming the address, and the first goes
    on serving every request."""
    first = stack.proxy(routed_to("a", upstream))
    cases = {
        "listen": (first.port, free_port()),
        "admin": (free_port(), first.admin_port),
    }
    for field, (listen, admin) in cases.items():
        path = tmp_path / f"second-{field}.yaml"
        path.write_text(
            f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\n"
            f"upstreams:\n  a:\n    endpoints: [127.0.0.1:{upstream.port}]\n"
            "routes:\n- {path: /svc/**, upstream: a}\n"
        )
        proc = run_meshgate("run", "-c", str(path), timeout=20)
        taken = listen if field == "listen" else admin
        assert proc.returncode == 1, proc.stderr
        assert f"{field}: 127.0.0.1:{taken} is in use" in proc.stderr, proc.stderr
    statuses = Counter(fetch(first.url("/svc/x")).status for _ in range(20))
    assert statuses == Counter({200: 20}), statuses
    assert first.alive


def test_reloaded_limits_apply_to_open_keepalive_connections(
    stack: Stack, upstream: UpstreamServer
) -> None:
    """A connection opened before a reload is held to the new limits from
    its next request on."""
    from support.client import RawConnection

    proxy = stack.proxy(routed_to("a", upstream))
    target = b"/svc/" + b"x" * 600
    request = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    with RawConnection(proxy.port) as conn:
        conn.send(request)
        assert conn.read_response().status == 200
        proxy.reload({**routed_to("a", upstream), "limits": {"max_request_line": 512}})
        proxy.wait_for_log(r"reloaded")
        conn.send(request)
        assert conn.read_response().status == 414
