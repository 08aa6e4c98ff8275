"""Two `meshgate control` instances on one real redis-server: either serves
any proxy, a registration on one reaches proxies on the other, and killing
one moves its proxies to the other within the reconnect backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshgate.mesh.agent import MeshAgent
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.proxy import run_meshgate
from support.redis import RedisServer

pytestmark = [pytest.mark.engine, pytest.mark.mesh]


def sid(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"


async def wait_for(pred: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def endpoints(agent: MeshAgent) -> list[Any]:
    return list(agent.sections.get("service/customers", {}).get("endpoints", []))


async def test_two_instances_share_one_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    root = tmp_path / "root"
    assert (
        run_meshgate("ca", "init", "--dir", str(root), "--trust-domain", TRUST_DOMAIN).returncode
        == 0
    )
    for name in ("a", "b"):
        proc = run_meshgate(
            "ca",
            "issue-intermediate",
            "--root",
            str(root),
            "--out",
            str(tmp_path / name / "ca"),
            "--name",
            f"cp-{name}",
        )
        assert proc.returncode == 0, proc.stderr
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        f"trust_domain: {TRUST_DOMAIN}\ncontrol:\n  store: {redis_server.url}\n"
        "  lease: 3s\n  debounce: 10ms\nservices:\n  orders: {calls: [customers]}\n"
        "  customers: {}\n"
    )
    a = ControlProcess(tmp_path / "a-run", path=mesh, state=tmp_path / "a").start()
    b = ControlProcess(tmp_path / "b-run", path=mesh, state=tmp_path / "b").start()
    bundle = (root / "root.pem").read_bytes()
    token_o = a.token("orders")  # made through one instance's store: both see it
    token_c = b.token("customers")
    try:
        orders = MeshAgent(
            identity=sid("orders"),
            controls=[("127.0.0.1", a.port), ("127.0.0.1", b.port)],
            state_dir=tmp_path / "orders",
            token=token_o,
            bundle_pem=bundle,
            shuffle=False,  # a first: the instance killed below
        )
        pinned = MeshAgent(
            identity=sid("orders"),
            controls=[("127.0.0.1", a.port)],
            state_dir=tmp_path / "orders-on-a",
            token=token_o,
            bundle_pem=bundle,
        )
        customers = MeshAgent(
            identity=sid("customers"),
            controls=[("127.0.0.1", b.port)],
            state_dir=tmp_path / "customers",
            token=token_c,
            bundle_pem=bundle,
            instance={"address": "127.0.0.1", "port": 9100},
        )
        for agent in (orders, pinned, customers):
            await agent.start()
        # customers registered on b; pinned is on a: pub/sub carried it.
        await wait_for(lambda: len(endpoints(pinned)) == 1, what="a registration across instances")
        await wait_for(lambda: len(endpoints(orders)) == 1, what="the registration")
        serial = orders.state.certificate().serial_number  # type: ignore[union-attr]
        assert orders.stream_conn is not None
        assert orders.stream_conn.writer.get_extra_info("peername")[1] == a.port
        a.kill()
        b_port = b.port
        await asyncio.sleep(0.2)
        # The one with both addresses carries on with b; nothing was lost.
        await wait_for(orders.connected.is_set, timeout=20, what="a move to the other instance")
        assert orders.stream_conn is not None
        assert orders.stream_conn.writer.get_extra_info("peername")[1] == b_port
        assert len(endpoints(orders)) == 1
        assert orders.state.certificate().serial_number == serial  # type: ignore[union-attr]
        # And a new registration, on b, still reaches it.
        more = MeshAgent(
            identity=sid("customers"),
            controls=[("127.0.0.1", b.port)],
            state_dir=tmp_path / "customers-2",
            token=token_c,
            bundle_pem=bundle,
            instance={"address": "127.0.0.1", "port": 9101},
        )
        await more.start()
        await wait_for(lambda: len(endpoints(orders)) == 2, what="a second registration")
        for agent in (orders, pinned, customers, more):
            await agent.close()
    finally:
        a.stop()
        b.stop()
