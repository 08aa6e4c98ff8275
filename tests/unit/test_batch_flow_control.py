"""Write batching and flow control, in memory: a streamed body reaches the
transport within the loop turn, so that a peer that reads nothing stops the
reads from the other side in that same turn (`http.batch`).

One wake-up of the event loop is not one read: libuv reads a readable socket
up to 32 times in a row while its reading is on (256 kB a read with uvloop).
Held in the batch until the end of the turn, what those reads produced was
invisible to the transport's high-water mark, so that `pause_writing` (and
with it the paused reading) came only after 32 reads: up to 8 MB held per
stalled client, and 20 slow readers of large answers grew the gateway by
more than 100 MB (tests/integration/test_proxy_limits.py).

These tests drive the proxy as libuv would: one wake-up is up to 32 reads,
stopped as soon as the reading transport is paused, then the batch's flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from meshgate.http.batch import FLUSH_AT
from support.h1mem import Harness, MemTransport, RecordingServerProtocol, harness, in_memory_pools

HIGH = 64 * 1024  # the transports' high-water mark (asyncio's and uvloop's default)
READS_PER_WAKEUP = 32  # libuv's uv__read loop
BIG = 64 << 20


class StalledTransport(MemTransport):
    """A transport whose peer reads nothing: it keeps what is written and
    calls `pause_writing` past `HIGH` bytes, from inside the write, as
    asyncio's and uvloop's transports do."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int] | None) -> None:
        super().__init__(loop, peer)
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.paused and len(self.data) > HIGH:
            self.paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()  # type: ignore[attr-defined]

    def get_write_buffer_size(self) -> int:
        return len(self.data)


@pytest.fixture(scope="module", autouse=True)
def _in_memory_proxy() -> Iterator[None]:
    with in_memory_pools():
        yield


@pytest.fixture
def h() -> Iterator[Harness]:
    with harness() as h:
        yield h


def wakeup(h: Harness, reading: MemTransport, protocol: asyncio.Protocol, read: bytes) -> int:
    """One epoll wake-up for `reading`'s socket: libuv's reads, then the end
    of the loop turn (the batch's flush). How many reads there were."""
    reads = 0
    while reading.reading and reads < READS_PER_WAKEUP:
        protocol.data_received(read)
        reads += 1
    h.batcher.flush()
    return reads


def stalled_client(h: Harness) -> StalledTransport:
    """The harness's connection, replaced by one whose client reads nothing."""
    h.proto = RecordingServerProtocol(h.state)
    h.client = StalledTransport(h.loop, ("127.0.0.1", 50001))
    h.client.attach(h.proto)
    return h.client


@pytest.mark.parametrize("size", [256000, 16384], ids=["full-reads", "short-reads"])
def test_a_client_that_reads_nothing_stops_the_upstream_within_the_turn(
    h: Harness, size: int
) -> None:
    client = stalled_client(h)
    h.proto.data_received(b"GET /download HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    h.batcher.flush()
    up = h.upstreams[0]
    assert up.transport.data.startswith(b"GET /download HTTP/1.1\r\n")
    up.conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
    reads = wakeup(h, up.transport, up.conn, b"x" * size)
    # Reading from the upstream paused in the turn, once the client's
    # transport held more than its high-water mark: not after 32 reads.
    assert client.paused and h.proto.write_paused
    assert not up.transport.reading
    assert reads < READS_PER_WAKEUP
    held = len(client.data) + sum(len(b) for b in h.proto.wbuf)
    assert held <= HIGH + FLUSH_AT + size, held
    # Later wake-ups read nothing more (the upstream's socket stays unread).
    assert wakeup(h, up.transport, up.conn, b"x" * size) == 0


def test_a_small_answer_still_leaves_once_per_batch(h: Harness) -> None:
    h.feed(b"GET /a HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert h.client.data.endswith(b"\r\n\r\nhello")
    h.client.data.clear()
    h.proto.data_received(b"GET /b HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    h.batcher.flush()
    up = next(u for u in h.upstreams if u.conn.sink is not None)
    up.conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
    # Held in the batch until the end of the turn, then written at once.
    assert not h.client.data
    h.batcher.flush()
    assert h.client.data.startswith(b"HTTP/1.1 200 ")
    assert h.client.data.endswith(b"\r\n\r\nhello")


def test_an_upstream_that_reads_nothing_stops_the_client_within_the_turn(h: Harness) -> None:
    up = h.upstreams[0]
    stalled = StalledTransport(h.loop, None)
    up.transport = stalled
    stalled.attach(up.conn)
    h.proto.data_received(
        b"POST /upload HTTP/1.1\r\nHost: gw.test\r\ncontent-length: %d\r\n\r\n" % BIG
    )
    h.batcher.flush()
    assert stalled.data.startswith(b"POST /upload HTTP/1.1\r\n")
    reads = wakeup(h, h.client, h.proto, b"y" * 256000)
    # Reading from the client paused in the turn (the upstream's high-water
    # mark), not after 32 reads.
    assert stalled.paused
    assert not h.client.reading
    assert reads < READS_PER_WAKEUP
    held = len(stalled.data) + sum(len(b) for b in up.conn.wbuf)
    assert held <= HIGH + FLUSH_AT + 256000 + 1024, held
