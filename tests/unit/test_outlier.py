"""Outlier detection's decisions, on a clock the test moves."""

from __future__ import annotations

from typing import Any

from meshgate.config.schema import OutlierDetectionConfig
from meshgate.upstream.balancer import Endpoint, RoundRobin
from meshgate.upstream.outlier import OutlierDetector


class _Loop:
    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Any, tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Any, *args: Any) -> Any:
        self.timers.append((self.now + delay, fn, args))

        class _Handle:
            def cancel(self) -> None:
                return None

        return _Handle()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, fn, args in due:
            fn(*args)


def _detector(n: int, **cfg: Any) -> tuple[OutlierDetector, list[Endpoint], _Loop]:
    eps = [Endpoint(None, b"10.0.0.%d:80" % i) for i in range(n)]  # type: ignore[arg-type]
    balancer = RoundRobin(eps)
    loop = _Loop()
    od = OutlierDetector("up", OutlierDetectionConfig(**cfg), balancer, loop)  # type: ignore[arg-type]
    return od, eps, loop


def test_a_low_success_rate_ejects_after_its_window() -> None:
    od, eps, loop = _detector(
        3,
        consecutive_5xx=None,
        consecutive_gateway_failure=None,
        success_rate_minimum=0.9,
        success_rate_request_volume=20,
        success_rate_interval=10,
    )
    bad, good = eps[0], eps[1]
    for i in range(40):  # 75% success: never 5 failures in a row
        if i % 4 == 0:
            od.failure(bad, gateway=False)
        else:
            od.success(bad)
        od.success(good)
    assert not bad.ejected_until  # the window has not ended yet
    loop.advance(10)
    od.success(good)  # the first answer after the window closes it
    assert bad.ejected_until and not good.ejected_until
    assert bad not in od.balancer.endpoints
    loop.advance(30)  # base_ejection_time
    assert not bad.ejected_until and bad in od.balancer.endpoints


def test_too_few_requests_are_not_judged() -> None:
    od, eps, loop = _detector(
        2, consecutive_5xx=None, success_rate_minimum=0.9, success_rate_request_volume=50
    )
    for _ in range(10):
        od.failure(eps[0], gateway=False)
    loop.advance(10)
    od.success(eps[1])
    assert not eps[0].ejected_until


def test_ejections_grow_and_never_take_the_last_endpoint() -> None:
    od, eps, loop = _detector(2, consecutive_5xx=2, max_ejection_percent=100)
    for _ in range(2):
        od.failure(eps[0], gateway=False)
    assert eps[0].ejected_until == loop.now + 30
    loop.advance(30)
    for _ in range(2):
        od.failure(eps[0], gateway=False)
    assert eps[0].ejected_until == loop.now + 60  # the second ejection lasts twice as long
    for _ in range(2):
        od.failure(eps[1], gateway=False)
    assert not eps[1].ejected_until  # one endpoint always stays
