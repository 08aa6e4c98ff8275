"""The dashboard on the demo's mesh (`meshgate.demo.mesh.MeshDemo`: a
control plane, a sidecar per service, a gateway in the mesh; with a 90/10
canary, see demo_runner.py) under a small steady load, in a real Chromium,
from the control plane's admin listener."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.browser import (
    ROOT,
    axe_violations,
    css_color,
    edge_rows,
    eventually,
    graph,
    graph_marks,
    open_dashboard,
    screenshot,
)

pytestmark = [pytest.mark.browser, pytest.mark.engine, pytest.mark.mesh, pytest.mark.timeout(300)]

# Requests per second on each path, by a thread each: the edges' rps order
# is external->gateway > gateway->order-service > order-service->customer-service
# > gateway->order-service-v2 > the denied gateway->customer-service.
LOAD = {"orders": 8.0, "shop": 10.0, "customers": 4.0, "denied": 0.4}
EXPECTED_ORDER = [
    "external->gateway",
    "gateway->order-service",
    "order-service->customer-service",
    "gateway->order-service-v2",
    "gateway->customer-service:denied",
]


class Load:
    """Bounded steady load: one thread per path, at a fixed rate, until stopped."""

    def __init__(self, targets: dict[str, tuple[int, str, float]]) -> None:
        self.stop = threading.Event()
        self.counts: dict[str, dict[int, int]] = {k: {} for k in targets}
        self.threads = [
            threading.Thread(target=self._run, args=(name, *t), daemon=True)
            for name, t in targets.items()
        ]

    def _run(self, name: str, port: int, path: str, rate: float) -> None:
        conn: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        while not self.stop.is_set():
            status = 0
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
                conn.request("GET", path, headers={"Host": "demo"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            counts = self.counts[name]
            counts[status] = counts.get(status, 0) + 1
            next_at += 1 / rate
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


class Demo:
    """demo_runner.py's process: the demo's mesh with the canary."""

    def __init__(self, tmp: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
        )
        self.log = tmp / "demo.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("demo_runner.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=tmp,
                env=env,
                start_new_session=True,
            )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self._line(90)
        assert line.startswith("{"), line + self.log.read_text(errors="replace")[-3000:]
        self.ports = json.loads(line)

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        return got[0].strip() if got else ""

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        answer = self._line(60)
        assert answer == "ok", answer + self.log.read_text(errors="replace")[-3000:]

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.admin + "/ui/api/state", timeout=10) as r:
            return dict(json.loads(r.read()))

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        text = self.log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, Load]]:
    d = Demo(tmp_path_factory.mktemp("demo"))
    load: Load | None = None
    try:
        gw, orders = d.ports["gateway"], d.ports["orders"]
        load = Load(
            {
                "orders": (gw, "/orders/x", LOAD["orders"]),
                "shop": (gw, "/shop/x", LOAD["shop"]),
                "customers": (orders, "/hops", LOAD["customers"]),
                "denied": (gw, "/customers/x", LOAD["denied"]),
            }
        ).start()
        yield d, load
    finally:
        if load is not None:
            load.close()
        d.close()


def _edges_ready(d: Demo) -> bool:
    st = d.state()
    edges = {e["id"]: e for e in st["edges"]}
    split = next(
        (r for r in st["services"].get("order-service", {}).get("routes", []) if r.get("split")),
        None,
    )
    return (
        all(edges.get(i, {}).get("requests", 0) > 0 for i in EXPECTED_ORDER)
        and split is not None
        and sum(b.get("requests", 0) for b in split["split"]) >= 150
    )


def test_the_dashboard_shows_the_demo_mesh(browser: Any, demo: tuple[Demo, Load]) -> None:
    d, load = demo
    eventually(lambda: _edges_ready(d), 90, "every edge and 150 split requests in the state", 1)
    assert load.counts["denied"].get(403, 0) > 0, load.counts
    page, errors = open_dashboard(browser, d.admin + "/ui")

    g = graph(page)
    ids = {n["id"] for n in g["nodes"]}
    assert {"external", "gateway", "order-service", "order-service-v2", "customer-service"} <= ids
    assert next(n for n in g["nodes"] if n["id"] == "gateway")["kind"] == "gateway"
    # The edges the traffic took, busiest first.
    rows = [r for r in edge_rows(page) if r["id"] in EXPECTED_ORDER]
    assert [r["id"] for r in rows] == EXPECTED_ORDER, rows
    # A padlock on every mTLS edge: every hop but the clients' to the gateway.
    marks = graph_marks(page)
    mtls = [e["id"] for e in g["edges"] if e["mtls"]]
    assert set(EXPECTED_ORDER[1:]) <= set(mtls)
    assert {i: marks.get(i) for i in mtls} == dict.fromkeys(mtls, "lock")
    # The denied call: its own dashed edge, explained by the callee's policy.
    denied = next(e for e in g["edges"] if e["id"] == "gateway->customer-service:denied")
    assert denied["lineStyle"] == "dashed"
    assert "inbound/customer-service" in denied["explanation"]
    why = next(r for r in rows if r["denied"])["why"]
    assert "inbound/customer-service" in why
    assert "inbound/customer-service" in page.locator("#denials-table tbody").inner_text()

    # The canary: about 10 % to v2.
    page.select_option("#service-select", "order-service")
    v2 = page.locator("table.split tr[data-upstream='order-service-v2']")
    share = float(v2.get_attribute("data-share") or "nan")
    assert 0.05 <= share <= 0.16, share
    assert v2.get_attribute("data-weight") == "10"

    violations = axe_violations(page)
    assert not violations, violations
    screenshot(page, "demo-desktop")
    tablet, tablet_errors = open_dashboard(
        browser, d.admin + "/ui", viewport="tablet", scheme="dark"
    )
    assert not axe_violations(tablet)
    screenshot(tablet, "demo-tablet-dark")
    tablet.context.close()
    tablet_errors.check()

    # Its only instance stopped, customer-service's node turns red within 10 s...
    def health() -> str:
        return str(
            page.evaluate(
                "() => window.meshgateGraph.getElementById('customer-service').data('health')"
            )
        )

    d.command("stop customer-service")
    t0 = time.monotonic()
    eventually(lambda: health() == "down", 10, "customer-service's node says down")
    took = time.monotonic() - t0
    node = next(n for n in graph(page)["nodes"] if n["id"] == "customer-service")
    assert node["color"] == css_color(page, "--bad"), took
    screenshot(page, "demo-desktop-down")
    # ...and back once it is restarted.
    d.command("start customer-service")
    eventually(lambda: health() not in ("down", ""), 20, "customer-service's node is back")
    node = next(n for n in graph(page)["nodes"] if n["id"] == "customer-service")
    assert node["color"] != css_color(page, "--bad")
    errors.check()
    page.context.close()
