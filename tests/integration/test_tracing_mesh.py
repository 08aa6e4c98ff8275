"""One trace across the mesh: gateway -> sidecar A -> app A -> sidecar A
(outbound) -> sidecar B -> app B, every hop a real process.

The apps are `mesh_app.py`: app A calls B through its sidecar's port for b,
passing the request's trace headers on (as every app in a mesh must); app
B answers the first request for each path 503, and b's traffic policy
retries 503 once, so the hop from A's outbound to B is tried twice. Every
proxy sends its spans to one OTLP/HTTP receiver (`support.otlp`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.client import fetch, free_port, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.otlp import STATUS_ERROR, OtlpReceiver, ReceivedSpan
from support.proxy import ProxyProcess
from support.sidecar import SidecarProcess

pytestmark = [pytest.mark.mesh]

APP = Path(__file__).with_name("mesh_app.py")
A = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/a"
B = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/b"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"

SERVICES: dict[str, Any] = {
    "a": {"calls": ["b"]},
    "b": {"traffic": {"retry": {"attempts": 2, "on": [503], "backoff": {"base": "10ms"}}}},
    "gateway": {"namespace": "edge"},
}


def _app(name: str, port: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(APP), name, str(port), "--bind", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class TracedMesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.receiver = OtlpReceiver()
        self.cp = ControlProcess(tmp / "cp", services=SERVICES)
        self.port_a, self.port_b = free_port(), free_port()
        tracing = ("--tracing-endpoint", self.receiver.url, "--tracing-batch-delay", "50ms")
        self.sc_a = SidecarProcess(
            self.cp, "a", self.port_a, tmp / "a", upstreams=("b",), extra=tracing
        )
        self.sc_b = SidecarProcess(self.cp, "b", self.port_b, tmp / "b", extra=tracing)
        self.apps: list[subprocess.Popen[bytes]] = []
        self.gateway: ProxyProcess | None = None

    def start(self) -> TracedMesh:
        self.receiver.start()
        self.cp.start()
        self.apps.append(_app("b", self.port_b, "--fail-first", "/flaky"))
        self.apps.append(
            _app("a", self.port_a, "--call", f"/chain={self.sc_a.url('/flaky/chain', 'b')}")
        )
        self.sc_b.start()
        self.sc_a.start()
        wait_until(
            lambda: fetch(self.sc_a.url("/ping", "b")).status == 200,
            timeout=20,
            what="a's sidecar reaches b",
        )
        token = self.tmp / "gateway.token"
        token.write_text(self.cp.token("gateway"))
        self.gateway = ProxyProcess(
            {
                "mesh": {
                    "control": f"127.0.0.1:{self.cp.port}",
                    "trust_domain": TRUST_DOMAIN,
                    "token_file": str(token),
                    "trust_bundle": str(self.cp.state / "ca" / "bundle.pem"),
                    "state_dir": str(self.tmp / "gateway-state"),
                },
                "routes": [{"path": "/a/**", "upstream": "a", "strip_prefix": True}],
                "upstreams": {"a": {"service": "a"}},
                "tracing": {
                    "endpoint": self.receiver.url,
                    "service_name": "gateway",
                    "batch": {"schedule_delay": "50ms"},
                },
            },
            self.tmp,
        ).start()
        gw = self.gateway
        wait_until(
            lambda: fetch(gw.url("/a/ping")).status == 200,
            timeout=20,
            what="the gateway reaches a through the mesh",
        )
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for sc in (self.sc_a, self.sc_b):
            sc.stop()
        for app in self.apps:
            app.terminate()
            app.wait(10)
        self.cp.stop()
        self.receiver.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedMesh]:
    m = TracedMesh(tmp_path_factory.mktemp("tracing-mesh"))
    try:
        yield m.start()
    finally:
        m.stop()


def test_one_trace_through_gateway_and_two_sidecars_with_a_retried_hop(
    mesh: TracedMesh,
) -> None:
    assert mesh.gateway is not None
    rid = f"mesh-trace-{time.monotonic_ns()}"
    r = fetch(mesh.gateway.url(f"/a/chain?k={rid}"), "-H", f"X-Request-Id: {rid}")
    assert r.status == 200, r.body
    (root,) = mesh.receiver.wait_for_spans(
        1,
        lambda s: (
            s.service == "gateway"
            and s.is_server
            and s.attributes.get("meshgate.request_id") == rid
        ),
    )
    # gateway 2, A inbound 2, A outbound 1 + 2 tries, B inbound 2 x (1 + 1)
    spans = mesh.receiver.wait_for_spans(11, lambda s: s.trace_id == root.trace_id)
    time.sleep(0.5)
    spans = mesh.receiver.trace(root.trace_id)
    assert len(spans) == 11, spans
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == 11  # every span its own id

    def children(parent: ReceivedSpan) -> list[ReceivedSpan]:
        return sorted(
            (s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_ns
        )

    # The gateway: the root (the client sent no context), and its one try.
    assert root.service == "gateway" and root.parent_span_id == ""
    assert root.attributes["meshgate.upstream"] == "a"
    (gw_try,) = children(root)
    assert gw_try.is_client and gw_try.service == "gateway"
    assert gw_try.attributes["meshgate.peer.identity"] == A
    # A's inbound: its caller is the gateway, by certificate.
    (a_in,) = children(gw_try)
    assert a_in.is_server and a_in.service == "a"
    assert a_in.attributes["meshgate.direction"] == "inbound"
    assert a_in.attributes["meshgate.peer.identity"] == GATEWAY
    assert a_in.attributes["url.scheme"] == "https"
    (a_app,) = children(a_in)
    assert a_app.is_client and a_app.service == "a"
    # The app passed the context on: A's outbound is a child of the call to it.
    (a_out,) = children(a_app)
    assert a_out.is_server and a_out.service == "a"
    assert a_out.attributes["meshgate.direction"] == "outbound"
    assert a_out.attributes["meshgate.upstream"] == "b"
    assert a_out.attributes["meshgate.retries"] == 1
    assert a_out.attributes["http.response.status_code"] == 200
    # The retried hop: two client spans, the first failed with B's 503.
    first, second = children(a_out)
    assert first.is_client and second.is_client
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503" and first.status == STATUS_ERROR
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert first.attributes["meshgate.peer.identity"] == B
    # Each try reached B's inbound, which called app B once per try.
    statuses = []
    for try_span in (first, second):
        (b_in,) = children(try_span)
        assert b_in.is_server and b_in.service == "b"
        assert b_in.attributes["meshgate.peer.identity"] == A
        (b_app,) = children(b_in)
        assert b_app.is_client and b_app.service == "b"
        assert children(b_app) == []
        statuses.append(b_app.attributes["http.response.status_code"])
    assert statuses == [503, 200]
    # Every span but the root hangs off another span of this trace.
    assert all(s.parent_span_id in by_id for s in spans if s is not root)
    # And in time: a child within its parent (one host, one clock; loop
    # times are read in milliseconds, hence the slack).
    slack = 5_000_000
    for s in spans:
        assert s.start_ns < s.end_ns, s
        if s is not root:
            parent = by_id[s.parent_span_id]
            assert parent.start_ns - slack <= s.start_ns, (parent, s)
            assert s.end_ns <= parent.end_ns + slack, (parent, s)
