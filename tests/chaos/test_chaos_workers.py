"""`kill -9` of one worker of two, under a steady keep-alive load.

What may fail is exactly what the killed worker held: the one request in
flight (or the next one) on each client connection it had accepted. Every
other request succeeds: those on the other worker's connections, and those
on the new connections that replace the dead ones. The supervisor forks a
new worker (a new pid among its children) within a few seconds, and the
admin API shows it: its pid answers `/config`, and a `/metrics` scrape
holds both workers' samples again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from support.client import http_get, wait_until
from support.load import SteadyLoad
from support.proxy import ProxyProcess, Stack, children, socket_owners, upstream_block

pytestmark = [pytest.mark.engine, pytest.mark.chaos]

CONNECTIONS = 12
RESTART_WITHIN = 10.0  # the supervisor waits RESTART_BACKOFF (1 s) before forking


def admin_worker_pid(proxy: ProxyProcess) -> int:
    """The pid of the worker that answered `/config` on a new connection."""
    status, body = http_get(proxy.admin_port, "/config")
    assert status == 200, body[:300]
    pid: int = json.loads(body)["worker"]
    return pid


def gone(pid: int) -> bool:
    """Dead: no /proc entry, or a zombie (its sockets are closed either way)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def workers_scraped(proxy: ProxyProcess) -> float:
    status, body = http_get(proxy.admin_port, "/metrics", timeout=5)
    assert status == 200
    m = re.search(rb"(?m)^meshgate_workers_scraped(?:\{\})? (\S+)$", body)
    assert m is not None, body[:2000]
    return float(m.group(1))


def test_kill_9_of_a_worker_costs_only_its_connections(stack: Stack) -> None:
    up = stack.upstream("up")
    proxy = stack.proxy(
        {
            "upstreams": {"up": upstream_block(up)},
            "routes": [{"path": "/svc/**", "upstream": "up"}],
        },
        workers=2,
    )
    before = wait_until(lambda: (c := children(proxy.pid)) and len(c) == 2 and c, what="2 workers")
    assert wait_until(lambda: workers_scraped(proxy) == 2, what="a scrape of both workers")

    with SteadyLoad(
        proxy.port, "/svc/fixed", connections=CONNECTIONS, rate=240, duration=40,
        max_requests=9000,
    ) as load:  # fmt: skip
        load.wait_for(240)
        assert load.errors() == [], [o.describe() for o in load.errors()[:5]]
        ports = load.open_ports()
        assert len(ports) == CONNECTIONS
        owners = socket_owners(ports, before, accepted_on=proxy.port)
        assert sorted(owners) == sorted(ports), (owners, ports, before)
        held = Counter(owners.values())
        # SO_REUSEPORT spreads connections by a hash: both workers hold some.
        assert len(held) == 2, f"every connection on one worker: {held}"
        victim = max(held, key=lambda pid: (held[pid], pid))
        (survivor,) = set(before) - {victim}
        victim_ports = {p for p, pid in owners.items() if pid == victim}

        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: gone(victim), timeout=5, what=f"worker {victim} to die")
        # Meanwhile a scrape is answered by the survivor, which leaves the
        # dead worker out (its socket refuses) rather than waiting for it.
        scrape_at = time.monotonic()
        scraped_alone = workers_scraped(proxy)
        scrape_took = time.monotonic() - scrape_at

        def new_worker() -> int | None:
            fresh = set(children(proxy.pid)) - set(before)
            return fresh.pop() if fresh else None

        replacement = wait_until(new_worker, timeout=RESTART_WITHIN, what="a new worker pid")
        restarted_at = time.monotonic()
        assert set(children(proxy.pid)) == {survivor, replacement}
        # The admin port is shared by both workers too: the new one answers it.
        wait_until(
            lambda: admin_worker_pid(proxy) == replacement,
            timeout=10,
            what="the new worker's /config",
        )
        wait_until(lambda: workers_scraped(proxy) == 2, timeout=10, what="both workers scraped")
        # A few more seconds of load with the new worker in place.
        load.wait_for(600, after=restarted_at)
    survived_gap = [
        o for o in load.outcomes(started_after=killed_at, ended_before=restarted_at)
        if o.status == 200
    ]  # fmt: skip

    outcomes = load.outcomes()
    errors = [o for o in outcomes if o.status is None]
    wrong = [o for o in outcomes if o.status not in (None, 200)]
    print(
        f"\nkill -9 of worker {victim} ({len(victim_ports)} of {CONNECTIONS} connections): "
        f"{len(outcomes)} requests, {len(errors)} connection errors, new worker {replacement} "
        f"after {restarted_at - killed_at:.2f}s, {len(survived_gap)} answered meanwhile; "
        f"a scrape meanwhile took {scrape_took * 1000:.0f} ms, {scraped_alone:g} worker in"
    )
    assert wrong == [], [o.describe() for o in wrong[:5]]
    assert (scraped_alone, scrape_took < 1.0) == (1, True), (scraped_alone, scrape_took)
    # The errors are the killed worker's connections', one each, and nothing else.
    per_port = Counter(o.port for o in errors)
    assert set(per_port) <= victim_ports, [o.describe() for o in errors]
    assert all(n == 1 for n in per_port.values()), per_port
    assert len(errors) <= len(victim_ports)
    # Each client whose connection died went on, on a new connection, without a failure.
    by_client: dict[int, list[int | None]] = defaultdict(list)
    for o in outcomes:
        by_client[o.client].append(o.status)
    for o in errors:
        after = by_client[o.client][by_client[o.client].index(None) + 1 :]
        assert after and set(after) == {200}, (o.describe(), after[:5])
    # The other worker kept serving while the supervisor was restarting the dead one.
    assert survived_gap, "no request was answered between the kill and the restart"
    assert proxy.alive
    line = proxy.wait_for_log(rf"worker \d+ \(pid {victim}\) exited with status -?9")
    assert "restarting" in line
    assert proxy.stop() == 0
