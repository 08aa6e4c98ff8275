"""The sidecar's access log (`--access-log`): the caller's sidecar logs the
call outbound, the callee's logs it inbound with the caller's identity."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from support.client import fetch, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh

ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(t) for t in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def test_both_sidecars_log_the_call(tmp_path: Path) -> None:
    cp = ControlProcess(
        tmp_path / "cp", services={"orders": {"calls": ["customers"]}, "customers": {}}
    )
    apps = {name: UpstreamServer(name) for name in ("orders", "customers")}
    sidecars: list[SidecarProcess] = []
    try:
        cp.start()
        for app in apps.values():
            app.start()
        orders = SidecarProcess(
            cp,
            "orders",
            apps["orders"].port,
            tmp_path / "orders",
            upstreams=("customers",),
            extra=("--access-log", "out.log"),
        )
        sidecars.append(orders.start())
        customers = SidecarProcess(
            cp,
            "customers",
            apps["customers"].port,
            tmp_path / "customers",
            extra=("--access-log", "in.log", "--access-log-sample-2xx", "1"),
        )
        sidecars.append(customers.start())
        wait_until(
            lambda: fetch(orders.url("/ping", "customers")).status == 200,
            timeout=15,
            what="orders' sidecar reaches customers",
        )
        r = fetch(orders.url("/things/1?secret=hunter2", "customers"))
        assert r.status == 200, r.describe()
        rid = r.header("x-request-id")
        out_log, in_log = tmp_path / "orders" / "out.log", tmp_path / "customers" / "in.log"

        def find(path: Path) -> dict[str, Any] | None:
            return next((x for x in _lines(path) if x["request_id"] == rid), None)

        wait_until(lambda: find(out_log) and find(in_log), timeout=10, what="both lines")
        out, inbound = find(out_log), find(in_log)
        assert out is not None and inbound is not None
        assert out["direction"] == "outbound" and out["status"] == 200, out
        assert out["upstream"] == "customers" and out["peer"] is None, out
        assert inbound["direction"] == "inbound" and inbound["status"] == 200, inbound
        assert inbound["peer"] == ORDERS, inbound
        assert inbound["endpoint"] == f"127.0.0.1:{apps['customers'].port}", inbound
        for path in (out_log, in_log):
            assert "hunter2" not in path.read_text() and "/things/1" not in path.read_text()
        # SIGHUP reopens the file (rotation).
        rotated = tmp_path / "orders" / "out.log.1"
        out_log.rename(rotated)
        assert orders.process is not None
        orders.process.send_signal(signal.SIGHUP)
        wait_until(out_log.exists, timeout=5, what="out.log opened again")
        assert fetch(orders.url("/after", "customers")).status == 200
        wait_until(lambda: len(_lines(out_log)) == 1, timeout=10, what="a line in the new file")
        assert orders.alive
    finally:
        for sc in sidecars:
            sc.stop()
        for app in apps.values():
            app.stop()
        cp.stop()
