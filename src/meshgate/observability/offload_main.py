"""The child process of an `offload.Offload`:
`python -m meshgate.observability.offload_main KIND STATUS_FD`.

It reads frames from stdin until its end, and reports its counts on
STATUS_FD (a pipe to its parent), every half second while they change,
and once more at its end. KIND is:

- `log`: the access log. Frames: `("log", path, offset)` (the target:
  `-`, `stderr` or an absolute path, opened for appending; sent again on
  every reload and reopen, so a rotated file is let go of) and
  `("rows", [value, ...])` (`logline.ROW` values a line, formatted by
  `logline.LineFormatter`, written by `logline.LineWriter`). Counts: `written`, `unwritten`.
- `trace`: the span export. Frames: `("trace", settings)` (a `spans.SpanSink`'s
  arguments) and `("spans", [value, ...])` (`SpanSink.emit`'s arguments,
  `spanship.SPAN` of them a span).
  Counts: `exported`, `failed`, `dropped`. At the end of input, what is
  queued is exported (for the sink's timeout at most).

This process holds nothing but what it is sent: it was exec'd, not forked,
so the proxy's sockets and keys are not in it. It ends at the end of its
input, or, should that not reach it (stuck opening or writing its target),
within half a second of its parent's death.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from meshgate.observability.offload import frame, read_frames

log = logging.getLogger("meshgate.offload")

STATUS_EVERY = 0.5


class _LogTask:
    def __init__(self) -> None:
        from meshgate.observability.logline import LineFormatter, LineWriter

        self.formatter = LineFormatter()
        self.writer = LineWriter(1)
        self.fd = -1

    def handle(self, kind: str, args: tuple[Any, ...]) -> None:
        from meshgate.observability.logline import close_target, open_target

        if kind == "rows":
            self.writer.write(self.formatter.lines(args[0]))
        elif kind == "log":
            path, offset = args
            try:
                fd = open_target(path)
            except OSError as exc:
                log.error("access log: cannot open %s, kept the previous one: %s", path, exc)
                return
            self.formatter.offset = offset
            old, self.fd = self.fd, fd
            self.writer.retarget(fd)
            close_target(old)

    def counts(self) -> dict[str, int]:
        return {"written": self.writer.written, "unwritten": self.writer.unwritten}

    def close(self) -> None:
        pass


class _TraceTask:
    def __init__(self) -> None:
        from meshgate.observability.spanship import SpanCounts

        self.counts_ = SpanCounts()
        self.sink: Any = None
        self.timeout = 10.0

    def handle(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "spans":
            from meshgate.observability.spanship import SPAN

            values = args[0]
            sink = self.sink
            if sink is None:
                self.counts_.queue_dropped += len(values) // SPAN
                return
            emit = sink.emit
            for i in range(0, len(values) - SPAN + 1, SPAN):
                emit(*values[i : i + SPAN])
        elif kind == "trace" and self.sink is None:
            from meshgate.observability.spans import SpanSink

            settings = dict(args[0])
            self.timeout = float(settings.pop("close_timeout", 5.0))
            self.sink = SpanSink(counts=self.counts_, **settings)

    def counts(self) -> dict[str, int]:
        c = self.counts_
        return {"exported": c.exported, "failed": c.failed, "dropped": c.queue_dropped}

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close(self.timeout)


class _Reporter:
    """Writes the task's counts to the parent when they change."""

    def __init__(self, fd: int, task: _LogTask | _TraceTask) -> None:
        self.fd = fd
        self.task = task
        self.last: dict[str, int] = {}
        self.done = threading.Event()

    def report(self) -> None:
        counts = self.task.counts()
        if counts != self.last:
            self.last = counts
            with contextlib.suppress(OSError):  # (the parent is gone: its input ends too)
                os.write(self.fd, frame(counts))

    def run(self) -> None:
        parent = os.getppid()
        while not self.done.wait(STATUS_EVERY):
            if os.getppid() != parent:
                # The proxy died (killed): this process may be stuck where
                # its input's end cannot reach it (opening a named pipe
                # nobody reads, writing to a full one). Nothing is left to
                # report to.
                os._exit(1)
            self.report()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s meshgate[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    kind, status_fd = argv[0], int(argv[1])
    task: _LogTask | _TraceTask = _LogTask() if kind == "log" else _TraceTask()
    reporter = _Reporter(status_fd, task)
    thread = threading.Thread(target=reporter.run, daemon=True)
    thread.start()
    buf = bytearray()
    stdin = sys.stdin.fileno()
    try:
        while chunk := os.read(stdin, 1 << 20):
            buf += chunk
            for got in read_frames(buf):
                try:
                    task.handle(got[0], got[1:])
                except Exception:
                    log.exception("%s process: a frame failed", kind)
    finally:
        task.close()
        reporter.done.set()
        thread.join()
        reporter.report()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
