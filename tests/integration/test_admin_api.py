"""The admin API through the real gateway and real clients (curl, http.client).

Access (loopback by default, a bearer token off loopback, no web pages),
methods, config generations and rollback (one process, and two workers under
load), `/ratelimits`, `/identity` outside the mesh, `/explain` and
`meshgate explain --admin`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from support.client import curl, fetch, raw_request, wait_until
from support.proxy import ProxyProcess, Stack, run_meshgate, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine


def _digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def _routing(target: str, *upstreams: UpstreamServer, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {u.name: upstream_block(u) for u in upstreams},
        "routes": [{"path": "/**", "upstream": target}],
        **extra,
    }


def _served_by(proxy: ProxyProcess, path: str = "/x") -> str:
    r = fetch(proxy.url(path))
    assert r.status == 200, r.describe()
    name: str = r.json()["upstream"]
    return name


def _admin(proxy: ProxyProcess, path: str, *args: str) -> Any:
    r = fetch(proxy.admin_url(path), *args)
    assert r.status == 200, r.describe()
    return r.json()


def _rollback(proxy: ProxyProcess, *args: str) -> tuple[int, Any]:
    r = fetch(proxy.admin_url("/config/rollback"), "-X", "POST", *args)
    return r.status, r.json()


# -- access -------------------------------------------------------------------


def test_an_admin_api_off_loopback_without_a_token_is_refused(
    stack: Stack, upstream: UpstreamServer, tmp_path: Path
) -> None:
    path = tmp_path / "open.yaml"
    path.write_text(
        "listen: 127.0.0.1:0\n"
        "admin: 0.0.0.0:0\n"
        f"upstreams:\n  up: {{endpoints: ['{upstream.address}']}}\n"
        "routes:\n  - {path: /x, upstream: up}\n"
    )
    for command in ("check", "run"):
        proc = run_meshgate(command, "-c", str(path))
        assert proc.returncode == 1, proc
        assert f"{path}:2:" in proc.stderr and "field 'admin'" in proc.stderr, proc.stderr
        assert "admin_token" in proc.stderr, proc.stderr
    # The token itself, written where its digest belongs, is refused and not echoed.
    path.write_text(path.read_text() + "admin_token: hunter2-is-a-token\n")
    proc = run_meshgate("check", "-c", str(path))
    assert proc.returncode == 1 and "field 'admin_token'" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "head",
    [
        b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
        b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
    ],
    ids=["upgrade", "connect"],
)
def test_an_upgrade_or_connect_to_the_admin_api_is_a_400_and_logs_no_error(
    stack: Stack, upstream: UpstreamServer, head: bytes
) -> None:
    proxy = stack.proxy(_routing(upstream.name, upstream))
    reply = raw_request(proxy.admin_port, head, read_timeout=3)
    assert reply.status == 400 and reply.closed, bytes(reply)
    # The listener still answers, and nothing escaped to the event loop.
    assert fetch(proxy.admin_url("/readyz")).status == 200
    assert "Traceback" not in proxy.stderr_text(), proxy.stderr_text()
    assert "Fatal error" not in proxy.stderr_text(), proxy.stderr_text()


def test_the_token_guards_every_path_but_the_probes(
    stack: Stack, upstream: UpstreamServer, tmp_path: Path
) -> None:
    token = "mg_" + secrets.token_urlsafe(24)
    wrong = "mg_" + secrets.token_urlsafe(24)
    proxy = stack.proxy({}, start=False)
    config = _routing(
        "up", upstream, admin=f"0.0.0.0:{proxy.admin_port}", admin_token=_digest(token)
    )
    proxy.write_config(config)
    proxy.start()
    auth = ("-H", f"Authorization: Bearer {token}")
    for path in ("/config", "/config/generations", "/routes", "/metrics", "/nope", "/explain"):
        for args in (
            (),
            ("-H", f"Authorization: Bearer {wrong}"),
            ("-H", f"Authorization: {token}"),
        ):
            r = fetch(proxy.admin_url(path), *args)
            assert r.status == 401, (path, args, r.describe())
            assert (r.header("www-authenticate") or "").startswith("Bearer"), r.describe()
            assert b"paths" not in r.body  # nothing about the API before the token
    r = fetch(proxy.admin_url("/config/rollback"), "-X", "POST")
    assert r.status == 401, r.describe()
    for path in ("/healthz", "/readyz"):
        assert fetch(proxy.admin_url(path)).status == 200
    doc = _admin(proxy, "/config", *auth)
    assert doc["generation"] == 1 and doc["config"]["admin_token"] == "<redacted>", doc
    assert _digest(token) not in json.dumps(doc)
    assert fetch(proxy.admin_url("/metrics"), *auth).status == 200
    # A web page's request (it carries Origin) is refused, token or not.
    r = fetch(proxy.admin_url("/config/rollback"), "-X", "POST", "-H", "Origin: http://x", *auth)
    assert r.status == 403, r.describe()
    # With the token, any Host is fine (no DNS rebinding can know the token).
    assert fetch(proxy.admin_url("/config"), "-H", "Host: admin.example", *auth).status == 200
    log = proxy.stderr_text()
    assert token not in log and wrong not in log, log
    # A reload that would drop the token while the listener stays off loopback is refused.
    loopback = _routing("up", upstream)
    proxy.reload(loopback)
    proxy.wait_for_log("would open it to other hosts")
    assert fetch(proxy.admin_url("/config")).status == 401


def test_without_a_token_only_loopback_names_are_answered(
    stack: Stack, upstream: UpstreamServer
) -> None:
    proxy = stack.proxy(_routing("up", upstream))
    assert fetch(proxy.admin_url("/config")).status == 200
    for host in ("localhost:1", "127.0.0.1", "[::1]:9901"):
        assert fetch(proxy.admin_url("/config"), "-H", f"Host: {host}").status == 200, host
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
    r = fetch(proxy.admin_url("/config"), "-H", "Host: evil.example:9901")
    assert r.status == 403, r.describe()
    r = fetch(proxy.admin_url("/config/rollback"), "-X", "POST", "-H", "Origin: null")
    assert r.status == 403, r.describe()
    assert fetch(proxy.admin_url("/healthz"), "-H", "Host: evil.example").status == 200


def test_only_rollback_is_posted_and_bodies_are_bounded(
    stack: Stack, upstream: UpstreamServer
) -> None:
    proxy = stack.proxy(_routing("up", upstream))
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = fetch(proxy.admin_url("/config"), "-X", method)
        assert r.status == 405 and r.header("allow") == "GET, HEAD", (method, r.describe())
    for method in ("GET", "PUT", "HEAD"):
        args = ("-I",) if method == "HEAD" else ("-X", method)
        r = fetch(proxy.admin_url("/config/rollback"), *args)
        assert r.status == 405 and r.header("allow") == "POST", (method, r.describe())
    head = fetch(proxy.admin_url("/config"), "-I")
    # curl -I writes the head where the body goes: there is no JSON after it.
    assert head.status == 200 and b"{" not in head.body, head.describe()
    # A large body is not read into memory: the connection is closed.
    big = curl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "--data-binary",
        "@-",
        proxy.admin_url("/config/rollback"),
        input=b"x" * (1 << 20),
    )
    assert big.stdout in (b"400", b"000"), big
    assert fetch(proxy.admin_url("/healthz")).status == 200


# -- generations and rollback -------------------------------------------------


def test_generations_and_rollback_in_one_process(stack: Stack) -> None:
    a, b, c = stack.upstream("A"), stack.upstream("B"), stack.upstream("C")
    proxy = stack.proxy(_routing("A", a, b, c))
    texts = [proxy.config_path.read_text()]
    status, doc = _rollback(proxy)
    assert status == 409 and "nothing to roll back to" in doc["error"], doc
    for target in ("B", "C"):
        proxy.reload(_routing(target, a, b, c), via="edit")
        wait_until(lambda t=target: _served_by(proxy) == t, timeout=15, what=f"{target} served")
        texts.append(proxy.config_path.read_text())
    gens = _admin(proxy, "/config/generations")
    assert gens["current"] == 3 and [g["generation"] for g in gens["generations"]] == [3, 2, 1]
    assert [g["current"] for g in gens["generations"]] == [True, False, False]
    assert [g["digest"] for g in gens["generations"]] == [
        "sha256:" + hashlib.sha256(t.encode()).hexdigest() for t in reversed(texts)
    ]
    doc = _admin(proxy, "/config")
    assert doc["generation"] == 3 and doc["config"]["routes"][0]["upstream"] == "C", doc
    assert doc["source"] == str(proxy.config_path) and doc["kind"] == "load"

    status, doc = _rollback(proxy)  # undo 3: generation 2's config (B) again
    assert status == 200, doc
    assert (doc["generation"], doc["restores"], doc["rolled_back_from"]) == (4, 2, 3), doc
    assert {_served_by(proxy) for _ in range(5)} == {"B"}
    status, doc = _rollback(proxy)  # and undo 2: generation 1 (A)
    assert status == 200 and (doc["generation"], doc["restores"]) == (5, 1), doc
    assert {_served_by(proxy) for _ in range(5)} == {"A"}
    status, doc = _rollback(proxy)
    assert status == 409 and "generation 5" in doc["error"], doc
    assert proxy.config_path.read_text() == texts[-1]  # the file is not touched
    assert "rolled back from generation 4 to 1's config (now generation 5)" in proxy.stderr_text()
    metrics = fetch(proxy.admin_url("/metrics")).body.decode()
    assert "meshgate_config_generation 5" in metrics

    # A later edit of the file loads as usual, and a rollback undoes it.
    proxy.reload(_routing("C", a, b, c, access_log=False), via="edit")
    wait_until(lambda: _served_by(proxy) == "C", timeout=15, what="the edit served")
    assert _admin(proxy, "/config")["generation"] == 6
    status, doc = _rollback(proxy)
    assert status == 200 and (doc["generation"], doc["restores"]) == (7, 5), doc
    assert _served_by(proxy) == "A"


class Load:
    """Keep-alive GETs from a few threads until stopped (or `limit` each)."""

    def __init__(self, port: int, threads: int = 4, limit: int = 5000) -> None:
        self.port = port
        self.limit = limit
        self.stop = threading.Event()
        self.results: list[list[tuple[float, str]]] = [[] for _ in range(threads)]
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def _run(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        out = self.results[i]
        try:
            while not self.stop.is_set() and len(out) < self.limit:
                try:
                    conn.request("GET", f"/load/{i}")
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(f"thread {i}: {exc!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    continue
                if resp.status != 200:
                    self.failures.append(f"thread {i}: {resp.status} {body[:200]!r}")
                    continue
                out.append((time.monotonic(), json.loads(body)["upstream"]))
        finally:
            conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def count(self) -> int:
        return sum(len(r) for r in self.results)

    def after(self, when: float) -> set[str]:
        return {name for r in self.results for t, name in r if t > when}


def test_rollback_under_load_restores_the_previous_routing_and_fails_nothing(
    stack: Stack,
) -> None:
    a, b = stack.upstream("A"), stack.upstream("B")
    proxy = stack.proxy(_routing("A", a, b), workers=2)
    with Load(proxy.port) as load:
        wait_until(lambda: load.count() > 200, timeout=20, what="load flowing")
        proxy.reload(_routing("B", a, b))  # SIGHUP to the supervisor
        wait_until(lambda: len(b.requests) > 200, timeout=20, what="B serving")
        wait_until(
            lambda: all(_admin(proxy, "/config")["generation"] == 2 for _ in range(6)),
            timeout=10,
            what="every worker on generation 2",
        )
        status, doc = _rollback(proxy)
        done = time.monotonic()
        assert status == 200, doc
        assert (doc["generation"], doc["restores"], doc["rolled_back_from"]) == (3, 1, 2), doc
        served_a = len(a.requests)
        wait_until(lambda: len(a.requests) > served_a + 400, timeout=20, what="A again")
    assert not load.failures, load.failures[:10]
    assert load.after(done) == {"A"}, "a request reached B after the rollback answered"
    # Every worker answers for the same generation (the admin port reaches any one).
    seen = {(d["worker"], d["generation"]) for d in (_admin(proxy, "/config") for _ in range(12))}
    assert {gen for _, gen in seen} == {3}, seen
    assert "rolled back from generation 2 to 1's config (now generation 3)" in proxy.stderr_text()
    # A worker restarted later serves the supervisor's current generation.
    victim = next(w for w, _ in seen)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: proxy.stderr_text().count("listening on") >= 3,
        timeout=20,
        what="the worker restarted",
    )
    proxy.wait_ready()
    for _ in range(12):
        doc = _admin(proxy, "/config")
        assert doc["generation"] == 3 and doc["config"]["routes"][0]["upstream"] == "A", doc
        assert _served_by(proxy) == "A"


# -- ratelimits, identity, explain ----------------------------------------------


def test_ratelimits_identity_and_explain(stack: Stack, tmp_path: Path) -> None:
    a = stack.upstream("A")
    token = "mg_" + secrets.token_urlsafe(24)
    token_file = tmp_path / "admin.token"
    token_file.write_text(token + "\n")
    config = {
        "upstreams": {"A": upstream_block(a)},
        "auth": {"keys": {"type": "api_key"}},
        "consumers": {"c1": {"api_keys": [_digest("k1")], "rate_limit": "100/h"}},
        "routes": [
            {
                "name": "limited",
                "path": "/api/{id}",
                "methods": ["GET"],
                "upstream": "A",
                "rewrite": "/v1/{id}",
                "rate_limit": [
                    {"limit": 2, "period": "1m", "name": "per-ip", "key": "ip"},
                    {"limit": 1000, "period": "1h", "key": "consumer"},
                ],
                "auth": "keys",
            },
            {"path": "/open/**", "upstream": "A"},
        ],
        "admin_token": _digest(token),
    }
    proxy = stack.proxy(config, workers=2)
    auth = ("-H", f"Authorization: Bearer {token}")
    statuses = [fetch(proxy.url("/api/7"), "-H", "x-api-key: k1").status for _ in range(3)]
    assert sorted(statuses) == [200, 200, 429], statuses
    doc = _admin(proxy, "/ratelimits", *auth)
    per_ip = next(lim for lim in doc["limits"] if lim["name"] == "per-ip")
    # The instance's counts: both workers' (the third request may land on either).
    assert (per_ip["allowed"], per_ip["limited"]) == (2, 1), doc
    assert (per_ip["route"], per_ip["path"], per_ip["limit"], per_ip["period_s"]) == (
        "limited",
        "/api/{id}",
        2,
        60.0,
    ), per_ip
    assert per_ip["key"] == "ip" and per_ip["policy"] == "local"
    assert doc["consumer_rates"] == {"c1": {"limit": 100, "period_s": 3600.0}}
    assert doc["redis"] == []

    r = fetch(proxy.admin_url("/identity"), *auth)
    assert r.status == 404 and r.json() == {"error": "not in the mesh"}, r.describe()

    doc = _admin(proxy, "/explain?method=GET&path=/api/7%3Fq%3D1", *auth)
    match = doc["match"]
    assert (match["route"], match["upstream"], match["sent_as"]) == ("limited", "A", "/v1/7?q=1")
    assert match["auth"]["use"] == [{"name": "keys", "type": "api_key"}]
    assert match["rate_limits"][0]["name"] == "per-ip"
    doc = _admin(proxy, "/explain?method=POST&path=/api/7", *auth)
    assert doc["match"] is None and "method" in doc["routes"][0]["reason"].lower(), doc

    url = proxy.admin_url("")
    out = run_meshgate("explain", "--admin", url, "--token-file", str(token_file), "GET", "/api/7")
    assert out.returncode == 0, out
    assert (
        "=> routes[0] /api/{id}" in out.stdout and "sent to upstream A as GET /v1/7" in out.stdout
    )
    assert "auth: any of keys (api_key)" in out.stdout, out.stdout
    assert "rate limit per-ip: 2 per 60s by ip (local)" in out.stdout, out.stdout
    out = run_meshgate(
        "explain", "--admin", url, "--token-file", str(token_file), "--json", "GET", "/open/x"
    )
    assert out.returncode == 0 and json.loads(out.stdout)["match"]["route"] == "routes[1]", out
    out = run_meshgate("explain", "--admin", url, "--token-file", str(token_file), "GET", "/no")
    assert out.returncode == 1 and "no route matches" in out.stdout, out
    out = run_meshgate("explain", "--admin", url, "GET", "/api/7")
    assert out.returncode == 1 and "401" in out.stderr, out
    assert token not in proxy.stderr_text()
