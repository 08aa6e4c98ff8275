"""`SteadyLoad`: a bounded, paced HTTP/1.1 load of keep-alive connections.

Each of `connections` threads holds one keep-alive connection
(`http.client`) and sends GETs on a fixed schedule, so that together they
make `rate` requests per second. It stops by itself after `max_requests`
requests or `duration` seconds, whichever comes first (or on `stop()`).
Every request is recorded as an `Outcome`: the local port of the connection
that carried it (which gateway worker held it: `proxy.socket_owners`), its
status and the headers, or the socket error. A connection that failed is
replaced by a new one for the next request; nothing is retried, so every
error is counted exactly once.

A late thread does not catch up in a burst: its schedule restarts from now.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

__all__ = ["Outcome", "SteadyLoad"]

_BODY_KEPT = 4096


@dataclass(frozen=True)
class Outcome:
    client: int
    """Which of the load's threads sent it."""
    port: int
    """The client connection's local port (0: the connection failed to open)."""
    started: float
    ended: float
    status: int | None
    """None: a socket or protocol error (see `error`)."""
    error: str | None
    headers: tuple[tuple[str, str], ...]
    """Response headers, names lowercased."""
    body: bytes
    """The first 4 KiB of the body."""

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def describe(self) -> str:
        what = self.error if self.status is None else f"{self.status} {self.body[:200]!r}"
        return f"client {self.client} port {self.port} at {self.started:.3f}: {what}"


class SteadyLoad:
    """Use as a context manager: the threads start on enter and are stopped
    and joined on exit (they also stop by themselves)."""

    def __init__(
        self,
        port: int,
        path: str | Callable[[int, int], str],
        *,
        connections: int = 4,
        rate: float = 200.0,
        max_requests: int = 10_000,
        duration: float = 30.0,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = port
        self.host = host
        self.path = path if callable(path) else (lambda client, n: path)
        self.connections = connections
        self.interval = connections / rate
        self.max_requests = max_requests
        self.duration = duration
        self.timeout = timeout
        self.headers = headers or {}
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._ports: dict[int, int] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(connections)
        ]
        self.started_at = 0.0

    def __enter__(self) -> SteadyLoad:
        self.started_at = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise AssertionError(f"load threads still running (a request hangs): {alive}")

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _take(self) -> bool:
        with self._lock:
            return len(self._outcomes) < self.max_requests

    def _run(self, client: int) -> None:
        deadline = self.started_at + self.duration
        # The threads' schedules are spread over one interval.
        next_at = self.started_at + self.interval * client / self.connections
        conn: http.client.HTTPConnection | None = None
        n = 0
        try:
            while not self._stop.is_set() and self._take():
                now = time.monotonic()
                if now >= deadline:
                    break
                if next_at > now and self._stop.wait(next_at - now):
                    break
                next_at = max(next_at + self.interval, time.monotonic())
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                conn = self._one(conn, client, n)
                n += 1
        finally:
            if conn is not None:
                conn.close()

    def _one(
        self, conn: http.client.HTTPConnection, client: int, n: int
    ) -> http.client.HTTPConnection | None:
        started = time.monotonic()
        port = 0
        try:
            if conn.sock is None:
                conn.connect()
            port = conn.sock.getsockname()[1]
            with self._lock:
                self._ports[client] = port
            conn.request("GET", self.path(client, n), headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            outcome = Outcome(
                client, port, started, time.monotonic(), resp.status, None,
                tuple((k.lower(), v) for k, v in resp.getheaders()), body[:_BODY_KEPT],
            )  # fmt: skip
            keep: http.client.HTTPConnection | None = conn
            if resp.will_close:
                conn.close()
                keep = None
        except (OSError, http.client.HTTPException) as exc:
            outcome = Outcome(client, port, started, time.monotonic(), None, repr(exc), (), b"")
            conn.close()
            keep = None
        with self._lock:
            self._outcomes.append(outcome)
        return keep

    # -- what tests read -----------------------------------------------------

    def outcomes(
        self, started_after: float = 0.0, ended_before: float = float("inf")
    ) -> list[Outcome]:
        with self._lock:
            got = list(self._outcomes)
        return [o for o in got if o.started >= started_after and o.ended <= ended_before]

    def count(self) -> int:
        with self._lock:
            return len(self._outcomes)

    def open_ports(self) -> list[int]:
        """The local port of each thread's current (or last) connection."""
        with self._lock:
            return list(self._ports.values())

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes() if o.status is None]

    def unexpected(self, expected: Collection[int] = (200,)) -> list[Outcome]:
        """Every socket error and every status not in `expected`."""
        return [o for o in self.outcomes() if o.status not in expected]

    def statuses(self) -> Counter[int | None]:
        return Counter(o.status for o in self.outcomes())

    def wait_for(self, n: int, timeout: float = 20.0, *, after: float = 0.0) -> None:
        """Until `n` requests that started after `after` have ended."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes(started_after=after)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.outcomes(started_after=after))} of {n} requests after "
                    f"{timeout}s; statuses {self.statuses()}"
                )
            if not self.running:
                raise AssertionError(
                    f"the load ended with {len(self.outcomes(started_after=after))} "
                    f"of {n} requests; statuses {self.statuses()}"
                )
            time.sleep(0.02)
