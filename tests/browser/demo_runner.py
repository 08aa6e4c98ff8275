"""The demo's mesh (`meshgate.demo.mesh.MeshDemo`) in a process of its own,
for the dashboard's browser test, with a canary added:

    python demo_runner.py

order-service's mesh route splits 90/10 with order-service-v2, and the
gateway's /shop/** route, named like that mesh route, applies it (the
gateway is order-service's only caller). The demo's own routes and hops
are unchanged. The apps are small echo servers.

It prints one JSON line once the mesh is up (`admin`: the control plane's
admin port, `gateway`, `orders`: order-service's port for
customer-service), then reads commands on stdin, one a line, each
answered `ok` or `error: ...`: `stop SERVICE` stops the sidecar of a
service's only instance, `start SERVICE` starts it again, `quit` (or the
end of stdin) stops everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

import meshgate.demo.mesh as mesh
from meshgate.mesh.sidecar.proxy import Sidecar

CANARY_SERVICE = """\
  order-service:
    calls: [customer-service]
    routes:
    - path: /**
      split: [{{upstream: order-service, weight: 90}}, {{upstream: order-service-v2, weight: 10}}]
"""
CANARY_ROUTE = """\
routes:
- {{name: order-service/0, path: /shop/**, strip_prefix: true, split: [{{upstream: order-service, \
weight: 90}}, {{upstream: order-service-v2, weight: 10}}]}}
"""
APPS = ("order-service", "order-service-v2", "customer-service")


def patch() -> None:
    service = "  order-service:\n    calls: [customer-service]\n"
    assert service in mesh.MESH_YAML
    mesh.MESH_YAML = mesh.MESH_YAML.replace(service, CANARY_SERVICE, 1)
    assert "routes:\n" in mesh.GATEWAY_YAML and "upstreams:\n" in mesh.GATEWAY_YAML
    gateway = mesh.GATEWAY_YAML.replace("routes:\n", CANARY_ROUTE, 1)
    mesh.GATEWAY_YAML = gateway.replace(
        "upstreams:\n", "upstreams:\n  order-service-v2: {{service: order-service-v2}}\n", 1
    )


async def app(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive HTTP/1.1 app that answers 200 with its name."""
    body = json.dumps({"service": name}).encode()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> int:
    patch()
    servers = []
    instances = []
    for name in APPS:

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: str = name) -> None:
            await app(n, r, w)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        instances.append((name, int(server.sockets[0].getsockname()[1])))
    demo = mesh.MeshDemo(instances, port=0)
    await demo.start()
    assert demo.cp is not None
    print(
        json.dumps(
            {
                "admin": demo.cp.admin_port,
                "gateway": demo.gateway_port,
                "orders": demo._orders().ports["port:customer-service"],
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stopped: dict[str, Sidecar] = {}
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            verb, _, service = line.strip().partition(" ")
            try:
                if verb == "quit":
                    break
                if verb == "stop":
                    sidecar = next(s for s in demo.sidecars if s.opts.service == service)
                    await sidecar.stop()
                    demo.sidecars.remove(sidecar)
                    stopped[service] = sidecar
                elif verb == "start":
                    old = stopped.pop(service)
                    token = demo.cp.store.create_token(service, ttl=3600)
                    new = Sidecar(dataclasses.replace(old.opts, token=token))
                    await new.start()
                    demo.sidecars.append(new)
                else:
                    raise ValueError(f"unknown command {verb!r}")
                print("ok", flush=True)
            except Exception as exc:
                print(f"error: {exc!r}", flush=True)
    finally:
        await demo.close()
        for server in servers:
            server.close()
    return 0


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main()))
