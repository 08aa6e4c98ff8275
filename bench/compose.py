#!/usr/bin/env python3
"""The cost of composition (aggregate:, transform:) against a plain route, side by side.

Starts on loopback, in a temp dir, all as child processes killed at exit:
  direct      nginx (the upstream), 1 worker, default_type application/json:
                /orders/*     a small order JSON (return 200 '...')
                /customers/*  a small customer JSON
                /  (any other path)  a fixed 2,048-byte JSON order document
                              (20 line items; built deterministically below)
  nginx       nginx as a keep-alive reverse proxy in front of it (run.py's
              proxy_block: /api/customers/** -> the 2 KB document)
  meshgate    `meshgate run` (1 worker) with three routes to the same upstream:
                /api/plain/**      strip_prefix /api/plain -> the 2 KB document
                /api/summary/{id}  aggregate: /orders/{id} (group order) and
                                   /customers/{id} (group customer),
                                   independent, so called concurrently
                /api/mapped/**     the plain route plus a transform: response
                                   body mapping (rename, a wildcard rename over
                                   the 20 items, move, deny, defaults) of the
                                   same 2 KB document
and measures, targets interleaved per round (wrk -t1 -c64 -dNs --latency):
  direct, nginx, plain, aggregate, transform
after checking each target once (200; the exact document for direct, nginx
and plain; both groups for aggregate; the mapped fields for transform).
Reports req/s, p50/p99, and the ratios to the plain meshgate route and to
nginx (median of the per-round ratios). Writes bench/results/compose-*.json.

Usage: python bench/compose.py [--duration 10] [--rounds 3] [--connections 64]
Stdlib only (plus nginx and wrk on PATH).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
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
    log,
    machine_info,
    run_script,
    wait_http,
)
from run import parse_wrk, proxy_block, start_nginx

DOC_SIZE = 2048

TARGETS = {
    # name: path (on the port of the server of that name)
    "direct": "/42",
    "nginx": "/api/customers/42",
    "plain": "/api/plain/42",
    "aggregate": "/api/summary/42",
    "transform": "/api/mapped/42",
}
MESHGATE_TARGETS = ("plain", "aggregate", "transform")


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _nginx_safe(body: bytes) -> bytes:
    """A body that can sit inside an nginx '...' string as is."""
    assert b"'" not in body and b"$" not in body and b"\\" not in body
    return body


def make_document(size: int = DOC_SIZE) -> bytes:
    """An order with 20 line items, exactly `size` bytes of compact JSON.

    Deterministic (no clock, no randomness), and valid for `BODY_MAP`: it has
    /status, /customer/id, /internal and /items/*/qty, and no /currency.
    """
    items = [
        {
            "line": i + 1,
            "sku": f"SKU-{1000 + i * 7}",
            "name": f"Item {i + 1}",
            "qty": 1 + i % 4,
            "unit_price": f"{5 + (i * 37) % 90}.{(i * 13) % 100:02d}",
        }
        for i in range(20)
    ]
    doc: dict[str, Any] = {
        "id": 42,
        "status": "paid",
        "created": "2026-01-15T10:30:00Z",
        "customer": {"id": 7, "name": "Ada Lovelace", "email": "ada@example.com"},
        "items": items,
        "total": "1234.50",
        "note": "",
        "internal": {"warehouse": "W-3", "picker": 11},
    }
    short = len(_compact(doc))
    if short > size:
        raise ValueError(f"the document is {short} bytes before padding, over {size}")
    doc["note"] = "x" * (size - short)  # padding; kept by the mapping (deny hits /internal)
    body = _compact(doc)
    assert len(body) == size
    return _nginx_safe(body)


DOC = make_document()
ORDER = _nginx_safe(_compact({"id": 42, "status": "paid", "customer_id": 7, "total": "1234.50"}))
CUSTOMER = _nginx_safe(_compact({"id": 7, "name": "Ada Lovelace", "tier": "gold"}))

# The transform route's response body mapping (BodyMap), as YAML flow text.
BODY_MAP = (
    "{rename: {/status: state, /items/*/qty: quantity}, "
    "move: {/customer/id: /customer_id}, deny: [/internal], defaults: {/currency: EUR}}"
)


def expected_mapped() -> dict[str, Any]:
    """What the transform route should answer, computed here from DOC by hand
    (rules in jsonmap's order: deny, rename, move, defaults)."""
    doc: dict[str, Any] = json.loads(DOC)
    del doc["internal"]
    doc["state"] = doc.pop("status")
    for item in doc["items"]:
        item["quantity"] = item.pop("qty")
    doc["customer_id"] = doc["customer"].pop("id")
    doc.setdefault("currency", "EUR")
    return doc


def upstream_block(port: int) -> str:
    return f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location /orders/ {{
            return 200 '{ORDER.decode()}';
        }}
        location /customers/ {{
            return 200 '{CUSTOMER.decode()}';
        }}
        location / {{
            return 200 '{DOC.decode()}';
        }}
    }}"""


def meshgate_config(port: int, admin: int, upstream: int) -> str:
    return f"""\
# Written by bench/compose.py for one benchmark run.
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
workers: 1
access_log: false
limits:
  drain_timeout: 1s
upstreams:
  up:
    endpoints: [127.0.0.1:{upstream}]
