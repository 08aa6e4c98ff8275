"""Work handed to a child process: the access log's lines and the spans'
export, done off the proxy's event loop and off its GIL.

A proxy process is one event loop on one core. Formatting a JSON line
(about 2 µs) or encoding and sending a span through the OpenTelemetry SDK
(tens of µs) on that loop, or on a thread that fights it for the GIL, takes
that time from every request. So the loop only gathers the values, a tuple
per line or span, and `Offload` hands them in batches (one `marshal` frame,
a C call) to a child process of its own (`offload_main`), which formats,
writes and exports them, on another core.

- The child is `python -m meshgate.observability.offload_main KIND`, a
  fresh interpreter (exec'd, so it inherits neither the proxy's sockets nor
  its keys: only stdin, stdout, stderr and its status pipe). Frames go to
  its stdin: a 4-byte big-endian length, then `marshal` data (core types
  only: loading it runs no code).
- A writer thread of this process does the blocking writes to that pipe,
  so no system call is made on the loop; the loop hands frames over in a
  deque. What waits there is bounded by its owner (`backlog`): a child that
  falls behind (a stdout nobody reads) makes the owner drop and count, and
  a response never waits.
- The child reports counts (lines it could not write, spans exported and
  failed) on its status pipe, every half second while they change and at
  its end (`status`).
- The child dies (killed, crashed): the frames not written to it are
  counted as `lost`, and it is started again, at most once a second, with
  its configuration frames first (`configure`). What sat in the pipe when
  it died (up to the pipe's 64 KiB) is lost uncounted.
- `stop`: what is queued is written, stdin is closed, and the child, at its
  end of input, finishes (writes, exports) and exits; after `timeout`
  seconds it is killed.
- The child ignores SIGINT and SIGTERM (a Ctrl-C or a signal to the process
  group reaches this process, which ends it by closing its input); when
  this process dies, its input ends and it exits all the same.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["Offload", "frame", "read_frames"]

log = logging.getLogger("meshgate.offload")

_LEN = struct.Struct(">I")
RESPAWN_EVERY = 1.0
"""Seconds between two starts of a child that died."""
ROUND = 0.1
"""Seconds the writer waits for frames before it looks at the child."""
PIPE_SIZE = 1 << 20
"""The child's input pipe, in bytes (Linux's default limit for a user)."""
SAY_EVERY = 60.0
"""Seconds between two logs of a child that died."""


def _child_env() -> dict[str, str]:
    """The environment of a child: this one, with the directory this
    meshgate was imported from first on its path, so that the child runs
    the same code however this process found it."""
    import meshgate

    root = os.path.dirname(os.path.dirname(os.path.abspath(meshgate.__file__)))
    env = dict(os.environ)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not rest else root + os.pathsep + rest
    return env


def frame(obj: Any) -> bytes:
    """One frame: its length, then `obj` in marshal's format (ValueError
    for a value marshal cannot write)."""
    data = marshal.dumps(obj, 4)
    return _LEN.pack(len(data)) + data


def read_frames(buf: bytearray) -> list[Any]:
    """The whole frames at the start of `buf`, taken out of it."""
    out = []
    at = 0
    size = len(buf)
    while size - at >= 4:
        (n,) = _LEN.unpack_from(buf, at)
        if size - at - 4 < n:
            break
        out.append(marshal.loads(bytes(buf[at + 4 : at + 4 + n])))
        at += 4 + n
    del buf[:at]
    return out


class Offload:
    """One child process and the thread that feeds it (see the module)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.frames: collections.deque[tuple[bytes, int]] = collections.deque()
        """Frames for the writer, each with the number of items it holds."""
        self.queued = 0  # items put in `frames` (the loop counts)
        self.taken = 0  # items taken out of `frames` (the writer counts)
        self.lost = 0
        """Items in frames that could not be written to a child (the writer counts)."""
        self.status: dict[str, int] = {}
        """The counts the child reported last (its own, since it started)."""
        self.carried: dict[str, int] = {}
        """The counts of the children that came before it."""
        self.config: list[bytes] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._status_fd = -1
        self._status_buf = bytearray()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fresh_config = False
        self._last_spawn = 0.0
        self._failed_spawn = False
        self._last_said = -SAY_EVERY
        self._lock = threading.Lock()

    @property
    def backlog(self) -> int:
        """Items handed over and not yet written to the child."""
        return self.queued - self.taken

    def count(self, name: str) -> int:
        """A count the children reported, all of them added up."""
        return self.carried.get(name, 0) + self.status.get(name, 0)

    # -- the owner's side --------------------------------------------------------

    def start(self) -> None:
        """Start the child and the writer; OSError when the child cannot be
        started."""
        if self._thread is not None:
            return
        self._stopping = False
        self._spawn()
        self._thread = threading.Thread(
            target=self._run, name=f"meshgate-offload-{self.kind}", daemon=True
        )
        self._thread.start()

    def configure(self, *frames_: Any) -> None:
        """The frames a child needs before any other (its settings): sent
        now, and first to every child started after this one."""
        with self._lock:
            self.config = [frame(f) for f in frames_]
            self._fresh_config = True
        self._wake.set()

    def send(self, data: bytes, items: int) -> None:
        """Hand one frame to the writer (from the loop, without waiting)."""
        self.queued += items
        self.frames.append((data, items))
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self, timeout: float = 2.0) -> bool:
        """Write what is queued, end the child's input and wait for it to
        finish, `timeout` seconds at most (then it is killed). False when
        something had to be given up."""
        thread = self._thread
        if thread is None:
            return True
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        thread.join(timeout)
        clean = not thread.is_alive()
        self._thread = None
        proc = self.proc
        if proc is not None:
            if clean:
                with contextlib.suppress(OSError):
                    if proc.stdin is not None:
                        proc.stdin.close()
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.05))
                except subprocess.TimeoutExpired:
                    clean = False
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
            self._read_status()
            self._close_status()
            self.proc = None
        if not clean:
            log.warning("%s process: stopped before it was done", self.kind)
        return clean

    # -- the writer thread -------------------------------------------------------

    def _spawn(self) -> None:
        self._last_spawn = time.monotonic()
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshgate.observability.offload_main", self.kind, str(w)],
                stdin=subprocess.PIPE,
                pass_fds=(w,),
                close_fds=True,
                bufsize=0,
                env=_child_env(),
            )
        except OSError:
            os.close(r)
            os.close(w)
            raise
        os.close(w)
        if proc.stdin is not None:
            # A frame fits in the pipe whole (while the child keeps up): one
            # write, not one per 64 KiB with the GIL taken back from the
            # loop between them. The kernel may refuse (a user's limit).
            with contextlib.suppress(OSError):
                fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(r, False)
        self._read_status()  # (the last words of the one before)
        self._close_status()
        for name, value in self.status.items():
            self.carried[name] = self.carried.get(name, 0) + value
        self.status = {}
        self._status_fd = r
        self.proc = proc
        with self._lock:
            self._fresh_config = True

    def _close_status(self) -> None:
        if self._status_fd >= 0:
            os.close(self._status_fd)
            self._status_fd = -1
            self._status_buf.clear()

    def _read_status(self) -> None:
        fd = self._status_fd
        if fd < 0:
            return
        buf = self._status_buf
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(fd, 65536):
                buf += chunk
        for got in read_frames(buf):
            if isinstance(got, dict):
                self.status = {k: v for k, v in got.items() if isinstance(v, int)}

    def _run(self) -> None:
        while True:
            self._wake.wait(ROUND)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._round()
            except Exception:
                log.exception("%s process: the writer failed", self.kind)
            if stopping and not self.frames:
                return

    def _round(self) -> None:
        self._read_status()
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            self._discard(proc, f"exited ({proc.returncode})")
            proc = None
        if proc is None:
            if self._stopping or time.monotonic() - self._last_spawn < RESPAWN_EVERY:
                self._drop_frames()
                return
            try:
                self._spawn()
                self._failed_spawn = False
            except OSError as exc:
                if not self._failed_spawn:
                    self._failed_spawn = True
                    log.error("%s process: cannot start: %s", self.kind, exc)
                self._drop_frames()
                return
            proc = self.proc
        assert proc is not None and proc.stdin is not None
        pipe = proc.stdin
        fd = pipe.fileno()
        with self._lock:
            config = self.config if self._fresh_config else []
            self._fresh_config = False
        try:
            for data in config:
                _write_all(fd, data)
            frames = self.frames
            while frames:
                data, items = frames[0]
                _write_all(fd, data)
                frames.popleft()
                self.taken += items
        except OSError:
            # The child died: what it did not take is lost; the next round
            # starts another.
            self._drop_frames()
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
            self._discard(proc, f"ended ({proc.poll()})")

    def _discard(self, proc: subprocess.Popen[bytes], what: str) -> None:
        """A child that is gone: its pipe closed, and said (a child that
        keeps dying at its start is said once a minute, not every second)."""
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self.proc = None
        now = time.monotonic()
        if not self._stopping and now - self._last_said >= SAY_EVERY:
            self._last_said = now
            log.error("%s process: %s; starting another", self.kind, what)

    def _drop_frames(self) -> None:
        frames = self.frames
        while frames:
            _, items = frames.popleft()
            self.taken += items
            self.lost += items


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
