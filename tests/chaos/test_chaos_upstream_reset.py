"""An upstream that resets the connection (SO_LINGER 0: an RST) mid-response.

Once the head has gone to the client, the only honest thing left is to end
the client's connection short of what the head promised: the client must see
the body stop before its Content-Length (or its last chunk), at once, not
after a timeout. A reset before any byte is a 502. Either way the gateway
goes on serving, and no later request lands on a connection whose framing
was lost: each answer is its own (the scripted upstream names the
connection, the sequence number and the target in every body).

The gateway's timeouts are 30 s and retries are off, so that a hang shows
as a wait far longer than the bound here, and a dead pooled connection used
again shows as a failed request instead of a retried one.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator

import pytest

from support.bad_upstream import ScriptedUpstream
from support.client import RawConnection, assert_problem, parse_response
from support.proxy import ProxyProcess, Stack, upstream_block

pytestmark = [pytest.mark.engine, pytest.mark.chaos]

PROMISED = 100_000
ANSWERS = {
    "partial-body": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % PROMISED + b"x" * 30_000,
    "head-only": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % PROMISED,
    "partial-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"3e8\r\n" + b"y" * 1000 + b"\r\n",
    "nothing": b"",
}  # fmt: skip
NO_HANG = 5.0  # seconds; the gateway's own timeouts are 30 s


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream(ANSWERS, resets=frozenset(ANSWERS))
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(module_stack: Stack, scripted: ScriptedUpstream) -> ProxyProcess:
    up = upstream_block(
        scripted.address,
        timeouts={"read": "30s", "total": "30s"},
        retry={"attempts": 1},
        outlier_detection=False,
    )
    return module_stack.proxy(
        {"upstreams": {"up": up}, "routes": [{"path": "/**", "upstream": "up"}]}
    )


def own_answers(proxy: ProxyProcess, n: int, tag: str) -> None:
    """`n` requests on one keep-alive client connection, each answered by
    the upstream with its own target, none failed."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for i in range(n):
            target = f"/ok/{tag}/{i}"
            conn.request("GET", target)
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200, (resp.status, body)
            assert body.endswith(f" target={target}"), (target, body)
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["partial-body", "head-only", "partial-chunked"])
def test_a_reset_after_the_head_ends_the_client_connection_short(
    gateway: ProxyProcess, scripted: ScriptedUpstream, kind: str
) -> None:
    own_answers(gateway, 3, f"before-{kind}")  # a pooled connection exists
    with RawConnection(gateway.port) as conn:
        conn.send(f"GET /bad/{kind} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        reply = conn.read_until_closed(timeout=NO_HANG)
    assert reply.closed, f"the gateway kept the client waiting: {reply.describe()}"
    assert reply.startswith(b"HTTP/1.1 200 "), reply.describe()
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    lowered = head.lower()
    if kind == "partial-chunked":
        assert b"transfer-encoding: chunked" in lowered, head
        assert not body.endswith(b"0\r\n\r\n"), "a truncated body was given its last chunk"
        assert b"y" * 1000 in body.replace(b"\r\n", b""), body[:200]
    else:
        assert f"content-length: {PROMISED}".encode() in lowered, head
        assert len(body) < PROMISED
        if kind == "partial-body":
            assert body == b"x" * len(body) and len(body) > 0
    # The client library's view: a clean, immediate error, not a hang.
    started = time.monotonic()
    client = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=NO_HANG)
    try:
        client.request("GET", f"/bad/{kind}")
        resp = client.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        client.close()
    assert time.monotonic() - started < NO_HANG
    # The gateway goes on, and no answer after it is another request's.
    own_answers(gateway, 20, f"after-{kind}")
    assert gateway.alive
    assert "Traceback" not in gateway.stderr_text(), gateway.stderr_text()[-3000:]


def test_a_reset_before_any_byte_is_a_502(gateway: ProxyProcess) -> None:
    own_answers(gateway, 3, "before-nothing")
    with RawConnection(gateway.port) as conn:
        started = time.monotonic()
        conn.send(b"GET /bad/nothing HTTP/1.1\r\nHost: gw\r\n\r\n")
        resp = conn.read_response(timeout=NO_HANG)
        assert time.monotonic() - started < NO_HANG
        assert_problem(resp, 502)
        # The client's connection is still good: the next request on it is answered.
        conn.send(b"GET /ok/same-connection HTTP/1.1\r\nHost: gw\r\n\r\n")
        again = conn.read_response(timeout=NO_HANG)
    assert again.status == 200 and again.body.endswith(b" target=/ok/same-connection"), again
    own_answers(gateway, 20, "after-nothing")


def test_resets_under_load_leave_no_desynced_connection(
    gateway: ProxyProcess, scripted: ScriptedUpstream
) -> None:
    """Resets interleaved with good requests, on several client connections
    at once: every good request gets its own answer, each reset request a
    short body or a 502, within the bound."""
    failures: list[str] = []
    slow: list[float] = []

    def client(c: int) -> None:
        kinds = list(ANSWERS)
        for i in range(40):
            kind = kinds[(c + i) % len(kinds)] if i % 4 == 3 else None
            target = f"/bad/{kind}" if kind else f"/ok/load/{c}/{i}"
            started = time.monotonic()
            conn = RawConnection(gateway.port)
            try:
                conn.send(
                    f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()
                )
                reply = conn.read_until_closed(timeout=NO_HANG)
            finally:
                conn.close()
            elapsed = time.monotonic() - started
            if not reply.closed:
                slow.append(elapsed)
                continue
            if kind is None:
                resp, _ = parse_response(bytes(reply))
                if resp.status != 200 or not resp.body.endswith(f" target={target}".encode()):
                    failures.append(f"{target}: {resp.status} {resp.body[:200]!r}")
            elif kind == "nothing":
                if reply.status != 502:
                    failures.append(f"{target}: {reply.describe()}")
            elif reply.status != 200:
                failures.append(f"{target}: {reply.describe()}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert slow == [], f"{len(slow)} requests not ended within {NO_HANG}s"
    assert failures == [], failures[:5]
    assert gateway.alive
