"""Reading trace context: W3C Trace Context and B3 (the wire's rules)."""

from __future__ import annotations

import pytest

from meshgate.observability.tracecontext import B3_MULTI, B3_SINGLE, incoming

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


def _read(*pairs: tuple[str, str]) -> tuple[int, int, bool | None, int, bytes | None]:
    ctx = incoming([(n.encode(), v.encode()) for n, v in pairs])
    return ctx.trace_id, ctx.span_id, ctx.sampled, ctx.b3, ctx.tracestate


def test_traceparent() -> None:
    assert _read(("traceparent", f"00-{TID}-{SID}-01")) == (
        int(TID, 16),
        int(SID, 16),
        True,
        0,
        None,
    )
    assert _read(("traceparent", f"00-{TID}-{SID}-02"))[2] is False  # only bit 0 samples


def test_a_later_version_may_carry_more_fields() -> None:
    assert _read(("traceparent", f"01-{TID}-{SID}-01-what-comes-next"))[0] == int(TID, 16)
    assert _read(("traceparent", f"01-{TID}-{SID}-01x"))[0] == 0


def test_tracestate_members_are_joined_and_bounded() -> None:
    tp = ("traceparent", f"00-{TID}-{SID}-01")
    assert _read(tp, ("tracestate", "a=1"), ("tracestate", "b=2"))[4] == b"a=1,b=2"
    members = ",".join(f"k{i}=v" for i in range(32))
    assert _read(tp, ("tracestate", members))[4] == members.encode()
    assert _read(tp, ("tracestate", members + ",k32=v"))[4] is None
    # tracestate without a valid traceparent is not read.
    assert _read(("tracestate", "a=1"))[4] is None


def test_traceparent_wins_over_b3() -> None:
    got = _read(("b3", f"{'1' * 32}-{'2' * 16}-0"), ("traceparent", f"00-{TID}-{SID}-01"))
    assert got[:3] == (int(TID, 16), int(SID, 16), True)


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        (f"{TID}-{SID}-1", True),
        (f"{TID}-{SID}-d", True),  # debug
        (f"{TID}-{SID}-0", False),
        (f"{TID}-{SID}", None),  # deferred
        (f"{TID}-{SID}-1-{'3' * 16}", True),
    ],
)
def test_b3_single(value: str, sampled: bool | None) -> None:
    assert _read(("b3", value))[:4] == (int(TID, 16), int(SID, 16), sampled, B3_SINGLE)


@pytest.mark.parametrize("value", ["0", "1", "d"])
def test_b3_single_may_carry_a_decision_alone(value: str) -> None:
    assert _read(("b3", value))[:3] == (0, 0, value != "0")


@pytest.mark.parametrize(
    "value",
    [f"{TID}-{SID}-1-xyz", f"{TID[:20]}-{SID}-1", f"{TID}-{SID}-2", "2", f"{TID}-{SID}-1-{SID}-9"],
)
def test_b3_single_malformed(value: str) -> None:
    assert _read(("b3", value))[:2] == (0, 0)


def test_b3_multi() -> None:
    got = _read(("x-b3-traceid", TID), ("x-b3-spanid", SID), ("x-b3-sampled", "true"))
    assert got[:4] == (int(TID, 16), int(SID, 16), True, B3_MULTI)
    got = _read(("x-b3-traceid", TID), ("x-b3-spanid", SID), ("x-b3-flags", "1"))
    assert got[2] is True  # debug implies sampled
    assert _read(("x-b3-sampled", "0"))[:3] == (0, 0, False)
    assert _read(("x-b3-traceid", TID), ("x-b3-spanid", "0" * 16))[:2] == (0, 0)
