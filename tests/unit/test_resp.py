"""`ratelimit.resp` on its own: the reply parser, and the pipelined
connection against a loopback server that plays Redis (split replies, a
garbled reply, silence, AUTH and SELECT first)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from meshgate.ratelimit.resp import (
    RespConnection,
    RespError,
    RespFailure,
    RespTimeout,
    command,
    parse_reply,
)


def test_command_is_an_array_of_bulk_strings() -> None:
    assert command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert command(b"SET", b"", b"a\r\nb") == b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\na\r\nb\r\n"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b":42\r\n", 42),
        (b":-1\r\n", -1),
        (b"+OK\r\n", b"OK"),
        (b"$3\r\nabc\r\n", b"abc"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*4\r\n:1\r\n:99\r\n:0\r\n:0\r\n", [1, 99, 0, 0]),
        (b"*2\r\n*1\r\n:1\r\n$2\r\nab\r\n", [[1], b"ab"]),
    ],
)
def test_parse_reply(raw: bytes, value: Any) -> None:
    got = parse_reply(raw + b"+next\r\n", 0)
    assert got is not None
    assert got == (value, len(raw))
    # Every proper prefix is incomplete, never an error or a wrong value.
    for cut in range(1, len(raw)):
        assert parse_reply(raw[:cut], 0) is None, raw[:cut]


def test_an_error_reply_is_a_resp_error() -> None:
    got = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)
    assert got is not None
    assert isinstance(got[0], RespError) and str(got[0]).startswith("NOSCRIPT")


@pytest.mark.parametrize(
    "raw", [b"?what\r\n", b":abc\r\n", b"$3\r\nabcd\r\n", b"*99999999\r\n", b"$999999999999\r\n"]
)
def test_what_is_not_resp_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_reply(raw, 0)


class FakeRedis:
    """A loopback server: `answer(request_bytes) -> reply bytes or None`,
    called with everything a connection has sent so far that is unanswered."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.received = bytearray()
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pending = b""
        try:
            while data := await reader.read(65536):
                self.received += data
                pending += data
                reply = self.answer(pending)
                if reply is not None:
                    pending = b""
                    writer.write(reply)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Callable[[bytes], bytes | None]], Any]]:
    made: list[FakeRedis] = []

    async def make(answer: Callable[[bytes], bytes | None]) -> tuple[FakeRedis, str]:
        server = FakeRedis(answer)
        made.append(server)
        return server, await server.start()

    yield make
    for server in made:
        await server.stop()


def _count(request: bytes) -> int:
    return request.count(b"*2\r\n$3\r\nGET\r\n")


async def _gets(conn: RespConnection, n: int) -> list[Any]:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in range(n)]
    for i, f in enumerate(futs):
        conn.submit(command(b"GET", b"%d" % i), f.set_result)
    return await asyncio.gather(*futs)


async def test_a_turns_commands_go_in_one_write_and_replies_split_anywhere_come_back_in_order(
    fake: Any,
) -> None:
    def answer(req: bytes) -> bytes | None:
        n = _count(req)
        return b"".join(b":%d\r\n" % i for i in range(n)) if n == 50 else None

    server, url = await fake(answer)
    conn = RespConnection(url, timeout=2)
    try:
        assert await _gets(conn, 50) == list(range(50))
        assert server.connections == 1
    finally:
        await conn.close()


async def test_a_garbled_reply_fails_every_waiting_command_and_the_next_batch_reconnects(
    fake: Any,
) -> None:
    state = {"garble": True}

    def answer(req: bytes) -> bytes | None:
        n = _count(req)
        if state["garble"]:
            state["garble"] = False
            return b":1\r\n?garbage\r\n"
        return b"".join(b":7\r\n" for _ in range(n))

    server, url = await fake(answer)
    conn = RespConnection(url, timeout=2)
    try:
        got = await _gets(conn, 3)
        assert got[0] == 1
        assert all(isinstance(g, RespFailure) for g in got[1:]), got
        assert await _gets(conn, 2) == [7, 7]
        assert server.connections == 2
    finally:
        await conn.close()


async def test_silence_fails_within_the_timeout(fake: Any) -> None:
    _, url = await fake(lambda req: None)
    conn = RespConnection(url, timeout=0.2)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = await _gets(conn, 5)
        assert all(isinstance(g, RespTimeout) for g in got), got
        assert loop.time() - started < 1.0
    finally:
        await conn.close()


async def test_auth_and_select_go_first(fake: Any) -> None:
    def answer(req: bytes) -> bytes | None:
        if req.startswith(b"*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$6\r\nsecret\r\n"):
            return b"+OK\r\n"
        if req == command(b"SELECT", b"3"):
            return b"+OK\r\n"
        n = _count(req)
        return b":5\r\n" * n if n else None

    server, url = await fake(answer)
    conn = RespConnection(url.replace("redis://", "redis://user:secret@")[:-2] + "/3", timeout=2)
    try:
        assert await _gets(conn, 1) == [5]
        assert bytes(server.received).startswith(
            command(b"AUTH", b"user", b"secret") + command(b"SELECT", b"3")
        )
    finally:
        await conn.close()


async def test_a_refused_auth_fails_the_queued_commands(fake: Any) -> None:
    _, url = await fake(lambda req: b"-WRONGPASS invalid password\r\n")
    conn = RespConnection(url.replace("redis://", "redis://:bad@"), timeout=2)
    try:
        (got,) = await _gets(conn, 1)
        assert isinstance(got, RespFailure) and "WRONGPASS" in str(got)
    finally:
        await conn.close()


async def test_nothing_listening_is_a_failure_not_a_hang() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = RespConnection(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        (got,) = await _gets(conn, 1)
        assert isinstance(got, RespFailure)
    finally:
        await conn.close()


def test_decision_replies_split_anywhere_read_the_same_as_the_general_parser() -> None:
    """The four-integer fast path and `parse_reply` agree, whatever the reads."""
    from meshgate.ratelimit.resp import _Protocol

    replies = [b"*4\r\n:1\r\n:-2\r\n:3\r\n:4\r\n", b"*4\r\n:0\r\n:0\r\n:12345678901\r\n:7\r\n"]
    replies += [
        b"-NOSCRIPT no\r\n",
        b"*3\r\n:1\r\n:2\r\n:3\r\n",
        b"*4\r\n:1\r\n:2\r\n:3\r\n$1\r\nx\r\n",
    ]
    stream = b"".join(replies)
    expected = [parse_reply(r, 0)[0] for r in replies]  # type: ignore[index]
    for cut in range(1, len(stream)):
        conn = RespConnection("redis://127.0.0.1:1/0", timeout=1)
        got: list[Any] = []
        for _ in replies:
            conn.waiting.append((got.append, 0.0))
        proto = _Protocol(conn)
        proto.data_received(stream[:cut])
        proto.data_received(stream[cut:])
        assert [str(g) if isinstance(g, RespError) else g for g in got] == [
            str(e) if isinstance(e, RespError) else e for e in expected
        ], cut
        assert not proto.buf
