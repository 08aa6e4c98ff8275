#!/usr/bin/env python3
"""meshgate throughput and paced-latency benchmark against nginx.

Starts on loopback, in a temp dir, all as child processes killed at exit:
  direct       nginx returning a fixed 100-byte JSON body (the upstream)
  nginx        nginx as a keep-alive reverse proxy in front of it
  meshgate-1w  `meshgate run` (1 worker), seed-style routes, same upstream
  meshgate-2w  `meshgate run --workers 2`
then measures
  throughput   wrk -t1 -c64 -dNs --latency, targets interleaved per round;
               per round ratio = target req/s / nginx req/s, median over rounds
  paced        hey -z Ns -c 10 -q 100 (1,000 req/s in all): p50/p99 and
               added p99 = meshgate p99 - direct p99
and prints markdown tables, writes bench/results/run-*.json.

Usage: python bench/run.py [--quick] [--duration 10] [--connections 64] [--rounds 3]
Stdlib only (plus nginx, wrk, hey on PATH; installed via apt when run as root).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
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
    ensure_tools,
    find_meshgate,
    free_port,
    git_describe,
    http_get,
    log,
    machine_info,
    run_script,
    start_meshgate,
    wait_http,
)

PATH = "/api/customers/42"
ALL_TARGETS = ("direct", "nginx", "meshgate-1w", "meshgate-2w")
PACED_TARGETS = ("direct", "nginx", "meshgate-1w")
BODY_SIZE = 100


def make_body(size: int = BODY_SIZE) -> bytes:
    """A JSON object of exactly `size` bytes, safe inside an nginx '...' string."""
    doc: dict[str, Any] = {
        "id": 42,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "tier": "gold",
        "pad": "",
    }
    short = len(json.dumps(doc, separators=(",", ":")))
    doc["pad"] = "x" * (size - short)
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == size and b"'" not in body and b"$" not in body and b"\\" not in body
    return body


BODY = make_body()


# ---------------------------------------------------------------- nginx


def nginx_conf(prefix: Path, http_block: str) -> str:
    return f"""\
# Written by bench/run.py for one benchmark run.
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{http_block}
}}
"""


def upstream_block(port: int) -> str:
    return f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{
            return 200 '{BODY.decode()}';
        }}
    }}"""


def proxy_block(port: int, upstream_port: int) -> str:
    return f"""\
    upstream customer_service {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /api/customers/ {{
            proxy_pass http://customer_service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location / {{
            return 404;
        }}
    }}"""


