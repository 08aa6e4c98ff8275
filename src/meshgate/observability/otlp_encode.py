"""OTLP's protobuf for meshgate's spans, made from cached pieces.

The OTLP/HTTP exporter turns each batch into an `ExportTraceServiceRequest`
with the SDK's `encode_spans`, which builds a protobuf message per span,
per attribute and per attribute value: 33 µs a span here (10 attributes),
most of tracing's cost at 100% sampling, and all of the export process's.
Most of a span's attributes repeat from span to span (the method, the
route, the upstream, the peer): `SpanEncoder` writes the wire format of a
span directly, each attribute's bytes kept by its key and value, and hands
the exporter the same message, parsed from those bytes in one C call (5 µs
a span).

It takes the spans meshgate makes (`spans.SpanSink`): one resource and one
scope, scalar attributes, no events, no links, no trace state, nothing
dropped. A batch with anything else is left to the SDK's own encoder, and
so is every batch if the two ever disagree on a sample span
(`install`, checked when the export process starts).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags
from opentelemetry.trace import SpanKind

__all__ = ["SpanEncoder", "install"]

log = logging.getLogger("meshgate.tracing")

_CACHE_MAX = 8192
_ONCE = 512
_KINDS = {
    SpanKind.INTERNAL: Span.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: Span.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: Span.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: Span.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: Span.SpanKind.SPAN_KIND_CONSUMER,
}
_LOCAL = struct.pack("<I", SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK)
_REMOTE = struct.pack(
    "<I",
    SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK,
)
_TIMES = struct.Struct("<BQBQ")
_TIME = struct.Struct("<BQ")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, its length, its bytes."""
    return tag + _varint(len(payload)) + payload


def _string_pair(key: str, value: str) -> bytes:
    """`KeyValue(key=key, value=AnyValue(string_value=value))`, serialized."""
    name = _field(b"\x0a", key.encode()) if key else b""
    return name + _field(b"\x12", _field(b"\x0a", value.encode()))


def _value(value: Any) -> AnyValue:
    kind = type(value)
    if kind is str:
        return AnyValue(string_value=value)
    if kind is bool:
        return AnyValue(bool_value=value)
    if kind is int:
        return AnyValue(int_value=value)
    if kind is float:
        return AnyValue(double_value=value)
    raise TypeError(kind)


def _pairs(attributes: Any) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in (attributes or {}).items()]


class _Unsupported(Exception):
    """A batch this encoder does not make (the SDK's encoder does)."""


