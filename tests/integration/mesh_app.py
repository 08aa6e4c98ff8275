"""A tiny app for the mesh tests: stdlib only, knows nothing of the mesh.

    python3 mesh_app.py NAME PORT [--bind ADDR] [--call PREFIX=URL ...]
                        [--fail-first PREFIX ...]

Every request is answered 200 with JSON: `service` (NAME), `path` (the
request target), `xfcc` (the X-Forwarded-Client-Cert header it got, or
null), `trace` (the trace context headers it got) and `calls`. A request
whose path starts with PREFIX first calls each URL given for that prefix
(in order, GET, with urllib, no proxy), the request's query string
appended, and puts their JSON answers in `calls`; a failed call makes the
answer 502. The calls carry the request's trace context headers on, as
every app in a mesh must for its calls to join the caller's trace. With
`--fail-first PREFIX`, the first request for each path that starts with
PREFIX is answered 503 (a retry then succeeds). Each request is also
printed as one JSON line on stdout (flushed), for the test to read back.

It runs with the system's python3 under another uid (uid 65534 cannot read
the venv), so it must stay stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# What an app passes on from the request it serves to the calls it makes.
TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("port", type=int)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--call", action="append", default=[], metavar="PREFIX=URL")
    parser.add_argument("--fail-first", action="append", default=[], metavar="PREFIX")
    args = parser.parse_args()
    failing: list[str] = args.fail_first
    failed: set[str] = set()
    lock = threading.Lock()
    calls: list[tuple[str, str]] = []
    for spec in args.call:
        prefix, _, url = spec.partition("=")
        calls.append((prefix, url))
    name: str = args.name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path
            query = path.partition("?")[2]
            xfcc = self.headers.get("x-forwarded-client-cert")
            trace = {h: self.headers[h] for h in TRACE_HEADERS if self.headers.get(h)}
            with lock:
                fail = any(path.startswith(p) for p in failing) and path not in failed
                failed.add(path)
            line = {"service": name, "path": path, "xfcc": xfcc, "trace": trace}
            print(json.dumps({**line, "status": 503 if fail else None}), flush=True)
            if fail:
                body = b'{"error": "failing once"}'
                self.send_response(503)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            doc: dict[str, Any] = {**line, "calls": []}
            status = 200
            for prefix, url in calls:
                if not path.startswith(prefix):
                    continue
                target = f"{url}?{query}" if query else url
                try:
                    call = urllib.request.Request(target, headers=trace)
                    with _OPENER.open(call, timeout=20) as resp:
                        doc["calls"].append(json.loads(resp.read()))
                except Exception as exc:
                    status = 502
                    doc["calls"].append({"url": target, "error": repr(exc)})
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.daemon_threads = True
    print(f"{name} listening on {args.bind}:{args.port}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
