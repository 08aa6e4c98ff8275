"""Self-tests of the harness: the test upstream, driven by curl and raw sockets
directly (no proxy), so that the proxy tests can trust what it records."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest

from support.client import (
    RawConnection,
    assert_problem,
    curl,
    fetch,
    free_port,
    parse_responses,
    raw_request,
)
from support.proxy import ProxyProcess, descendants, socket_owners
from support.upstream import (
    FIXED_BODY,
    UpstreamServer,
    pattern_bytes,
    pattern_sha256,
    write_pattern_file,
)


def test_pattern_is_deterministic_and_blocks_differ() -> None:
    assert pattern_bytes(0, 100) == pattern_bytes(0, 100)
    assert pattern_bytes(65536, 16) != pattern_bytes(0, 16)
    whole = pattern_bytes(0, 200_000)
    assert pattern_bytes(65530, 20) == whole[65530:65550]
    assert hashlib.sha256(whole).hexdigest() == pattern_sha256(200_000)


def test_echo_records_method_target_headers_in_order(upstream: UpstreamServer) -> None:
    r = fetch(
        upstream.url("/echo/a?x=1"), "-H", "X-Mixed-Case: One", "-H", "x-dup: 1", "-H", "X-Dup: 2"
    )
    assert r.returncode == 0 and r.status == 200, r.describe()
    doc = r.json()
    assert doc["method"] == "GET" and doc["target"] == "/echo/a?x=1"
    names = [h[0] for h in doc["headers"]]
    assert names.index("X-Mixed-Case") < names.index("x-dup") < names.index("X-Dup")
    (rec,) = upstream.requests
    assert rec.header_all("x-dup") == ["1", "2"]
    assert rec.header("x-mixed-case") == "One"
    assert rec.body_complete and rec.finished and rec.framing == "none"
    assert r.header("x-upstream") == "up" and r.header("x-target") == "/echo/a?x=1"


def test_fixed_and_status(upstream: UpstreamServer) -> None:
    assert fetch(upstream.url("/fixed")).body == FIXED_BODY
    r = fetch(upstream.url("/status/418"))
    assert r.status == 418 and r.body == b"status 418\n"
    r = fetch(upstream.url("/anything"), "-H", "x-test-behavior: fixed")
    assert r.body == FIXED_BODY


@pytest.mark.parametrize("mode", ["length", "chunked", "close"])
def test_download_modes(upstream: UpstreamServer, mode: str) -> None:
    size = 3_000_001
    r = fetch(upstream.url(f"/download?size={size}&mode={mode}"))
    assert r.returncode == 0, r.describe()
    assert len(r.body) == size
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(size)
    te = r.header("transfer-encoding")
    assert (te == "chunked") == (mode == "chunked")
    assert (r.header("content-length") is not None) == (mode == "length")


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_is_recorded_whole(upstream: UpstreamServer, tmp_path: Path, chunked: bool) -> None:
    path = tmp_path / "up.bin"
    digest = write_pattern_file(path, 2_500_000)
    args = ["-X", "POST", "-T", str(path), "-H", "Expect:"]
    if chunked:
        args += ["-H", "Transfer-Encoding: chunked"]
    r = fetch(upstream.url("/echo"), *args)
    assert r.status == 200, r.describe()
    doc = r.json()
    assert doc["body_sha256"] == digest and doc["body_len"] == 2_500_000
    assert doc["framing"] == ("chunked" if chunked else "length")
    (rec,) = upstream.requests
    assert rec.body_complete and hashlib.sha256(rec.body).hexdigest() == digest


def test_keepalive_connections_are_counted(upstream: UpstreamServer) -> None:
    url = upstream.url("/echo")
    cp = curl("-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", url, url, url)
    assert cp.returncode == 0, cp.stderr
    assert upstream.connection_count == 1
    assert [r.seq for r in upstream.requests] == [0, 1, 2]
    curl("-o", "/dev/null", url)
    assert upstream.connection_count == 2


def test_head_204_304_have_no_body(upstream: UpstreamServer) -> None:
    reply = raw_request(
        upstream.port,
        b"HEAD /download?size=5000 HTTP/1.1\r\nHost: u\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: u\r\n\r\n"
        b"GET /status/304?cl=99 HTTP/1.1\r\nHost: u\r\n\r\n"
        b"GET /fixed HTTP/1.1\r\nHost: u\r\nConnection: close\r\n\r\n",
    )
    assert reply.closed, reply.describe()
    head, r204, r304, fixed = reply.responses(["HEAD", "GET", "GET", "GET"])
    assert head.status == 200 and head.header("content-length") == "5000" and head.body == b""
    assert r204.status == 204 and r304.status == 304 and r304.header("content-length") == "99"
    assert fixed.body == FIXED_BODY


def test_expect_100_continue(upstream: UpstreamServer) -> None:
    r = fetch(
        upstream.url("/echo"),
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        "--data-binary",
        "x" * 2048,
    )
    assert r.status == 200 and r.interim == [100], r.describe()
    assert r.json()["sent_continue"] is True and r.json()["body_len"] == 2048
    r = fetch(
        upstream.url("/x"),
        "-H",
        "x-test-behavior: expect-reject",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        "--data-binary",
        "x" * 2048,
    )
    assert r.status == 417, r.describe()


def test_close_without_answer_and_answer_then_close(upstream: UpstreamServer) -> None:
    r = fetch(upstream.url("/close"))
    assert r.returncode == 52, r.describe()  # curl: empty reply from server
    conn = RawConnection(upstream.port)
    conn.send(b"GET /answer-close HTTP/1.1\r\nHost: u\r\n\r\n")
    resp = conn.read_response()
    assert resp.status == 200 and resp.header("connection") is None
    assert conn.read_until_closed(5).closed


def test_close_reused_answers_first_request_only(upstream: UpstreamServer) -> None:
    reply = raw_request(
        upstream.port,
        b"GET /close-reused HTTP/1.1\r\nHost: u\r\n\r\n" * 2,
    )
    assert reply.closed
    assert len(reply.responses()) == 1


def test_idle_timeout_closes_idle_connections(make_upstream) -> None:
    up = make_upstream("idle", idle_timeout=0.3)
    conn = RawConnection(up.port)
    conn.send(b"GET /fixed HTTP/1.1\r\nHost: u\r\n\r\n")
    assert conn.read_response().body == FIXED_BODY
    reply = conn.read_until_closed(5)
    assert reply.closed and reply == b""
    up.wait_for(lambda s: all(c.closed for c in s.connections), what="closed connection")


def test_truncate_is_visible_to_curl(upstream: UpstreamServer) -> None:
    for mode in ("length", "chunked"):
        r = fetch(upstream.url(f"/truncate?size=100000&mode={mode}"))
        assert r.returncode == 18, r.describe()  # curl: partial file


def test_slow_streams_chunks(upstream: UpstreamServer) -> None:
    start = time.monotonic()
    r = fetch(upstream.url("/slow?headers_delay=0.2&chunks=3&chunk_delay=0.1&chunk_size=4"))
    assert r.body == b"x" * 12
    assert time.monotonic() - start >= 0.4


def test_aborted_chunked_body_is_recorded_incomplete(upstream: UpstreamServer) -> None:
    with RawConnection(upstream.port) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        upstream.wait_for(lambda s: any(r.body_len == 5 for r in s.requests), what="5 bytes")
    (rec,) = upstream.wait_finished()
    assert not rec.body_complete and rec.error in ("eof", "reset") and rec.body == b"hello"


def test_bad_chunk_is_recorded_as_an_error(upstream: UpstreamServer) -> None:
    reply = raw_request(
        upstream.port,
        b"POST /echo HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    assert reply.status == 400 and reply.closed
    (rec,) = upstream.wait_finished()
    assert not rec.body_complete and rec.error and rec.error.startswith("bad-chunk")


def test_content_length_body_cut_short(upstream: UpstreamServer) -> None:
    reply = raw_request(
        upstream.port, b"POST /echo HTTP/1.1\r\nHost: u\r\nContent-Length: 10\r\n\r\nabc", 0.3
    )
    assert reply == b""
    (rec,) = upstream.wait_finished()
    assert rec.body == b"abc" and not rec.body_complete


def test_raw_bytes_recorded_and_cleared(upstream: UpstreamServer) -> None:
    with RawConnection(upstream.port) as conn:
        conn.send(b"GET /fi")
        upstream.wait_for(lambda s: s.bytes_received == 7, what="7 bytes")
        assert upstream.connections[0].raw == b"GET /fi"
        assert upstream.requests == []
    upstream.wait_for(lambda s: all(c.closed for c in s.connections), what="close")
    upstream.clear()
    assert upstream.bytes_received == 0 and upstream.connections == []


def test_trailers_and_chunk_extensions(upstream: UpstreamServer) -> None:
    reply = raw_request(
        upstream.port,
        b"POST /echo HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    (resp,) = reply.responses()
    doc = resp.json()
    assert doc["body"] == "abc" and doc["trailers"] == [["X-Trailer", "t"]]


def test_http10_request_closes(upstream: UpstreamServer) -> None:
    reply = raw_request(upstream.port, b"GET /download?size=1000&mode=close HTTP/1.0\r\n\r\n")
    assert reply.closed
    (resp,) = reply.responses()
    assert resp.framing == "close" and resp.body == pattern_bytes(0, 1000)


def test_parse_responses_pipelined_chunked_and_length() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        b"HTTP/1.0 200 OK\r\n\r\nrest"
    )
    a, b, c = parse_responses(data)
    assert a.interim == [100] and a.body == b"abc" and a.framing == "chunked"
    assert b.body == b"hi" and c.body == b"rest" and c.framing == "close"


def test_assert_problem_accepts_rfc9457() -> None:
    (resp,) = parse_responses(
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/problem+json\r\n"
        b"content-length: 66\r\n\r\n"
        b'{"type":"about:blank","title":"t","status":502,"detail":"d","x":1}'
    )
    assert assert_problem(resp, 502)["x"] == 1
    with pytest.raises(AssertionError):
        assert_problem(resp, 504)


def test_raw_request_reports_timeout_when_server_keeps_open(upstream: UpstreamServer) -> None:
    reply = raw_request(upstream.port, b"GET /fixed HTTP/1.1\r\nHost: u\r\n\r\n", 0.3)
    assert not reply.closed and reply.status == 200


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_proxy_process_renders_config_with_ports(tmp_path: Path) -> None:
    proxy = ProxyProcess({"routes": []}, tmp_path)
    text = proxy.config_path.read_text()
    assert f"listen: 127.0.0.1:{proxy.port}" in text
    assert f"admin: 127.0.0.1:{proxy.admin_port}" in text
    # A string keeps its own line numbers: the ports are appended.
    proxy.write_config("upstreams: {}\nroutes: []\n")
    lines = proxy.config_path.read_text().splitlines()
    assert lines[:2] == ["upstreams: {}", "routes: []"] and lines[2].startswith("listen:")


def test_socket_owners_finds_this_process(upstream: UpstreamServer) -> None:
    import os

    with RawConnection(upstream.port) as conn:
        local_port = conn.sock.getsockname()[1]
        owners = socket_owners([local_port], [os.getpid()])
    assert owners == {local_port: os.getpid()}
    assert os.getpid() not in descendants(os.getpid())