class SpanEncoder:
    """`encode_spans` for meshgate's spans (see the module)."""

    def __init__(self, fallback: Callable[[Sequence[Any]], Any]) -> None:
        self.fallback = fallback
        self._attributes: dict[tuple[str, type, Any], bytes] = {}
        self._misses: dict[str, int] = {}
        """Values of each key not found kept, since the cache was emptied."""
        self._once: set[str] = set()
        """Keys whose values are not kept: more than `_ONCE` were new."""
        self._heads: dict[tuple[int, int], tuple[bytes, bytes, Any, Any]] = {}

    def __call__(self, spans: Sequence[Any]) -> Any:
        try:
            data = self.encode(spans)
        except (
            _Unsupported,
            TypeError,
            ValueError,
            AttributeError,
            KeyError,
            OverflowError,
            struct.error,
        ):
            return self.fallback(spans)
        return ExportTraceServiceRequest.FromString(data)

    def _attribute(self, key: str, value: Any) -> bytes:
        """One attribute as a span's field 9, kept by key and value, but for
        a key whose values rarely repeat (a request id: `_ONCE`)."""
        index = (key, type(value), value)
        got = self._attributes.get(index)
        if got is not None:
            return got
        kind = type(value)
        if kind not in (str, bool, int, float):
            raise _Unsupported
        once = key in self._once
        if once and kind is str:
            return _field(b"\x4a", _string_pair(key, value))
        got = _field(b"\x4a", KeyValue(key=key, value=_value(value)).SerializeToString())
        if once:
            return got
        seen = self._misses[key] = self._misses.get(key, 0) + 1
        if seen > _ONCE:
            self._once.add(key)
        if len(self._attributes) >= _CACHE_MAX:
            self._attributes.clear()
            self._misses.clear()
        self._attributes[index] = got
        return got

    def _head(self, resource: Any, scope: Any) -> tuple[bytes, bytes]:
        """The resource's and the scope's fields, kept by their objects."""
        key = (id(resource), id(scope))
        got = self._heads.get(key)
        if got is None or got[2] is not resource or got[3] is not scope:
            res_pb = Resource(attributes=_pairs(resource.attributes)).SerializeToString()
            res = _field(b"\x0a", res_pb)
            scope_pb = InstrumentationScope(
                name=scope.name, version=scope.version, attributes=_pairs(scope.attributes)
            ).SerializeToString()
            got = (res, _field(b"\x0a", scope_pb), resource, scope)
            if len(self._heads) >= 16:
                self._heads.clear()
            self._heads[key] = got
        return got[0], got[1]

    def encode(self, spans: Sequence[Any]) -> bytes:
        """The batch's `ExportTraceServiceRequest`, serialized; _Unsupported
        for a batch of other spans."""
        if not spans:
            return b""
        resource = spans[0].resource
        scope = spans[0].instrumentation_scope
        if scope is None:
            raise _Unsupported
        attribute = self._attribute
        out = []
        for s in spans:
            if (
                s.resource is not resource
                or s.instrumentation_scope is not scope
                or s.events
                or s.links
                or s.dropped_attributes
                or s.dropped_events
                or s.dropped_links
            ):
                raise _Unsupported
            ctx = s.context
            if ctx.trace_state:
                raise _Unsupported
            parent = s.parent
            parts = [
                b"\x0a\x10",
                ctx.trace_id.to_bytes(16, "big"),
                b"\x12\x08",
                ctx.span_id.to_bytes(8, "big"),
            ]
            if parent is not None:
                parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
            name = s.name.encode()
            if name:
                parts.append(_field(b"\x2a", name))
            kind = _KINDS[s.kind]
            if kind:
                parts += (b"\x30", _varint(kind))
            start, end = s.start_time, s.end_time
            if start and end:
                parts.append(_TIMES.pack(0x39, start, 0x41, end))
            else:  # (proto3 leaves a zero out)
                parts += (
                    _TIME.pack(0x39, start) if start else b"",
                    _TIME.pack(0x41, end) if end else b"",
                )
            for key, value in s.attributes.items():
                parts.append(attribute(key, value))
            status = s.status
            code = status.status_code.value
            message = (status.description or "").encode()
            body = (_field(b"\x12", message) if message else b"") + (
                b"\x18" + _varint(code) if code else b""
            )
            parts.append(_field(b"\x7a", body))
            parts += (b"\x85\x01", _REMOTE if parent is not None and parent.is_remote else _LOCAL)
            out.append(_field(b"\x12", b"".join(parts)))
        res, scope_field = self._head(resource, scope)
        scope_spans = scope_field + b"".join(out)
        if scope.schema_url:
            scope_spans += _field(b"\x1a", scope.schema_url.encode())
        resource_spans = res + _field(b"\x12", scope_spans)
        if resource.schema_url:
            resource_spans += _field(b"\x1a", resource.schema_url.encode())
        return _field(b"\x0a", resource_spans)


def install(sample: Sequence[Any]) -> bool:
    """Make the OTLP/HTTP exporter encode with a `SpanEncoder` (in this
    process: the span export's), if it agrees byte for byte with the SDK's
    encoder on `sample` (spans as meshgate makes them). False, and the SDK's
    encoder kept, if not."""
    from opentelemetry.exporter.otlp.proto.http import trace_exporter

    original = getattr(trace_exporter, "encode_spans", None)
    if original is None or isinstance(original, SpanEncoder):
        return isinstance(original, SpanEncoder)
    encoder = SpanEncoder(original)
    try:
        mine = encoder.encode(sample)
        theirs = original(sample).SerializeToString()
    except Exception:
        log.exception("the fast span encoder failed its check; the SDK's encodes")
        return False
    if mine != theirs:
        log.warning("the fast span encoder disagrees with the SDK's; the SDK's encodes")
        return False
    trace_exporter.encode_spans = encoder  # type: ignore[attr-defined,assignment]
    return True
