"""A pipelining RESP2 connection to one Redis server, for rate limit decisions.

`RedisLimiter` sends the decisions asked for in one turn of the event loop
as one write of EVALSHA commands and reads their replies in order. Through
redis-py that cost about 20 µs per decision here (a coroutine per reply, its
own packing and timeout per batch: py-spy put a fifth of a rate-limited
gateway's time there). This is the same exchange on an `asyncio.Protocol`:
the commands are bytes made by the caller (only the key changes between two
decisions of one limit), one `write` per batch, and the replies are parsed
from the read buffer as they arrive and handed to each command's callback,
in order.

What it is not: a general client. It speaks to one server over TCP or a
Unix socket (`redis://`, `unix://`; TLS, sentinel and cluster stay with
redis-py, `redis._pipelinable`), sends AUTH and SELECT when it connects,
and knows the replies those scripts give (integers, arrays, strings,
errors). Any reply it cannot parse, or a batch
not answered within the timeout, closes the connection and fails every
command waiting on it: a reply stream out of step is never read on. The next
batch connects again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

__all__ = ["RespConnection", "RespError", "RespFailure", "RespTimeout", "command", "parse_reply"]

log = logging.getLogger("meshgate.ratelimit")

Reply = Any
"""A parsed reply: int, bytes, None, a list of replies, or a `RespError`."""
Callback = Callable[[Reply | BaseException], None]


class RespError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`): the server answered."""


class RespFailure(ConnectionError):
    """The server did not answer (connect failed, connection lost, timeout,
    or a reply that is not RESP): nothing is known of the command's effect."""


class RespTimeout(RespFailure, TimeoutError):
    """No answer within the timeout."""


