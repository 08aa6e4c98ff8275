"""`observability.otlp_encode`: the span export's OTLP protobuf, made from
cached pieces, must be byte for byte what the SDK's own encoder makes, for
every span meshgate makes; a batch it does not make goes to the SDK's."""

from __future__ import annotations

import random
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import trace_exporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import Event

from meshgate.observability.otlp_encode import SpanEncoder
from meshgate.observability.spans import SpanSink
from meshgate.observability.spanship import SpanCounts


def _sink() -> SpanSink:
    sink = SpanSink(
        endpoint="http://127.0.0.1:9/v1/traces",
        resource={"service.name": "gateway", "service.namespace": "shop"},
        counts=SpanCounts(),
    )
    sink.closed = True  # (its processor is never used here)
    return sink


def _spans(sink: SpanSink, n: int, seed: int) -> list[Any]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        attrs: dict[str, Any] = {
            "http.request.method": rnd.choice(["GET", "POST", "_OTHER"]),
            "url.path": rnd.choice(["/", "/api/orders/7", "/é/" + "x" * rnd.randrange(300)]),
            "server.port": rnd.choice([80, 8080, 65535]),
            "http.response.status_code": rnd.choice([200, 404, 503]),
            "meshgate.request_id": f"{rnd.getrandbits(128):032x}",
            "meshgate.retries": rnd.randrange(3),
            "meshgate.sampled": rnd.random() < 0.5,
            "meshgate.ratio": rnd.random(),
            "meshgate.empty": "",
        }
        for key in rnd.sample(sorted(attrs), rnd.randrange(3)):
            del attrs[key]
        parent = rnd.choice([0, rnd.getrandbits(64) or 1])
        start = rnd.getrandbits(63)
        out.append(
            sink.span(
                rnd.choice(["GET /api/orders/{id}", "GET", ""]),
                rnd.random() < 0.5,
                rnd.getrandbits(128) or 1,
                rnd.getrandbits(64) or 1,
                parent,
                bool(parent) and rnd.random() < 0.5,
                attrs,
                start,
                start + rnd.randrange(10**9),
                rnd.choice([None, "timeout", "upstream reset", ""]),
            )
        )
    return out


def test_batches_are_the_sdks_bytes_whatever_the_spans() -> None:
    sink = _sink()
    encoder = SpanEncoder(encode_spans)
    for seed in range(40):
        batch = _spans(sink, 1 + seed * 13 % 300, seed)
        assert encoder.encode(batch) == encode_spans(batch).SerializeToString(), seed
        got = encoder(batch)
        assert isinstance(got, ExportTraceServiceRequest)
        assert got == encode_spans(batch)


def test_a_batch_it_does_not_make_goes_to_the_sdks_encoder() -> None:
    sink = _sink()
    calls: list[int] = []

    def sdk(spans: Any) -> Any:
        calls.append(len(spans))
        return encode_spans(spans)

    encoder = SpanEncoder(sdk)
    plain = _spans(sink, 3, 1)
    evented = _spans(sink, 1, 2)[0]
    evented._events = (Event("retry", {"n": 1}, 5),)
    other = _spans(_sink(), 1, 3)  # another resource object
    listed = _spans(sink, 1, 4)[0]
    listed._attributes = {"tags": ("a", "b")}
    for batch in ([*plain, evented], [*plain, *other], [listed]):
        assert encoder(batch) == encode_spans(batch)
    assert calls == [4, 4, 1]
    assert encoder(plain) == encode_spans(plain) and calls == [4, 4, 1]


def test_the_export_process_encodes_with_it_after_the_check() -> None:
    _sink()  # (the check runs when a sink is made)
    assert isinstance(trace_exporter.encode_spans, SpanEncoder)
