"""Tracing at the gateway: real `meshgate run` processes, a recording
upstream, and an OTLP/HTTP receiver that decodes what the exporter really
sends (`support.otlp`).

Each request carries its own X-Request-Id, which the server span reports
(`meshgate.request_id`): that is how a test finds its spans.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.client import fetch, free_port, wait_until
from support.otlp import STATUS_ERROR, OtlpReceiver, ReceivedSpan
from support.proxy import ProxyProcess, Stack, run_meshgate, upstream_block
from support.upstream import RecordedRequest, UpstreamServer

pytestmark = pytest.mark.engine

APP = Path(__file__).with_name("mesh_app.py")
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")
TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
_ids = itertools.count()


def _rid() -> str:
    return f"trace-test-{time.monotonic_ns()}-{next(_ids)}"


def _tracing(receiver: OtlpReceiver, **extra: Any) -> dict[str, Any]:
    return {"endpoint": receiver.url, "batch": {"schedule_delay": "50ms"}, **extra}


class Gateway:
    """The module's processes: a receiver, an upstream, a flaky app, and
    gateways with tracing sampled (1.0), unsampled (0.0), and off."""

    def __init__(self, stack: Stack) -> None:
        self.receiver = OtlpReceiver().start()
        self.up = stack.upstream("up")
        self.app_port = free_port()
        self.app = subprocess.Popen(
            [
                *(sys.executable, str(APP), "flaky", str(self.app_port)),
                *("--bind", "127.0.0.1", "--fail-first", "/flaky"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        dead = free_port()
        config: dict[str, Any] = {
            "upstreams": {
                "up": upstream_block(self.up),
                "flaky": upstream_block(f"127.0.0.1:{self.app_port}"),
                "dead": upstream_block(f"127.0.0.1:{dead}"),
            },
            "routes": [
                {
                    "path": "/flaky/**",
                    "upstream": "flaky",
                    "retry": {"attempts": 2, "on": [503], "backoff": {"base": "10ms"}},
                },
                {"path": "/dead/**", "upstream": "dead"},
                {"path": "/api/**", "upstream": "up", "name": "api"},
            ],
        }
        self.access_log = stack.directory / "access-sampled.log"
        self.sampled = stack.proxy(
            {
                **config,
                "tracing": _tracing(self.receiver),
                "access_log": {"path": str(self.access_log)},
            }
        )
        self.unsampled = stack.proxy(
            {**config, "tracing": _tracing(self.receiver, sample_ratio=0, compression="gzip")}
        )
        self.off = stack.proxy(config)
        wait_until(
            lambda: fetch(f"http://127.0.0.1:{self.app_port}/ping").status == 200,
            timeout=10,
            what="the flaky app answers",
        )

    def stop(self) -> None:
        self.app.terminate()
        self.app.wait(10)
        self.receiver.stop()

    def request(self, proxy: ProxyProcess, path: str, *headers: str) -> tuple[str, Any]:
        rid = _rid()
        args = ["-H", f"X-Request-Id: {rid}"]
        for h in headers:
            args += ["-H", h]
        r = fetch(proxy.url(path), *args)
        return rid, r

    def server_span(self, rid: str) -> ReceivedSpan:
        (span,) = self.receiver.wait_for_spans(
            1, lambda s: s.is_server and s.attributes.get("meshgate.request_id") == rid
        )
        return span

    def children(self, parent: ReceivedSpan, n: int) -> list[ReceivedSpan]:
        got = self.receiver.wait_for_spans(
            n, lambda s: s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id
        )
        time.sleep(0.2)  # none more come
        got = self.receiver.wait_for_spans(
            n, lambda s: s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id
        )
        assert len(got) == n, got
        return sorted(got, key=lambda s: s.start_ns)

    def received(self, rid: str) -> RecordedRequest:
        for req in reversed(self.up.requests):
            if req.header("x-request-id") == rid:
                return req
        raise AssertionError(f"the upstream never received {rid}")


@pytest.fixture(scope="module")
def gw(module_stack: Stack) -> Iterator[Gateway]:
    g = Gateway(module_stack)
    try:
        yield g
    finally:
        g.stop()


def _traceparent(req: RecordedRequest) -> tuple[str, str, str]:
    values = req.header_all("traceparent")
    assert len(values) == 1, req.headers
    m = TRACEPARENT.match(values[0])
    assert m is not None, values
    return m.group(1), m.group(2), m.group(3)


def _one_client(gw: Gateway, server: ReceivedSpan) -> ReceivedSpan:
    (client,) = gw.children(server, 1)
    assert client.is_client
    return client


# -- one request, its two spans ------------------------------------------------------


def test_a_request_gets_a_server_span_and_its_try_a_client_span(gw: Gateway) -> None:
    rid, r = gw.request(gw.sampled, "/api/orders/7?x=1", "User-Agent: t")
    assert r.status == 200
    server = gw.server_span(rid)
    assert server.parent_span_id == ""  # a new trace
    assert server.service == "meshgate"
    assert server.name == "GET /api/**"
    a = server.attributes
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/api/orders/7"
    assert a["url.scheme"] == "http"
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == gw.sampled.port
    assert a["network.peer.address"] == "127.0.0.1"
    assert a["http.response.status_code"] == 200
    assert a["http.route"] == "/api/**"
    assert a["meshgate.route"] == "api"
    assert a["meshgate.upstream"] == "up"
    assert a["meshgate.direction"] == "inbound"
    assert "error.type" not in a and server.status != STATUS_ERROR
    client = _one_client(gw, server)
    c = client.attributes
    assert client.name == "GET"
    assert c["http.request.method"] == "GET"
    assert c["server.address"] == "127.0.0.1" and c["server.port"] == gw.up.port
    assert c["http.response.status_code"] == 200
    assert c["meshgate.upstream"] == "up" and c["meshgate.try"] == 1
    assert "http.request.resend_count" not in c
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    # The upstream got the client span's context, and nothing else of the trace.
    trace_id, span_id, flags = _traceparent(gw.received(rid))
    assert (trace_id, span_id, flags) == (server.trace_id, client.span_id, "01")


def test_the_access_log_names_the_trace(gw: Gateway) -> None:
    rid, r = gw.request(gw.sampled, "/api/logged", f"traceparent: 00-{TID}-{SID}-01")
    assert r.status == 200
    assert gw.server_span(rid).trace_id == TID

    def line() -> dict[str, Any] | None:
        text = gw.access_log.read_text() if gw.access_log.exists() else ""
        for raw in text.splitlines():
            doc = json.loads(raw)
            if doc["request_id"] == rid:
                return dict(doc)
        return None

    wait_until(lambda: line() is not None, timeout=10, what="the request's access log line")
    doc = line()
    assert doc is not None and doc["trace_id"] == TID


def test_the_clients_traceparent_is_honoured(gw: Gateway) -> None:
    rid, r = gw.request(
        gw.sampled,
        "/api/honoured",
        f"traceparent: 00-{TID}-{SID}-01",
        "tracestate: vendor=abc,other=1",
    )
    assert r.status == 200
    server = gw.server_span(rid)
    assert server.trace_id == TID
    assert server.parent_span_id == SID
    client = _one_client(gw, server)
    req = gw.received(rid)
    assert _traceparent(req) == (TID, client.span_id, "01")
    assert req.header_all("tracestate") == ["vendor=abc,other=1"]


def test_a_caller_that_did_not_sample_is_followed(gw: Gateway) -> None:
    """Parent-based: flags 00 from the client is not sampled at ratio 1, and
    its headers reach the upstream as they came."""
    rid, r = gw.request(gw.sampled, "/api/not-sampled", f"traceparent: 00-{TID}-{SID}-00")
    assert r.status == 200
    req = gw.received(rid)
    assert req.header_all("traceparent") == [f"00-{TID}-{SID}-00"]
    time.sleep(0.5)
    assert not [s for s in gw.receiver.spans if s.attributes.get("meshgate.request_id") == rid]


# -- B3 ------------------------------------------------------------------------------


@pytest.mark.parametrize("wide", [True, False], ids=["128-bit", "64-bit"])
def test_b3_single_header_is_accepted_and_passed_on(gw: Gateway, wide: bool) -> None:
    b3_trace = TID if wide else TID[16:]
    rid, r = gw.request(gw.sampled, "/api/b3", f"b3: {b3_trace}-{SID}-1")
    assert r.status == 200
    server = gw.server_span(rid)
    assert server.trace_id == TID if wide else "0" * 16 + TID[16:]
    assert server.parent_span_id == SID
    client = _one_client(gw, server)
    req = gw.received(rid)
    assert req.header_all("b3") == [f"{b3_trace}-{client.span_id}-1-{server.span_id}"]
    assert _traceparent(req) == (server.trace_id, client.span_id, "01")


def test_b3_multi_headers_are_accepted_and_passed_on(gw: Gateway) -> None:
    rid, r = gw.request(
        gw.sampled,
        "/api/b3-multi",
        f"X-B3-TraceId: {TID}",
        f"X-B3-SpanId: {SID}",
        "X-B3-ParentSpanId: 1111111111111111",
        "X-B3-Sampled: 1",
    )
    assert r.status == 200
    server = gw.server_span(rid)
    assert server.trace_id == TID and server.parent_span_id == SID
    client = _one_client(gw, server)
    req = gw.received(rid)
    assert req.header_all("x-b3-traceid") == [TID]
    assert req.header_all("x-b3-spanid") == [client.span_id]
    assert req.header_all("x-b3-parentspanid") == [server.span_id]
    assert req.header_all("x-b3-sampled") == ["1"]


def test_b3_not_sampled_is_followed_and_passed_on_unchanged(gw: Gateway) -> None:
    rid, r = gw.request(gw.sampled, "/api/b3-no", f"b3: {TID}-{SID}-0")
    assert r.status == 200
    req = gw.received(rid)
    assert req.header_all("b3") == [f"{TID}-{SID}-0"]
    assert req.header_all("traceparent") == []


# -- not sampled -----------------------------------------------------------------------


def test_an_unsampled_request_carries_the_decision_on_and_exports_nothing(gw: Gateway) -> None:
    rid, r = gw.request(gw.unsampled, "/api/unsampled")
    assert r.status == 200
    trace_id, span_id, flags = _traceparent(gw.received(rid))
    assert flags == "00" and int(trace_id, 16) and int(span_id, 16)
    # A sampled caller is followed even at ratio 0, and its spans do come...
    rid2, r = gw.request(gw.unsampled, "/api/followed", f"traceparent: 00-{TID}-{SID}-01")
    assert r.status == 200
    server = gw.server_span(rid2)
    assert server.trace_id == TID
    # ... and the exporter sent them gzipped, as configured.
    assert "gzip" in gw.receiver.encodings
    time.sleep(0.3)
    assert not [s for s in gw.receiver.spans if s.attributes.get("meshgate.request_id") == rid]
    assert not gw.receiver.trace(trace_id)


# -- what a client may send ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        f"traceparent: 00-{TID}-{SID}-1",  # too short
        f"traceparent: 00-{TID}-{SID}-01-extra",  # version 00 is 55 characters
        f"traceparent: ff-{TID}-{SID}-01",  # version ff
        f"traceparent: 00-{'0' * 32}-{SID}-01",  # all-zero trace id
        f"traceparent: 00-{TID}-{'0' * 16}-01",  # all-zero parent id
        f"traceparent: 00-{TID.upper()}-{SID}-01",  # uppercase
        f"traceparent: 00-{TID[:-1]}g-{SID}-01",  # not hex
        "traceparent: " + "x" * 4000,
        f"b3: {TID}-{SID}-7",
        f"b3: {TID}",
        f"X-B3-TraceId: {TID}",  # no span id
    ],
)
def test_malformed_context_is_ignored_and_a_new_trace_starts(gw: Gateway, header: str) -> None:
    rid, r = gw.request(gw.sampled, "/api/malformed", header)
    assert r.status == 200
    server = gw.server_span(rid)
    assert server.parent_span_id == ""
    assert server.trace_id != TID and server.trace_id != "0" * 16 + TID[16:]
    client = _one_client(gw, server)
    req = gw.received(rid)
    assert _traceparent(req) == (server.trace_id, client.span_id, "01")
    name = header.partition(":")[0].lower()
    if name != "traceparent":
        assert req.header_all(name) == []  # the caller's is not passed on


def test_two_traceparent_headers_are_malformed(gw: Gateway) -> None:
    rid, r = gw.request(
        gw.sampled,
        "/api/two",
        f"traceparent: 00-{TID}-{SID}-01",
        f"traceparent: 00-{TID}-{SID}-01",
    )
    assert r.status == 200
    server = gw.server_span(rid)
    assert server.trace_id != TID and server.parent_span_id == ""
    assert len(gw.received(rid).header_all("traceparent")) == 1


@pytest.mark.parametrize(
    "tracestate",
    ["k=" + "v" * 600, ",".join(f"k{i}=v" for i in range(33))],
    ids=["over-512-bytes", "33-members"],
)
def test_a_tracestate_past_the_limits_is_dropped(gw: Gateway, tracestate: str) -> None:
    rid, r = gw.request(
        gw.sampled, "/api/ts", f"traceparent: 00-{TID}-{SID}-01", f"tracestate: {tracestate}"
    )
    assert r.status == 200
    assert gw.server_span(rid).trace_id == TID
    req = gw.received(rid)
    assert req.header_all("tracestate") == []
    assert _traceparent(req)[0] == TID


# -- tracing off ------------------------------------------------------------------------------


def test_tracing_off_adds_no_header_and_passes_the_clients_on(gw: Gateway) -> None:
    rid, r = gw.request(gw.off, "/api/off")
    assert r.status == 200
    req = gw.received(rid)
    assert not [h for h, _ in req.headers if h.lower() in ("traceparent", "tracestate", "b3")]
    rid, r = gw.request(gw.off, "/api/off", f"traceparent: 00-{TID}-{SID}-01", "b3: 1")
    req = gw.received(rid)
    assert req.header_all("traceparent") == [f"00-{TID}-{SID}-01"]
    assert req.header_all("b3") == ["1"]


# -- retries and local answers ---------------------------------------------------------------


def test_a_retried_request_has_a_client_span_per_try(gw: Gateway) -> None:
    rid, r = gw.request(gw.sampled, f"/flaky/{time.monotonic_ns()}")
    assert r.status == 200, r.body
    server = gw.server_span(rid)
    assert server.attributes["meshgate.retries"] == 1
    assert server.attributes["http.response.status_code"] == 200
    first, second = gw.children(server, 2)
    assert first.is_client and second.is_client
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503" and first.status == STATUS_ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["meshgate.try"] == 2
    assert "error.type" not in second.attributes
    assert first.end_ns <= second.start_ns
    assert first.span_id != second.span_id


def test_a_local_answer_gets_a_server_span_and_no_client_span(gw: Gateway) -> None:
    rid, r = gw.request(gw.sampled, "/nowhere")
    assert r.status == 404
    server = gw.server_span(rid)
    a = server.attributes
    assert a["http.response.status_code"] == 404
    assert a["meshgate.problem"] == "no-route" and a["meshgate.refusal"] == "no_route"
    assert "http.route" not in a and server.status != STATUS_ERROR
    time.sleep(0.3)
    assert not [s for s in gw.receiver.trace(server.trace_id) if s.is_client]


def test_a_failed_connect_is_an_error_on_both_spans(gw: Gateway) -> None:
    rid, r = gw.request(gw.sampled, "/dead/x")
    assert r.status in (502, 503), r.body
    server = gw.server_span(rid)
    assert server.status == STATUS_ERROR
    assert server.attributes["error.type"] == server.attributes["meshgate.problem"]
    client = _one_client(gw, server)
    assert client.status == STATUS_ERROR
    assert client.attributes["error.type"] == server.attributes["meshgate.problem"]
    assert "http.response.status_code" not in client.attributes


def test_spans_are_counted_in_metrics(gw: Gateway) -> None:
    rid, _ = gw.request(gw.sampled, "/api/counted")
    gw.server_span(rid)
    text = fetch(gw.sampled.admin_url("/metrics")).body.decode()
    m = re.search(r'^meshgate_trace_spans_total\{outcome="exported"\} (\d+)', text, re.M)
    assert m is not None and int(m.group(1)) >= 2, text
    assert re.search(r'^meshgate_trace_spans_total\{outcome="dropped"\} 0', text, re.M), text


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("tracing:\n  endpoint: http://c:4318/v1/traces\n  sample_ratio: 2\n", 3, "sample_ratio"),
        ("tracing:\n  endpoint: collector:4318\n", 2, "endpoint"),
        ("tracing:\n  sample_ratio: 0.5\n", 1, "endpoint"),
        ("tracing:\n  endpoint: http://c/v1/traces\n  batch: {max_queue: 10, max_batch: 20}\n",
         3, "batch"),
    ],
    ids=["ratio", "endpoint-url", "endpoint-missing", "batch"],
)  # fmt: skip
def test_a_bad_tracing_section_names_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_meshgate("check", "-c", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"{path}:{line}" in out, out
    assert field in out, out


def test_a_reload_turns_tracing_on(stack: Stack, upstream: UpstreamServer) -> None:
    receiver = OtlpReceiver().start()
    try:
        config: dict[str, Any] = {
            "upstreams": {"up": upstream_block(upstream)},
            "routes": [{"path": "/**", "upstream": "up"}],
        }
        proxy = stack.proxy(config)
        assert fetch(proxy.url("/before")).status == 200
        assert upstream.requests[-1].header("traceparent") is None
        proxy.reload({**config, "tracing": _tracing(receiver)})
        proxy.wait_for_log("tracing on")
        assert fetch(proxy.url("/after")).status == 200
        trace_id, _, _ = _traceparent(upstream.requests[-1])
        spans = receiver.wait_for_spans(2, lambda s: s.trace_id == trace_id)
        assert sorted(s.is_server for s in spans) == [False, True]
    finally:
        receiver.stop()


def test_spans_a_collector_refuses_are_counted_as_dropped(
    stack: Stack, upstream: UpstreamServer
) -> None:
    receiver = OtlpReceiver().start()
    receiver.status = 400  # not retried by the exporter
    try:
        proxy = stack.proxy(
            {
                "upstreams": {"up": upstream_block(upstream)},
                "routes": [{"path": "/**", "upstream": "up"}],
                "tracing": _tracing(receiver),
            }
        )
        assert fetch(proxy.url("/refused")).status == 200

        def dropped() -> int:
            text = fetch(proxy.admin_url("/metrics")).body.decode()
            m = re.search(r'^meshgate_trace_spans_total\{outcome="dropped"\} (\d+)', text, re.M)
            return int(m.group(1)) if m else -1

        wait_until(lambda: dropped() >= 2, timeout=10, what="two spans counted as dropped")
        assert not receiver.spans
    finally:
        receiver.stop()


def test_every_worker_traces_and_one_scrape_counts_them_all(
    stack: Stack, upstream: UpstreamServer
) -> None:
    receiver = OtlpReceiver().start()
    try:
        proxy = stack.proxy(
            {
                "upstreams": {"up": upstream_block(upstream)},
                "routes": [{"path": "/**", "upstream": "up"}],
                "tracing": _tracing(receiver),
            },
            workers=2,
        )
        n = 20
        for i in range(n):
            assert fetch(proxy.url(f"/w{i}"), "-H", "Connection: close").status == 200
        spans = receiver.wait_for_spans(2 * n)
        pids = {s.resource["service.instance.id"] for s in spans}
        assert len(pids) == 2, pids  # both workers exported

        def exported() -> int:
            text = fetch(proxy.admin_url("/metrics")).body.decode()
            m = re.search(r'^meshgate_trace_spans_total\{outcome="exported"\} (\d+)', text, re.M)
            return int(m.group(1)) if m else -1

        wait_until(lambda: exported() == 2 * n, timeout=10, what="both workers' spans counted")
    finally:
        receiver.stop()


def test_admin_config_hides_the_exporters_credentials(
    stack: Stack, upstream: UpstreamServer
) -> None:
    proxy = stack.proxy(
        {
            "upstreams": {"up": upstream_block(upstream)},
            "routes": [{"path": "/**", "upstream": "up"}],
            "tracing": {
                "endpoint": "http://user:hunter2@127.0.0.1:1/v1/traces?token=hunter3",
                "headers": {"x-api-key": "hunter4"},
            },
        }
    )
    r = fetch(proxy.admin_url("/config"))
    assert r.status == 200
    body = r.body.decode()
    assert "hunter" not in body, body
    doc = r.json()["config"]["tracing"]
    assert doc["headers"] == {"x-api-key": "<redacted>"}
    assert doc["endpoint"] == "http://<redacted>@127.0.0.1:1/v1/traces"
