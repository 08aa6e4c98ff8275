"""Trace context on the wire: W3C Trace Context and B3, read and written.

What a request brings is read once, from its header pairs (`incoming`):

- W3C `traceparent` (`00-<trace-id>-<parent-id>-<flags>`) and `tracestate`;
- B3, as one `b3` header (`<trace-id>-<span-id>[-<sampled>[-<parent-id>]]`,
  or a bare sampling decision `0`, `1`, `d`) or as the multi-header form
  (`X-B3-TraceId`, `X-B3-SpanId`, `X-B3-ParentSpanId`, `X-B3-Sampled`,
  `X-B3-Flags`).

`traceparent` wins when both are valid, as in Envoy and the OpenTelemetry
propagators. Anything malformed is ignored, as W3C Trace Context says (a new
trace starts), never refused: a wrong length, a version `ff`, an all-zero
id, a character that is not lowercase hex. A repeated `traceparent` is
malformed. `tracestate` is dropped when it is longer than 512 bytes or has
more than 32 members (the spec's limits), so a client cannot make the
gateway hold or forward more than that.
"""

from __future__ import annotations

import re

__all__ = [
    "B3_MULTI",
    "B3_NONE",
    "B3_SINGLE",
    "TRACE_HEADERS",
    "Incoming",
    "incoming",
]

# Every request header name that carries trace context: what is dropped
# from a forwarded request when meshgate writes its own.
TRACE_HEADERS: frozenset[bytes] = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)

TRACESTATE_MAX = 512
TRACESTATE_MEMBERS = 32

# How the caller spoke B3 (a sampled request's tries answer in kind).
B3_NONE = 0
B3_SINGLE = 1
B3_MULTI = 2

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEX16 = re.compile(rb"[0-9a-f]{16}")
_TRACE_ID = re.compile(rb"[0-9a-f]{16}(?:[0-9a-f]{16})?")


class Incoming:
    """The trace context a request came with (`incoming`)."""

    __slots__ = ("b3", "b3_trace", "sampled", "span_id", "trace_id", "tracestate")

    def __init__(self) -> None:
        self.trace_id = 0
        """128 bits; 0 when no valid context came (only a decision, perhaps)."""
        self.span_id = 0
        """The caller's span: the parent of this hop's server span."""
        self.sampled: bool | None = None
        """The caller's decision; None when it made none (B3 may defer)."""
        self.tracestate: bytes | None = None
        self.b3 = B3_NONE
        """The B3 form the caller used, when B3 gave the context."""
        self.b3_trace = b""
        """The B3 trace id as sent (16 or 32 hex digits), written back as it came."""


def _traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """A valid `traceparent`'s (trace id, parent id, sampled), else None."""
    value = value.strip(b" \t")
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version = m.group(1)
    if version == b"ff":
        return None
    if len(value) != 55 and (version == b"00" or value[55:56] != b"-"):
        # Version 00 is exactly 55 characters; a later version may append
        # fields after a dash, which this reader ignores.
        return None
    trace_id = int(m.group(2), 16)
    span_id = int(m.group(3), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(m.group(4), 16) & 1)


def _tracestate(values: list[bytes]) -> bytes | None:
    """The `tracestate` to pass on (several headers joined), or None when it
    is empty or over the limits."""
    joined = b",".join(v.strip(b" \t") for v in values)
    if not joined or len(joined) > TRACESTATE_MAX:
        return None
    if joined.count(b",") >= TRACESTATE_MEMBERS:
        members = [m for m in joined.split(b",") if m.strip(b" \t")]
        if len(members) > TRACESTATE_MEMBERS:
            return None
    return joined


def _b3_sampled(value: bytes) -> bool | None:
    v = value.strip(b" \t").lower()
    if v in (b"1", b"true", b"d"):
        return True
    if v in (b"0", b"false"):
        return False
    return None


def _b3_single(value: bytes, into: Incoming) -> bool:
    """Read a `b3` header into `into`; False when it is malformed."""
    parts = value.strip(b" \t").split(b"-")
    if len(parts) == 1:
        sampled = _b3_sampled(parts[0]) if parts[0] in (b"0", b"1", b"d") else None
        if sampled is None:
            return False
        into.sampled = sampled
        return True
    if len(parts) > 4:
        return False
    trace, span = parts[0], parts[1]
    if _TRACE_ID.fullmatch(trace) is None or _HEX16.fullmatch(span) is None:
        return False
    sampled = None
    if len(parts) >= 3:
        if parts[2] not in (b"0", b"1", b"d"):
            return False
        sampled = _b3_sampled(parts[2])
    if len(parts) == 4 and _HEX16.fullmatch(parts[3]) is None:
        return False
    trace_id = int(trace, 16)
    span_id = int(span, 16)
    if not trace_id or not span_id:
        return False
    into.trace_id, into.span_id, into.sampled = trace_id, span_id, sampled
    into.b3, into.b3_trace = B3_SINGLE, trace
    return True


def _b3_multi(found: dict[bytes, list[bytes]], into: Incoming) -> None:
    """Read the X-B3-* headers into `into` (nothing of them when malformed)."""
    flags = found.get(b"x-b3-flags")
    sampled_v = found.get(b"x-b3-sampled")
    sampled = None
    if flags is not None and flags[0].strip(b" \t") == b"1":
        sampled = True  # debug
    elif sampled_v is not None:
        sampled = _b3_sampled(sampled_v[0])
    trace_v = found.get(b"x-b3-traceid")
    span_v = found.get(b"x-b3-spanid")
    if trace_v is not None and span_v is not None and len(trace_v) == 1 and len(span_v) == 1:
        trace = trace_v[0].strip(b" \t").lower()
        span = span_v[0].strip(b" \t").lower()
        if _TRACE_ID.fullmatch(trace) is not None and _HEX16.fullmatch(span) is not None:
            trace_id = int(trace, 16)
            span_id = int(span, 16)
            if trace_id and span_id:
                into.trace_id, into.span_id = trace_id, span_id
                into.b3, into.b3_trace = B3_MULTI, trace
    into.sampled = sampled


def incoming(pairs: list[tuple[bytes, bytes]]) -> Incoming:
    """The trace context in a request's trace header pairs (names lowercase,
    each one of `TRACE_HEADERS`)."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        got = found.get(name)
        if got is None:
            found[name] = [value]
        else:
            got.append(value)
    out = Incoming()
    tp = found.get(b"traceparent")
    if tp is not None and len(tp) == 1:
        parsed = _traceparent(tp[0])
        if parsed is not None:
            out.trace_id, out.span_id, out.sampled = parsed
            ts = found.get(b"tracestate")
            if ts is not None:
                out.tracestate = _tracestate(ts)
            return out
    b3 = found.get(b"b3")
    if b3 is not None and len(b3) == 1 and _b3_single(b3[0].lower(), out):
        return out
    if any(n.startswith(b"x-b3-") for n in found):
        _b3_multi(found, out)
    return out
