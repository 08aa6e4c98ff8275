"""The protocol layer's path for filters that wait (Redis, a JWKS refetch).

In-process on loopback, with a real upstream socket: the filter chains are
replaced by ones that wait on futures the test controls, so that the
orderings a real Redis or IdP produces only by chance happen every time.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import uvloop

from meshgate.engine.load import load_config_text
from meshgate.engine.runtime import Runtime
from meshgate.filters import Chain, FilterRequest, LocalReply
from meshgate.protocol import h1
from meshgate.stream.stream import ProxyStream
from meshgate.upstream.cluster import PoolRegistry


class _Upstream(asyncio.Protocol):
    """Answers each request 200 after a short delay; counts targets."""

    def __init__(self, seen: collections.Counter[bytes]) -> None:
        self.seen = seen
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.seen[head.split(b" ")[1]] += 1
            asyncio.get_running_loop().call_later(
                0.02,
                self.transport.write,  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            )


async def _gateway(
    seen: collections.Counter[bytes],
    filter_for_b: Callable[[FilterRequest], Any],
) -> tuple[Runtime, int, list[asyncio.AbstractServer]]:
    loop = asyncio.get_running_loop()
    up = await loop.create_server(lambda: _Upstream(seen), "127.0.0.1", 0)
    port = up.sockets[0].getsockname()[1]
    config = load_config_text(
        f"""
upstreams:
  u: {{endpoints: ["127.0.0.1:{port}"]}}
routes:
- {{path: /a, name: a, upstream: u}}
- {{path: /b, name: b, upstream: u}}
""",
        "test.yaml",
    )
    registry = PoolRegistry(loop)
    runtime = Runtime.build(config, registry)
    match = runtime.router.match("GET", "h", "/b", [])
    assert match is not None
    match.route.target.chain = Chain([("wait", filter_for_b)])
    state = h1.ServerState(runtime, registry, loop=loop, streams=ProxyStream)
    server = await loop.create_server(lambda: h1.ServerProtocol(state), "127.0.0.1", 0)
    return runtime, server.sockets[0].getsockname()[1], [up, server]


async def _read_all(reader: asyncio.StreamReader, quiet: float = 0.3) -> bytes:
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), quiet)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def test_filters_finishing_with_the_exchange_ahead_start_it_once() -> None:
    """A (plain) and B (filters waiting) pipelined; B's filters finish in the
    loop turn where A's response completes. B goes upstream once."""

    async def main() -> tuple[collections.Counter[bytes], bytes]:
        seen: collections.Counter[bytes] = collections.Counter()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def wait() -> None:
            await gate

        _, port, servers = await _gateway(seen, lambda req: wait())
        original = ProxyStream.on_upstream_end

        def on_end(self: ProxyStream, conn: Any) -> None:
            if self.route_label == "a" and not gate.done():
                gate.set_result(None)  # B's decision arrives in this same turn
            original(self, conn)

        ProxyStream.on_upstream_end = on_end  # type: ignore[method-assign]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /a HTTP/1.1\r\nhost: h\r\n\r\nGET /b HTTP/1.1\r\nhost: h\r\n\r\n")
            data = await _read_all(reader)
            writer.close()
        finally:
            ProxyStream.on_upstream_end = original  # type: ignore[method-assign]
            for server in servers:
                server.close()
        return seen, data

    seen, data = uvloop.run(main())
    assert seen == {b"/a": 1, b"/b": 1}
    assert data.count(b"HTTP/1.1 200") == 2


def test_a_cancelled_wait_answers_503_instead_of_hanging() -> None:
    """What a filter awaits is cancelled under it (a JWKS fetch closed by a
    reload): the request is answered, and the connection goes on."""

    async def main() -> tuple[collections.Counter[bytes], bytes]:
        seen: collections.Counter[bytes] = collections.Counter()
        inner: list[asyncio.Task[None]] = []

        async def fetch() -> None:
            await asyncio.sleep(30)

        async def wait() -> LocalReply | None:
            task = asyncio.get_running_loop().create_task(fetch())
            inner.append(task)
            await asyncio.shield(task)
            return None

        _, port, servers = await _gateway(seen, lambda req: wait())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /b HTTP/1.1\r\nhost: h\r\n\r\n")
            await asyncio.sleep(0.1)
            inner[0].cancel()
            first = await _read_all(reader)
            writer.write(b"GET /a HTTP/1.1\r\nhost: h\r\n\r\n")
            second = await _read_all(reader)
            writer.close()
        finally:
            for server in servers:
                server.close()
        return seen, first + second

    seen, data = uvloop.run(main())
    assert data.startswith(b"HTTP/1.1 503"), data
    assert b"filter-unavailable" in data
    assert data.count(b"HTTP/1.1 200") == 1
    assert seen == {b"/a": 1}
