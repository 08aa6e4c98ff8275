"""`Tracing.begin` for a request without a trace context: the decision, and
the `traceparent` an unsampled request carries on (one random draw for
both of its ids, written as hex in one call)."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from meshgate.observability.tracing import Tracing

TRACEPARENT = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-00\r\n")


def _begin(ratio: float, n: int) -> list[Any]:
    """Begin `n` requests without a context on a Tracing at `ratio`."""
    tracing = Tracing(endpoint="http://127.0.0.1:9/v1/traces", service_name="t", sample_ratio=ratio)
    out = []
    try:
        for _ in range(n):
            ex = SimpleNamespace(trace=None, trace_head=b"", t_start=0.0)
            tracing.begin(ex, SimpleNamespace(trace_headers=None, url=b"/", host=b"a"))
            out.append(ex)
    finally:
        tracing.close(0.5)
    return out


def test_an_unsampled_request_carries_a_valid_new_context_each_time() -> None:
    exes = _begin(0.0, 2000)
    assert all(ex.trace is None for ex in exes)
    found = [TRACEPARENT.fullmatch(ex.trace_head) for ex in exes]
    assert all(found), [ex.trace_head for ex, m in zip(exes, found, strict=True) if not m][:3]
    ids = [(m.group(1), m.group(2)) for m in found if m]
    assert len({t for t, _ in ids}) == len(ids)  # a new trace id every time
    assert all(int(t, 16) and int(s, 16) for t, s in ids)  # never the all-zero (invalid) id
    # The draw is uniform: the first hex digit of the trace ids spreads.
    assert len({t[:1] for t, _ in ids}) == 16


def test_the_ratio_decides_on_the_trace_ids_low_64_bits() -> None:
    exes = _begin(0.25, 4000)
    sampled = [ex for ex in exes if ex.trace is not None]
    assert 800 < len(sampled) < 1200
    bound = 1 << 62  # 0.25 of 2**64
    for ex in sampled:
        assert ex.trace_head == b"" and (ex.trace.trace_id & ((1 << 64) - 1)) < bound
    for ex in exes:
        if ex.trace is None:
            m = TRACEPARENT.fullmatch(ex.trace_head)
            assert m is not None and int(m.group(1), 16) & ((1 << 64) - 1) >= bound
