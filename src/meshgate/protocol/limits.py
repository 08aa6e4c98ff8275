"""Resource limits of client connections: admission, and the slow clients.

- `Admission` counts a listener's open connections, in all and by client
  address, and refuses one past `limits.max_connections` or
  `limits.max_connections_per_ip`. A refused connection is closed as soon as
  it is accepted, without an answer, as Envoy's listener limits do (nginx's
  `limit_conn` answers 503): answering would mean reading the request of a
  client that already holds too many connections, and a flood of them
  would cost a parse and a write each.
- `SlowClientTimeouts`, mixed into `protocol.h1.ServerProtocol`, checks on
  the connection's timeout tick (never a timer per request) the client that
  sends its body too slowly (`limits.body_timeout`, slow POST) and the one
  that leaves its response unread (`limits.write_timeout`). The request
  head's own deadline (slowloris) is `h1`'s `DEADLINE_HEAD`.

Both cost the hot path nothing but a counter: a read of a body adds one to
`body_reads`, and the tick compares it with what it saw last time.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections import deque

    from meshgate.config.schema import ServerLimits
    from meshgate.protocol.api import Stream

__all__ = ["REFUSED_BY_CLIENT", "REFUSED_BY_LISTENER", "Admission", "SlowClientTimeouts"]

REFUSED_BY_LISTENER = 3
"""Where a refusal past `max_connections` is counted (`MetricsHub.connection_counters`)."""
REFUSED_BY_CLIENT = 4
"""... and one past `max_connections_per_ip`."""


class Admission:
    """The open connections of one listener (in one worker), in all and by
    client address."""

    __slots__ = ("by_client", "open", "refused")

    def __init__(self) -> None:
        self.open = 0
        self.by_client: dict[bytes, int] = {}
        self.refused = 0
        """Connections closed at accept since the listener started."""

    def admit(self, client: bytes, limits: ServerLimits) -> int:
        """Count a new connection from `client` in (0), or refuse it: the
        index of its refusal in the hub's connection counters (`REFUSED_BY_*`:
        `meshgate_tcp_connections_refused_total`)."""
        cap = limits.max_connections
        if cap and self.open >= cap:
            self.refused += 1
            return REFUSED_BY_LISTENER
        n = self.by_client.get(client, 0)
        cap = limits.max_connections_per_ip
        if cap and n >= cap:
            self.refused += 1
            return REFUSED_BY_CLIENT
        self.by_client[client] = n + 1
        self.open += 1
        return 0

    def leave(self, client: bytes) -> None:
        """An admitted connection from `client` closed."""
        self.open -= 1
        n = self.by_client.get(client, 0) - 1
        if n > 0:
            self.by_client[client] = n
        else:
            self.by_client.pop(client, None)


class SlowClientTimeouts:
    """The body-read and write timeouts of a client connection (a mixin:
    its owner calls these from its tick, and `body_stalled` answers)."""

    __slots__ = ("body_mark", "body_reads", "body_since", "write_since")

    limits: ServerLimits
    transport: asyncio.Transport | None
    queue: deque[Stream]
    current: Stream | None
    pause_reasons: int
    body_reads: int
    """Reads that carried request body bytes (the hot path's only cost)."""
    body_mark: int
    body_since: float
    """When `body_reads` was last seen to move (0.0: not yet looked at)."""
    write_since: float
    """When the tick first saw writing paused (0.0: not paused, or not yet
    seen); reset whenever the client's buffer drains."""

    def check_body(self, now: float) -> None:
        """A request body is being read: it must keep coming. The clock runs
        only while this request is the one being answered and the gateway
        itself reads (reading paused for an upstream that is slower, or
        behind earlier pipelined requests, is not the client's doing)."""
        reads = self.body_reads
        queue = self.queue
        if (
            reads != self.body_mark
            or not self.body_since
            or self.pause_reasons
            or not queue
            or queue[0] is not self.current
        ):
            self.body_mark = reads
            self.body_since = now
            return
        timeout = self.limits.body_timeout
        if now - self.body_since >= timeout:
            self.body_since = 0.0
            self.body_stalled(f"the request body stalled for more than {timeout:g}s")

    def body_stalled(self, detail: str) -> None:
        """Answer 408 (or reset, if the answer began) and close."""
        raise NotImplementedError

    def check_write(self, now: float) -> None:
        """Writing is paused (the client's buffer is full): it must drain
        below the low-water mark within the write timeout, else the
        connection is reset, which drops the upstream exchange too. This is
        stricter than nginx's `send_timeout` (the time between two writes):
        a client taking a byte now and then still holds a full buffer."""
        since = self.write_since
        if not since:
            self.write_since = now
        elif now - since >= self.limits.write_timeout:
            self.write_since = 0.0
            if self.transport is not None:
                self.transport.abort()
