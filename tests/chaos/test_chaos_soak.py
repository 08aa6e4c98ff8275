"""A soak: a steady, paced load through a gateway doing everything at once
(metrics, an access log to a file, a `policy: redis` rate limit set high),
while the worker's resident memory and open file descriptors are sampled.

It runs `MESHGATE_SOAK_SECONDS` (60 by default, in `make test` and CI). The
ten-minute run, by hand:

    MESHGATE_SOAK_SECONDS=600 MESHGATE_SOAK_RESULTS=bench/results \\
        PYTHONPATH=src .venv/bin/python -m pytest tests/chaos/test_chaos_soak.py -s

The samples go to `soak.json` in the test's tmp directory (its path is
printed), and also to `$MESHGATE_SOAK_RESULTS/soak-<time>.json` when that
is set; a summary line gives RSS start/end/max and fds start/end.

The verdict looks at the second half only (the first is warm-up: pools,
caches and the allocator's arenas fill): RSS grows less than 10 MiB over it,
the fds that are not sockets (files, pipes, listeners) stay flat, and the
sockets never outnumber what the load's concurrency calls for (clients,
and the upstream and Redis pools). Not one request may fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support.load import SteadyLoad
from support.proxy import Stack, upstream_block
from support.redis import RedisServer

SOAK_SECONDS = float(os.environ.get("MESHGATE_SOAK_SECONDS", "60"))
RATE = 300.0  # requests per second, all connections together
SAMPLE_EVERY = 2.0
RSS_GROWTH_MAX = 10 * 1024 * 1024
OTHER_FD_DRIFT_MAX = 2
CLIENTS = 9  # connections the load holds at once (8 keep-alive, 1 new per request)

pytestmark = [
    pytest.mark.engine,
    pytest.mark.chaos,
    pytest.mark.timeout(SOAK_SECONDS + 120),
]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int, *, clients_on: int, upstream: int, redis: int) -> dict[str, int]:
    """The process's open fds: all of them, and its TCP sockets by what is
    at the other end (clients, the upstream pool, the Redis pool)."""
    inodes = []
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        total += 1
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.append(target[8:-1])
    ends: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rpartition(":")[2], 16)
        remote = int(fields[2].rpartition(":")[2], 16)
        ends[fields[9]] = (local, remote)
    counts = {"fds": total, "clients": 0, "upstream": 0, "redis": 0}
    for inode in inodes:
        local, remote = ends.get(inode, (0, 0))
        if local == clients_on and remote != 0:
            counts["clients"] += 1
        elif remote == upstream:
            counts["upstream"] += 1
        elif remote == redis:
            counts["redis"] += 1
    counts["other"] = total - counts["clients"] - counts["upstream"] - counts["redis"]
    return counts


def test_soak_keeps_memory_and_fds_flat(
    stack: Stack,
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    up = stack.upstream("up")
    access_log = tmp_path / "access.log"
    limit = {"limit": 100_000_000, "period": "1h", "key": "route", "policy": "redis"}
    proxy = stack.proxy(
        {
            "upstreams": {"up": upstream_block(up)},
            "routes": [{"path": "/soak/**", "upstream": "up", "rate_limit": limit}],
            "redis": {"url": redis_server.url, "timeout": "1s"},
            "access_log": {"path": str(access_log)},
        }
    )
    pid = proxy.pid  # one process: the worker itself
    redis_port = redis_server.port
    assert redis_port is not None
    total = int(RATE * SOAK_SECONDS * 1.1)
    keepalive = SteadyLoad(
        proxy.port,
        lambda c, n: f"/soak/fixed?c={c}&n={n}",
        connections=CLIENTS - 1,
        rate=RATE - 10,
        duration=SOAK_SECONDS,
        max_requests=total,
    )
    # A connection per request, too: the accept and close paths are soaked as well.
    churn = SteadyLoad(
        proxy.port, "/soak/fixed", connections=1, rate=10, duration=SOAK_SECONDS,
        max_requests=total, headers={"Connection": "close"},
    )  # fmt: skip
    samples: list[dict[str, Any]] = []
    with keepalive, churn:
        start = time.monotonic()
        while keepalive.running or churn.running:
            fds = open_fds(pid, clients_on=proxy.port, upstream=up.port, redis=redis_port)
            samples.append(
                {
                    "t": round(time.monotonic() - start, 3),
                    "rss": rss_bytes(pid),
                    **fds,
                    "requests": keepalive.count() + churn.count(),
                }
            )
            time.sleep(SAMPLE_EVERY)
        elapsed = time.monotonic() - start

    assert proxy.alive and proxy.stop() == 0  # the access log is all written out
    outcomes = keepalive.outcomes() + churn.outcomes()
    bad = [o for o in outcomes if o.status != 200]
    loaded_for = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
    second_half = [s for s in samples if s["t"] >= elapsed / 2]
    mid, end = second_half[0], samples[-1]
    rss_growth = max(s["rss"] for s in second_half) - mid["rss"]
    fd_drift = max(abs(s["fds"] - mid["fds"]) for s in second_half)
    other = [s["other"] for s in second_half]
    peaks = {k: max(s[k] for s in samples) for k in ("clients", "upstream", "redis")}
    figures = {
        "seconds": SOAK_SECONDS,
        "rate": RATE,
        "requests": len(outcomes),
        "failed": len(bad),
        "achieved_rate": round(len(outcomes) / loaded_for, 1),
        "rss_start_mb": round(samples[0]["rss"] / 2**20, 2),
        "rss_mid_mb": round(mid["rss"] / 2**20, 2),
        "rss_end_mb": round(end["rss"] / 2**20, 2),
        "rss_max_mb": round(max(s["rss"] for s in samples) / 2**20, 2),
        "rss_growth_second_half_mb": round(rss_growth / 2**20, 2),
        "fds_start": samples[0]["fds"],
        "fds_mid": mid["fds"],
        "fds_end": end["fds"],
        "fds_drift_second_half": fd_drift,
        "other_fds_second_half": [min(other), max(other)],
        "socket_peaks": peaks,
        "access_log_lines": sum(1 for _ in access_log.open()),
        "python": sys.version.split()[0],
    }
    doc = {"figures": figures, "samples": samples}
    paths = [tmp_path / "soak.json"]
    results = os.environ.get("MESHGATE_SOAK_RESULTS")
    if results:
        paths.append(Path(results) / time.strftime("soak-%Y%m%dT%H%M%S.json", time.gmtime()))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    with capsys.disabled():
        print(
            f"\nsoak {SOAK_SECONDS:g}s at {figures['achieved_rate']} req/s: "
            f"{len(outcomes)} requests, {len(bad)} failed; RSS start {figures['rss_start_mb']} "
            f"end {figures['rss_end_mb']} max {figures['rss_max_mb']} MiB "
            f"(+{figures['rss_growth_second_half_mb']} MiB over the second half); "
            f"fds start {figures['fds_start']} end {figures['fds_end']}; "
            f"samples: {', '.join(str(p) for p in paths)}"
        )

    assert bad == [], [o.describe() for o in bad[:10]]
    assert len(outcomes) >= 0.8 * RATE * SOAK_SECONDS, figures
    assert len(second_half) >= 3, samples
    assert rss_growth < RSS_GROWTH_MAX, figures
    # Files, pipes, listeners and the like: flat. Sockets: never more than
    # the load's concurrency calls for (a leaked one would not be reused, so
    # the count would climb past it): the pools hold at most what was in
    # flight at once, plus a connection or two on its way out.
    assert max(other) - min(other) <= OTHER_FD_DRIFT_MAX, figures
    assert peaks["clients"] <= CLIENTS, figures
    assert peaks["upstream"] <= CLIENTS + 2, figures
    assert peaks["redis"] <= CLIENTS + 2, figures
    # Every request was logged: the writer thread kept up, and dropped nothing.
    assert figures["access_log_lines"] == len(outcomes), figures
