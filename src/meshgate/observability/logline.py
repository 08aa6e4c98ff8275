"""The access log's lines: a row (`accesslog.AccessLog.log`'s tuple) made
into one JSON line (`LineFormatter`), and lines written whole to a file or
a pipe (`LineWriter`). Both run in the access log's own process
(`offload_main`), never on a proxy's event loop.

Lines never share a write with a part of another line: writes to a pipe
are at most PIPE_BUF bytes of whole lines, which the kernel keeps whole
between writers (a single line longer than PIPE_BUF, rare, may interleave
on a pipe); to a regular file, an O_APPEND write lands whole at the end. So
the lines of several workers, each with its own process, do not mix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from operator import add, floordiv, mod, mul, sub
from select import PIPE_BUF
from typing import Any

import orjson

__all__ = ["FIELDS", "ROW", "LineFormatter", "LineWriter", "open_target"]

log = logging.getLogger("meshgate.accesslog")

FILE_CHUNK = 64 * 1024

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


def close_target(fd: int) -> None:
    if fd > 2:
        with contextlib.suppress(OSError):
            os.close(fd)


_LINE = (
    b'{"time":"%s.%03dZ","request_id":%s,"trace_id":%s,%s,"status":%d,"duration_ms":%.3f,'
    b'"upstream_ms":%s,"bytes_in":%d,"bytes_out":%d,"retries":%d,"reason":%s}\n'
)
_LINE_ID = _LINE.replace(b'"request_id":%s', b'"request_id":"%s"')
"""`_LINE` for a block whose request ids are all plain (`_PLAIN_IDS`)."""
# Request ids that are JSON strings as they are (meshgate's own, and those
# the parser keeps: `protocol.h1._ID_CHARS`), all of a block's at once.
_PLAIN_IDS = re.compile(rb"[A-Za-z0-9_.:+/=-]*")
_MIDDLE = (
    b'"direction":%s,"client":%s,"consumer":%s,"peer":%s,"method":%s,"authority":%s,'
    b'"path":%s,"route":%s,"upstream":%s,"endpoint":%s'
)
_NULL = b"null"
_NULLS = {None: _NULL, "": _NULL, b"": _NULL}
"""The values a line writes as null (`LineFormatter._str`), known at once."""
_UNREADABLE = (TypeError, ValueError, IndexError, OverflowError, KeyError)
"""What `LineFormatter._columns` raises for a row it cannot read."""
ROW = 21
"""Values per line, as `accesslog.AccessLog.log` queues them."""
_CACHE_MAX = 8192


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return value if isinstance(value, str) else str(value)


def _trace_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int):
        return format(value, "032x")
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class LineFormatter:
    """Rows into lines (see the module)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        """The wall clock minus the monotonic clock the rows' times are on."""
        self._seconds = -1
        self._prefix = b""
        self._json: dict[Any, bytes] = dict(_NULLS)
        self._middles: dict[tuple[Any, ...], bytes] = {}
        self._prefixes: dict[int, bytes] = {}
        """The time's text to the second, by second (`_columns`)."""

    def _str(self, value: Any) -> bytes:
        """A field as JSON: null (None or empty), else a string (bytes read
        as latin-1, anything else as its text), escaped by orjson, so a
        client's quote or backslash stays inside it. Kept by value: most
        fields repeat from line to line."""
        got = self._json.get(value)  # (None and empty: `_NULLS`, always there)
        if got is not None:
            return got
        got = orjson.dumps(_text(value))
        if len(self._json) > _CACHE_MAX:
            self._json.clear()
            self._json.update(_NULLS)
        self._json[value] = got
        return got

    def format(self, row: Sequence[Any]) -> bytes:
        """One row's line, newline included (ValueError if it cannot be
        read; not logged: the caller has the error)."""
        if len(row) != ROW:
            raise ValueError(f"a row has {ROW} values, not {len(row)}")
        try:
            return self._columns(row, 1)
        except _UNREADABLE as exc:
            raise ValueError(f"the row could not be formatted: {exc}") from exc

    def lines(self, values: Sequence[Any]) -> bytes:
        """Rows, `ROW` values each one after the other, into one block of
        lines; a row that cannot be read is skipped, and logged.

        This is the access log process's whole work, on a core the proxy
        may share, so a block is made by columns (`_columns`): each field of
        every row at once, in loops that run in C (`map`, `zip`, slices),
        then every line in one `%`. A block with a row that cannot be read
        goes row by row (`_rows`), which skips that row alone."""
        n = len(values) // ROW
        if n and len(values) == n * ROW:
            try:
                return self._columns(values, n)
            except _UNREADABLE:
                pass
        return self._rows(values)

    def _columns(self, values: Sequence[Any], n: int) -> bytes:
        """`lines` for `n` rows, by columns (any row that cannot be read
        raises, and the block is made again by `_rows`)."""
        starts = values[0::ROW]
        nows = values[1::ROW]
        started = values[2::ROW]
        # The time: whole seconds (their text made once each) and millis.
        stamps = list(map(int, map(mul, map(add, starts, repeat(self.offset)), repeat(1000.0))))
        seconds = list(map(floordiv, stamps, repeat(1000)))
        prefixes = self._prefixes
        for sec in set(seconds).difference(prefixes):
            if len(prefixes) > 64:
                prefixes.clear()
            prefixes[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
        ids = values[4::ROW]
        try:
            plain = _PLAIN_IDS.fullmatch(b"".join(ids)) is not None
        except TypeError:  # None, or not bytes
            plain = False
        if not plain:
            ids = [_NULL if v is None else orjson.dumps(_text(v)) for v in ids]
        traces: Iterable[bytes] = repeat(_NULL, n)
        if values[5::ROW].count(None) != n:
            traces = [_NULL if v is None else orjson.dumps(_trace_id(v)) for v in values[5::ROW]]
        # The fields from `direction` to `endpoint` (values 6 to 15): their
        # part of the line, kept by their values (`lines`).
        middles = self._middles
        mids = list(map(middles.get, zip(*[values[k::ROW] for k in range(6, 16)], strict=True)))
        if None in mids:
            js = self._str
            for i, part in enumerate(mids):
                if part is None:
                    key = tuple(values[i * ROW + 6 : i * ROW + 16])
                    part = middles.get(key)
                    if part is None:
                        if len(middles) > _CACHE_MAX:
                            middles.clear()
                        part = middles[key] = _MIDDLE % tuple(js(v) for v in key)
                    mids[i] = part
        ups = list(map(b"%.3f".__mod__, map(mul, map(sub, nows, values[3::ROW]), repeat(1000.0))))
        if not all(started):
            for i, s in enumerate(started):
                if not s:
                    ups[i] = _NULL
        reasons = list(map(self._json.get, values[20::ROW]))
        if None in reasons:
            js = self._str
            reasons = [js(v) for v in values[20::ROW]]
        fields = zip(
            map(prefixes.__getitem__, seconds),
            map(mod, stamps, repeat(1000)),
            ids,
            traces,
            mids,
            values[16::ROW],
            map(mul, map(sub, nows, starts), repeat(1000.0)),
            ups,
            values[17::ROW],
            values[18::ROW],
            map(mul, map(sub, values[19::ROW], repeat(1)), map(bool, started)),
            reasons,
            strict=True,
        )
        return ((_LINE_ID if plain else _LINE) * n) % tuple(chain.from_iterable(fields))

    def _rows(self, values: Sequence[Any]) -> bytes:
        """`lines`, one row after the other (see `lines`)."""
        out: list[bytes] = []
        append = out.append
        offset = self.offset
        middles = self._middles
        js = self._str
        dumps = orjson.dumps
        line = _LINE
        null = _NULL
        for i in range(0, len(values) - ROW + 1, ROW):
            try:
                t_start = values[i]
                seconds, millis = divmod(int((t_start + offset) * 1000), 1000)
                if seconds != self._seconds:
                    self._seconds = seconds
                    self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode()
                middle = tuple(values[i + 6 : i + 16])
                part = middles.get(middle)
                if part is None:
                    if len(middles) > _CACHE_MAX:
                        middles.clear()
                    part = middles[middle] = _MIDDLE % tuple(js(v) for v in middle)
                request_id = values[i + 4]
                trace_id = values[i + 5]
                started = values[i + 2]
                now = values[i + 1]
                append(
                    line
                    % (
                        self._prefix,
                        millis,
                        null if request_id is None else dumps(_text(request_id)),
                        null if trace_id is None else dumps(_trace_id(trace_id)),
                        part,
                        values[i + 16],
                        (now - t_start) * 1000,
                        b"%.3f" % ((now - values[i + 3]) * 1000) if started else null,
                        values[i + 17],
                        values[i + 18],
                        values[i + 19] - 1 if started else 0,
                        js(values[i + 20]),
                    )
                )
            except (TypeError, ValueError, IndexError, OverflowError) as exc:
                log.error("access log: a row could not be formatted: %s", exc)
        return b"".join(out)


class LineWriter:
    """Blocks of whole lines to one file descriptor (see the module)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self.unwritten = 0
        """Lines a write failed to send."""
        self._error = False
        self.limit = PIPE_BUF
        self.retarget(fd)

    def retarget(self, fd: int) -> None:
        """Write to `fd` from now on (the old one is not closed here)."""
        self.fd = fd
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        self.limit = FILE_CHUNK if regular else PIPE_BUF

    def write(self, block: bytes) -> None:
        """Write whole lines: a regular file takes the block in writes of
        up to FILE_CHUNK bytes, a pipe in writes of at most PIPE_BUF, each
        cut after a newline (a single line longer than that goes alone)."""
        fd = self.fd
        limit = self.limit
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
            if not self._error:
                self._error = True
                log.error("access log: cannot write: %s", exc)
            return False
        self._error = False
        self.written += data.count(b"\n")
        return True