routes:
- path: /api/plain/**
  upstream: up
  strip_prefix: /api/plain
- path: /api/summary/{{id}}
  aggregate:
    timeout: 2s
    backends:
    - {{upstream: up, path: "/orders/{{id}}", group: order}}
    - {{upstream: up, path: "/customers/{{id}}", group: customer}}
- path: /api/mapped/**
  upstream: up
  strip_prefix: /api/mapped
  transform:
    response:
      body: {BODY_MAP}
"""


def run_wrk(
    wrk: str, port: int, path: str, args: argparse.Namespace
) -> tuple[dict[str, Any], list[str]]:
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.duration + 60, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk exited {r.returncode}:\n{r.stdout}{r.stderr}")
    res = parse_wrk(r.stdout)
    res["raw"] = r.stdout
    return res, argv


def fetch(port: int, path: str) -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def check(name: str, port: int, path: str) -> None:
    """One request: 200 and the answer this target should give."""
    try:
        status, ctype, body = fetch(port, path)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{name}: GET {path} answered {e.code}: {e.read()[:300]!r}") from None
    where = f"{name}: GET {path}"
    if status != 200:
        raise RuntimeError(f"{where} answered {status}")
    if name in ("direct", "nginx", "plain"):
        if body != DOC:
            raise RuntimeError(
                f"{where}: {len(body)} bytes {body[:120]!r}, expected the {len(DOC)}-byte document"
            )
        log(f"checked {name}: the {len(body)}-byte document")
        return
    if "json" not in ctype:
        raise RuntimeError(f"{where}: Content-Type {ctype!r}, expected JSON")
    got = json.loads(body)
    if name == "aggregate":
        want = {"order": json.loads(ORDER), "customer": json.loads(CUSTOMER)}
        if got != want:
            raise RuntimeError(f"{where}: {got!r}, expected {want!r}")
    elif name == "transform":
        want = expected_mapped()
        if got != want:
            missing = {k for k in ("state", "customer_id", "currency") if k not in got}
            raise RuntimeError(
                f"{where}: the mapped document differs from the expected one "
                f"(missing {sorted(missing)}; internal present: {'internal' in got}):\n{got!r}"
            )
    log(f"checked {name}: {len(body)} bytes")


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
    if min(args.duration, args.rounds, args.connections, args.threads) < 1:
        p.error("--duration, --rounds, --connections, --threads must be >= 1")
    cmdline = command_line()
    tools = ensure_tools(["nginx", "wrk"])
    mg = find_meshgate(args.meshgate)
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-compose-"))
    result: dict[str, Any] = {
        "command": cmdline,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_describe(),
        "machine": machine_info(),
        "settings": vars(args),
        "document": {"bytes": len(DOC), "body_map": BODY_MAP},
        "rounds": [],
    }
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
            workdir = tmp / "meshgate"
            workdir.mkdir()
            port, admin = free_port(), free_port()
            while admin == port:
                admin = free_port()
            cfg = workdir / "meshgate.yaml"
            cfg.write_text(meshgate_config(port, admin, up_port))
            argv = [*mg, "run", "-c", str(cfg)]
            procs["meshgate"] = children.start(
                "meshgate", argv, workdir / "meshgate.log", cwd=workdir
            )
            wait_http(procs["meshgate"], admin, "/readyz", timeout=30)
            for name in MESHGATE_TARGETS:
                ports[name] = port
            result["commands"] = {"meshgate": shlex.join(argv), "config": cfg.read_text()}
            for name, path in TARGETS.items():
                check(name, ports[name], path)
            for name, path in TARGETS.items():
                log(f"warm-up {name}")
                run_wrk(tools["wrk"], ports[name], path,
                        argparse.Namespace(**{**vars(args), "duration": args.warmup}))  # fmt: skip
            for rnd in range(1, args.rounds + 1):
                round_res: dict[str, Any] = {}
                for name, path in TARGETS.items():
                    for child in procs.values():
                        if not child.alive():
                            raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
                    res, shown = run_wrk(tools["wrk"], ports[name], path, args)
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
                r[name]["rps"] / r["plain"]["rps"] for r in result["rounds"]
            ),
            "vs_nginx": statistics.median(
                r[name]["rps"] / r["nginx"]["rps"] for r in result["rounds"]
            ),
            "rps_rounds": [r["rps"] for r in runs],
            "errors": sum(r["non_2xx"] + sum(r["socket_errors"].values()) for r in runs),
        }
    result["summary"] = summary
    lines = [
        f"`{cmdline}` ({args.rounds} rounds x {args.duration}s, wrk -t{args.threads} "
        f"-c{args.connections}, targets interleaved; ratios are medians of per-round ratios; "
        f"plain and transform serve a {len(DOC)}-byte JSON document, aggregate joins two "
        f"small JSON documents fetched concurrently)",
        "",
        "| target | req/s | p50 ms | p99 ms | vs meshgate plain | vs nginx | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['vs_plain']:.3f} | {s['vs_nginx']:.3f} | {s['errors']} |"
        )
    lines += [
        "",
        f"aggregate / plain = {summary['aggregate']['vs_plain']:.3f}, "
        f"transform / plain = {summary['transform']['vs_plain']:.3f} (req/s, median of rounds)",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"compose-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
