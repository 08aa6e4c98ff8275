"""The access log in the real gateway: one JSON line per request, with its
fields right; the route's path pattern, never the request's own path or
query; 2xx sampling; a file, reopened on reload; N workers' lines whole;
and a stdout pipe nobody reads that never holds up a response."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from support.client import RawConnection, fetch, wait_until
from support.proxy import ProxyProcess, Stack, meshgate_cmd, upstream_block
from support.upstream import UpstreamServer

pytestmark = pytest.mark.engine

KEY = "access-log-key"
FIELDS = {
    "time",
    "request_id",
    "trace_id",
    "direction",
    "client",
    "consumer",
    "peer",
    "method",
    "authority",
    "path",
    "route",
    "upstream",
    "endpoint",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "retries",
    "reason",
}


def _config(up: UpstreamServer, access_log: Any = True, **extra: Any) -> dict[str, Any]:
    return {
        "access_log": access_log,
        "auth": {"keys": {"type": "api_key"}},
        "consumers": {"acme": {"api_keys": ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]}},
        "upstreams": {"up": upstream_block(up)},
        "routes": [
            {"name": "svc", "path": "/svc/**", "upstream": "up"},
            {"name": "keyed", "path": "/keyed/{id}", "upstream": "up", "auth": "keys"},
        ],
        **extra,
    }


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def _wait_lines(path: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    wait_until(lambda: len(_lines(path)) >= n, timeout=timeout, what=f"{n} lines in {path}")
    return _lines(path)


def _by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["request_id"]: line for line in lines}


def _metric(text: str, name: str) -> float:
    m = re.search(rf"(?m)^{name}(?:{{}})? (\S+)$", text)
    assert m is not None, f"no {name} in:\n{text}"
    return float(m.group(1))


def test_one_line_per_request_with_every_field(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(_config(upstream))
    ok = fetch(proxy.url("/svc/fixed?secret=hunter2"), "-H", "Host: shop.example:8443")
    posted = fetch(proxy.url("/svc/echo"), "-X", "POST", "--data-binary", "hello")
    missing = fetch(proxy.url("/nowhere?secret=hunter2"))
    refused = fetch(proxy.url("/keyed/7"))
    admitted = fetch(proxy.url("/keyed/7"), "-H", f"X-API-Key: {KEY}")
    assert [r.status for r in (ok, posted, missing, refused, admitted)] == [200, 200, 404, 401, 200]
    lines = _wait_lines(proxy.stdout_path, 5)
    assert len(lines) == 5, lines
    assert all(set(line) == FIELDS for line in lines), lines
    text = proxy.stdout_path.read_text()
    assert "hunter2" not in text and "/nowhere" not in text and "/svc/fixed" not in text
    got = _by_id(lines)
    assert set(got) == {
        r.header("x-request-id") for r in (ok, posted, missing, refused, admitted)
    }, lines

    line = got[ok.header("x-request-id")]
    started = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%f%z")
    assert line["time"].endswith("Z") and len(line["time"]) == len("2024-01-01T00:00:00.000Z")
    assert abs(datetime.now(UTC) - started) < timedelta(seconds=30), line
    assert line["trace_id"] is None
    assert line["direction"] == "inbound"
    assert line["client"] == "127.0.0.1"
    assert line["consumer"] is None and line["peer"] is None
    assert line["method"] == "GET"
    assert line["authority"] == "shop.example:8443"
    assert line["path"] == "/svc/**"
    assert line["route"] == "svc"
    assert line["upstream"] == "up"
    assert line["endpoint"] == upstream.address
    assert line["status"] == 200
    assert line["retries"] == 0 and line["reason"] is None
    assert isinstance(line["duration_ms"], float) and isinstance(line["upstream_ms"], float)
    assert 0 <= line["upstream_ms"] <= line["duration_ms"] < 10_000, line
    assert line["bytes_in"] == 0 and line["bytes_out"] >= len(b"fixed response body\n")

    line = got[posted.header("x-request-id")]
    assert line["method"] == "POST" and line["bytes_in"] == 5 and line["status"] == 200

    line = got[missing.header("x-request-id")]
    assert line["status"] == 404 and line["reason"] == "no_route"
    assert line["path"] is None and line["route"] is None and line["upstream"] is None
    assert line["endpoint"] is None and line["upstream_ms"] is None and line["retries"] == 0
    assert line["bytes_out"] > 0  # the problem document

    line = got[refused.header("x-request-id")]
    assert line["status"] == 401 and line["reason"] == "auth", line
    assert line["route"] == "keyed" and line["path"] == "/keyed/{id}"
    assert line["consumer"] is None and line["upstream_ms"] is None

    line = got[admitted.header("x-request-id")]
    assert line["status"] == 200 and line["consumer"] == "acme" and line["reason"] is None
    assert line["route"] == "keyed" and line["upstream"] == "up"
    assert KEY not in text
    assert proxy.stop() == 0


def test_a_retried_request_logs_its_retries(stack: Stack) -> None:
    busy, calm = stack.upstream("busy"), stack.upstream("calm")
    busy.forced = ("status", {"code": "503"})
    config = _config(busy)
    config["upstreams"]["up"] = upstream_block(
        busy, calm, balancer="round_robin", retry={"attempts": 2, "on": ["503"]}
    )
    proxy = stack.proxy(config)
    # Round robin: one of the two starts on `busy`, and is retried on `calm`.
    assert [fetch(proxy.url(f"/svc/{i}")).status for i in range(2)] == [200, 200]
    lines = _wait_lines(proxy.stdout_path, 2)
    assert sorted(line["retries"] for line in lines) == [0, 1], lines
    assert {line["endpoint"] for line in lines} == {calm.address}, lines
    assert all(line["status"] == 200 and line["reason"] is None for line in lines)


def test_sample_2xx_zero_logs_every_refusal_and_no_2xx(
    stack: Stack, upstream: UpstreamServer
) -> None:
    proxy = stack.proxy(_config(upstream, {"path": "-", "sample_2xx": 0}))
    with RawConnection(proxy.port) as conn:
        for i in range(40):
            path = f"/svc/{i}" if i % 4 else f"/keyed/{i}"
            conn.send(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert conn.read_response().status == (200 if i % 4 else 401)
    assert fetch(proxy.url("/nowhere")).status == 404
    lines = _wait_lines(proxy.stdout_path, 11)
    assert proxy.stop() == 0  # (flushes what is left)
    lines = _lines(proxy.stdout_path)
    assert sorted(line["status"] for line in lines) == [401] * 10 + [404], lines


def test_a_file_is_written_and_reopened_on_reload(stack: Stack, upstream: UpstreamServer) -> None:
    config = _config(upstream, {"path": "access.log"})
    proxy = stack.proxy(config)
    log = stack.directory / "access.log"
    for i in range(3):
        assert fetch(proxy.url(f"/svc/{i}")).status == 200
    assert len(_wait_lines(log, 3)) == 3
    assert proxy.stdout_path.read_text() == ""
    # Rotated: renamed away, then SIGHUP; new lines go to a new file.
    rotated = stack.directory / "access.log.1"
    os.rename(log, rotated)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded")
    wait_until(log.exists, timeout=5, what="access.log opened again")
    for i in range(2):
        assert fetch(proxy.url(f"/svc/after/{i}")).status == 200
    assert len(_wait_lines(log, 2)) == 2
    assert len(_lines(rotated)) == 3
    assert proxy.stop() == 0


def test_a_bad_path_is_refused_at_start_and_kept_on_reload(
    stack: Stack, upstream: UpstreamServer, tmp_path: Path
) -> None:
    bad = _config(upstream, {"path": str(tmp_path / "no" / "such" / "dir.log")})
    proxy = stack.proxy(bad, start=False)
    proc = subprocess.run(
        meshgate_cmd("run", "-c", str(proxy.config_path)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1 and "access_log.path: cannot open" in proc.stderr, proc.stderr

    proxy = stack.proxy(_config(upstream, {"path": "access.log"}))
    proxy.reload(bad)
    proxy.wait_for_log(r"access log: cannot open .*kept the previous one")
    assert fetch(proxy.url("/svc/x")).status == 200
    assert len(_wait_lines(stack.directory / "access.log", 1)) == 1


def test_two_workers_write_whole_lines_to_one_file(stack: Stack, upstream: UpstreamServer) -> None:
    proxy = stack.proxy(_config(upstream, {"path": "access.log"}), workers=2)
    n = 400
    for i in range(n):
        with RawConnection(proxy.port) as conn:  # a new connection each: both workers serve
            conn.send(f"GET /svc/{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            assert conn.read_response().status == 200
    lines = _wait_lines(stack.directory / "access.log", n)  # each one parses whole
    assert len(lines) == n and len(_by_id(lines)) == n


def test_an_unread_stdout_pipe_never_holds_up_a_response(
    stack: Stack, upstream: UpstreamServer
) -> None:
    proxy: ProxyProcess = stack.proxy(
        _config(upstream, {"path": "-", "buffer_lines": 256}), start=False
    )
    with open(proxy.stderr_path, "wb") as err:
        proxy.process = subprocess.Popen(
            meshgate_cmd("run", "-c", str(proxy.config_path)),
            stdout=subprocess.PIPE,  # never read
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=proxy.directory,
            start_new_session=True,
        )
    proxy.wait_ready()
    n, batch = 24000, 100  # past what the pipes hold (about 2 MiB of lines)
    with RawConnection(proxy.port) as conn:
        request = b"GET /svc/fixed HTTP/1.1\r\nHost: a\r\n\r\n"
        for _ in range(n // batch):
            conn.send(request * batch)  # pipelined
            for _ in range(batch):
                assert conn.read_response(timeout=10).status == 200
    # The stdout pipe holds 64 KiB (a few hundred lines), the access log's
    # process's input pipe up to 1 MiB of frames, the queue 256 lines: what
    # came once those were full was dropped, and counted.
    text = fetch(proxy.admin_url("/metrics")).body.decode()
    dropped = _metric(text, "meshgate_access_log_dropped_total")
    assert 0 < dropped <= n, dropped
    assert fetch(proxy.url("/svc/fixed")).status == 200
    # Draining does not wait for the pipe either (the access log's process
    # is given up).
    assert proxy.stop(timeout=20) == 0
    assert "access log: its process was stuck" in proxy.stderr_text()
    assert "starting another" not in proxy.stderr_text()
    assert proxy.process is not None and proxy.process.stdout is not None
    proxy.process.stdout.close()