def command(*parts: bytes) -> bytes:
    """One command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


_MAX_BULK = 512 * 1024 * 1024
_DECISION = re.compile(
    rb"\*4\r\n:(-?\d{1,19})\r\n:(-?\d{1,19})\r\n:(-?\d{1,19})\r\n:(-?\d{1,19})\r\n"
)
"""An array of four integers, what the rate limit scripts answer (the
common reply, matched before the general parser)."""
_MAX_ITEMS = 1 << 20


def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[Reply, int] | None:
    """The reply at `pos` and the position after it, or None when `buf`
    holds only part of it. ValueError for bytes that are not RESP."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), nxt
    if kind == 0x2A:  # '*' array
        n = int(line)
        if n < 0:
            return None, nxt
        if n > _MAX_ITEMS:
            raise ValueError("an array longer than any reply of ours")
        items: list[Reply] = []
        for _ in range(n):
            got = parse_reply(buf, nxt)
            if got is None:
                return None
            item, nxt = got
            items.append(item)
        return items, nxt
    if kind == 0x24:  # '$' bulk string
        n = int(line)
        if n < 0:
            return None, nxt
        if n > _MAX_BULK:
            raise ValueError("a bulk string longer than Redis sends")
        if len(buf) < nxt + n + 2:
            return None
        if buf[nxt + n : nxt + n + 2] != b"\r\n":
            raise ValueError("a bulk string not ended by CRLF")
        return bytes(buf[nxt : nxt + n]), nxt + n + 2
    if kind == 0x2B:  # '+' simple string
        return line, nxt
    if kind == 0x2D:  # '-' error
        return RespError(line.decode("utf-8", "replace")), nxt
    raise ValueError(f"not a RESP reply (type byte {kind!r})")


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RespConnection) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.dead = False
        """Given up by its owner: what it reports from now on is not news."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        waiting = self.owner.waiting
        pos = 0
        size = len(buf)
        fast = _DECISION.match
        try:
            while pos < size:
                m = fast(buf, pos)
                if m is not None:
                    # A decision script's reply, read in one go.
                    a, b, c, d = m.groups()
                    reply: Reply = [int(a), int(b), int(c), int(d)]
                    pos = m.end()
                else:
                    got = parse_reply(buf, pos)
                    if got is None:
                        break
                    reply, pos = got
                if not waiting:
                    raise ValueError("a reply nobody asked for")
                cb, _ = waiting.popleft()
                try:
                    cb(reply)
                except Exception:
                    log.exception("a redis reply's callback failed")
        except ValueError as exc:
            self.owner.lost(RespFailure(f"redis sent what is not a reply: {exc}"), self)
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.dead:
            self.owner.lost(
                RespFailure(f"the connection to redis was lost: {exc or 'closed'}"), self
            )


class RespConnection:
    """One pipelined connection (see the module)."""

    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        scheme = u.scheme.lower()
        self.unix: str | None = u.path if scheme == "unix" else None
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        query = urllib.parse.parse_qs(u.query)
        db_text = (query.get("db") or [""])[0] or (u.path.strip("/") if scheme != "unix" else "")
        self.db = int(db_text) if db_text.isdigit() else 0
        self.username = urllib.parse.unquote(u.username) if u.username else None
        self.password = urllib.parse.unquote(u.password) if u.password is not None else None
        self.timeout = timeout
        self.proto: _Protocol | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.waiting: collections.deque[tuple[Callback, float]] = collections.deque()
        """The commands written and not answered yet, in order, with the
        monotonic instant each batch was written."""
        self.queued: list[bytes] = []
        self.queued_cbs: list[Callback] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flush_due = False
        self.closed = False

    # -- sending ----------------------------------------------------------------

    def submit(self, cmd: bytes, cb: Callback) -> None:
        """Send `cmd` with this turn's others; `cb` gets its reply, a
        `RespError`, or a `RespFailure`."""
        if self.closed:
            cb(RespFailure("the redis connection is closed"))
            return
        self.queued.append(cmd)
        self.queued_cbs.append(cb)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not self.queued:
            return
        proto = self.proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            if self.connecting is None:
                self.connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # sent once connected
        cmds, cbs = self.queued, self.queued_cbs
        self.queued, self.queued_cbs = [], []
        now = time.monotonic()
        waiting = self.waiting
        for cb in cbs:
            waiting.append((cb, now))
        proto.transport.write(b"".join(cmds))
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self.waiting:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.timeout / 2, self._check)

    def _check(self) -> None:
        """The oldest command waiting past the timeout fails them all."""
        self._timer = None
        if self.waiting and time.monotonic() - self.waiting[0][1] >= self.timeout:
            self.lost(RespTimeout(f"redis did not answer within {self.timeout:g}s"))
            return
        self._arm()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        proto: _Protocol | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if self.unix is not None:
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), self.unix)
                else:
                    _, proto = await loop.create_connection(
                        lambda: _Protocol(self), self.host, self.port
                    )
                hello: list[bytes] = []
                if self.password is not None:
                    creds = (self.username.encode(),) if self.username else ()
                    hello.append(command(b"AUTH", *creds, self.password.encode()))
                if self.db:
                    hello.append(command(b"SELECT", b"%d" % self.db))
                for cmd in hello:
                    fut: asyncio.Future[Reply] = loop.create_future()
                    self.waiting.append((_settle(fut), time.monotonic()))
                    assert proto.transport is not None
                    proto.transport.write(cmd)
                    reply = await fut
                    if isinstance(reply, BaseException):
                        raise reply
            self.proto = proto
        except (OSError, TimeoutError, RespError) as exc:
            failure: RespFailure
            if isinstance(exc, RespFailure):
                failure = exc
            elif isinstance(exc, TimeoutError):
                failure = RespTimeout(f"redis did not answer within {self.timeout:g}s")
            else:
                failure = RespFailure(str(exc) or repr(exc))
            if proto is not None:
                self.lost(failure, proto)
            cbs, self.queued, self.queued_cbs = self.queued_cbs, [], []
            for cb in cbs:
                _call(cb, failure)
        finally:
            self.connecting = None
        if self.proto is not None and self.queued:
            self._flush()

    # -- failing ------------------------------------------------------------------

    def lost(self, failure: RespFailure, proto: _Protocol | None = None) -> None:
        """The connection (`proto`, else the current one) is no good: close
        it and fail what waits on it."""
        if proto is None:
            proto = self.proto
        elif proto.dead:
            return
        if proto is self.proto:
            self.proto = None
        if proto is not None:
            proto.dead = True
            if proto.transport is not None:
                proto.transport.abort()
        waiting, self.waiting = self.waiting, collections.deque()
        for cb, _ in waiting:
            _call(cb, failure)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def close(self) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.connecting
        cbs, self.queued, self.queued_cbs = self.queued_cbs, [], []
        for cb in cbs:
            _call(cb, RespFailure("the redis connection was closed"))
        self.lost(RespFailure("the redis connection was closed"))


def _call(cb: Callback, reply: Reply | BaseException) -> None:
    """A reply to its callback; a callback's failure is logged, never lets
    the reply stream fall out of step."""
    try:
        cb(reply)
    except Exception:
        log.exception("a redis reply's callback failed")


def _settle(fut: asyncio.Future[Reply]) -> Callback:
    def cb(reply: Reply | BaseException) -> None:
        if not fut.done():
            fut.set_result(reply)

    return cb
