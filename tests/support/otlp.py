"""An OTLP/HTTP trace receiver for the tests: what a collector would get.

`OtlpReceiver` is a plain HTTP server (stdlib, its own thread, 127.0.0.1
on a free port) that takes `POST /v1/traces`, decodes the body as the
real wire format, an `ExportTraceServiceRequest` protobuf (gunzipped
first when Content-Encoding says gzip), and answers with an
`ExportTraceServiceResponse`. Every span is kept as a `ReceivedSpan`
(ids as hex, attributes as plain values, the resource's service.name);
`wait_for_spans` waits for them.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = Status.StatusCode.STATUS_CODE_ERROR


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int
    attributes: dict[str, Any]
    status: int
    status_message: str
    start_ns: int
    end_ns: int
    service: str
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def is_server(self) -> bool:
        return self.kind == SERVER

    @property
    def is_client(self) -> bool:
        return self.kind == CLIENT

    def __repr__(self) -> str:
        kind = "server" if self.is_server else "client" if self.is_client else str(self.kind)
        return (
            f"<{self.service} {kind} {self.name!r} {self.span_id} <- {self.parent_span_id or '-'}"
            f" {self.attributes}>"
        )


class OtlpReceiver:
    """A collector's OTLP/HTTP traces endpoint (`url`)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.encodings: list[str] = []
        self.errors: list[str] = []
        self.status = 200
        """What export requests get (a test may make the collector fail)."""
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("content-encoding") or "").lower()
                status = receiver.status
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    if self.path != "/v1/traces":
                        raise ValueError(f"POST {self.path}")
                    if self.headers.get("content-type") != "application/x-protobuf":
                        raise ValueError(f"content-type {self.headers.get('content-type')}")
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                except Exception as exc:
                    receiver.errors.append(repr(exc))
                    status = 400
                else:
                    if status == 200:
                        receiver._add(req, encoding)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _add(self, req: ExportTraceServiceRequest, encoding: str) -> None:
        got: list[ReceivedSpan] = []
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            status=s.status.code,
                            status_message=s.status.message,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            service=service,
                            resource=resource,
                        )
                    )
        with self._cond:
            self.requests += 1
            self.encodings.append(encoding)
            self.spans += got
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.spans = []

    def wait_for_spans(
        self,
        n: int,
        where: Callable[[ReceivedSpan], bool] = lambda s: True,
        timeout: float = 15.0,
    ) -> list[ReceivedSpan]:
        """At least `n` received spans that match `where` (all of those)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [s for s in self.spans if where(s)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(got)} of {n} spans after {timeout}s; received: {self.spans}; "
                        f"errors: {self.errors}"
                    )
                self._cond.wait(left)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._cond:
            return [s for s in self.spans if s.trace_id == trace_id]
