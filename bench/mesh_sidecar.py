"""What a pair of sidecars costs: memory, and the latency it adds.

    .venv/bin/python bench/mesh_sidecar.py [--rate 1000] [--duration 10] [--rounds 3]

One run, side by side:

  direct   the client calls the upstream (nginx, a fixed 100-byte JSON body);
  pair     the client calls its sidecar's port for the service; that sidecar
           opens mutual TLS to the service's sidecar, which calls the same
           nginx: the east/west path of the mesh, as Istio measures it
           ("a pair of sidecars", client and server side).

Both are loaded by bench/paced.py: an open-loop paced load (1,000 req/s by
default), latency measured from each request's scheduled instant (no
coordinated omission). Rounds alternate direct and pair, so drift on a
shared machine hits both. Reported: p50/p90/p99 per target (median over
rounds), what the pair adds at each, and each process's RSS idle and after
the load (from /proc). A control plane runs too (its RSS is shown apart).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Children, ensure_tools, find_meshgate, free_port, log
from paced import run as paced_run
from run import PATH, start_nginx, upstream_block

TRUST_DOMAIN = "bench.mesh"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_line(path: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not in {path}:\n{path.read_text(errors='replace')[-3000:]}")


def wait_ok(port: int, host: str | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    cmd = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*cmd, f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, check=False
        )
        if out.stdout == "200":
            return
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} did not answer 200")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds per target, discarded")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    tools = ensure_tools(["nginx", "curl"])
    meshgate = find_meshgate(None)
    results: dict[str, Any] = {"rate": args.rate, "duration": args.duration}
    with tempfile.TemporaryDirectory(prefix="mg-sidecar-bench-") as tmp, Children() as kids:
        work = Path(tmp)
        _, up_port = start_nginx(kids, tools["nginx"], work, "upstream", upstream_block)
        cp_port = free_port()
        (work / "mesh.yaml").write_text(
            f"trust_domain: {TRUST_DOMAIN}\n"
            f"control: {{listen: 127.0.0.1:{cp_port}, state_dir: state, lease: 10s}}\n"
            "services:\n  client: {calls: [app]}\n  app: {}\n"
        )
        cp = kids.start(
            "control", [*meshgate, "control", "-c", str(work / "mesh.yaml")], work / "cp.log", work
        )
        wait_line(work / "cp.log", "meshgate control listening on")
        sidecars: dict[str, Any] = {}
        app_port = free_port()
        for name, app in (("app", up_port), ("client", free_port())):
            token = subprocess.run(
                [*meshgate, "token", "create", "-c", str(work / "mesh.yaml"), "--service", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            cmd = [
                *meshgate,
                "sidecar",
                "--service",
                name,
                "--app",
                f"127.0.0.1:{app}",
                "--control",
                f"127.0.0.1:{cp_port}",
                "--trust-domain",
                TRUST_DOMAIN,
                "--token",
                token,
                "--trust-bundle",
                str(work / "state" / "ca" / "bundle.pem"),
                "--state-dir",
                str(work / f"state-{name}"),
                "--inbound",
                f"127.0.0.1:{free_port()}",
                "--outbound",
                f"127.0.0.1:{free_port()}",
            ]
            if name == "client":
                cmd += ["--upstream", f"app={app_port}"]
            log_path = work / f"sidecar-{name}.log"
            sidecars[name] = kids.start(f"sidecar-{name}", cmd, log_path, work)
            wait_line(log_path, "ready:")
        wait_ok(app_port)
        time.sleep(2.0)
        results["rss_idle_mib"] = {
            "sidecar (client side)": rss_mib(sidecars["client"].pid),
            "sidecar (server side)": rss_mib(sidecars["app"].pid),
            "control plane": rss_mib(cp.pid),
        }
        targets = {
            "direct": f"http://127.0.0.1:{up_port}{PATH}",
            "pair": f"http://127.0.0.1:{app_port}{PATH}",
        }
        rounds: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
        # Every target is warmed at the same rate first (pools filled, TLS
        # sessions up); what the pair does from cold is reported apart.
        results["cold"] = {}
        for name, url in targets.items():
            log(f"warm-up: {name} at {args.rate:.0f} req/s for {args.warmup:.0f} s")
            results["cold"][name] = asyncio.run(paced_run(url, args.rate, args.warmup))
        for i in range(args.rounds):
            for name, url in targets.items():
                log(f"round {i + 1}: {name} at {args.rate:.0f} req/s for {args.duration:.0f} s")
                out = asyncio.run(paced_run(url, args.rate, args.duration))
                rounds[name].append(out)
                log(
                    f"  p50 {out['p50_ms']:.3f} ms, p90 {out['p90_ms']:.3f} ms, "
                    f"p99 {out['p99_ms']:.3f} ms, errors {out['errors']}"
                )
        results["rss_after_mib"] = {
            "sidecar (client side)": rss_mib(sidecars["client"].pid),
            "sidecar (server side)": rss_mib(sidecars["app"].pid),
            "control plane": rss_mib(cp.pid),
        }
        summary: dict[str, dict[str, float]] = {}
        for name, outs in rounds.items():
            summary[name] = {
                key: statistics.median(o[key] for o in outs)
                for key in ("p50_ms", "p90_ms", "p99_ms")
            }
            summary[name]["errors"] = sum(o["errors"] for o in outs)
            summary[name]["completed"] = sum(o["completed"] for o in outs)
        results["latency"] = summary
        results["rounds"] = rounds
    d, p = summary["direct"], summary["pair"]
    print()
    print(f"Paced {args.rate:.0f} req/s, {args.duration:.0f} s x {args.rounds} rounds each")
    print()
    print("| target | p50 ms | p90 ms | p99 ms | requests | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} "
            f"| {int(s['completed'])} | {int(s['errors'])} |"
        )
    added = [p[k] - d[k] for k in ("p50_ms", "p90_ms", "p99_ms")]
    print(f"| **the pair adds** | +{added[0]:.3f} | +{added[1]:.3f} | +{added[2]:.3f} | | |")
    print()
    print("From cold (the warm-up, not in the table above):")
    for name, out in results["cold"].items():
        print(
            f"  {name}: p50 {out['p50_ms']:.3f} ms, p99 {out['p99_ms']:.3f} ms, "
            f"{int(out['errors'])} errors, {int(out['connections'])} client connections"
        )
    print()
    print("| process | RSS idle MiB | RSS after load MiB |")
    print("|---|---:|---:|")
    for name, idle in results["rss_idle_mib"].items():
        print(f"| {name} | {idle:.1f} | {results['rss_after_mib'][name]:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
