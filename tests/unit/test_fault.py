"""meshgate.filters.fault: header matching, percent edges, delay-then-abort, counters."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest

from meshgate.config.schema import FaultConfig
from meshgate.engine.load import load_config_text
from meshgate.filters import Chain, FilterRequest, FilterResult, LocalReply
from meshgate.filters.build import FilterServices, compile_check, compile_filters
from meshgate.filters.fault import FaultFilter


def fault(**cfg: Any) -> FaultConfig:
    return FaultConfig.model_validate(cfg)


def request(*headers: tuple[bytes, bytes]) -> FilterRequest:
    return FilterRequest(b"GET", b"/", list(headers), b"127.0.0.1")


def draws(*values: float) -> Callable[[], float]:
    """A `rand` that returns these values in turn (then fails the test)."""
    it = iter(values)
    return lambda: next(it)


def resolve(result: FilterResult) -> LocalReply | None:
    """What the filter decided, awaiting it when it had to wait."""
    if result is None or isinstance(result, LocalReply):
        return result
    return asyncio.run(_await(result))


async def _await(co: Coroutine[Any, Any, LocalReply | None]) -> LocalReply | None:
    return await co


ABORT_ALL = {"abort": {"percent": 100, "status": 503}}


# -- header matching --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "sent", "applies"),
    [
        ({"X-Fault": "1"}, [(b"x-fault", b"1")], True),
        ({"X-Fault": "1"}, [(b"x-fault", b"2")], False),
        ({"X-Fault": "1"}, [(b"x-fault", b"2"), (b"x-fault", b"1")], True),  # any line
        ({"X-Fault": "1"}, [(b"x-fault", b"1 ")], False),  # exact
        ({"X-Fault": "abc"}, [(b"x-fault", b"ABC")], False),  # values keep their case
        ({"X-Fault": "1"}, [], False),
        ({"x-fault": True}, [(b"x-fault", b"")], True),
        ({"x-fault": True}, [(b"x-other", b"1")], False),
        ({"x-fault": False}, [(b"x-other", b"1")], True),
        ({"x-fault": False}, [(b"x-fault", b"0")], False),
        ({"x-a": "1", "x-b": True, "x-c": False}, [(b"x-a", b"1"), (b"x-b", b"")], True),
        ({"x-a": "1", "x-b": True, "x-c": False}, [(b"x-a", b"1")], False),
        (
            {"x-a": "1", "x-b": True, "x-c": False},
            [(b"x-a", b"1"), (b"x-b", b""), (b"x-c", b"")],
            False,
        ),
        ({"x-fault": "é"}, [(b"x-fault", "é".encode())], True),
    ],
)
def test_header_matching(
    headers: dict[str, Any], sent: list[tuple[bytes, bytes]], applies: bool
) -> None:
    f = FaultFilter("r", fault(headers=headers, **ABORT_ALL))
    reply = f(request(*sent))
    assert (reply is not None) is applies
    assert f.aborted == (1 if applies else 0)


def test_header_matching_is_compiled_at_load() -> None:
    f = FaultFilter("r", fault(headers={"X-Fault": 1, "X-On": True}, **ABORT_ALL))
    # YAML's `x-fault: 1` is the text "1"; names are lower-cased bytes.
    assert f.checks == ((b"x-fault", b"1"), (b"x-on", True))


def test_a_request_the_headers_do_not_match_draws_nothing() -> None:
    f = FaultFilter("r", fault(headers={"x-fault": "1"}, **ABORT_ALL), rand=draws())
    assert f(request()) is None  # `draws()` would raise on a draw


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"bad name": "1"}, "is not a valid header name"),
        ({"X-Fault": "1", "x-fault": "2"}, "given twice"),
    ],
)
def test_bad_header_names_are_refused(headers: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FaultFilter("r", fault(headers=headers, **ABORT_ALL))


# -- percent edges ------------------------------------------------------------------


def test_percent_0_never_fires_and_100_always_does() -> None:
    never = FaultFilter(
        "r",
        fault(delay={"percent": 0, "duration": "1s"}, abort={"percent": 0, "status": 503}),
    )
    always = FaultFilter("r", fault(**ABORT_ALL))
    for _ in range(2000):
        assert never(request()) is None
        assert isinstance(always(request()), LocalReply)
    assert (never.delayed, never.aborted) == (0, 0)
    assert always.aborted == 2000


@pytest.mark.parametrize(
    ("percent", "draw", "fires"),
    [
        (0, 0.0, False),  # the smallest draw
        (100, 0.9999999999999999, True),  # the largest draw
        (50, 0.49, True),
        (50, 0.5, False),
        (0.5, 0.004, True),  # fractions of a percent
        (0.5, 0.005, False),
    ],
)
def test_percent_is_a_strict_bound_on_the_draw(percent: float, draw: float, fires: bool) -> None:
    f = FaultFilter("r", fault(abort={"percent": percent, "status": 503}), rand=draws(draw))
    assert (f(request()) is not None) is fires


def test_abort_percent_is_roughly_kept() -> None:
    f = FaultFilter("r", fault(abort={"percent": 30, "status": 503}))
    n = sum(f(request()) is not None for _ in range(10_000))
    assert 2500 < n < 3500
    assert f.aborted == n


# -- the abort reply -----------------------------------------------------------------


def test_abort_reply() -> None:
    reply = FaultFilter("r", fault(abort={"percent": 100, "status": 503}))(request())
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.kind, reply.close) == (503, "fault-injected", False)
    assert reply.headers == ((b"x-meshgate-fault", b"abort"),)


@pytest.mark.parametrize(("status", "kind"), [(200, ""), (204, ""), (302, "fault-injected")])
def test_abort_below_400(status: int, kind: str) -> None:
    # The protocol layer answers a kind-less reply without a body below 300
    # only; from 300 up it is a problem document either way.
    reply = FaultFilter("r", fault(abort={"percent": 100, "status": status}))(request())
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.kind) == (status, kind)
    assert reply.headers == ((b"x-meshgate-fault", b"abort"),)


def test_abort_304_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="304"):
        FaultFilter("r", fault(abort={"percent": 100, "status": 304}))


# -- delay, then abort --------------------------------------------------------------


def test_delay_returns_a_coroutine_that_sleeps_then_lets_the_request_on() -> None:
    f = FaultFilter("r", fault(delay={"percent": 100, "duration": "50ms"}))
    result = f(request())
    assert asyncio.iscoroutine(result)
    assert f.delayed == 1  # counted when the delay starts
    start = time.monotonic()
    assert resolve(result) is None
    assert time.monotonic() - start >= 0.05
    assert f.aborted == 0


def test_delay_comes_before_abort() -> None:
    """With both, the abort is drawn after the delay has passed."""
    order: list[str] = []
    values = itertools.count()

    def rand() -> float:
        order.append(f"draw{next(values)}")
        return 0.0

    f = FaultFilter(
        "r",
        fault(delay={"percent": 100, "duration": "20ms"}, abort={"percent": 100, "status": 429}),
        rand=rand,
    )
    result = f(request())
    assert order == ["draw0"]  # the delay's draw only: no abort yet
    assert asyncio.iscoroutine(result)
    assert (f.delayed, f.aborted) == (1, 0)

    async def run() -> LocalReply | None:
        task = asyncio.ensure_future(result)
        await asyncio.sleep(0.005)
        assert not task.done() and f.aborted == 0  # still delaying
        return await task

    reply = asyncio.run(run())
    assert order == ["draw0", "draw1"]
    assert isinstance(reply, LocalReply) and reply.status == 429
    assert (f.delayed, f.aborted) == (1, 1)


@pytest.mark.parametrize(
    ("rolls", "delayed", "aborted"),
    [
        ((0.1, 0.1), True, True),
        ((0.1, 0.9), True, False),
        ((0.9, 0.1), False, True),
        ((0.9, 0.9), False, False),
    ],
)
def test_delay_and_abort_are_drawn_independently(
    rolls: Iterable[float], delayed: bool, aborted: bool
) -> None:
    f = FaultFilter(
        "r",
        fault(delay={"percent": 50, "duration": "1ms"}, abort={"percent": 50, "status": 503}),
        rand=draws(*rolls),
    )
    result = f(request())
    assert asyncio.iscoroutine(result) is delayed
    reply = resolve(result)
    assert (reply is not None) is aborted
    assert (f.delayed, f.aborted) == (int(delayed), int(aborted))


def test_a_cancelled_delay_does_not_abort_or_continue() -> None:
    f = FaultFilter(
        "r",
        fault(delay={"percent": 100, "duration": "10s"}, abort={"percent": 100, "status": 503}),
    )

    async def run() -> None:
        result = Chain([("fault", f)]).run(request())
        assert asyncio.iscoroutine(result)
        task = asyncio.ensure_future(result)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert (f.delayed, f.aborted) == (1, 0)


# -- in the chain ---------------------------------------------------------------------

CONFIG = """
auth:
  keys: {type: api_key}
