"""Header count bombs and pipelining floods: bounded, answered in order, and
an attack inside a pipeline ends the connection at that request, with
nothing after it reaching the upstream."""

from __future__ import annotations

import json
import threading
import time

import pytest

from support.adversarial import (
    LIMITS,
    SMUGGLED,
    assert_clean_head,
    assert_refused,
    assert_upstream_saw_nothing,
    send,
)
from support.client import RawConnection, RawResponse, parse_responses
from support.proxy import ProxyProcess
from support.upstream import UpstreamServer

pytestmark = [pytest.mark.engine, pytest.mark.adversarial]

MAX_HEADER_BYTES = int(str(LIMITS["max_header_bytes"]))


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()


@pytest.mark.parametrize(
    "line",
    [b"a:\r\n", b"a: b\r\n", b"X-Header-Name: v\r\n", b"Host: gw.test\r\n", b"Cookie: a=b\r\n"],
    ids=["empty", "tiny", "named", "host", "cookie"],
)
def test_header_count_bomb_is_refused_promptly(
    gateway: ProxyProcess, up: UpstreamServer, line: bytes
) -> None:
    """100,000 header lines: cut at the byte limit, whatever the lines hold."""
    bomb = b"GET /b HTTP/1.1\r\nHost: gw.test\r\n" + line * 100_000 + b"\r\n"
    start = time.monotonic()
    with RawConnection(gateway.port) as conn:
        send(conn, bomb)
        reply = conn.read_until_closed(10)
    assert_refused(reply, (400, 431))
    assert time.monotonic() - start < 5, reply.describe()
    assert_upstream_saw_nothing(up)


def test_many_small_headers_under_the_limit_are_served(
    gateway: ProxyProcess, up: UpstreamServer
) -> None:
    count = MAX_HEADER_BYTES // 12  # `x-NNNN: v` lines, well under the limit in all
    lines = b"".join(b"x-%04d: v\r\n" % i for i in range(count))
    with RawConnection(gateway.port) as conn:
        send(conn, b"GET /many HTTP/1.1\r\nHost: gw.test\r\n" + lines + b"\r\n")
        resp = conn.read_response(timeout=10)
    assert resp.status == 200, resp
    (rec,) = up.requests
    assert sum(1 for n in rec.header_names() if n.startswith("x-0")) == count
    assert_clean_head(rec)


def _read_all(conn: RawConnection, n: int, methods: list[str], timeout: float) -> list[RawResponse]:
    out: list[RawResponse] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.append(conn.read_response(methods[len(out)], timeout=deadline - time.monotonic()))
    return out


def _send_in_background(conn: RawConnection, data: bytes) -> threading.Thread:
    """Send while the caller reads: the gateway stops reading when its
    pipeline or write buffer is full, and a client that only writes would
    deadlock with it."""
    t = threading.Thread(target=send, args=(conn, data), daemon=True)
    t.start()
    return t


def test_pipelining_flood_is_answered_in_order(gateway: ProxyProcess, up: UpstreamServer) -> None:
    n = 1000
    with RawConnection(gateway.port) as conn:
        sender = _send_in_background(conn, b"".join(get(f"/p/{i}") for i in range(n)))
        answers = _read_all(conn, n, ["GET"] * n, timeout=30)
        sender.join(10)
    assert [json.loads(r.body)["target"] for r in answers] == [f"/p/{i}" for i in range(n)]
    assert [r.target for r in up.requests] == [f"/p/{i}" for i in range(n)]


def test_pipelined_mixed_bodies_stay_in_step(gateway: ProxyProcess, up: UpstreamServer) -> None:
    reqs, expected = [], []
    for i in range(60):
        body = b"%d:" % i + SMUGGLED  # each body holds a request that is not one
        if i % 3 == 0:
            reqs.append(
                b"POST /m/%d HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n"
                % (i, len(body))
                + body
            )
        elif i % 3 == 1:
            reqs.append(
                b"POST /m/%d HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (i, body[:3], len(body) - 3, body[3:])
            )
        else:
            reqs.append(get(f"/m/{i}"))
            body = b""
        expected.append((f"/m/{i}", body))
    with RawConnection(gateway.port) as conn:
        sender = _send_in_background(conn, b"".join(reqs))
        answers = _read_all(conn, len(reqs), ["POST"] * len(reqs), timeout=30)
        sender.join(10)
    assert [json.loads(r.body)["target"] for r in answers] == [t for t, _ in expected]
    recs = up.wait_finished()
    assert [(r.target, r.body) for r in recs] == expected
    for rec in recs:
        assert rec.body_complete
        assert_clean_head(rec)


@pytest.mark.parametrize(
    "attack",
    [
        b"POST /x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\nHost: gw.test\n\n",
        b"GET /x HTTP/1.1\r\nHost: gw.test\r\nX: a\x00b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
    ],
    ids=["cl-te", "bare-lf", "nul", "upgrade", "connection-close"],
)
def test_nothing_after_a_pipelined_attack_reaches_the_upstream(
    gateway: ProxyProcess, up: UpstreamServer, attack: bytes
) -> None:
    before = [get(f"/before/{i}") for i in range(20)]
    after = [get(f"/after/{i}") for i in range(20)]
    with RawConnection(gateway.port) as conn:
        send(conn, b"".join(before) + attack + SMUGGLED + b"".join(after))
        reply = conn.read_until_closed(10)
    assert reply.closed, reply.describe()
    answers = parse_responses(bytes(reply))
    assert [json.loads(r.body)["target"] for r in answers[:20]] == [
        f"/before/{i}" for i in range(20)
    ]
    (last,) = answers[20:]  # the attack's answer, and nothing after it
    assert last.status in ((200,) if b"close" in attack else (400, 501)), last
    targets = [r.target for r in up.wait_finished()]
    expect = [f"/before/{i}" for i in range(20)] + (["/x"] if b"close" in attack else [])
    assert targets == expect, targets


def test_pipeline_limit_holds_a_slow_head(gateway: ProxyProcess, up: UpstreamServer) -> None:
    """Requests pipelined behind a slow one wait (reading pauses past the
    pipeline limit) and are answered after it, in order, none lost."""
    n = 100
    data = get("/slow?headers_delay=0.5") + b"".join(get(f"/q/{i}") for i in range(n))
    with RawConnection(gateway.port) as conn:
        sender = _send_in_background(conn, data)
        answers = _read_all(conn, n + 1, ["GET"] * (n + 1), timeout=30)
        sender.join(10)
    assert answers[0].body == b"slow\n"
    assert [json.loads(r.body)["target"] for r in answers[1:]] == [f"/q/{i}" for i in range(n)]
