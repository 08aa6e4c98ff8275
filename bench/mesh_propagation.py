#!/usr/bin/env python3
"""How fast an endpoint change reaches N connected proxies, and the control
plane's RSS at each N.

Starts a real `meshgate control` (SQLite store, debounce 20 ms) on loopback,
then N light proxies: `MeshAgent`s (the proxy side of the real protocol:
join with a token, mutual TLS, the stream, ACKs), spread over a few client
processes, each agent of service `orders`, which calls `customers`. Then,
`--changes` times, one instance of `customers` registers (a new agent with
an instance), and each proxy records when its snapshot first holds it. The
time is from the moment the registering agent opened its stream to the
moment a proxy applied the snapshot: the debounce, the push, the TLS write,
and the proxy's parse and save are all inside it. All processes share one
clock (one machine).

Usage: python bench/mesh_propagation.py [--proxies 10,100,1000] [--changes 10]
       [--processes 4]
Prints a markdown table and writes bench/results/mesh-propagation-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meshgate.mesh.agent import MeshAgent  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TD = "bench.mesh"


def sid(service: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{service}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _clients(
    port: int, bundle: bytes, token: str, base: Path, n: int, index: int, conn: Any
) -> None:
    seen: dict[str, dict[int, float]] = {}
    agents = []

    def hook(name: str) -> Any:
        def on_snapshot(sections: dict[str, Any]) -> None:
            now = time.time()
            marks = seen.setdefault(name, {})
            for ep in sections.get("service/customers", {}).get("endpoints", []):
                marks.setdefault(ep["port"], now)

        return on_snapshot

    for i in range(n):
        name = f"p{index}-{i}"
        agent = MeshAgent(
            identity=sid("orders"),
            controls=[("127.0.0.1", port)],
            state_dir=base / name,
            token=token,
            bundle_pem=bundle,
            on_snapshot=hook(name),
            keep_token=False,
        )
        await agent.start()
        agents.append(agent)
    for agent in agents:
        await agent.connected.wait()
    conn.send("ready")
    while True:
        msg = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        if msg == "report":
            conn.send(seen)
        elif msg == "stop":
            break
    for agent in agents:
        await agent.close()


def _client_main(*args: Any) -> None:
    import uvloop

    uvloop.run(_clients(*args))


async def _register(port: int, bundle: bytes, token: str, base: Path, instance_port: int) -> Any:
    agent = MeshAgent(
        identity=sid("customers"),
        controls=[("127.0.0.1", port)],
        state_dir=base / f"customers-{instance_port}",
        token=token,
        bundle_pem=bundle,
        instance={"address": "127.0.0.1", "port": instance_port},
        keep_token=False,
    )
    await agent._join()
    started = time.time()
    await agent.start()
    await agent.connected.wait()
    return agent, started


def run(proxies: int, changes: int, processes: int, workdir: Path) -> dict[str, Any]:
    port = free_port()
    cpdir = workdir / f"cp-{proxies}"
    cpdir.mkdir()
    (cpdir / "mesh.yaml").write_text(
        f"trust_domain: {TD}\ncontrol:\n  listen: 127.0.0.1:{port}\n  state_dir: state\n"
        "  debounce: 20ms\n  lease: 30s\n  csr_rate: {limit: 100000, period: 1s}\n"
        "services:\n  orders: {calls: [customers]}\n  customers: {}\n"
    )
    log = open(cpdir / "control.log", "wb")  # noqa: SIM115
    cp = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshgate.cli",
            "--log-level",
            "warning",
            "control",
            "-c",
            str(cpdir / "mesh.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        cwd=cpdir,
    )
    spy: subprocess.Popen[bytes] | None = None
    try:
        assert cp.stdout is not None
        cp.stdout.readline()  # "meshgate control listening on ..."
        # MESHGATE_PROFILE=DIR: py-spy samples the control plane for the
        # whole run (it writes DIR/cp-<N>.txt, collapsed stacks, at its exit).
        profile = os.environ.get("MESHGATE_PROFILE")
        spy = (
            subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(cp.pid),
                    "--format",
                    "raw",
                    "-o",
                    f"{profile}/cp-{proxies}.txt",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if profile
            else None
        )
        bundle = (cpdir / "state" / "ca" / "bundle.pem").read_bytes()

        def token(service: str) -> str:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "meshgate.cli",
                    "token",
                    "create",
                    "-c",
                    str(cpdir / "mesh.yaml"),
                    "--service",
                    service,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            return out.stdout.strip()

        orders_token, customers_token = token("orders"), token("customers")
        rss_idle = rss_kib(cp.pid)
        ctx = multiprocessing.get_context("spawn")
        pipes, procs = [], []
        per = [
            proxies // processes + (1 if i < proxies % processes else 0) for i in range(processes)
        ]
        for i, n in enumerate(per):
            if not n:
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_client_main,
                args=(port, bundle, orders_token, workdir / f"px-{proxies}", n, i, child),
            )
            p.start()
            pipes.append(parent)
            procs.append(p)
        for pipe in pipes:
            assert pipe.recv() == "ready"
        rss_connected = rss_kib(cp.pid)
        starts: dict[int, float] = {}
        registered = []

        async def changes_loop() -> None:
            for k in range(changes):
                instance_port = 20000 + k
                agent, started = await _register(
                    port, bundle, customers_token, workdir / f"reg-{proxies}", instance_port
                )
                starts[instance_port] = started
                registered.append(agent)
                await asyncio.sleep(0.5)
            for agent in registered:
                await agent.close()

        asyncio.run(changes_loop())
        time.sleep(1.0)
        seen: dict[str, dict[str, float]] = {}
        for pipe in pipes:
            pipe.send("report")
            seen.update(pipe.recv())
        rss_pushing = rss_kib(cp.pid)
        for pipe in pipes:
            pipe.send("stop")
        for p in procs:
            p.join(30)
        times: list[float] = []
        missing = 0
        for instance_port, started in starts.items():
            for marks in seen.values():
                at = marks.get(instance_port)
                if at is None:
                    missing += 1
                else:
                    times.append(at - started)
        times.sort()

        def q(p: float) -> float:
            return times[min(len(times) - 1, int(p * len(times)))] * 1000 if times else float("nan")

        return {
            "proxies": proxies,
            "changes": changes,
            "samples": len(times),
            "missing": missing,
            "p50_ms": round(q(0.50), 1),
            "p99_ms": round(q(0.99), 1),
            "max_ms": round(times[-1] * 1000, 1) if times else None,
            "mean_ms": round(statistics.fmean(times) * 1000, 1) if times else None,
            "cp_rss_mib_idle": round(rss_idle / 1024, 1),
            "cp_rss_mib_connected": round(rss_connected / 1024, 1),
            "cp_rss_mib_after": round(rss_pushing / 1024, 1),
        }
    finally:
        cp.terminate()
        if spy is not None:
            spy.wait(30)
        try:
            cp.wait(10)
        except subprocess.TimeoutExpired:
            cp.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxies", default="10,100,1000")
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--processes", type=int, default=4)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mg-prop-") as tmp:
        for n in (int(x) for x in args.proxies.split(",")):
            rows.append(run(n, args.changes, args.processes, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| proxies | changes | p50 | p99 | max | missed "
        "| control plane RSS (idle / connected / after) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['proxies']} | {r['changes']} | {r['p50_ms']} ms | {r['p99_ms']} ms | "
            f"{r['max_ms']} ms | {r['missing']} | {r['cp_rss_mib_idle']} / "
            f"{r['cp_rss_mib_connected']} / {r['cp_rss_mib_after']} MiB |"
        )
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    (RESULTS / f"mesh-propagation-{stamp}.json").write_text(
        json.dumps({"commit": commit, "argv": sys.argv, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
