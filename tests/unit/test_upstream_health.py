"""Active health checks: the threshold state machine, how it combines with
outlier ejection in the balancer's list, one check against a local socket,
and a checker's start/stop. The real gateway is in
tests/integration/test_health.py (this file cannot share that basename: the
test directories are not packages)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from meshgate.config.describe import describe
from meshgate.config.schema import Config, HealthCheckConfig, OutlierDetectionConfig
from meshgate.upstream.balancer import Endpoint, RoundRobin
from meshgate.upstream.health import (
    CheckFailed,
    HealthChecker,
    HealthState,
    build_request,
    check_once,
)
from meshgate.upstream.outlier import OutlierDetector

# -- the state machine -----------------------------------------------------------------


def _feed(state: HealthState, results: str, healthy: int = 2, unhealthy: int = 3) -> list[Any]:
    """Record `results` ("+" pass, "-" fail); what each record returned."""
    return [
        state.record(r == "+", r, float(i), healthy=healthy, unhealthy=unhealthy)
        for i, r in enumerate(results)
    ]


def test_an_endpoint_starts_up_and_goes_down_after_the_unhealthy_threshold() -> None:
    state = HealthState()
    assert not state.down and state.last_ok is None
    changes = _feed(state, "---")
    assert changes == [None, None, True]
    assert state.down and state.failures == 3
    # Further failures change nothing (one "down" per episode).
    assert _feed(state, "--") == [None, None]


def test_a_pass_resets_the_failure_count() -> None:
    state = HealthState()
    assert _feed(state, "--+--+--") == [None] * 8
    assert not state.down
    assert _feed(state, "-") == [True]


def test_a_down_endpoint_comes_back_after_the_healthy_threshold() -> None:
    state = HealthState()
    _feed(state, "---")
    assert _feed(state, "+-+") == [None, None, None]  # a failure restarts the count
    assert state.down
    assert _feed(state, "+") == [False]  # the second pass in a row
    assert not state.down and state.successes == 2 and state.failures == 0


@pytest.mark.parametrize(("healthy", "unhealthy"), [(1, 1), (1, 5), (4, 2)])
def test_thresholds_count_consecutive_results(healthy: int, unhealthy: int) -> None:
    state = HealthState()
    changes = _feed(state, "-" * unhealthy, healthy=healthy, unhealthy=unhealthy)
    assert changes[-1] is True and changes.count(True) == 1
    changes = _feed(state, "+" * healthy, healthy=healthy, unhealthy=unhealthy)
    assert changes[-1] is False and changes.count(False) == 1


def test_state_remembers_the_last_result() -> None:
    state = HealthState()
    state.record(False, "connection refused", 12.5, healthy=2, unhealthy=3)
    assert (state.last_ok, state.last_result, state.last_at, state.checks) == (
        False,
        "connection refused",
        12.5,
        1,
    )


# -- the checker's decisions on the balancer ----------------------------------------------


def _pool(port: int) -> Any:
    return SimpleNamespace(host="127.0.0.1", port=port)


def _checker(
    n: int = 3, loop: asyncio.AbstractEventLoop | None = None, **cfg: Any
) -> tuple[HealthChecker, list[Endpoint], RoundRobin]:
    eps = [Endpoint(_pool(1000 + i), f"127.0.0.1:{1000 + i}".encode()) for i in range(n)]
    rr = RoundRobin(eps)
    opts: dict[str, Any] = {"path": "/healthz", "healthy_threshold": 2, "unhealthy_threshold": 2}
    opts.update(cfg)
    checker = HealthChecker("orders", HealthCheckConfig(**opts), rr, loop or _FakeLoop())  # type: ignore[arg-type]
    return checker, eps, rr


class _FakeLoop:
    def time(self) -> float:
        return 100.0


def test_a_down_endpoint_leaves_the_balancer_and_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checker, eps, rr = _checker()
    caplog.set_level(logging.INFO, "meshgate.upstream")
    checker.record(eps[1], False, "status 503")
    assert rr.endpoints == tuple(eps)  # one failure: still in
    checker.record(eps[1], False, "status 503")
    assert eps[1].health_down
    assert rr.endpoints == (eps[0], eps[2])
    assert all(rr.pick() is not eps[1] for _ in range(10))
    down = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(down) == 1 and "127.0.0.1:1001 is down" in down[0].getMessage()
    assert "status 503" in down[0].getMessage()

    checker.record(eps[1], True, "status 200")
    assert rr.endpoints == (eps[0], eps[2])
    checker.record(eps[1], True, "status 200")
    assert not eps[1].health_down and rr.endpoints == tuple(eps)
    back = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(back) == 1 and "back in service" in back[0].getMessage()
    assert len(caplog.records) == 2  # one line per change, nothing for the rest


def test_health_and_ejection_combine_and_never_take_all_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checker, eps, rr = _checker()
    eps[0].ejected_until = 1e9  # outlier detection took it out
    rr.refresh()
    assert rr.endpoints == (eps[1], eps[2])
    for _ in range(2):
        checker.record(eps[1], False, "connection refused")
    assert rr.endpoints == (eps[2],)
    # An endpoint whose ejection ends but whose checks fail stays out.
    for _ in range(2):
        checker.record(eps[0], False, "connection refused")
    eps[0].ejected_until = 0.0
    rr.refresh()
    assert rr.endpoints == (eps[2],)
    # The last one goes down: rather than nothing, everything serves.
    caplog.set_level(logging.WARNING, "meshgate.upstream")
    for _ in range(2):
        checker.record(eps[2], False, "no answer within 2s")
    assert rr.endpoints == tuple(eps)
    assert "no endpoint is in service" in caplog.records[-1].getMessage()
    # One comes back: only it serves.
    for _ in range(2):
        checker.record(eps[1], True, "status 200")
    assert rr.endpoints == (eps[1],)


def test_each_mechanism_says_when_the_other_still_holds_an_endpoint_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checker, eps, rr = _checker()
    detector = OutlierDetector("orders", OutlierDetectionConfig(), rr, _FakeLoop())  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, "meshgate.upstream")
    eps[0].ejected_until = 1e9
    for _ in range(2):
        checker.record(eps[0], False, "status 500")
    detector.restore(eps[0])  # the ejection ends; the checks still fail
    assert eps[0] not in rr.endpoints
    assert "stays out while its health checks fail" in caplog.records[-1].getMessage()
    eps[1].ejected_until = 1e9
    for _ in range(2):
        checker.record(eps[1], False, "status 500")
    for _ in range(2):
        checker.record(eps[1], True, "status 200")  # passes again, still ejected
    assert rr.endpoints == (eps[2],)
    assert "stays out until its outlier ejection ends" in caplog.records[-1].getMessage()
    detector.restore(eps[1])
    assert rr.endpoints == (eps[1], eps[2])
    assert "is back after its ejection" in caplog.records[-1].getMessage()


def test_report_says_unchecked_until_the_first_check() -> None:
    checker, eps, _ = _checker()
    assert checker.report(eps[0], 100.0) == {"health": "unchecked", "last_check": None}
    checker.record(eps[0], False, "status 500")
    doc = checker.report(eps[0], 101.5)
    assert doc["health"] == "up"  # one failure of two
    assert doc["last_check"] == {
        "ok": False,
        "result": "status 500",
        "ago_s": 1.5,
        "passes_in_a_row": 0,
        "failures_in_a_row": 1,
    }
    checker.record(eps[0], False, "status 500")
    assert checker.report(eps[0], 102.0)["health"] == "down"


def test_a_reload_keeps_the_state_of_endpoints_probed_the_same_way() -> None:
    old, old_eps, _ = _checker()
    for _ in range(2):
        old.record(old_eps[1], False, "status 503")
    # Same endpoints and probe, another interval: the down endpoint stays down.
    new, new_eps, rr = _checker(interval="1s")
    new.adopt(old)
    assert new_eps[1].health_down and rr.endpoints == (new_eps[0], new_eps[2])
    assert new.report(new_eps[1], 100.0)["last_check"]["result"] == "status 503"
    # Another path: what the old checks said does not apply.
    other, other_eps, rr2 = _checker(path="/ready")
    other.adopt(old)
    assert not any(e.health_down for e in other_eps) and rr2.endpoints == tuple(other_eps)


# -- config and describe ----------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    hc = HealthCheckConfig(path="/healthz")
    assert (hc.interval, hc.timeout, hc.healthy_threshold, hc.unhealthy_threshold) == (
        10.0,
        2.0,
        2,
        3,
    )
    assert [s for s in (199, 200, 204, 302, 399, 400, 404, 500) if hc.passes(s)] == [
        200,
        204,
        302,
        399,
    ]
    only = HealthCheckConfig(path="/h", expected=[204, 503], interval="250ms")
    assert only.interval == 0.25
    assert [s for s in (200, 204, 503) if only.passes(s)] == [204, 503]
    for bad in (
        {"path": "healthz"},
        {"path": "/a b"},
        {"path": "/x\r\nX-Injected: 1"},
        {"path": "/h", "host": "a b"},
        {"path": "/h", "interval": 0},
        {"path": "/h", "healthy_threshold": 0},
        {"path": "/h", "expected": []},
        {"path": "/h", "expected": [700]},
        {"path": "/h", "method": "HEAD"},
    ):
        with pytest.raises(ValidationError):
            HealthCheckConfig(**bad)


def test_describe_names_an_upstream_with_health_checks() -> None:
    config = Config.model_validate(
        {
            "upstreams": {
                "orders": {
                    "endpoints": ["127.0.0.1:9000"],
                    "health_check": {"path": "/healthz", "interval": "5s"},
                },
                "plain": {"endpoints": ["127.0.0.1:9001"]},
            },
            "routes": [
                {"path": "/a", "upstream": "orders"},
                {"path": "/b", "upstream": "plain"},
            ],
        }
    )
    health = [line for line in describe(config) if "health check" in line]
    assert health == [
        "upstreams.orders: health check GET /healthz every 5s "
        "(timeout 2s; out after 3 failures in a row, back after 2 passes)"
    ]


# -- one check, on real sockets -----------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> _Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def _answer(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return handler


async def _never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(10)


REQUEST = build_request("/healthz?deep=1", b"svc.internal:8080")


async def test_check_once_reads_the_status_and_sends_a_plain_get() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with _Server(_answer(ok)) as srv:
        assert await check_once("127.0.0.1", srv.port, REQUEST, 2.0) == 200
    head = srv.heads[0].decode()
    assert head.startswith("GET /healthz?deep=1 HTTP/1.1\r\nHost: svc.internal:8080\r\n")
    assert "Connection: close" in head


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", 503),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204),
        # Close-delimited body, and a body past what is read: the status decides.
        (b"HTTP/1.1 200 OK\r\n\r\nstreaming", 200),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 200_000, 200),
    ],
)
async def test_check_once_statuses(raw: bytes, status: int) -> None:
    async with _Server(_answer(raw)) as srv:
        assert await check_once("127.0.0.1", srv.port, REQUEST, 2.0) == status


@pytest.fixture
async def refused_port() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    yield port


async def test_check_once_failures(refused_port: int) -> None:
    with pytest.raises(CheckFailed, match="connection refused"):
        await check_once("127.0.0.1", refused_port, REQUEST, 2.0)
    async with _Server(_never) as srv:
        with pytest.raises(CheckFailed, match=r"no answer within 0.2s"):
            await check_once("127.0.0.1", srv.port, REQUEST, 0.2)
    async with _Server(_answer(b"")) as srv:
        with pytest.raises(CheckFailed, match="closed before a response"):
            await check_once("127.0.0.1", srv.port, REQUEST, 2.0)
    async with _Server(_answer(b"NOT HTTP AT ALL\r\n\r\n")) as srv:
        with pytest.raises(CheckFailed, match="invalid response"):
            await check_once("127.0.0.1", srv.port, REQUEST, 2.0)


# -- a checker's tasks -------------------------------------------------------------------


async def test_checker_start_is_idempotent_and_stop_ends_the_checks() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    async with _Server(_answer(ok)) as srv:
        loop = asyncio.get_running_loop()
        ep = Endpoint(SimpleNamespace(host="127.0.0.1", port=srv.port), b"127.0.0.1")  # type: ignore[arg-type]
        rr = RoundRobin([ep])
        cfg = HealthCheckConfig(path="/h", interval=0.05)
        checker = HealthChecker("up", cfg, rr, loop)
        checker.start()
        checker.start()  # no second set of tasks
        assert len(checker.tasks) == 1
        await asyncio.sleep(0.5)
        checker.stop()
        assert not checker.running
        await checker.wait_stopped()
        seen = len(srv.heads)
        # One task at 20/s: about 10 checks in 0.5 s (never two tasks' worth).
        assert 3 <= seen <= 12, seen
        assert checker.report(ep, loop.time())["health"] == "up"
        await asyncio.sleep(0.3)
        assert len(srv.heads) == seen  # nothing after stop
