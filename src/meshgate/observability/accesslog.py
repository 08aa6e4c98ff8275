"""The access log: one JSON line per request, written off the hot path.

`AccessLog.log` is the listeners' `RequestSeries.then` (set through
its proxy's `MetricsHub.set_request_hook`): it runs once per request that ends, on the event
loop, and only reads the exchange's fields into a tuple appended to a
deque (a 2xx answer may be sampled out first, with one random draw).
Every 100 ms (sooner when many lines wait) the loop turns the queued
tuples into lines, 256 at a time with a turn of the loop between (the
answers went out already: this is off every request's path), and hands
them to a writer thread (a daemon), which writes them with `os.write`:
every system call stays out of the loop. Formatting on the loop rather
than in the thread spares the two threads fighting for the GIL, which cost
more than the formatting itself (and held the loop up for the
interpreter's 5 ms switch interval). Without a running loop (tests), the
writer formats what is queued itself.

The queue is bounded (`buffer_lines`): when the writer falls behind (a
stdout pipe nobody reads, a full disk) new lines are dropped and counted
(`meshgate_access_log_dropped_total`), so a response never waits for the
log and memory never grows without bound.

Where: stdout (`-`), stderr, or a file opened with O_APPEND, reopened on
reload (SIGHUP), so that a rotated file is let go of. With several workers
each writes its own lines to the same file or pipe. Lines never share a
write with a part of another line: writes to a pipe are at most PIPE_BUF
bytes of whole lines, which the kernel keeps whole between writers
(a single line longer than PIPE_BUF, rare, may interleave on a pipe); to
a regular file, an O_APPEND write lands whole at the end, so batches of
workers do not mix inside a line either.

The line's time is the request's start, in RFC 3339 UTC with milliseconds:
the request's monotonic clock (`ProxyExchange.t_start`) plus the offset
to the wall clock, measured when the log is configured (and again on each
reload).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from random import random
from select import PIPE_BUF
from typing import Any

import orjson

from meshgate.config.schema import AccessLogConfig
from meshgate.observability.hub import HUB, MetricsHub

__all__ = ["FIELDS", "AccessLog", "open_target"]

log = logging.getLogger("meshgate.accesslog")

INTERVAL = 0.1
BATCH = 256
"""Lines formatted in one turn of the loop."""
"""Seconds between the writer's rounds."""
WAKE_AT = 1024
"""Lines waiting that wake the writer before its round."""
FILE_CHUNK = 64 * 1024
STOP_TIMEOUT = 2.0

FIELDS = (
    "time",
    "request_id",
    "trace_id",
    "direction",
    "client",
    "consumer",
    "peer",
    "method",
    "authority",
    "path",
    "route",
    "upstream",
    "endpoint",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "retries",
    "reason",
)
"""The keys of a line, in order."""


def open_target(path: str, base_dir: str | None = None) -> int:
    """The file descriptor lines go to: stdout for `-`, stderr for
    `stderr`, else the file (relative to `base_dir`), created if need be
    and opened for appending. OSError when it cannot be opened."""
    if path == "-":
        return 1
    if path == "stderr":
        return 2
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _close(fd: int) -> None:
    if fd > 2:
        with contextlib.suppress(OSError):
            os.close(fd)


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


_LINE = (
    b'{"time":"%s.%03dZ","request_id":"%s","trace_id":%s,%s,"status":%d,"duration_ms":%.3f,'
    b'"upstream_ms":%s,"bytes_in":%d,"bytes_out":%d,"retries":%d,"reason":%s}\n'
)
_MIDDLE = (
    b'"direction":"%s","client":"%s","consumer":%s,"peer":%s,"method":"%s","authority":%s,'
    b'"path":%s,"route":%s,"upstream":%s,"endpoint":%s'
)
_NULL = b"null"


def _json(cache: dict[Any, bytes], value: bytes | str | None) -> bytes:
    """A field as JSON (null, or a string: bytes read as latin-1), kept in
    `cache` by its value: most fields repeat from line to line."""
    if value is None or value == "" or value == b"":
        return _NULL
    got = orjson.dumps(value.decode("latin-1") if isinstance(value, bytes) else value)
    cache[value] = got
    return got


def _trace_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int):
        return format(value, "032x")
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


SLICE = 32
"""Lines the writer formats before it lets the event loop run."""


