#!/usr/bin/env python3
"""The cost of edge security and resilience, side by side in one run.

Starts on loopback, in a temp dir, all as child processes killed at exit:
  direct      nginx returning a fixed 100-byte JSON body (the upstream)
  nginx       nginx as a keep-alive reverse proxy in front of it (plain route)
  redis       redis-server on a free port (no persistence)
  meshgate    `meshgate run` (1 worker) with three routes to the same upstream:
                /api/customers/**  plain
                /api/orders/**     the seed's route: auth: jwt (RS256, public key
                                   file) + rate_limit, policy redis, limit set high
                /api/partners/**   the same JWT + rate_limit, policy local
                /api/resilient/**  no auth; its upstream has retries (3 attempts,
                                   per-try timeout), circuit breakers, outlier
                                   detection and the peak-EWMA balancer
and measures, targets interleaved per round (wrk -t1 -c64 -dNs, the token in
an Authorization header where the route needs it):
  nginx, meshgate plain, jwt+redis, jwt+local, resilient
Reports req/s, p50/p99, and the ratios to the plain meshgate route and to
nginx (median of the per-round ratios). Writes bench/results/edge-*.json.

Usage: python bench/edge.py [--duration 10] [--rounds 3] [--connections 64]
Needs nginx, wrk, redis-server on PATH; PyJWT and cryptography (in .venv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from _common import (
    RESULTS_DIR,
    Child,
    Children,
    command_line,
    ensure_tools,
    find_meshgate,
    free_port,
    git_describe,
    log,
    machine_info,
    run_script,
    start_redis,
    wait_http,
)
from run import parse_wrk, proxy_block, start_nginx, upstream_block

TARGETS = {
    # name: (path, needs the token)
    "nginx": ("/api/customers/42", False),
    "meshgate-plain": ("/api/customers/42", False),
    "meshgate-jwt-redis": ("/api/orders/42", True),
    "meshgate-jwt-local": ("/api/partners/42", True),
    "meshgate-resilient": ("/api/resilient/42", False),
}


ISSUER = "https://id.example.com"
AUDIENCE = "orders"
"""What the token of `make_token` says, and the gateway checks."""


def meshgate_config(port: int, admin: int, upstream: int, redis_port: int) -> str:
    return f"""\
# Written by bench/edge.py for one benchmark run.
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
access_log: false
limits:
  drain_timeout: 1s
redis:
  url: redis://127.0.0.1:{redis_port}/0
  timeout: 1s
auth:
  jwt:
    type: jwt
    issuer: {ISSUER}
    audience: {AUDIENCE}
    public_key_file: jwt.pub.pem
upstreams:
  order-service:
    endpoints: [127.0.0.1:{upstream}]
  customer-service:
    endpoints: [127.0.0.1:{upstream}]
  resilient-service:
    endpoints: [127.0.0.1:{upstream}]
    balancer: ewma
    retry: {{attempts: 3, on: [gateway-error], per_try_timeout: 5s}}
    circuit_breaker: {{max_requests: 10000, max_pending: 1000, max_retries: 100}}
    outlier_detection: {{}}
