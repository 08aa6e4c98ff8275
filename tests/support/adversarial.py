"""Cases and verdicts for the adversarial suite (tests/adversarial/, issue 16).

A case either is refused (a 4xx, or the documented 501 for upgrades and
CONNECT, with the connection closed and nothing at all reaching the
upstream) or is served safely (exactly the requests the gateway's own framing
says, each with a head the gateway wrote, and the connection still in step
for the next request).

Why no sleeps: when a refused connection is seen closed, every request the
gateway forwarded from it before the refusal has been answered (a
connection's answers go in order), so the upstream has already recorded it.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass

import pytest

from .client import RawConnection, RawReply, parse_responses
from .proxy import ProxyProcess, upstream_block
from .upstream import RecordedRequest, UpstreamServer

# Limits small enough that the bombs are cheap to send.
LIMITS = {"max_request_line": 2048, "max_header_bytes": 8192, "header_timeout": "2s"}
# Inside a body: what a desynchronised parser would take for a second request.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
# Documented refusals (README, security notes): upgrades and CONNECT are 501.
REFUSED = (400, 405, 411, 413, 414, 417, 431, 501, 505)
# A byte that may appear in a head the gateway writes: visible ASCII, SP, HT.
_BAD_HEAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def gateway_config(up: UpstreamServer, **extra: object) -> dict[str, object]:
    """Every path to the recording upstream, under `LIMITS`."""
    return {
        "limits": LIMITS,
        "upstreams": {"u": upstream_block(up)},
        "routes": [{"path": "/**", "upstream": "u"}],
        **extra,
    }


# -- the cases -------------------------------------------------------------------


@dataclass(frozen=True)
class Refuse:
    """Answered with one of `statuses`, the connection closed, nothing upstream."""

    statuses: tuple[int, ...] = (400,)


@dataclass(frozen=True)
class Serve:
    """Forwarded as exactly these (target, body) requests, in order; a refusal
    in `or_refuse` is accepted instead (an implementation's choice, both safe)."""

    forwarded: tuple[tuple[str, bytes], ...]
    or_refuse: tuple[int, ...] = ()
    status: int = 200
    """The status of the (first) answer; with nothing forwarded, the
    gateway's own answer, after which the connection may stay open."""
    methods: tuple[str, ...] = ()
    """The methods of the responses expected (for HEAD); GET when not given."""


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    expect: Refuse | Serve


def params(cases: list[Case]) -> list[object]:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return [pytest.param(c, id=c.id) for c in cases]


# -- verdicts ---------------------------------------------------------------------


def send(conn: RawConnection, data: bytes, *, bytewise: bool = False) -> None:
    """Send all of `data`, or one byte per write (the parser's state must not
    depend on how the bytes were cut)."""
    try:
        if not bytewise:
            conn.send(data)
            return
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            conn.send(data[i : i + 1])
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused mid-send: what came back is judged below


def assert_upstream_saw_nothing(up: UpstreamServer) -> None:
    assert up.requests == [], [(r.method, r.target, r.raw_head[:200]) for r in up.requests]
    assert up.bytes_received == 0, [c.raw[:300] for c in up.connections]


def assert_aborted(up: UpstreamServer) -> None:
    """One request reached the upstream, and its body never completed."""
    (rec,) = up.wait_finished()
    assert not rec.body_complete and rec.error in ("eof", "reset"), rec
    assert_clean_head(rec)


def assert_refused(reply: RawReply, statuses: tuple[int, ...]) -> None:
    assert reply.status in statuses, reply.describe()
    assert reply.closed, f"connection left open after a refusal: {reply.describe()}"
    (resp,) = parse_responses(bytes(reply))  # one answer, nothing after it
    assert resp.header("connection") == "close", resp.headers
    ctype = (resp.header("content-type") or "").split(";")[0]
    assert ctype == "application/problem+json", resp.headers


def assert_clean_head(rec: RecordedRequest) -> None:
    """The head the upstream received is one the gateway wrote: CRLF lines,
    no control bytes, no folding, one Host, one framing at most."""
    lines = rec.raw_head.split(b"\r\n")
    for line in lines:
        assert not _BAD_HEAD_BYTE.search(line), f"control byte upstream: {rec.raw_head!r}"
    for line in lines[1:]:
        assert line[:1] not in (b" ", b"\t"), f"folded line upstream: {rec.raw_head!r}"
    assert len(rec.header_all("host")) <= 1, rec.headers
    cl, te = rec.header_all("content-length"), rec.header_all("transfer-encoding")
    assert len(cl) + len(te) <= 1, f"framing upstream: {rec.headers}"
    assert not te or te == ["chunked"], rec.headers
    assert not cl or cl[0].isdigit(), rec.headers
    assert not rec.path.startswith("/smuggled"), rec.target


def assert_forwarded(up: UpstreamServer, forwarded: tuple[tuple[str, bytes], ...]) -> None:
    reqs = up.wait_finished()
    got = [(r.target, r.body) for r in reqs]
    assert got == list(forwarded), got
    for rec in reqs:
        assert rec.body_complete, rec
        assert rec.error is None, rec
        assert_clean_head(rec)


def run_case(
    gateway: ProxyProcess, up: UpstreamServer, case: Case, *, bytewise: bool = False
) -> None:
    expect = case.expect
    with RawConnection(gateway.port) as conn:
        send(conn, case.data, bytewise=bytewise)
        if isinstance(expect, Refuse):
            assert_refused(conn.read_until_closed(5), expect.statuses)
            if bytewise and up.requests:
                # The head was whole and valid, and went on before the bad
                # body byte arrived: the upstream must see that body cut off.
                assert_aborted(up)
            else:
                assert_upstream_saw_nothing(up)
            return
        first = conn.read_response(expect.methods[0] if expect.methods else "GET", timeout=5)
        if expect.or_refuse and first.status in expect.or_refuse:
            rest = conn.read_until_closed(5)
            assert rest.closed and rest == b"", f"after the refusal: {rest.describe()}"
            assert first.header("connection") == "close", first.headers
            assert_upstream_saw_nothing(up)
            return
        assert first.status == expect.status, (first.status, first.headers, first.body[:300])
        answers = [first]
        if expect.forwarded:
            methods = list(expect.methods) or ["GET"] * len(expect.forwarded)
            for method in methods[1:]:
                answers.append(conn.read_response(method, timeout=5))
            for (target, _), resp in zip(expect.forwarded, answers, strict=True):
                assert resp.status == 200, resp
                if resp.body:
                    assert json.loads(resp.body)["target"] == target, resp.body[:300]
        if answers[-1].header("connection") != "close":
            # Still in step: the next request is answered as itself.
            send(conn, b"GET /after HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            after = conn.read_response(timeout=5)
            assert json.loads(after.body)["target"] == "/after", after.body[:300]
            forwarded = (*expect.forwarded, ("/after", b""))
        else:
            assert conn.read_until_closed(5).closed
            forwarded = expect.forwarded
    assert_forwarded(up, forwarded)
