"""`meshgate demo`: the seed's topology on one machine.

Sample `order-service` (two instances) and `customer-service` backends run
on loopback, and the gateway serves the seed's config (`seed.yaml`, next to
this file) on :8080. The demo then sends a few requests itself, prints them
as curl commands with what came back, and serves until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from importlib import resources

import orjson

from meshgate.config.describe import describe
from meshgate.config.loader import load_config
from meshgate.server.worker import Worker, WorkerOptions

log = logging.getLogger("meshgate.demo")

BACKENDS = (("order-service", 9001), ("customer-service", 9002), ("order-service", 9003))


async def _serve_backend(
    name: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A small keep-alive HTTP/1.1 service that answers JSON about the request."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            body = orjson.dumps(
                {
                    "service": name,
                    "instance": f"127.0.0.1:{port}",
                    "method": method,
                    "path": target,
                    "seen_headers": {
                        k: headers[k]
                        for k in ("host", "x-forwarded-for", "x-request-id", "via")
                        if k in headers
                    },
                }
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return f"{resp.status} {resp.read().decode()}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.read().decode()}"
    except OSError as exc:
        return f"failed: {exc}"


async def _show(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    for path in ("/api/orders/7", "/api/orders/8", "/api/customers/42", "/nowhere"):
        url = base + path
        result = await asyncio.to_thread(_fetch, url)
        status, _, body = result.partition(" ")
        try:
            shown = json.dumps(json.loads(body), indent=None)
        except ValueError:
            shown = body
        print(f"$ curl -s {url}\n  -> {status} {shown}\n", flush=True)


async def _demo(port: int) -> int:
    cfg_path = str(resources.files("meshgate.demo").joinpath("seed.yaml"))
    config = load_config(cfg_path)
    servers = []
    for name, bport in BACKENDS:

        async def handler(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, n: str = name, p: int = bport
        ) -> None:
            await _serve_backend(n, p, r, w)

        servers.append(await asyncio.start_server(handler, "127.0.0.1", bport))
    worker = Worker(config, WorkerOptions(config_path=cfg_path, watch=False, listen_port=port))
    await worker.start()
    print(
        f"\nmeshgate demo: the gateway listens on :{port} with the seed's config ({cfg_path}).\n"
        "order-service runs on 127.0.0.1:9001 and :9003 (least_request), customer-service on "
        ":9002.\nRequests the demo just sent, as curl commands:\n",
        flush=True,
    )
    await _show(port)
    for line in describe(config)[1:]:
        print(f"note: {line}", flush=True)
    print(
        "\nAlso try:\n"
        f"  curl -si http://127.0.0.1:{port}/api/customers/42?verbose=1\n"
        "  curl -s http://127.0.0.1:9901/readyz      # admin listener\n"
        "  curl -s http://127.0.0.1:9901/upstreams   # pools and balancer state\n"
        "  meshgate explain -c examples/seed.yaml GET /api/orders/7\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )
    await worker.wait_and_drain()
    for server in servers:
        server.close()
    return 0


def run_demo(port: int = 8080) -> int:
    import uvloop

    return uvloop.run(_demo(port))
