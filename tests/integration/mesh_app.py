"""A tiny app for the mesh tests: stdlib only, knows nothing of the mesh.

    python3 mesh_app.py NAME PORT [--bind ADDR] [--call PREFIX=URL ...]

Every request is answered 200 with JSON: `service` (NAME), `path` (the
request target), `xfcc` (the X-Forwarded-Client-Cert header it got, or
null) and `calls`. A request whose path starts with PREFIX first calls each
URL given for that prefix (in order, GET, with urllib, no proxy), the
request's query string appended, and puts their JSON answers in `calls`;
a failed call makes the answer 502. Each request is also printed as one
JSON line on stdout (flushed), for the test to read back.

It runs with the system's python3 under another uid (uid 65534 cannot read
the venv), so it must stay stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("port", type=int)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--call", action="append", default=[], metavar="PREFIX=URL")
    args = parser.parse_args()
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
            print(json.dumps({"service": name, "path": path, "xfcc": xfcc}), flush=True)
            doc: dict[str, Any] = {"service": name, "path": path, "xfcc": xfcc, "calls": []}
            status = 200
            for prefix, url in calls:
                if not path.startswith(prefix):
                    continue
                target = f"{url}?{query}" if query else url
                try:
                    with _OPENER.open(target, timeout=20) as resp:
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
