"""An open-loop paced HTTP/1.1 load: requests at evenly spaced instants.

`hey -q` paces each of its workers with its own ticker, and the tickers start
together: `-c 10 -q 100` sends bursts of 10 requests at once, every 10 ms. A
burst measures how a server drains a queue, not the latency it adds at a
steady 1,000 req/s. This client schedules request i at `start + i / rate`,
sends it on an idle keep-alive connection (opening one if none is idle),
and measures latency from the *scheduled* instant, as wrk2 does, so a slow
server cannot hide its delay by slowing the client down (no coordinated
omission).

    .venv/bin/python bench/paced.py URL [--rate 1000] [--duration 10] [--json] [-H 'Name: v']

It is also used by bench/run.py for the paced-latency table. The client
runs on uvloop in one process; its own overhead is the same for every
target, so compare targets, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
import urllib.parse

import httptools
import uvloop


class _Conn(asyncio.Protocol):
    def __init__(self, done: collections.deque[_Conn], lat: list[float]) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle = done
        self.latencies = lat
        self.scheduled = 0.0
        self.status = 0
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.latencies.append(time.perf_counter() - self.scheduled)
        if self.status != 200:
            self.errors += 1
        self.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def run(
    url: str,
    rate: float,
    duration: float,
    warmup: float = 1.0,
    headers: tuple[str, ...] = (),
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    request = (
        f"GET {u.path or '/'}{'?' + u.query if u.query else ''} HTTP/1.1\r\n"
        f"Host: {u.netloc}\r\nUser-Agent: meshgate-paced\r\n"
        + "".join(f"{h}\r\n" for h in headers)
        + "\r\n"
    ).encode()
    idle: collections.deque[_Conn] = collections.deque()
    latencies: list[float] = []
    conns: list[_Conn] = []
    opening = 0

    async def open_conn(scheduled: float) -> None:
        nonlocal opening
        opening += 1
        try:
            _, conn = await loop.create_connection(lambda: _Conn(idle, latencies), host, port)
        finally:
            opening -= 1
        conns.append(conn)
        conn.scheduled = scheduled
        assert conn.transport is not None
        conn.transport.write(request)

    # Warm a few connections so the first requests don't pay for connects.
    for _ in range(8):
        conn = (await loop.create_connection(lambda: _Conn(idle, latencies), host, port))[1]
        conns.append(conn)
        idle.append(conn)

    total = int(rate * (duration + warmup))
    interval = 1.0 / rate
    start = time.perf_counter() + 0.05
    sent = 0
    tasks = []
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / interval) + 1) if now >= start else 0
        while sent < due:
            scheduled = start + sent * interval
            sent += 1
            while idle and idle[0].transport is None:
                idle.popleft()
            if idle:
                conn = idle.popleft()
                conn.scheduled = scheduled
                assert conn.transport is not None
                conn.transport.write(request)
            else:
                tasks.append(asyncio.ensure_future(open_conn(scheduled)))
        # Sleep to the next send instant (the loop's timers are ms-grained;
        # sends that fall due meanwhile go out together, timed from their
        # own instants).
        await asyncio.sleep(max(0.0, start + sent * interval - time.perf_counter()))
    deadline = time.perf_counter() + 10
    while len(latencies) < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    # The first `warmup` seconds (connections being opened behind the target,
    # caches warming) are sent but not counted.
    skip = int(rate * warmup)
    completed_in_time = len(latencies)
    latencies[:] = latencies[skip:]
    total -= skip
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    lat = sorted(latencies)
    n = len(lat)

    def pct(p: float) -> float:
        return lat[min(n - 1, int(p / 100 * n))] * 1000 if n else float("nan")

    return {
        "sent": total,
        "completed": n,
        "errors": sum(c.errors for c in conns) + (total + skip - completed_in_time),
        "connections": len(conns),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": lat[-1] * 1000 if n else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not counted")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument(
        "-H", "--header", action="append", default=[], help="a request header, 'Name: value'"
    )
    args = ap.parse_args()
    result = uvloop.run(run(args.url, args.rate, args.duration, args.warmup, tuple(args.header)))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:12} {v:.3f}" if isinstance(v, float) else f"{k:12} {v}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
