#!/usr/bin/env python3
"""The cost of observability: metrics, access logs and tracing, side by side.

Starts on loopback, in a temp dir, all as child processes killed at exit:
  direct    nginx (the upstream), 1 worker: a fixed 2,048-byte JSON document
  nginx     nginx as a keep-alive reverse proxy in front of it
  off       meshgate (1 worker), everything off: `metrics: {enabled: false}`,
            no access log, no tracing
  metrics   metrics on (as meshgate ships), no access log
  default   metrics on, and JSON access logs on, to a file
            (`access_log: {path: ...}`)
  trace0    the default, plus tracing on at 0%: what every request that is
            not sampled pays (reading its context, sending one on)
  trace1    the default, plus tracing at 1% (parent-based) to an OTLP/HTTP
            sink (a child process that answers 200 to every export)
  trace100  the same at 100%
and measures, targets interleaved per round (wrk -t1 -c64 -dNs --latency),
the same route on each meshgate. Reports req/s, p50/p99 and the ratio of
each meshgate to `off` (the median of per-round ratios), the CPU each
target's processes spent per request (user + system, all threads, from
/proc: the cost itself, which a shared machine disturbs less than req/s)
and its ratio to `off`, with the spans the sink received. Writes bench/results/observability-*.json.

Usage: python bench/observability.py [--duration 10] [--rounds 3] [--connections 64]
       [--targets off,metrics,...] (a subset: nginx and off always run)
Stdlib only (plus nginx and wrk on PATH).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
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
    run_script,
    wait_http,
)
from compose import DOC, check, run_wrk
from run import proxy_block, start_nginx

MESHGATES = {
    "off": "metrics: {{enabled: false}}\naccess_log: false\n",
    "metrics": "access_log: false\n",
    "default": "access_log: {{path: {log}}}\n",
    "trace0": "access_log: {{path: {log}}}\ntracing: {{endpoint: {otlp}, sample_ratio: 0.0}}\n",
    "trace1": "access_log: {{path: {log}}}\ntracing: {{endpoint: {otlp}, sample_ratio: 0.01}}\n",
    "trace100": "access_log: {{path: {log}}}\ntracing: {{endpoint: {otlp}, sample_ratio: 1.0}}\n",
}
TARGETS = ("direct", "nginx", *MESHGATES)

SINK = """\
import http.server, sys
count = 0
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global count
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        count += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def do_GET(self):
        body = str(count).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def upstream_block(port: int) -> str:
    return f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{
            return 200 '{DOC.decode()}';
        }}
    }}"""


def meshgate_config(port: int, admin: int, upstream: int, extra: str) -> str:
    return f"""\
# Written by bench/observability.py for one benchmark run.
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
workers: 1
limits:
  drain_timeout: 1s
{extra}upstreams:
  up:
    endpoints: [127.0.0.1:{upstream}]
