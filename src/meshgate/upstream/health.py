"""Active health checks: every endpoint of an upstream is asked `GET <path>`.

A `HealthChecker` runs one asyncio task per endpoint of its cluster. Each
check opens a connection of its own (never one of the request pool's, whose
warm connections it must not disturb), sends `GET <path> HTTP/1.1` with
`Connection: close`, reads the response up to its end (or 64 KiB of body)
and closes; connecting and answering together must fit in `timeout`. A
status in `expected` (2xx or 3xx by default) passes; anything else fails:
another status, a refused or reset connection, a timeout, a malformed answer.

`HealthState` is the threshold state machine: an endpoint starts in service
(healthy until proven otherwise); `unhealthy_threshold` failures in a row
take it out (`Endpoint.health_down`), and `healthy_threshold` passes in a row
put it back. The balancer's in-service tuple is rebuilt by
`Balancer.refresh`, the same rebuild outlier detection uses: an endpoint
serves when it is neither ejected nor down, and when none is left, all do.
Each change is logged on one line: a warning going down, info coming back.

Checkers start when their runtime becomes active and stop when a reload
replaces it or the worker drains (`Runtime.start_health`/`stop_health`).
A reload that keeps an endpoint with the same probe (path, Host, expected
statuses) keeps its health state, so a dead endpoint does not get traffic
again just because the file changed. Each worker checks on its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

import httptools

from meshgate.config.schema import HealthCheckConfig

if TYPE_CHECKING:
    from meshgate.upstream.balancer import Balancer, Endpoint

__all__ = ["CheckFailed", "HealthChecker", "HealthState", "check_once"]

log = logging.getLogger("meshgate.upstream")

_READ_SIZE = 65536
_MAX_BODY = 65536
"""Body bytes read before the connection is closed anyway (the status decides)."""
_USER_AGENT = b"meshgate-health-check"


class HealthState:
    """Consecutive passes and failures of one endpoint, and what they decided."""

    __slots__ = ("checks", "down", "failures", "last_at", "last_ok", "last_result", "successes")

    def __init__(self) -> None:
        self.down = False
        self.successes = 0
        self.failures = 0
        self.checks = 0
        self.last_ok: bool | None = None
        self.last_result = ""
        self.last_at = 0.0

    def record(
        self, ok: bool, result: str, now: float, *, healthy: int, unhealthy: int
    ) -> bool | None:
        """Count one check; return True when it takes the endpoint down, False
        when it brings it back, None when the state stays."""
        self.checks += 1
        self.last_ok = ok
        self.last_result = result
        self.last_at = now
        if ok:
            self.failures = 0
            self.successes += 1
            if self.down and self.successes >= healthy:
                self.down = False
                return False
        else:
            self.successes = 0
            self.failures += 1
            if not self.down and self.failures >= unhealthy:
                self.down = True
                return True
        return None

    def copy_from(self, other: HealthState) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(other, name))


class CheckFailed(Exception):
    """A check that got no usable answer; the message says why."""


class _Response:
    """httptools callbacks: the final status, and whether the message ended."""

    __slots__ = ("body", "complete", "parser", "status")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.body = 0
        self.complete = False

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:  # an interim 1xx is skipped
            self.status = status

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        if self.status:
            self.complete = True


def build_request(path: str, host: bytes) -> bytes:
    return (
        b"GET " + path.encode("ascii") + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"User-Agent: " + _USER_AGENT + b"\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


async def check_once(host: str, port: int, request: bytes, timeout: float) -> int:
    """Send `request` on a new connection; the response's status.
    Raises CheckFailed when there is none within `timeout`."""
    writer: asyncio.StreamWriter | None = None
    resp = _Response()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            while not resp.complete and resp.body <= _MAX_BODY:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                resp.parser.feed_data(data)
    except TimeoutError:
        if resp.status:
            return resp.status  # the head came in time: the status decides
        raise CheckFailed(f"no answer within {timeout:g}s") from None
    except httptools.HttpParserUpgrade:
        raise CheckFailed("invalid response: the upstream switched protocols unasked") from None
    except httptools.HttpParserError as exc:
        raise CheckFailed(f"invalid response: {exc}") from None
    except ConnectionRefusedError:
        raise CheckFailed("connection refused") from None
    except ConnectionResetError:
        if resp.status:
            return resp.status
        raise CheckFailed("connection reset") from None
    except OSError as exc:
        raise CheckFailed(exc.strerror or str(exc) or type(exc).__name__) from None
    finally:
        if writer is not None:
            if resp.complete:
                writer.close()
            else:
                writer.transport.abort()
    if not resp.status:
        raise CheckFailed("connection closed before a response")
    return resp.status


class HealthChecker:
    """The checks of one cluster's endpoints: one task each while started."""

    __slots__ = (
        "balancer",
        "cfg",
        "cluster",
        "loop",
        "requests",
        "states",
        "stopping",
        "tasks",
    )

    def __init__(
        self,
        cluster: str,
        cfg: HealthCheckConfig,
        balancer: Balancer,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.balancer = balancer
        self.loop = loop
        self.states = {id(ep): HealthState() for ep in balancer.all}
        host = cfg.host.encode("ascii") if cfg.host is not None else None
        self.requests = {
            id(ep): build_request(cfg.path, host or ep.authority) for ep in balancer.all
        }
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping: list[asyncio.Task[None]] = []

    @property
    def probe(self) -> tuple[Any, ...]:
        """What a check asks and accepts: state carries over a reload only
        between checkers that agree on it."""
        cfg = self.cfg
        return (cfg.path, cfg.host, tuple(cfg.expected) if cfg.expected else None)

    def state(self, ep: Endpoint) -> HealthState:
        return self.states[id(ep)]

    # -- lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self.tasks)

    def start(self) -> None:
        """One task per endpoint, each first checking at a random moment of
        the first interval (so that endpoints and workers are not checked in
        step). Starting a started checker does nothing."""
        if self.tasks:
            return
        for ep in self.balancer.all:
            delay = random.uniform(0.0, self.cfg.interval)
            task = self.loop.create_task(self._run(ep, delay))
            self.tasks.append(task)

    def stop(self) -> None:
        """Cancel every task: none sends a check after this returns."""
        for task in self.tasks:
            task.cancel()
        self.stopping += self.tasks
        self.tasks = []

    async def wait_stopped(self) -> None:
        stopping, self.stopping = self.stopping, []
        if stopping:
            await asyncio.gather(*stopping, return_exceptions=True)

    def adopt(self, previous: HealthChecker) -> None:
        """Take over the states of `previous` (the checker a reload replaces)
        for the endpoints both check, when both probe the same way."""
        if previous.probe != self.probe:
            return
        old = {(ep.pool.host, ep.pool.port): ep for ep in previous.balancer.all}
        changed = False
        for ep in self.balancer.all:
            was = old.get((ep.pool.host, ep.pool.port))
            if was is None:
                continue
            state = self.state(ep)
            state.copy_from(previous.state(was))
            if state.down != ep.health_down:
                ep.health_down = state.down
                changed = True
        if changed:
            self.balancer.refresh()

    # -- checking --------------------------------------------------------------

    async def _run(self, ep: Endpoint, delay: float) -> None:
        loop = self.loop
        interval = self.cfg.interval
        await asyncio.sleep(delay)
        while True:
            started = loop.time()
            ok, result = await self._check(ep)
            self.record(ep, ok, result)
            await asyncio.sleep(max(started + interval - loop.time(), 0.0))

    async def _check(self, ep: Endpoint) -> tuple[bool, str]:
        cfg = self.cfg
        try:
            status = await check_once(
                ep.pool.host, ep.pool.port, self.requests[id(ep)], cfg.timeout
            )
        except CheckFailed as exc:
            return False, str(exc)
        except Exception as exc:  # a bug here must not end the checks
            log.error(
                "upstream %s: health check of %s failed unexpectedly: %r",
                self.cluster,
                ep.authority.decode(),
                exc,
            )
            return False, f"internal error: {type(exc).__name__}"
        if cfg.passes(status):
            return True, f"status {status}"
        return False, f"status {status}"

    def record(self, ep: Endpoint, ok: bool, result: str) -> None:
        """Count one check's result; take the endpoint out or put it back."""
        cfg = self.cfg
        state = self.state(ep)
        change = state.record(
            ok,
            result,
            self.loop.time(),
            healthy=cfg.healthy_threshold,
            unhealthy=cfg.unhealthy_threshold,
        )
        if change is None:
            return
        ep.health_down = change
        self.balancer.refresh()
        none_left = not any(e.in_service for e in self.balancer.all)
        note = "; no endpoint is in service, so all of them get requests" if none_left else ""
        if change:
            log.warning(
                "upstream %s: %s is down after %d failed health checks in a row "
                "(GET %s: %s); taken out of service%s",
                self.cluster,
                ep.authority.decode(),
                state.failures,
                cfg.path,
                result,
                note,
            )
        elif ep.ejected_until:
            log.info(
                "upstream %s: %s passed %d health checks in a row; it stays out until "
                "its outlier ejection ends",
                self.cluster,
                ep.authority.decode(),
                state.successes,
            )
        else:
            log.info(
                "upstream %s: %s is back in service after %d passed health checks in a row",
                self.cluster,
                ep.authority.decode(),
                state.successes,
            )

    def report(self, ep: Endpoint, now: float) -> dict[str, Any]:
        """The endpoint's health for `GET /upstreams`: `unchecked` until its
        first check has answered (it serves meanwhile)."""
        state = self.state(ep)
        if state.last_ok is None:
            return {"health": "unchecked", "last_check": None}
        return {
            "health": "down" if ep.health_down else "up",
            "last_check": {
                "ok": state.last_ok,
                "result": state.last_result,
                "ago_s": round(max(now - state.last_at, 0.0), 3),
                "passes_in_a_row": state.successes,
                "failures_in_a_row": state.failures,
            },
        }
