"""A real `redis-server` for integration tests.

`RedisServer` runs one on 127.0.0.1 on a free ephemeral port, without
persistence, in its own directory; `stop()` and `start()` again reuse the
same port, so clients configured with `url` see a server going away and
coming back; `kill()` is the same going away as a crash (SIGKILL).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

REDIS_SERVER = "redis-server"


def redis_server_path() -> str | None:
    return shutil.which(REDIS_SERVER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; use as a context manager or call
    `start()` / `stop()` (any number of times)."""

    def __init__(self, directory: Path | None = None, *, startup_timeout: float = 10.0) -> None:
        path = redis_server_path()
        if path is None:
            raise RuntimeError("redis-server is not installed")
        self.executable = path
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="redis-")) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.directory / "redis.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        args = [
            self.executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self._log),
        ]
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if ping(port):
                return True
            time.sleep(0.02)
        return False

    def start(self) -> RedisServer:
        """Start the server: on a new free port the first time, on the same
        port afterwards. Returns once it answers PING."""
        if self.running:
            return self
        for attempt in range(5):
            # A new port may have been taken between the probe and the
            # server's bind: try another. The same port: try again shortly.
            port = self.port if self.port is not None else _free_port()
            proc = self._spawn(port)
            if self._wait_ready(proc, port):
                self.port = port
                self.proc = proc
                return self
            self._terminate(proc)
            time.sleep(0.1 * attempt)
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log_text()}")

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """SIGTERM, and wait until the process is gone (the port is free)."""
        if self.proc is not None:
            self._terminate(self.proc)
            self.proc = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    def kill(self) -> None:
        """`kill -9`, as a crash: no shutdown of its own; returns once the
        process is gone (the port is free for `start()` again)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")
        return ""

    def client(self) -> redis.Redis:
        """A synchronous client for this server (close it after use)."""
        if self.port is None:
            raise RuntimeError("the server was never started")
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