routes:
- path: /api/plain/**
  upstream: up
  strip_prefix: /api/plain
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--meshgate", default=None)
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="a comma-separated subset (nginx and off are always run: the ratios' bases)",
    )
    args = p.parse_args()
    wanted = set(args.targets.split(",")) | {"nginx", "off"}
    unknown = wanted - set(TARGETS)
    if unknown:
        p.error(f"--targets: unknown {sorted(unknown)}; known: {', '.join(TARGETS)}")
    targets = tuple(t for t in TARGETS if t in wanted)
    meshgates = {k: v for k, v in MESHGATES.items() if k in wanted}
    if min(args.duration, args.rounds, args.connections, args.threads) < 1:
        p.error("--duration, --rounds, --connections, --threads must be >= 1")
    cmdline = command_line()
    tools = ensure_tools(["nginx", "wrk"])
    mg = find_meshgate(args.meshgate)
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-obs-"))
    result: dict[str, Any] = {
        "command": cmdline,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_describe(),
        "machine": machine_info(),
        "settings": vars(args),
        "rounds": [],
    }
    paths = {"direct": "/42", "nginx": "/api/customers/42"}
    try:
        with Children() as children:
            ports: dict[str, int] = {}
            procs: dict[str, Child] = {}
            procs["direct"], ports["direct"] = start_nginx(
                children, tools["nginx"], tmp, "direct", upstream_block
            )
            up_port = ports["direct"]
            procs["nginx"], ports["nginx"] = start_nginx(
                children, tools["nginx"], tmp, "nginx", lambda port: proxy_block(port, up_port)
            )
            sink_port = free_port()
            (tmp / "sink.py").write_text(SINK)
            procs["sink"] = children.start(
                "otlp-sink",
                [sys.executable, str(tmp / "sink.py"), str(sink_port)],
                tmp / "sink.log",
                cwd=tmp,
            )
            wait_http(procs["sink"], sink_port, "/", timeout=10)
            result["commands"] = {}
            admins: dict[str, int] = {}
            for name, extra in meshgates.items():
                workdir = tmp / name
                workdir.mkdir()
                port, admin = free_port(), free_port()
                while admin == port:
                    admin = free_port()
                text = extra.format(
                    log=workdir / "access.log", otlp=f"http://127.0.0.1:{sink_port}/v1/traces"
                )
                cfg = workdir / "meshgate.yaml"
                cfg.write_text(meshgate_config(port, admin, up_port, text))
                argv = [*mg, "run", "-c", str(cfg)]
                procs[name] = children.start(name, argv, workdir / "meshgate.log", cwd=workdir)
                wait_http(procs[name], admin, "/readyz", timeout=30)
                ports[name] = port
                admins[name] = admin
                paths[name] = "/api/plain/42"
                result["commands"][name] = {"argv": shlex.join(argv), "config": cfg.read_text()}
            for name in targets:
                check("plain" if name in MESHGATES else name, ports[name], paths[name])
            for name in targets:
                log(f"warm-up {name}")
                run_wrk(tools["wrk"], ports[name], paths[name],
                        argparse.Namespace(**{**vars(args), "duration": args.warmup}))  # fmt: skip
            for rnd in range(1, args.rounds + 1):
                round_res: dict[str, Any] = {}
                for name in targets:
                    for child in procs.values():
                        if not child.alive():
                            raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
                    cpu0 = cpu_seconds(procs[name].pid)
                    res, shown = run_wrk(tools["wrk"], ports[name], paths[name], args)
                    # The CPU the target spent per request (all its processes
                    # and threads): steadier than req/s on a shared machine.
                    res["cpu_us"] = (cpu_seconds(procs[name].pid) - cpu0) / res["requests"] * 1e6
                    result.setdefault("wrk", {})[name] = shlex.join(shown)
                    round_res[name] = res
                    log(
                        f"round {rnd} {name}: {res['rps']:,.0f} req/s p50 {res['p50_ms']:.2f} ms "
                        f"p99 {res['p99_ms']:.2f} ms CPU {res['cpu_us']:.1f} us/req "
                        f"non-2xx {res['non_2xx']}"
                    )
                    time.sleep(args.pause)
                result["rounds"].append(round_res)
            time.sleep(6)  # the exporters' batches go out every 5 s
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/", timeout=5) as resp:
                result["otlp_exports"] = int(resp.read())
            lines = sum(
                1 for name in meshgates if (tmp / name / "access.log").exists() for _ in
                (tmp / name / "access.log").open("rb")
            )  # fmt: skip
            result["access_log_lines"] = lines
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict[str, dict[str, Any]] = {}
    for name in targets:
        runs = [r[name] for r in result["rounds"]]
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "vs_off": statistics.median(r[name]["rps"] / r["off"]["rps"] for r in result["rounds"]),
            "vs_nginx": statistics.median(
                r[name]["rps"] / r["nginx"]["rps"] for r in result["rounds"]
            ),
            "cpu_us": statistics.median(r["cpu_us"] for r in runs),
            "cpu_vs_off": statistics.median(
                r[name]["cpu_us"] / r["off"]["cpu_us"] for r in result["rounds"]
            ),
            "rps_rounds": [r["rps"] for r in runs],
            "errors": sum(r["non_2xx"] + sum(r["socket_errors"].values()) for r in runs),
        }
    result["summary"] = summary
    lines_out = [
        f"`{cmdline}` ({args.rounds} rounds x {args.duration}s, wrk -t{args.threads} "
        f"-c{args.connections}, targets interleaved; ratios are medians of per-round ratios; "
        f"every target serves the same {len(DOC)}-byte JSON document)",
        "",
        "| target | req/s | p50 ms | p99 ms | vs off | vs nginx | CPU us/req | CPU vs off "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        lines_out.append(
            f"| {name} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['vs_off']:.3f} | {s['vs_nginx']:.3f} | {s['cpu_us']:.1f} | "
            f"{s['cpu_vs_off']:.3f} | {s['errors']} |"
        )
    lines_out += [
        "",
        f"OTLP export requests received: {result['otlp_exports']}; "
        f"access log lines written: {result['access_log_lines']:,}",
    ]
    table = "\n".join(lines_out)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"observability-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
