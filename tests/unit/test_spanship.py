"""`observability.spanship` with its real export process (`offload_main`'s
`trace`) and a real OTLP/HTTP receiver: spans reach the collector with
their ids, parents and attributes; drops past the bound, spans a collector
refuses and an export process killed are counted, and a new one is started."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from meshgate.observability.spanship import SpanCounts, SpanShipper
from support.otlp import OtlpReceiver

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    try:
        yield r
    finally:
        r.stop()


def _settings(url: str) -> dict[str, Any]:
    return {
        "endpoint": url,
        "resource": {"service.name": "orders"},
        "compression": "none",
        "timeout": 5.0,
        "headers": {},
        "schedule_delay": 0.1,
        "max_queue": 64,
        "max_batch": 16,
        "close_timeout": 5.0,
    }


def _emit(shipper: SpanShipper, span_id: int, **attrs: Any) -> None:
    now = time.time_ns()
    shipper.emit(
        "GET /orders", True, TRACE, span_id, 0x1111, True, dict(attrs), now, now + 1000, None
    )


def test_spans_reach_the_collector_and_are_counted(receiver: OtlpReceiver) -> None:
    counts = SpanCounts()
    shipper = SpanShipper(_settings(receiver.url), counts, max_queue=64, max_batch=16)
    for i in range(1, 11):
        _emit(shipper, i, **{"meshgate.try": i, "url.path": "/orders/" + "x" * 2000})
    shipper.close(5.0)
    got = receiver.wait_for_spans(10)
    assert sorted(int(s.span_id, 16) for s in got) == list(range(1, 11))
    assert {s.trace_id for s in got} == {f"{TRACE:032x}"}
    assert {s.parent_span_id for s in got} == {f"{0x1111:016x}"}
    assert {s.service for s in got} == {"orders"}
    assert all(len(s.attributes["url.path"]) == 1024 for s in got)  # bounded, as the SDK would
    assert counts.totals() == (10, 0) and not counts.live


def test_past_the_bound_spans_are_dropped_and_counted(receiver: OtlpReceiver) -> None:
    counts = SpanCounts()
    shipper = SpanShipper(_settings(receiver.url), counts, max_queue=64, max_batch=1000)
    for i in range(1, 101):  # no loop: nothing is handed over before close
        _emit(shipper, i)
    shipper.close(5.0)
    receiver.wait_for_spans(64)
    assert counts.totals() == (64, 36)


def test_a_killed_export_process_is_started_again(receiver: OtlpReceiver) -> None:
    counts = SpanCounts()
    shipper = SpanShipper(_settings(receiver.url), counts, max_queue=64, max_batch=16)
    try:
        first = shipper.offload.proc
        assert first is not None
        first.kill()
        first.wait(5)
        deadline = time.monotonic() + 10
        while shipper.offload.proc in (None, first):
            assert time.monotonic() < deadline, "no new export process"
            time.sleep(0.05)
        _emit(shipper, 7)
        shipper.flush()
    finally:
        shipper.close(5.0)
    [span] = receiver.wait_for_spans(1)
    assert int(span.span_id, 16) == 7
    assert counts.totals() == (1, 0)


def test_spans_a_collector_refuses_are_counted_as_dropped() -> None:
    counts = SpanCounts()
    # Nothing listens on port 9 (discard): every export fails.
    settings = {**_settings("http://127.0.0.1:9/v1/traces"), "timeout": 0.5}
    shipper = SpanShipper(settings, counts, max_queue=64, max_batch=16)
    for i in range(1, 6):
        _emit(shipper, i)
    shipper.close(1.0)
    assert counts.totals() == (0, 5)
