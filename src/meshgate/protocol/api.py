"""What a client connection and a request's stream know of each other.

The wire protocol (`protocol.h1`) parses requests; what happens to each one
(routing, filters, the upstream) is a stream's business (`stream`, Envoy's
`ActiveStream`). The connection is handed a `StreamFactory` by its listener
(`ServerState.streams`) and never imports the stream's module: these
Protocols are all either side sees of the other.

- The connection calls a `Stream`: once with the parsed head
  (`on_request_head`, reading a `RequestHead`), then with body bytes, the
  end of the request, write back-pressure, timeouts and the client's
  departure. A request refused while parsing is a stream answered with one
  call (`reply_local`).
- A stream calls its connection as a `StreamSink`: write, pause and resume
  reading for a reason (the `PAUSE_*` bits), close or abort, and say when its
  response is complete (`stream_done`), as `pool.ResponseSink` is for an
  upstream connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshgate.engine.runtime import Runtime
    from meshgate.observability.tracing import Tracing

__all__ = [
    "PAUSE_BUFFER",
    "PAUSE_DONE",
    "PAUSE_PIPELINE",
    "PAUSE_UPSTREAM",
    "Framing",
    "ListenerState",
    "RequestHead",
    "Stream",
    "StreamFactory",
    "StreamSink",
]

# Reasons for which reading from the client is paused (a bitmask).
PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
PAUSE_BUFFER = 2  # body buffered while waiting for an upstream connection
PAUSE_PIPELINE = 4  # too many queued pipelined requests
PAUSE_DONE = 8  # the connection is closing: read nothing more


class ListenerState(Protocol):
    """What a stream reads of the listener its connection came in on."""

    @property
    def runtime(self) -> Runtime: ...
    @property
    def scheme(self) -> bytes: ...
    @property
    def draining(self) -> bool: ...
    @property
    def observe(self) -> Callable[[Any], None] | None: ...
    @property
    def tracing(self) -> Tracing | None: ...


class Framing(Protocol):
    """How a request head frames its body, and the forwarded headers it
    brought: what a stream needs to write the request upstream."""

    @property
    def chunked_in(self) -> bool: ...
    @property
    def length(self) -> bytes: ...
    @property
    def has_length(self) -> bool: ...
    @property
    def expect(self) -> bytes | None: ...
    @property
    def xff(self) -> bytes | None: ...
    @property
    def via(self) -> bytes | None: ...


class RequestHead(Framing, Protocol):
    """A parsed request head, as `Stream.on_request_head` reads it (it is
    valid during that call only: the connection goes on to the next head)."""

    @property
    def url(self) -> bytes: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def host_count(self) -> int: ...
    @property
    def route_host(self) -> bytes | None: ...
    @property
    def budget(self) -> float: ...
    @property
    def grpc(self) -> bool: ...
    @property
    def drop(self) -> frozenset[bytes] | None: ...
    @property
    def trace_headers(self) -> list[tuple[bytes, bytes]] | None: ...
    @property
    def client(self) -> bytes: ...
    @property
    def peer(self) -> str | None: ...


class StreamSink(Protocol):
    """The client connection, as a stream sees it."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def state(self) -> ListenerState: ...
    @property
    def client(self) -> bytes: ...
    @property
    def pause_reasons(self) -> int: ...
    @property
    def write_paused(self) -> bool: ...

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: list[bytes]) -> None: ...
    def flush_writes(self) -> None:
        """Hand what this batch holds to the transport now (`http.batch`)."""
        ...

    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...
    def is_head(self, stream: object) -> bool:
        """`stream` is the one answering now (the head of the pipeline)."""
        ...

    def stream_done(self, stream: object) -> None:
        """`stream`'s response is complete: the next one may go."""
        ...

    def close(self) -> None: ...
    def abort(self) -> None:
        """Drop what is buffered and reset the connection."""
        ...


class Stream(Protocol):
    """One request on a connection, as the connection drives it."""

    keep_alive: bool

    @property
    def request_complete(self) -> bool: ...

    def on_request_head(self, head: RequestHead) -> None: ...
    def reply_local(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        close: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None: ...
    def start(self) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...
    def abort_request(self, status: int, kind: str, detail: str) -> None: ...
    def on_client_pause_writing(self) -> None: ...
    def on_client_resume_writing(self) -> None: ...
    def on_client_lost(self) -> None: ...
    def check_timeout(self, now: float) -> None: ...


class StreamFactory(Protocol):
    """Makes the stream of each request a connection parses."""

    def __call__(
        self, sink: StreamSink, method: bytes, http10: bool, keep_alive: bool, request_id: bytes, /
    ) -> Stream: ...