routes:
- path: /api/orders/**
  upstream: order-service
  auth: jwt
  rate_limit: {{limit: 1000000000, period: 1m, policy: redis}}
- path: /api/customers/**
  upstream: customer-service
- path: /api/partners/**
  upstream: order-service
  auth: jwt
  rate_limit: {{limit: 1000000000, period: 1m, policy: local}}
- path: /api/resilient/**
  upstream: resilient-service
"""


def make_token(workdir: Path) -> str:
    """An RS256 token valid for an hour (PyJWT), and its public key in
    workdir/jwt.pub.pem; the private key never leaves this process."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (workdir / "jwt.pub.pem").write_bytes(pem)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bench",
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, key, algorithm="RS256")


def run_wrk(
    wrk: str, port: int, path: str, token: str | None, args: argparse.Namespace
) -> tuple[dict[str, Any], list[str]]:
    import subprocess

    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.duration + 60, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk exited {r.returncode}:\n{r.stdout}{r.stderr}")
    res = parse_wrk(r.stdout)
    res["raw"] = r.stdout
    shown = [
        a if not a.startswith("Authorization") else "Authorization: Bearer $TOKEN" for a in argv
    ]
    return res, shown


def check(port: int, path: str, token: str | None) -> None:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{path} answered {resp.status}")
        limit = resp.headers.get("RateLimit-Policy")
    if token and not limit:
        raise RuntimeError(f"{path}: no RateLimit-Policy field: is the limit on?")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--meshgate", default=None)
    args = p.parse_args()
    cmdline = command_line()
    tools = ensure_tools(["nginx", "wrk", "redis-server"])
    mg = find_meshgate(args.meshgate)
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-edge-"))
    result: dict[str, Any] = {
        "command": cmdline,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_describe(),
        "machine": machine_info(),
        "settings": vars(args),
        "rounds": [],
    }
    try:
        with Children() as children:
            ports: dict[str, int] = {}
            procs: dict[str, Child] = {}
            up, up_port = start_nginx(children, tools["nginx"], tmp, "direct", upstream_block)
            procs["direct"] = up
            procs["nginx"], ports["nginx"] = start_nginx(
                children, tools["nginx"], tmp, "nginx", lambda port: proxy_block(port, up_port)
            )
            procs["redis"], redis_port = start_redis(children, tools["redis-server"], tmp)
            workdir = tmp / "meshgate"
            workdir.mkdir()
            token = make_token(workdir)
            port, admin = free_port(), free_port()
            cfg = workdir / "meshgate.yaml"
            cfg.write_text(meshgate_config(port, admin, up_port, redis_port))
            argv = [*mg, "run", "-c", str(cfg)]
            procs["meshgate"] = children.start(
                "meshgate", argv, workdir / "meshgate.log", cwd=workdir
            )
            wait_http(procs["meshgate"], admin, "/readyz", timeout=30)
            for name in TARGETS:
                if name.startswith("meshgate"):
                    ports[name] = port
            result["commands"] = {"meshgate": shlex.join(argv), "config": cfg.read_text()}
            for name, (path, needs) in TARGETS.items():
                check(ports[name], path, token if needs else None)
            for name, (path, needs) in TARGETS.items():
                log(f"warm-up {name}")
                run_wrk(tools["wrk"], ports[name], path, token if needs else None,
                        argparse.Namespace(**{**vars(args), "duration": args.warmup}))  # fmt: skip
            for rnd in range(1, args.rounds + 1):
                round_res: dict[str, Any] = {}
                for name, (path, needs) in TARGETS.items():
                    for child in procs.values():
                        if not child.alive():
                            raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
                    res, shown = run_wrk(
                        tools["wrk"], ports[name], path, token if needs else None, args
                    )
                    result.setdefault("wrk", {})[name] = shlex.join(shown)
                    round_res[name] = res
                    log(
                        f"round {rnd} {name}: {res['rps']:,.0f} req/s p50 {res['p50_ms']:.2f} ms "
                        f"p99 {res['p99_ms']:.2f} ms non-2xx {res['non_2xx']}"
                    )
                    time.sleep(args.pause)
                result["rounds"].append(round_res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict[str, dict[str, Any]] = {}
    for name in TARGETS:
        runs = [r[name] for r in result["rounds"]]
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "vs_plain": statistics.median(
                r[name]["rps"] / r["meshgate-plain"]["rps"] for r in result["rounds"]
            ),
            "vs_nginx": statistics.median(
                r[name]["rps"] / r["nginx"]["rps"] for r in result["rounds"]
            ),
            "errors": sum(r["non_2xx"] + sum(r["socket_errors"].values()) for r in runs),
        }
    result["summary"] = summary
    lines = [
        f"`{cmdline}` ({args.rounds} rounds x {args.duration}s, wrk -t{args.threads} "
        f"-c{args.connections}, targets interleaved; ratios are medians of per-round ratios)",
        "",
        "| target | req/s | p50 ms | p99 ms | vs meshgate plain | vs nginx | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['vs_plain']:.3f} | {s['vs_nginx']:.3f} | {s['errors']} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"edge-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
