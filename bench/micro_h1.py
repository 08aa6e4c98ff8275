"""Per-request CPU cost of the proxy's Python hot path, without sockets.

Drives `ServerProtocol` and a pooled `UpstreamConnection` with in-memory
transports: a request is fed to the client side, the upstream side answers,
and the loop repeats. It isolates meshgate's own code from syscalls and the
event loop, so it is the number to watch while optimising (profile with
`--profile`). It is not a throughput figure: see `bench/run.py` for that.

    .venv/bin/python bench/micro_h1.py [--n 200000] [--profile] [--obs MODE]

`--obs` picks what observability is on, as bench/observability.py's targets:
`off` (no request series, no access log), `metrics` (the default), `default`
(metrics and the JSON access log, to /dev/null, formatted on the "loop" every
256 requests as the worker does), `trace0` and `trace1` (the default plus
tracing at 0%, 1% and 100%, exporting to a closed port: the spans are dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import time
from typing import Any

from meshgate.config.schema import AccessLogConfig
from meshgate.config.tracing import TracingConfig
from meshgate.engine.load import load_config_text
from meshgate.engine.runtime import Runtime
from meshgate.observability.accesslog import AccessLog
from meshgate.observability.tracing import Tracing
from meshgate.protocol.h1 import ServerProtocol, ServerState
from meshgate.stream.stream import ProxyStream
from meshgate.upstream.cluster import PoolRegistry
from meshgate.upstream.pool import UpstreamConnection

CONFIG = """
listen: 127.0.0.1:0
upstreams:
  order-service: {endpoints: [127.0.0.1:9001]}
  customer-service: {endpoints: [127.0.0.1:9002]}
routes:
- {path: /api/orders/**, upstream: order-service}
- {path: /api/customers/**, upstream: customer-service}
"""

REQUEST = (
    b"GET /api/customers/42 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"User-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
BODY = b'{"id":42,"name":"customer","email":"c@example.com","tier":"gold"}'.ljust(100)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 21:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
    + BODY
)


class MemTransport:
    """Just enough of asyncio.Transport for the protocols."""

    def __init__(self) -> None:
        self.out = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def writelines(self, data: Any) -> None:
        for d in data:
            self.out += len(d)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


OBS = ("off", "metrics", "default", "trace0", "trace1", "trace100")


async def main(n: int, profile: bool, obs: str = "metrics") -> None:
    loop = asyncio.get_running_loop()
    registry = PoolRegistry(loop)
    config = load_config_text(CONFIG)
    runtime = Runtime.build(config, registry)
    state = ServerState(runtime, registry, loop=loop, streams=ProxyStream)
    access: AccessLog | None = None
    if obs == "off":
        state.observe = state.series.pass_on
    if obs in ("default", "trace0", "trace1"):
        access = AccessLog(time.monotonic, state.hub)
        access.apply(AccessLogConfig(path="/dev/null"))
    if obs.startswith("trace"):
        ratio = {"trace0": 0.0, "trace1": 0.01}.get(obs, 1.0)
        state.tracing = Tracing.from_config(
            TracingConfig(endpoint="http://127.0.0.1:9/v1/traces", sample_ratio=ratio), state.hub
        )
    proto = ServerProtocol(state)
    client = MemTransport()
    proto.connection_made(client)  # type: ignore[arg-type]
    pool = runtime.clusters["customer-service"].endpoints[0].pool
    conn = UpstreamConnection(pool)
    conn.connection_made(MemTransport())  # type: ignore[arg-type]
    pool.open_count += 1
    pool.release(conn)

    flush = state.batcher.flush  # what the loop does once per turn

    format_batch = access.flush if access is not None else None

    def run(count: int) -> None:
        for i in range(count):
            proto.data_received(REQUEST)
            flush()
            conn.data_received(RESPONSE)
            flush()
            if format_batch is not None and i % 256 == 255:
                format_batch()

    run(1000)
    # As the worker does once it has started: what exists now (modules,
    # config) is left out of garbage collections.
    gc.freeze()
    prof = cProfile.Profile() if profile else None
    start = time.process_time()
    if prof:
        prof.enable()
    run(n)
    if prof:
        prof.disable()
    elapsed = time.process_time() - start
    print(f"{n} requests: {elapsed / n * 1e6:.2f} us/request (client got {client.out} bytes)")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if access is not None:
        access.stop()
    if state.tracing is not None:
        state.tracing.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--obs", choices=OBS, default="metrics")
    args = ap.parse_args()
    import uvloop

    uvloop.run(main(args.n, args.profile, args.obs))
