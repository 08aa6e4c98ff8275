"""The dashboard on a gateway alone: a real gateway with 2 workers, its
admin listener, and real upstreams.

`orders` answers everything; `flaky` answers some requests 500; `spare`
has one endpoint, health-checked, that a test stops. The `private` route
to orders has an authz policy that denies plaintext callers. The state's
numbers are checked against the gateway's own `/metrics` (every worker's,
added up), its health against a stopped endpoint, its live updates as a
client reads them and leaves, and its access rules as a browser page
elsewhere, a DNS rebinding, a wrong method or a missing token would meet
them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshgate.observability.scrape import parse
from support.client import free_port, wait_until
from support.proxy import ProxyProcess, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

TOKEN = "dashboard-test-token-0123456789"
DIGEST = "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()
HEALTH = {
    "path": "/healthz",
    "interval": "0.3s",
    "timeout": "0.5s",
    "unhealthy_threshold": 1,
    "healthy_threshold": 1,
}


def call(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request, the path sent as it is (no normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method != "GET" else None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Gateway:
    def __init__(self, tmp: Path) -> None:
        self.ups = {name: UpstreamServer(name) for name in ("orders", "flaky", "spare")}
        self.tmp = tmp
        self.proxy: ProxyProcess | None = None

    def start(self) -> Gateway:
        for up in self.ups.values():
            up.start()
        config = {
            "upstreams": {
                "orders": upstream_block(self.ups["orders"]),
                "flaky": upstream_block(self.ups["flaky"], outlier_detection=False),
                "spare": upstream_block(self.ups["spare"], health_check=HEALTH),
            },
            "routes": [
                {
                    "path": "/private/**",
                    "name": "private",
                    "upstream": "orders",
                    "authz": {
                        "default": "deny",
                        "rules": [
                            {
                                "name": "orders-only",
                                "action": "allow",
                                "from": ["spiffe://mesh.local/ns/default/sa/orders"],
                            }
                        ],
                    },
                },
                {"path": "/orders/**", "name": "orders", "upstream": "orders"},
                {"path": "/flaky/**", "name": "flaky", "upstream": "flaky"},
                {"path": "/spare/**", "name": "spare", "upstream": "spare"},
            ],
        }
        self.proxy = ProxyProcess(config, self.tmp, workers=2).start()
        return self

    @property
    def admin(self) -> int:
        assert self.proxy is not None
        return self.proxy.admin_port

    def get(self, path: str) -> int:
        assert self.proxy is not None
        status, _, _ = call(self.proxy.port, path)
        return status

    def state(self) -> dict[str, Any]:
        status, _, body = call(self.admin, "/ui/api/state")
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for up in self.ups.values():
            up.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("dashboard-gw"))
    try:
        yield g.start()
    finally:
        g.stop()


def _node(state: dict[str, Any], name: str) -> dict[str, Any]:
    for node in state["nodes"]:
        if node["id"] == name:
            return dict(node)
    raise AssertionError(f"no node {name}: {state['nodes']}")


def _edges(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in state["edges"]}


def _counted(port: int, **want: Any) -> float:
    """meshgate_requests_total (inbound) of the rows whose labels are `want`
    (`reason_not`: any reason but that one), as /metrics shows them."""
    status, _, body = call(port, "/metrics")
    assert status == 200
    not_reason = want.pop("reason_not", None)
    total = 0.0
    for s in parse(body.decode()).samples("meshgate_requests_total"):
        if s.label("direction") != "inbound":
            continue
        if not_reason is not None and s.label("reason") == not_reason:
            continue
        if all(s.label(k) == v for k, v in want.items()):
            total += s.value
    return total


def test_the_state_counts_what_metrics_counts(gw: Gateway) -> None:
    # Traffic: in less than a minute of the start, so the 1-minute window
    # holds all of it.
    for i in range(12):
        assert gw.get(f"/orders/item/{i}") == 200
    codes = [gw.get("/flaky/status?code=500") for _ in range(4)]
    codes += [gw.get("/flaky/echo") for _ in range(6)]
    assert codes.count(500) == 4 and codes.count(200) == 6
    for _ in range(3):
        assert gw.get("/spare/echo") == 200
    assert gw.get("/private/secret") == 403
    assert gw.get("/private/secret") == 403

    def settled() -> dict[str, Any] | None:
        state = gw.state()
        edges = _edges(state)
        ext = edges.get("external->gateway")
        orders = edges.get("gateway->orders")
        flaky = edges.get("gateway->flaky")
        denied = edges.get("external->gateway:denied")
        done = (
            ext is not None
            and ext["requests"] == 25
            and orders is not None
            and orders["requests"] == 12
            and flaky is not None
            and flaky["requests"] == 10
            and denied is not None
            and denied["requests"] == 2
        )
        return state if done else None

    state = wait_until(settled, timeout=10, interval=0.5, what="the state to count the traffic")
    assert state["scope"] == "gateway"
    assert {"external", "gateway", "orders", "flaky", "spare"} <= {n["id"] for n in state["nodes"]}
    assert _node(state, "external")["kind"] == "external"
    assert _node(state, "gateway")["kind"] == "gateway"
    edges = _edges(state)
    # The same numbers as the gateway's own /metrics, every worker's added up.
    assert _counted(gw.admin, reason_not="authz") == edges["external->gateway"]["requests"]
    assert _counted(gw.admin, upstream="orders") == edges["gateway->orders"]["requests"]
    assert _counted(gw.admin, upstream="flaky") == edges["gateway->flaky"]["requests"]
    assert _counted(gw.admin, reason="authz") == edges["external->gateway:denied"]["requests"]
    assert edges["gateway->orders"]["success"] == 1.0
    assert edges["gateway->flaky"]["success"] == pytest.approx(0.6)
    assert edges["gateway->flaky"]["p99_ms"] is not None and edges["gateway->flaky"]["rps"] > 0
    flaky = _node(state, "flaky")
    assert flaky["success"] == pytest.approx(0.6) and flaky["health"] == "degraded"
    assert _node(state, "orders")["health"] == "healthy"
    denied = edges["external->gateway:denied"]
    assert denied["denied"] is True and denied["policy"] == "private"
    # Per service: golden metrics, routes, resilience, policies.
    svc = state["services"]["orders"]
    assert set(svc["golden"]) == {"1m", "5m", "15m"}
    assert svc["golden"]["1m"]["rps"] > 0
    assert {r["route"] for r in svc["routes"]} == {"private", "orders"}
    [inst] = svc["instances"]
    assert inst["address"] == gw.ups["orders"].address and inst["healthy"] is True
    rows = {(p["policy"], p["rule"]): p for p in svc["policies"]}
    assert rows[("private", "(default)")]["deny"] == 2
    assert rows[("private", "orders-only")]["allow"] == 0
    assert state["services"]["flaky"]["resilience"]["breaker_open"] is False
    # The edge: per-route figures and refusals.
    routes = {r["route"]: r for r in state["edge"]["routes"]}
    assert routes["orders"]["requests"] == 12 and routes["flaky"]["success"] == pytest.approx(0.6)
    assert {"reason": "authz", "count": 2} in state["edge"]["refusals"]
    # Denials, from whichever worker refused them.
    denials = state["denials"]
    assert len(denials) == 2
    assert {d["policy"] for d in denials} == {"private"}
    assert all(d["source"] == "plaintext" and d["path"] == "/private/secret" for d in denials)
    assert all(d["reason"] == "no rule allowed it" for d in denials)
    # Config: generation 1, from the file, every worker serving it.
    config = state["config"]
    assert config["generation"] == 1 and config["generations"][0]["generation"] == 1
    assert config["generations"][0]["digest"].startswith("sha256:")
    assert [p["acked"] for p in config["proxies"]] == [1, 1]


def test_explain_names_the_route_and_its_policy(gw: Gateway) -> None:
    status, _, body = call(gw.admin, "/ui/api/explain?method=GET&path=/orders/x")
    doc = json.loads(body)
    assert status == 200 and doc["decision"] == "allow" and doc["route"]["route"] == "orders"
    status, _, body = call(gw.admin, "/ui/api/explain?method=GET&path=/private/x")
    doc = json.loads(body)
    assert status == 200 and doc["decision"] == "deny"
    assert doc["policy"] == "private" and doc["rule"] is None
    assert doc["reason"] and [t["name"] for t in doc["trace"]] == ["orders-only"]
    orders = "spiffe%3A%2F%2Fmesh.local%2Fns%2Fdefault%2Fsa%2Forders"
    status, _, body = call(gw.admin, f"/ui/api/explain?method=GET&path=/private/x&source={orders}")
    assert json.loads(body)["decision"] == "allow"
    status, _, body = call(gw.admin, "/ui/api/explain?method=GET&path=/nowhere")
    doc = json.loads(body)
    assert status == 200 and doc["decision"] == "deny" and doc["route"] is None
    status, _, _ = call(gw.admin, "/ui/api/explain?path=relative")
    assert status == 400
    for method in ("%C3%A9", "G%20T", "%00"):
        status, _, _ = call(gw.admin, f"/ui/api/explain?method={method}&path=/orders/x")
        assert status == 400, method


def test_config_diff_of_kept_generations(gw: Gateway) -> None:
    status, _, body = call(gw.admin, "/ui/api/config/diff?from=1&to=1")
    assert status == 200 and json.loads(body) == {"from": 1, "to": 1, "diff": ""}
    status, _, _ = call(gw.admin, "/ui/api/config/diff?from=1&to=7")
    assert status == 404
    status, _, _ = call(gw.admin, "/ui/api/config/diff?from=x&to=1")
    assert status == 400


def _read_event(sock: socket.socket, data: bytes = b"") -> bytes:
    while b"\r\n\r\n" not in data or b"\n\n" not in data.partition(b"\r\n\r\n")[2]:
        chunk = sock.recv(1 << 20)
        assert chunk, data[:500]
        data += chunk
    return data


def test_server_sent_events_within_3s_and_a_clean_end(gw: Gateway) -> None:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.admin), timeout=3) as s:
        s.sendall(b"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = _read_event(s)
        assert time.monotonic() - t0 < 3
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-type: text/event-stream" in head.lower()
        assert b"content-length" not in head.lower()
        assert b"content-security-policy: default-src 'self'" in head.lower()
        first = body.split(b"\n\n")[0]
        assert first.startswith(b"event: state\ndata: ")
        assert json.loads(first.partition(b"data: ")[2])["scope"] == "gateway"
        # A second event, about 2 s later.
        while body.count(b"event: state\n") < 2 or not body.endswith(b"\n\n"):
            chunk = s.recv(1 << 20)
            assert chunk
            body += chunk
        # The client leaves: the gateway ends the stream and closes.
        s.shutdown(socket.SHUT_WR)
        t1 = time.monotonic()
        s.settimeout(3)
        while s.recv(1 << 20):
            pass
        assert time.monotonic() - t1 < 3
    assert gw.proxy is not None and "Traceback" not in gw.proxy.stderr_text()


def test_sse_clients_are_bounded(gw: Gateway) -> None:
    socks = []
    try:
        for _ in range(70):  # 2 workers, at most 32 each
            s = socket.create_connection(("127.0.0.1", gw.admin), timeout=5)
            s.sendall(b"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(s)
        heads = []
        for s in socks:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                assert chunk
                data += chunk
            heads.append(data.split(b"\r\n", 1)[0])
        assert heads.count(b"HTTP/1.1 503 Service Unavailable") >= 70 - 64
        assert heads.count(b"HTTP/1.1 200 OK") <= 64
    finally:
        for s in socks:
            s.close()

    # Their slots come back once they leave.
    def answered() -> bool:
        with socket.create_connection(("127.0.0.1", gw.admin), timeout=5) as s:
            s.sendall(b"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(65536).startswith(b"HTTP/1.1 200")

    for _ in range(4):
        wait_until(answered, timeout=10, interval=0.2, what="an SSE slot free again")


def test_static_files_and_their_headers(gw: Gateway) -> None:
    status, headers, _ = call(gw.admin, "/ui/api/state")
    assert status == 200
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "script-src 'self';" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-cache"
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/app.css"):
        status, headers, _ = call(gw.admin, path)
        # The page itself may not be in this tree yet: a 404 carries the
        # page's headers all the same.
        assert status in (200, 404)
        assert headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        if status == 200:
            assert headers["content-type"].split(";")[0] in (
                "text/html",
                "text/javascript",
                "text/css",
            )


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../x",
        "/ui/%2e%2e/",
        "/ui/%2e%2e/admin/server.py",
        "/ui/../../pyproject.toml",
        "/ui/vendor/../app.js",
        "/ui/vendor/..%2f..%2fpyproject.toml",
        "/ui/vendor/",
        "/ui/vendor/.hidden",
        "/ui//etc/passwd",
        "/ui/api/../../../etc/passwd",
        "/ui/%00",
        "/ui/vendor/x%00.js",
    ],
)
def test_no_path_leaves_the_allow_list(gw: Gateway, path: str) -> None:
    status, _, body = call(gw.admin, path)
    assert status == 404, body


def test_the_dashboard_is_read_only(gw: Gateway) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD"):
        status, headers, _ = call(gw.admin, "/ui/api/state", method)
        assert status == 405 and headers["allow"] == "GET"
    status, _, _ = call(gw.admin, "/ui/events", "POST")
    assert status == 405


def test_other_pages_and_other_names_are_refused(gw: Gateway) -> None:
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{gw.admin + 1}"):
        status, _, _ = call(gw.admin, "/ui/api/state", headers={"Origin": origin})
        assert status == 403
        status, _, _ = call(gw.admin, "/ui/events", headers={"Origin": origin})
        assert status == 403
    # A DNS rebinding: the page's name resolves to 127.0.0.1.
    for path in ("/ui/api/state", "/ui/events", "/ui"):
        status, _, _ = call(gw.admin, path, headers={"Host": "evil.example"})
        assert status == 403
    status, _, _ = call(
        gw.admin,
        "/ui/api/state",
        headers={"Host": "evil.example", "Origin": "http://evil.example"},
    )
    assert status == 403
    # The page's own requests (same origin) are answered.
    status, _, _ = call(
        gw.admin, "/ui/api/state", headers={"Origin": f"http://127.0.0.1:{gw.admin}"}
    )
    assert status == 200


def test_a_stopped_endpoint_turns_its_upstream_down_within_10s(gw: Gateway) -> None:
    # Healthy once the sampler has seen the endpoint (its first samples
    # come 2 s apart).
    wait_until(
        lambda: _node(gw.state(), "spare")["health"] == "healthy",
        timeout=10,
        what="the spare upstream healthy",
    )
    spare = gw.ups["spare"]
    port = spare.port
    spare.stop()
    t0 = time.monotonic()
    # Each worker samples on its own 2 s beat and answers whichever request
    # the kernel hands it, so the node and its instance are read from one
    # and the same state.
    seen: list[dict[str, Any]] = []

    def spare_down() -> bool:
        state = gw.state()
        seen[:] = [state]
        return bool(_node(state, "spare")["health"] == "down")

    wait_until(spare_down, timeout=10, interval=0.25, what="spare down")
    assert time.monotonic() - t0 < 10
    [inst] = seen[0]["services"]["spare"]["instances"]
    assert inst["healthy"] is False and inst["state"] in ("down", "unreachable")
    gw.ups["spare"] = UpstreamServer("spare", port=port).start()
    wait_until(
        lambda: _node(gw.state(), "spare")["health"] == "healthy",
        timeout=15,
        interval=0.25,
        what="spare back",
    )


# -- a non-loopback admin bind: the token ---------------------------------------------


@pytest.fixture(scope="module")
def open_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("dashboard-gw-open")
    with UpstreamServer("open") as up:
        port = free_port()
        proxy = ProxyProcess(
            {
                "admin": f"0.0.0.0:{port}",
                "admin_token": DIGEST,
                "upstreams": {"up": upstream_block(up)},
                "routes": [{"path": "/**", "upstream": "up"}],
            },
            tmp,
        )
        proxy.admin_port = port
        proxy.start()
        try:
            yield proxy
        finally:
            if proxy.alive:
                proxy.stop()


def test_a_non_loopback_bind_needs_the_token(open_gw: ProxyProcess) -> None:
    port = open_gw.admin_port
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/ui", "/ui/api/state", "/ui/events", "/ui/api/explain?path=/x"):
        status, headers, _ = call(port, path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
        for wrong in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
            status, _, _ = call(port, path, headers={"Authorization": wrong})
            assert status == 401, (path, wrong)
    status, _, body = call(port, "/ui/api/state", headers=bearer)
    assert status == 200 and json.loads(body)["scope"] == "gateway"
    # Any name, with the token (a reverse proxy in front adds it).
    status, _, _ = call(port, "/ui/api/state", headers={**bearer, "Host": "gw.example:443"})
    assert status == 200
    # The token does not open the door to other web pages.
    status, _, _ = call(port, "/ui/api/state", headers={**bearer, "Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = call(port, "/ui/api/state", "POST", headers=bearer)
    assert status == 405


def test_draining_ends_the_event_streams(open_gw: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", open_gw.admin_port), timeout=5) as s:
        s.sendall(
            f"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}"
            "\r\n\r\n".encode()
        )
        _read_event(s)
        open_gw.signal(signal.SIGTERM)
        t0 = time.monotonic()
        while s.recv(1 << 20):
            pass
        assert time.monotonic() - t0 < 5
    assert open_gw.wait(15) == 0
