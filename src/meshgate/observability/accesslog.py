"""The access log: one JSON line per request, formatted and written off
the proxy's event loop, in a process of its own.

`AccessLog.log` is the listeners' `RequestSeries.then` (set through its
proxy's `MetricsHub.set_request_hook`): it runs once per request that
ends, on the event loop, and only reads the exchange's fields into a tuple
appended to a deque (a 2xx answer may be sampled out first, with one
random draw). Every 100 ms (sooner when many wait) the loop hands what is
queued, in one `marshal` frame, to the access log's process
(`offload.Offload`, `offload_main`'s `log`), which makes the lines
(`logline.LineFormatter`) and writes them whole (`logline.LineWriter`).
The loop so pays a tuple and its share of one C call per line, not the
line's formatting, nor a thread fighting it for the GIL.

What waits for that process is bounded (`buffer_lines`): when it falls
behind (a stdout pipe nobody reads, a full disk) new lines are dropped and
counted (`meshgate_access_log_dropped_total`, with the lines that process
could not write, and those lost when it died), so a response never waits
for the log and memory never grows without bound.

Where: stdout (`-`), stderr, or a file opened with O_APPEND, opened again
on reload (SIGHUP), so that a rotated file is let go of. The file is
opened here first, so that a path that cannot be opened is refused with
the config that named it. With several workers, each has its own process
writing to the same file or pipe (`logline`: their lines do not mix).

The line's time is the request's start, in RFC 3339 UTC with milliseconds:
the request's monotonic clock (`ProxyExchange.t_start`) plus the offset
to the wall clock, measured when the log is configured (and again on each
reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from random import random
from typing import Any

from meshgate.config.schema import AccessLogConfig
from meshgate.observability.hub import HUB, MetricsHub
from meshgate.observability.logline import FIELDS, ROW, close_target, open_target
from meshgate.observability.offload import Offload, frame

__all__ = ["FIELDS", "AccessLog", "open_target"]

log = logging.getLogger("meshgate.accesslog")

INTERVAL = 0.1
"""Seconds between two hand-overs of the queued lines."""
WAKE_AT = 4096
"""Lines waiting that are handed over before the interval is up."""
STOP_TIMEOUT = 2.0


def _target(path: str, base_dir: str | None) -> str:
    """The path the access log's process opens: `-`, `stderr`, or absolute."""
    if path in ("-", "stderr") or os.path.isabs(path):
        return path
    return os.path.abspath(os.path.join(base_dir or ".", path))


def _check_target(path: str, base_dir: str | None) -> None:
    """OSError when the access log's process could not open `path`: it is
    opened (and created) here, so that the config naming it is refused. A
    named pipe is not (opening it would wait for its reader, and closing
    it end the reader's input): it must exist and be writable."""
    where = _target(path, base_dir)
    if where in ("-", "stderr"):
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISFIFO(os.stat(where).st_mode):
            if not os.access(where, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable", where)
            return
    close_target(open_target(where))


def _plain(value: Any) -> Any:
    if value is None or type(value) in (str, bytes, int, float, bool):
        return value
    return str(value)


class AccessLog:
    """One proxy's access log (see the module)."""

    def __init__(self, loop_time: Callable[[], float], hub: MetricsHub = HUB) -> None:
        self.loop_time = loop_time
        self.hub = hub
        """The proxy whose requests it logs, and which reports its drops."""
        self.queue: list[Any] = []
        """The lines waiting, one after the other, `ROW` values each: no
        object per line, so the collector has none to look at."""
        self.lines = 0
        self.sample = 1.0
        self.bound = 65536
        self.dropped = 0
        """Lines dropped because too many waited (counted on the loop)."""
        self.offset = 0.0
        """The wall clock minus the loop's."""
        self.offload = Offload("log")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.settings: AccessLogConfig | None = None
        self.base_dir: str | None = None

    @property
    def unwritten(self) -> int:
        """Lines handed over and not written: lost with a process that
        died, or that it could not write."""
        return self.offload.lost + self.offload.count("unwritten")

    @property
    def written(self) -> int:
        return self.offload.count("written")

    # -- the loop's side ---------------------------------------------------------

    def apply(self, settings: AccessLogConfig | None, base_dir: str | None = None) -> None:
        """Log with `settings` from now on (None: stop logging), every
        listener of its proxy (`MetricsHub.set_request_hook`); the file is
        opened again. OSError when it cannot be opened, or its process
        cannot be started (what was in force stays so)."""
        if settings is None:
            if self.settings is not None:
                self.hub.set_request_hook(None)
                self.settings = None
                self.stop()
            return
        self.configure(settings, base_dir)
        self.start()
        if self.settings is None:
            self.hub.register("access_log", self.samples)
        self.settings = settings
        self.base_dir = base_dir
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
        _check_target(settings.path, base_dir)
        self.sample = settings.sample_2xx
        self.bound = settings.buffer_lines
        self.offset = time.time() - self.loop_time()
        self.offload.configure(("log", _target(settings.path, base_dir), self.offset))

    def start(self) -> None:
        """Start the access log's process (after `configure`); OSError when
        it cannot be started."""
        if self.offload.running:
            return
        self.offload.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write what is queued, and stop the access log's process; after
        `timeout` seconds (a stdout nobody reads) what is left is given up."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._loop = None
        if not self.offload.stop(timeout):
            log.warning("access log: its process was stuck; lines may be missing")

    def samples(self) -> dict[str, list[Any]]:
        return {"meshgate_access_log_dropped_total": [[(), self.dropped + self.unwritten]]}

    def log(self, ex: Any, now: float, reason: str) -> None:
        """One exchange ended (`RequestSeries.then`). The hot path: read
        its fields into a tuple, nothing else."""
        status = ex.status
        sample = self.sample
        if sample < 1.0 and 200 <= status < 300 and (sample == 0.0 or random() >= sample):
            return
        n = self.lines
        if n >= self.bound:
            self.dropped += 1
            return
        self.lines = n + 1
        trace = ex.trace
        cluster = ex.cluster
        ep = ex.last_ep
        proto = ex.proto
        self.queue.extend(
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
            if loop is None:
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    return  # (no loop: handed over at `flush` and `stop`)
            self._timer = loop.call_later(INTERVAL, self.flush)
        elif n == WAKE_AT:
            self._timer.cancel()
            loop = self._loop
            self._timer = loop.call_soon(self.flush) if loop is not None else None

    def flush(self) -> None:
        """Hand what is queued to the access log's process: one frame, made
        on the loop (a C call; its system call is on the writer's thread)."""
        self._timer = None
        n = self.lines
        if not n:
            return
        queue = self.queue
        self.queue = []
        self.lines = 0
        offload = self.offload
        if offload.backlog >= self.bound:
            self.dropped += n  # the process is stuck: memory stays bounded
            return
        try:
            data = frame(("rows", queue))
        except ValueError:  # a field marshal cannot write: sent as its text
            data = frame(("rows", [_plain(v) for v in queue]))
        offload.send(data, n)

    def rows(self) -> list[tuple[Any, ...]]:
        """The lines waiting, a tuple each (`logline.LineFormatter.format`'s)."""
        q = self.queue
        return [tuple(q[i : i + ROW]) for i in range(0, len(q), ROW)]
