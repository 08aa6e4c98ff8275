"""Endpoints that do not accept connections leave rotation at once.

A connect that is refused or times out marks the endpoint unreachable: the
balancer rebuilds its in-service tuple without it (the `refresh` that
outlier detection and health checks use too, so picking costs nothing more
per request), and a probe connects to it again with jittered exponential
backoff (100 ms doubling up to 5 s). The first connect that succeeds, a
probe's or a request's, puts it back; the probe's connection is left idle in
the pool for the next request. This is Linkerd's behaviour: it needs no
config and is always on.

A retry goes to an endpoint this request has not tried yet, where there is
one (Envoy's `previous_hosts` predicate): `retry_endpoint` picks it.

State lives on the endpoints, so a reload starts afresh; `stop` ends the
probes of a runtime that was replaced.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshgate.upstream.balancer import Balancer, Endpoint

__all__ = [
    "connect_failed",
    "connect_failure_answer",
    "connected",
    "free_retry",
    "retry_endpoint",
    "stop",
]

log = logging.getLogger("meshgate.upstream")

PROBE_BASE = 0.1
"""The first probe of an unreachable endpoint, in seconds; each further one
waits twice as long (full jitter on the upper half), up to PROBE_MAX."""
PROBE_MAX = 5.0


def connect_failed(ep: Endpoint, why: str) -> None:
    """A connect to `ep` was refused or timed out: out of rotation, probed."""
    if ep.unreachable:
        return
    ep.unreachable = True
    ep.probe_delay = PROBE_BASE
    balancer = ep.balancer
    balancer.refresh()
    log.warning(
        "upstream %s: %s does not accept connections (%s); out of rotation until a "
        "connect succeeds",
        balancer.name,
        ep.authority.decode(),
        why,
    )
    _schedule(ep)


def connected(ep: Endpoint) -> None:
    """A new connection to `ep` was made: back in rotation if it was out."""
    if not ep.unreachable:
        return
    ep.unreachable = False
    handle = ep.probe
    ep.probe = None
    if handle is not None:
        handle.cancel()
    ep.balancer.refresh()
    log.info("upstream %s: %s accepts connections again", ep.balancer.name, ep.authority.decode())


def connect_failure_answer(
    balancer: Balancer, address: str, reason: str, *, timed_out: bool
) -> tuple[int, str, str]:
    """What a request whose last try could not connect is answered: 503 when
    no endpoint accepts connections at all (Envoy's "no healthy upstream"),
    else the gateway error of that connect."""
    if all(e.unreachable for e in balancer.all):
        return (
            503,
            "upstream-unavailable",
            f"no endpoint of {balancer.name} accepts connections ({address}: {reason})",
        )
    if timed_out:
        return 504, "upstream-connect-timeout", f"connecting to {address} timed out"
    return 502, "upstream-connect-failed", f"cannot connect to {address}: {reason}"


def free_retry(balancer: Balancer, tried: Sequence[Endpoint], cause: str, *, sent: bool) -> bool:
    """A retry that costs no budget and waits for no backoff: a connect
    failed (nothing was sent) and an endpoint in service is still untried."""
    if sent or cause != "connect-failure":
        return False
    return any(e.in_service and e not in tried for e in balancer.endpoints)


def retry_endpoint(balancer: Balancer, tried: Sequence[Endpoint]) -> tuple[Endpoint, bool]:
    """The endpoint a retry goes to, and whether it is one in service that this
    request has not tried yet. Not by asking the balancer again: least-request
    and EWMA would pick a dead endpoint again, its load being zero."""
    fresh = [e for e in balancer.endpoints if e not in tried and e.in_service]
    if fresh:
        return random.choice(fresh), True
    untried = [e for e in balancer.all if e not in tried]
    if untried:
        return random.choice(untried), False
    others = [e for e in balancer.endpoints if e is not tried[-1]] if tried else []
    return (random.choice(others) if others else balancer.pick()), False


def stop(endpoints: Sequence[Endpoint]) -> None:
    """End the probes of endpoints that no runtime uses any more."""
    for ep in endpoints:
        ep.retired = True
        handle = ep.probe
        ep.probe = None
        if handle is not None:
            handle.cancel()
        task = ep.probe_task
        if task is not None:
            task.cancel()


def _schedule(ep: Endpoint) -> None:
    loop = ep.pool.loop
    delay = ep.probe_delay
    ep.probe_delay = min(delay * 2, PROBE_MAX)
    wait = random.uniform(delay / 2, delay)
    ep.probe = loop.call_later(wait, _start_probe, ep)


def _start_probe(ep: Endpoint) -> None:
    ep.probe = None
    if not ep.unreachable or ep.retired:
        return
    task = ep.pool.loop.create_task(_probe(ep))
    ep.probe_task = task


async def _probe(ep: Endpoint) -> None:
    pool = ep.pool
    try:
        if pool.full():
            ok = True  # its connections are all in use: it accepts them
        else:
            conn = await pool.connect()
            pool.release(conn)
            ok = True
    except (OSError, TimeoutError):
        ok = False
    except asyncio.CancelledError:
        ep.probe_task = None
        raise
    finally:
        ep.probe_task = None
    if ok:
        connected(ep)
    elif not ep.retired and ep.unreachable:
        _schedule(ep)