upstreams:
  u: {endpoints: ["127.0.0.1:9"]}
routes:
- path: /f
  name: faulty
  upstream: u
  auth: keys
  rate_limit: 10/s
  fault:
    delay: {percent: 100, duration: 10ms}
    abort: {percent: 100, status: 503}
- {path: /plain, upstream: u}
"""


def test_fault_runs_after_auth_and_is_listed_for_metrics() -> None:
    config = load_config_text(CONFIG, "test.yaml")
    out = compile_filters(config, FilterServices(), ["faulty", "routes[1]"], base_dir=Path("."))
    chain = out.chains[0]
    assert chain is not None
    assert chain.names == ("auth", "fault", "rate_limit")
    assert out.chains[1] is None
    assert [label for label, _ in out.fault_filters] == ["faulty"]
    f = out.fault_filters[0][1]
    # No credentials: auth answers 401 and no fault is drawn.
    reply = resolve(chain.run(request()))
    assert isinstance(reply, LocalReply) and reply.status == 401
    assert (f.delayed, f.aborted) == (0, 0)
    assert out.auth_filters[0][1].missing == 1


def test_compile_check_refuses_an_abort_304(tmp_path: Path) -> None:
    config = load_config_text(CONFIG.replace("status: 503", "status: 304"), "test.yaml")
    problem = compile_check(config, str(tmp_path / "test.yaml"))
    assert problem is not None and "faulty: fault: abort: status 304" in problem