def start_nginx(
    children: Children, nginx: str, workdir: Path, name: str, block_for_port: Any
) -> tuple[Child, int]:
    prefix = workdir / name
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, block_for_port(port)))
    test = subprocess.run(
        [nginx, "-t", "-q", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {conf}:\n{test.stdout}{test.stderr}")
    child = children.start(
        name,
        [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        prefix / "stdout.log",
    )
    wait_http(child, port, PATH, timeout=10.0)
    return child, port


# ---------------------------------------------------------------- parsing

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def wrk_time_ms(text: str) -> float:
    """wrk's `123.45us` / `1.23ms` / `1.00s` / `1.00m` -> milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if m is None:
        raise ValueError(f"unrecognised wrk time {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Pick req/s, latency percentiles and errors out of `wrk --latency` output."""
    res: dict[str, Any] = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if m is None:
        raise ValueError(f"no Requests/sec in wrk output:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if m:
        res["avg_ms"] = wrk_time_ms(m.group(1))
        res["stdev_ms"] = wrk_time_ms(m.group(2))
        res["max_ms"] = wrk_time_ms(m.group(3))
    pct = {p: wrk_time_ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M)}
    if "50" not in pct or "99" not in pct:
        raise ValueError(f"no latency distribution in wrk output (--latency?):\n{out}")
    res["p50_ms"], res["p75_ms"] = pct["50"], pct.get("75")
    res["p90_ms"], res["p99_ms"] = pct.get("90"), pct["99"]
    m = re.search(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out, re.M)
    if m:
        res["requests"] = int(m.group(1))
        res["seconds"] = wrk_time_ms(m.group(2) + m.group(3)) / 1000.0
    m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out, re.M
    )
    res["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
        if m
        else {}
    )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def parse_hey(out: str) -> dict[str, Any]:
    """Pick req/s, latency distribution and status codes out of hey's summary."""
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise ValueError(f"no Requests/sec in hey output:\n{out}")
    res["rps"] = float(m.group(1))
    for key in ("Total", "Slowest", "Fastest", "Average"):
        m = re.search(rf"^\s+{key}:\s+([\d.]+) secs", out, re.M)
        if m:
            res[key.lower() + ("_s" if key == "Total" else "_ms")] = float(m.group(1)) * (
                1.0 if key == "Total" else 1000.0
            )
    pct = {p: float(v) * 1000.0 for p, v in re.findall(r"^\s+(\d+)%+ in ([\d.]+) secs", out, re.M)}
    if "50" not in pct or "99" not in pct:
        raise ValueError(f"no latency distribution in hey output:\n{out}")
    res["percentiles_ms"] = pct
    res["p50_ms"], res["p99_ms"] = pct["50"], pct["99"]
    res["status"] = {
        code: int(n) for code, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", out, re.M)
    }
    err = out.partition("Error distribution:")[2]
    res["errors"] = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]", err, re.M))
    res["requests"] = sum(res["status"].values())
    return res


# ---------------------------------------------------------------- runners


def run_wrk(
    wrk: str, port: int, duration: int, connections: int, threads: int
) -> tuple[dict[str, Any], list[str]]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        f"http://127.0.0.1:{port}{PATH}",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    res = parse_wrk(r.stdout)
    res["raw"] = r.stdout
    return res, argv


def run_hey(
    hey: str, port: int, duration: int, workers: int, per_worker_qps: int
) -> tuple[dict[str, Any], list[str]]:
    argv = [
        hey,
        "-z",
        f"{duration}s",
        "-c",
        str(workers),
        "-q",
        str(per_worker_qps),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    res = parse_hey(r.stdout)
    res["raw"] = r.stdout
    return res, argv


def run_uniform(port: int, rate: int, duration: int) -> tuple[dict[str, Any], list[str]]:
    """bench/paced.py: evenly spaced requests, latency from the scheduled instant."""
    argv = [
        sys.executable,
        str(Path(__file__).with_name("paced.py")),
        f"http://127.0.0.1:{port}{PATH}",
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--json",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if not r.stdout.strip():
        raise RuntimeError(f"paced.py failed:\n{r.stderr}")
    return json.loads(r.stdout), argv


def check_target(name: str, port: int) -> None:
    status, body = http_get(port, PATH, timeout=5.0)
    if status != 200 or body != BODY:
        raise RuntimeError(
            f"{name} on port {port}: GET {PATH} answered {status} with {len(body)} bytes "
            f"{body[:120]!r}; expected 200 and the {len(BODY)}-byte upstream body"
        )


def ensure_alive(children: dict[str, Child]) -> None:
    for name, child in children.items():
        if not child.alive():
            raise RuntimeError(
                f"{name} died (exit {child.proc.returncode}); log {child.log_path}:\n"
                f"{child.log_tail()}"
            )


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{nd}f}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark meshgate (1 and 2 workers) against nginx and the bare upstream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (-c)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every target")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded wrk per target")
    p.add_argument("--pause", type=float, default=1.0, help="seconds of rest between runs")
    p.add_argument("--paced-duration", type=int, default=10, help="seconds per hey run")
    p.add_argument("--paced-workers", type=int, default=10, help="hey -c")
    p.add_argument("--paced-qps", type=int, default=100, help="hey -q, per worker")
    p.add_argument("--no-paced", action="store_true", help="skip the paced latency runs")
    p.add_argument("--uniform-rate", type=int, default=1000, help="bench/paced.py req/s")
    p.add_argument("--uniform-duration", type=int, default=10, help="seconds per paced.py run")
    p.add_argument("--uniform-rounds", type=int, default=3, help="interleaved paced.py rounds")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="comma-separated subset of " + ",".join(ALL_TARGETS),
    )
    p.add_argument("--meshgate", default=None, help="command that runs meshgate (default: venv)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2s per run, 1 round, 1s warm-up, 2s paced runs",
    )
    args = p.parse_args(argv)
    if args.quick:  # new defaults; options given explicitly still win
        p.set_defaults(
            duration=2,
            rounds=1,
            warmup=1,
            paced_duration=2,
            pause=0.2,
            uniform_duration=2,
            uniform_rounds=1,
        )
        args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        p.error(f"unknown target(s) {bad}; choose from {', '.join(ALL_TARGETS)}")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")  # the upstream is always there
    if min(args.duration, args.rounds, args.connections, args.threads, args.paced_duration) < 1:
        p.error("--duration, --rounds, --connections, --threads, --paced-duration must be >= 1")
    return args


def throughput_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| target | req/s (median) | p50 ms | p99 ms | ratio vs nginx | req/s per round | errors |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, s in summary.items():
        per_round = ", ".join(f"{x:,.0f}" for x in s["rps_rounds"])
        lines.append(
            f"| {name} | {fmt(s['rps'], 0)} | {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} | "
            f"{fmt(s.get('ratio_vs_nginx'), 3)} | {per_round} | {s['errors']} |"
        )
    return "\n".join(lines)