class AccessLog:
    """One proxy's access log (see the module)."""

    def __init__(self, loop_time: Callable[[], float], hub: MetricsHub = HUB) -> None:
        self.loop_time = loop_time
        self.hub = hub
        """The proxy whose requests it logs, and which reports its drops."""
        self.queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self.sample = 1.0
        self.bound = 65536
        self.dropped = 0
        """Lines dropped because the queue was full (counted on the loop)."""
        self.unwritten = 0
        """Lines a write failed to send, or given up at stop (counted by the
        writer: each counter has one thread)."""
        self.written = 0
        self.offset = 0.0
        """The wall clock minus the loop's."""
        self.fd = -1
        self._next_fd: int | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._write_error = False
        self._json = {}
        self.batches: collections.deque[tuple[bytes, int]] = collections.deque()
        """Blocks of lines formatted on the loop, for the writer, with their
        number of lines."""
        self.formatted = 0  # lines put in `batches` (the loop counts)
        self.taken = 0  # lines taken from `batches` (the writer counts)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.settings: AccessLogConfig | None = None
        self.base_dir: str | None = None

    # -- the loop's side ---------------------------------------------------------

    def apply(self, settings: AccessLogConfig | None, base_dir: str | None = None) -> None:
        """Log with `settings` from now on (None: stop logging), every
        listener of its proxy (`MetricsHub.set_request_hook`); the file is
        opened again. OSError when it cannot be opened (what was in force
        stays so)."""
        if settings is None:
            if self.settings is not None:
                self.hub.set_request_hook(None)
                self.settings = None
                self.stop()
            return
        self.configure(settings, base_dir)
        if self.settings is None:
            self.hub.register("access_log", self.samples)
        self.settings = settings
        self.base_dir = base_dir
        self.start()
        self.hub.set_request_hook(self.log)

    def reopen(self) -> None:
        """Open the file again (it was rotated); an error is logged, and the
        old one kept."""
        if self.settings is None:
            return
        try:
            self.configure(self.settings, self.base_dir)
        except OSError as exc:
            log.error("access log: cannot reopen %s: %s", self.settings.path, exc)

    def configure(self, settings: AccessLogConfig, base_dir: str | None = None) -> None:
        """Take `settings` (at start and on every reload): the file is
        opened again, even when its path did not change (log rotation).
        OSError when it cannot be opened; the previous one stays then."""
        fd = open_target(settings.path, base_dir)
        self.sample = settings.sample_2xx
        self.bound = settings.buffer_lines
        self.offset = time.time() - self.loop_time()
        with self._lock:
            if self.fd < 0:
                self.fd = fd
            else:
                if self._next_fd is not None:
                    _close(self._next_fd)
                self._next_fd = fd  # the writer swaps it in between batches
        self._wake.set()

    def start(self) -> None:
        """Start the writer (after `configure`)."""
        if self._thread is not None:
            return
        self._stopping = False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # the writer formats (no loop to do it)
        self._thread = threading.Thread(target=self._run, name="meshgate-access-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write what is queued, and stop the writer; after `timeout`
        seconds (a stdout nobody reads) what is left is given up."""
        thread = self._thread
        if thread is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.queue and self._loop is not None:
            self._format_batch(more=False)
        self._loop = None
        self._stopping = True
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            left = len(self.queue)
            self.queue.clear()
            self.dropped += left  # (the writer is stuck in a write: not counting)
            log.warning("access log: the writer is stuck; %d lines not written", left)
            return  # it holds its fd: a daemon, it ends with the process
        self._thread = None
        with self._lock:
            _close(self.fd)
            self.fd = -1
            if self._next_fd is not None:
                _close(self._next_fd)
                self._next_fd = None

    def samples(self) -> dict[str, list[Any]]:
        return {"meshgate_access_log_dropped_total": [[(), self.dropped + self.unwritten]]}

    def log(self, ex: Any, now: float, reason: str) -> None:
        """One exchange ended (`RequestSeries.then`). The hot path: read
        its fields into a tuple, nothing else."""
        status = ex.status
        sample = self.sample
        if sample < 1.0 and 200 <= status < 300 and (sample == 0.0 or random() >= sample):
            return
        queue = self.queue
        n = len(queue)
        if n >= self.bound:
            self.dropped += 1
            return
        trace = ex.trace
        cluster = ex.cluster
        ep = ex.last_ep
        proto = ex.proto
        queue.append(
            (
                ex.t_start,
                now,
                ex.started,
                ex.try_t0,
                ex.request_id,
                None if trace is None else getattr(trace, "trace_id", None),
                proto.state.direction,
                proto.client,
                ex.consumer,
                proto.peer,
                ex.method,
                ex.authority,
                ex.route_path,
                ex.route_label,
                None if cluster is None else cluster.name,
                None if ep is None else ep.pool.address,
                status,
                ex.sent_body,
                ex.bytes_out,
                ex.attempt,
                reason,
            )
        )
        if self._timer is None:
            loop = self._loop
            if loop is not None:
                self._timer = loop.call_later(INTERVAL, self._format_batch)
        elif n == WAKE_AT:
            self._wake.set()

    def _format_batch(self, more: bool = True) -> None:
        """Format up to `BATCH` queued tuples for the writer (on the loop),
        joined into one block; with `more`, come back at the next turn
        while some are left."""
        queue = self.queue
        fmt = self.format
        n = min(BATCH, len(queue))
        if n:
            if self.formatted - self.taken >= self.bound:
                self.dropped += n  # the writer is stuck: memory stays bounded
                for _ in range(n):
                    queue.popleft()
            else:
                block = b"".join([fmt(queue.popleft()) for _ in range(n)])
                self.formatted += n
                self.batches.append((block, n))
                self._wake.set()
        loop = self._loop
        if more and queue and loop is not None:
            self._timer = loop.call_soon(self._format_batch)
        elif more:
            self._timer = None

    # -- the writer thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(INTERVAL)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._round()
            except Exception:
                log.exception("access log: the writer failed")
            if stopping:
                return

    def _round(self) -> None:
        with self._lock:
            fresh = self._next_fd
            self._next_fd = None
            if fresh is not None:
                old, self.fd = self.fd, fresh
            else:
                old = -1
            fd = self.fd
        _close(old)
        batches = self.batches
        while batches:
            block, n = batches.popleft()
            self.taken += n
            self._write(fd, block)
        queue = self.queue
        fmt = self.format
        while queue and (self._loop is None or self._stopping):
            lines: list[bytes] = []
            while queue and len(lines) < 4096:
                lines.append(fmt(queue.popleft()))
                if len(lines) % SLICE == 0:
                    # Hand the GIL back to the event loop now and then:
                    # else this thread keeps it for the interpreter's whole
                    # switch interval (5 ms), and requests wait that long.
                    time.sleep(0)
            self._write(fd, b"".join(lines))

    def _write(self, fd: int, block: bytes) -> None:
        """Write whole lines: a regular file takes the block in writes of
        up to FILE_CHUNK bytes, a pipe in writes of at most PIPE_BUF, each
        cut after a newline (a single line longer than that goes alone)."""
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        limit = FILE_CHUNK if regular else PIPE_BUF
        size = len(block)
        start = 0
        while size - start > limit:
            cut = block.rfind(b"\n", start, start + limit)
            if cut < 0:
                cut = block.find(b"\n", start + limit)  # one long line
                if cut < 0:
                    break
            if not self._send(fd, block[start : cut + 1]):
                self.unwritten += block.count(b"\n", start)
                return
            start = cut + 1
        if start < size and not self._send(fd, block[start:] if start else block):
            self.unwritten += block.count(b"\n", start)

    def _send(self, fd: int, data: bytes) -> bool:
        """Write all of `data`; False on an error (logged once until a
        write succeeds): the caller counts the lines not written."""
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            if not self._write_error:
                self._write_error = True
                log.error("access log: cannot write: %s", exc)
            return False
        self._write_error = False
        self.written += data.count(b"\n")
        return True

    _seconds = -1
    _prefix = b""
    _json: dict[Any, bytes]

    def format(self, row: tuple[Any, ...]) -> bytes:
        """One line, newline included: a template filled with each field
        already in JSON (strings through orjson, so a Host with a quote or
        a backslash stays one JSON string). The fields from `direction` to
        `endpoint` repeat from line to line (one client, one route): their
        part of the line is made once and kept by their values."""
        t_start = row[0]
        seconds, millis = divmod(int((t_start + self.offset) * 1000), 1000)
        if seconds != self._seconds:
            self._seconds = seconds
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode()
        cache = self._json
        middle = row[6:16]
        part = cache.get(middle)
        if part is None:
            if len(cache) > 8192:
                cache.clear()
            part = cache[middle] = self._middle(middle)
        trace_id = row[5]
        started = row[2]
        now = row[1]
        reason = row[20]
        return _LINE % (
            self._prefix,
            millis,
            # Token characters only (ours are hex; a client's is checked
            # against the same set when it is read): no escaping needed.
            row[4],
            _NULL if trace_id is None else orjson.dumps(_trace_id(trace_id)),
            part,
            row[16],
            (now - t_start) * 1000,
            b"%.3f" % ((now - row[3]) * 1000) if started else _NULL,
            row[17],
            row[18],
            row[19] - 1 if started else 0,
            _NULL if not reason else cache.get(reason) or _json(cache, reason),
        )

    def _middle(self, fields: tuple[Any, ...]) -> bytes:
        """The line's part from `direction` to `endpoint` (see `format`)."""
        direction, client, consumer, peer, method, authority, path, route, upstream, endpoint = (
            fields
        )
        cache = self._json
        return _MIDDLE % (
            direction.encode(),
            client,
            cache.get(consumer) or _json(cache, consumer),
            cache.get(peer) or _json(cache, peer),
            method,
            cache.get(authority) or _json(cache, authority),
            cache.get(path) or _json(cache, path or None),
            cache.get(route) or _json(cache, route or None),
            cache.get(upstream) or _json(cache, upstream),
            cache.get(endpoint) or _json(cache, endpoint),
        )