def paced_table(paced: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| target | achieved req/s | p50 ms | p99 ms | added p99 vs direct ms | non-200/errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    direct_p99 = paced.get("direct", {}).get("p99_ms")
    for name, r in paced.items():
        added = None if direct_p99 is None or name == "direct" else r["p99_ms"] - direct_p99
        bad = r["requests"] - r["status"].get("200", 0) + r["errors"]
        lines.append(
            f"| {name} | {fmt(r['rps'], 0)} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
            f"{fmt(added)} | {bad} |"
        )
    return "\n".join(lines)


def report(result: dict[str, Any], args: argparse.Namespace, out: Path) -> str:
    """The markdown report printed at the end."""
    m, git = result["machine"], result["git"]
    summary: dict[str, dict[str, Any]] = result["summary"]
    paced: dict[str, dict[str, Any]] = result["paced"]
    lines = [
        f"## meshgate benchmark ({result['started']}, commit {git['commit'][:12]}"
        f"{' dirty' if git['dirty'] else ''}, {m['cpus']} CPUs)",
        "",
        f"Throughput: wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency "
        f"GET {PATH} ({len(BODY)}-byte body), {args.rounds} round(s), targets interleaved; "
        "medians over rounds; ratio = median of per-round (req/s / nginx req/s).",
        "",
        throughput_table(summary),
    ]
    if paced:
        total = args.paced_workers * args.paced_qps
        lines += [
            "",
            f"Paced latency: hey -z {args.paced_duration}s -c {args.paced_workers} "
            f"-q {args.paced_qps} ({total:,} req/s in all); hey reports latency in 0.1 ms steps.",
            "",
            paced_table(paced),
            "",
        ]
        for name in ("meshgate-1w", "nginx"):
            if name in paced and "direct" in paced:
                lines.append(
                    f"added p99 ({name}) = {name} p99 - direct p99 = "
                    f"{paced[name]['p99_ms']:.2f} - {paced['direct']['p99_ms']:.2f} = "
                    f"{paced[name]['added_p99_ms']:.2f} ms"
                )
    uniform: dict[str, dict[str, Any]] = result.get("uniform", {})
    if uniform:
        lines += [
            "",
            f"Paced latency, evenly spaced: bench/paced.py at {args.uniform_rate:,} req/s for "
            f"{args.uniform_duration}s, {args.uniform_rounds} interleaved round(s); latency from "
            "each request's scheduled instant (no coordinated omission); medians over rounds.",
            "",
            "| target | p50 ms | p99 ms | added p99 vs direct ms | p99 per round | errors |",
            "|---|---:|---:|---:|---|---:|",
        ]
        base = uniform.get("direct", {}).get("p99_ms")
        for name, u in uniform.items():
            added = None if base is None or name == "direct" else u["p99_ms"] - base
            rounds = ", ".join(f"{x:.2f}" for x in u["p99_rounds"])
            lines.append(
                f"| {name} | {fmt(u['p50_ms'])} | {fmt(u['p99_ms'])} | {fmt(added)} | "
                f"{rounds} | {u['errors']} |"
            )
    errors = sum(s["errors"] for s in summary.values())
    if errors:
        lines += ["", f"WARNING: {errors} socket errors / non-2xx responses in wrk runs; see JSON."]
    lines += ["", f"results: {out}", f"command: {result['command']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmdline = command_line()
    log(f"command: {cmdline}")
    tools = ensure_tools(["nginx", "wrk", "hey"])
    meshgate_cmd = (
        find_meshgate(args.meshgate) if any(t.startswith("meshgate") for t in args.targets) else []
    )
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "command": cmdline,
        "started": started.isoformat(timespec="seconds"),
        "git": git_describe(),
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",) and not callable(v)},
        "path": PATH,
        "body_bytes": len(BODY),
        "commands": {},
        "rounds": [],
    }
    result["settings"]["out"] = str(args.out) if args.out else None

    tmp = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
    log(f"temp dir: {tmp}")
    try:
        with Children() as children:
            procs: dict[str, Child] = {}
            ports: dict[str, int] = {}
            up, up_port = start_nginx(children, tools["nginx"], tmp, "direct", upstream_block)
            procs["direct"], ports["direct"] = up, up_port
            if "nginx" in args.targets:
                procs["nginx"], ports["nginx"] = start_nginx(
                    children,
                    tools["nginx"],
                    tmp,
                    "nginx",
                    lambda port: proxy_block(port, up_port),
                )
            for name, workers in (("meshgate-1w", 1), ("meshgate-2w", 2)):
                if name in args.targets:
                    child, port, mg_argv = start_meshgate(
                        children, meshgate_cmd, tmp, name, up_port, workers
                    )
                    procs[name], ports[name] = child, port
                    result["commands"][name] = shlex.join(mg_argv)
            for name in args.targets:
                check_target(name, ports[name])
            log("all targets answer GET " + PATH + f" with the {len(BODY)}-byte body")

            if args.warmup > 0:
                for name in args.targets:
                    log(f"warm-up {name} ({args.warmup}s)")
                    run_wrk(tools["wrk"], ports[name], args.warmup, args.connections, args.threads)
                    time.sleep(args.pause)

            for rnd in range(1, args.rounds + 1):
                round_res: dict[str, Any] = {}
                for name in args.targets:
                    ensure_alive(procs)
                    log(f"round {rnd}/{args.rounds}: wrk {name} ({args.duration}s)")
                    res, wrk_argv = run_wrk(
                        tools["wrk"], ports[name], args.duration, args.connections, args.threads
                    )
                    result["commands"][f"wrk {name}"] = shlex.join(wrk_argv)
                    round_res[name] = res
                    log(
                        f"  {name}: {res['rps']:,.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                        f"p99 {res['p99_ms']:.2f} ms"
                    )
                    time.sleep(args.pause)
                if "nginx" in round_res:
                    base = round_res["nginx"]["rps"]
                    for res in round_res.values():
                        res["ratio_vs_nginx"] = res["rps"] / base if base else None
                result["rounds"].append(round_res)
            ensure_alive(procs)

            summary: dict[str, dict[str, Any]] = {}
            for name in args.targets:
                runs = [r[name] for r in result["rounds"]]
                ratios = [r["ratio_vs_nginx"] for r in runs if r.get("ratio_vs_nginx")]
                summary[name] = {
                    "rps": median([r["rps"] for r in runs]),
                    "p50_ms": median([r["p50_ms"] for r in runs]),
                    "p99_ms": median([r["p99_ms"] for r in runs]),
                    "ratio_vs_nginx": median(ratios) if ratios else None,
                    "ratio_rounds": ratios,
                    "rps_rounds": [r["rps"] for r in runs],
                    "errors": sum(r["non_2xx"] + sum(r["socket_errors"].values()) for r in runs),
                }
            result["summary"] = summary

            paced: dict[str, dict[str, Any]] = {}
            if not args.no_paced:
                total = args.paced_workers * args.paced_qps
                for name in (t for t in PACED_TARGETS if t in args.targets):
                    ensure_alive(procs)
                    log(f"paced {name}: hey {total} req/s for {args.paced_duration}s")
                    res, hey_argv = run_hey(
                        tools["hey"],
                        ports[name],
                        args.paced_duration,
                        args.paced_workers,
                        args.paced_qps,
                    )
                    result["commands"][f"hey {name}"] = shlex.join(hey_argv)
                    paced[name] = res
                    log(
                        f"  {name}: {res['rps']:,.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                        f"p99 {res['p99_ms']:.2f} ms"
                    )
                    time.sleep(args.pause)
                ensure_alive(procs)
                if "direct" in paced:
                    for res in paced.values():
                        res["added_p99_ms"] = res["p99_ms"] - paced["direct"]["p99_ms"]
                uniform_runs: dict[str, list[dict[str, Any]]] = {}
                names = [t for t in PACED_TARGETS if t in args.targets]
                for rnd in range(args.uniform_rounds):
                    for name in names:
                        ensure_alive(procs)
                        log(
                            f"uniform round {rnd + 1}/{args.uniform_rounds} {name}: "
                            f"{args.uniform_rate} req/s for {args.uniform_duration}s"
                        )
                        res, argv = run_uniform(
                            ports[name], args.uniform_rate, args.uniform_duration
                        )
                        result["commands"][f"paced.py {name}"] = shlex.join(argv)
                        uniform_runs.setdefault(name, []).append(res)
                        log(f"  {name}: p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms")
                        time.sleep(args.pause)
                result["uniform"] = {
                    name: {
                        "p50_ms": median([r["p50_ms"] for r in runs]),
                        "p99_ms": median([r["p99_ms"] for r in runs]),
                        "p99_rounds": [r["p99_ms"] for r in runs],
                        "errors": sum(r["errors"] for r in runs),
                        "runs": runs,
                    }
                    for name, runs in uniform_runs.items()
                }
            result["paced"] = paced
    finally:
        if args.keep_tmp:
            log(f"kept temp dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = args.out or RESULTS_DIR / f"run-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(report(result, args, out))
    return 0


if __name__ == "__main__":
    run_script(main)
