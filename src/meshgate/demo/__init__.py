"""`meshgate demo`: the seed's topology on one machine.

Sample `order-service` (two instances), `order-service-v2` (its canary) and
`customer-service` backends run on loopback, with a small identity provider
on :7000 that serves a JWKS (a fresh RSA key each run) and signs tokens for
the demo. The gateway serves the seed's config (`seed.yaml`, next to this
file) on :8080, where `/api/orders/**` splits traffic 90/10 between
order-service and order-service-v2. The demo then sends a few requests
itself (no credentials, a JWT, an API key, past a rate limit, 200 requests
over the split and one canary), prints them as curl commands with what came
back, and serves until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import urllib.error
import urllib.request
from importlib import resources

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa

from meshgate.config.describe import describe
from meshgate.engine.load import load_config
from meshgate.server.worker import Worker, WorkerOptions

log = logging.getLogger("meshgate.demo")

BACKENDS = (
    ("order-service", 9001),
    ("customer-service", 9002),
    ("order-service", 9003),
    ("order-service-v2", 9004),
)
IDP_PORT = 7000
# The split demo: requests from this many users, this many each (each user
# has its own token, and the route's 100/min limit counts per user).
SPLIT_USERS = 20
SPLIT_PER_USER = 10
_ORDER_SERVICES = frozenset({"order-service", "order-service-v2"})
ISSUER = "https://id.example.com"
DEMO_API_KEY = "demo-key-acme"


class DemoIdp:
    """An identity provider for the demo: one RSA key, its JWKS, and tokens."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = f"demo-{int(time.time())}"
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        self.jwks = orjson.dumps({"keys": [jwk]})

    def token(self, subject: str = "acme-mobile", ttl: int = 3600) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": "orders",
            "sub": subject,
            "scope": "orders:read",
            "iat": now,
            "exp": now + ttl,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path == b"/.well-known/jwks.json":
                body, status = self.jwks, b"200 OK"
            else:
                body, status = b'{"error":"not found"}', b"404 Not Found"
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            pass
        finally:
            writer.close()


# The demo's data: orders as order-service (v1 shape) and order-service-v2
# (v2 shape) store them, and customers.
_ORDERS = {
    "7": {"customer_id": "c-42", "total": 12.5, "status": "paid"},
    "8": {"customer_id": "c-7", "total": 99.0, "status": "shipped"},
}
_CUSTOMERS = {
    "c-42": {"id": "c-42", "name": "Ada Lovelace", "tier": "gold"},
    "c-7": {"id": "c-7", "name": "Grace Hopper", "tier": "silver"},
}


def _domain(name: str, method: str, target: str, sent: bytes) -> tuple[int, bytes] | None:
    """Answers about orders and customers, or None (the echo answers)."""
    path = target.split("?", 1)[0]
    parts = path.strip("/").split("/")
    if name == "order-service" and len(parts) == 2 and parts[0] == "orders":
        order = _ORDERS.get(parts[1])
        if order is None:
            return 404, orjson.dumps({"error": "no such order"})
        return 200, orjson.dumps({"id": int(parts[1]), **order})
    if name == "customer-service" and len(parts) == 2 and parts[0] == "customers":
        customer = _CUSTOMERS.get(parts[1])
        if customer is None:
            return 404, orjson.dumps({"error": "no such customer"})
        return 200, orjson.dumps(customer)
    if name == "order-service-v2" and len(parts) == 3 and parts[:2] == ["v2", "orders"]:
        if method in ("POST", "PUT"):
            # Echo what was stored, in v2's shape, as a v2 service would.
            try:
                doc = orjson.loads(sent)
            except orjson.JSONDecodeError:
                return 400, orjson.dumps({"error": "not JSON"})
            return 200, orjson.dumps({"id": int(parts[2]) if parts[2].isdigit() else 0, **doc})
        order = _ORDERS.get(parts[2])
        if order is None:
            return 404, orjson.dumps({"error": "no such order"})
        return 200, orjson.dumps(
            {
                "id": int(parts[2]),
                "customer": {"id": order["customer_id"]},
                "amount": {"value": order["total"], "currency": "EUR"},
                "state": order["status"],
                "api_version": 2,
            }
        )
    return None


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
            sent = await reader.readexactly(length) if length else b""
            data = _domain(name, method, target, sent)
            if data is not None:
                status, body = data
                writer.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s"
                    % (status, b"OK" if status == 200 else b"Not Found", len(body), body)
                )
                await writer.drain()
                continue
            body = orjson.dumps(
                {
                    "service": name,
                    "instance": f"127.0.0.1:{port}",
                    "method": method,
                    "path": target,
                    "seen_headers": {
                        k: headers[k]
                        for k in (
                            "host",
                            "x-forwarded-for",
                            "x-request-id",
                            "via",
                            "x-consumer",
                            "x-forwarded-client-cert",
                        )
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


def _fetch(
    url: str, headers: dict[str, str], data: bytes | None = None
) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers=headers, data=data)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers.items()), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read().decode()
    except OSError as exc:
        return 0, {}, f"failed: {exc}"


_SHOWN_HEADERS = (
    "WWW-Authenticate",
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "Meshgate-Partial",
    "Deprecation",
    "Sunset",
)


async def _request(
    base: str,
    path: str,
    headers: dict[str, str],
    shown: dict[str, str],
    *,
    quiet: bool = False,
    data: bytes | None = None,
) -> int:
    status, got, body = await asyncio.to_thread(_fetch, base + path, headers, data)
    if quiet:
        return status
    flags = "".join(f' -H "{k}: {v}"' for k, v in shown.items())
    if data is not None:
        flags += f" -d '{data.decode()}'"
    try:
        text = json.dumps(json.loads(body), indent=None)
    except ValueError:
        text = body
    print(f"$ curl -s{flags} {base}{path}\n  -> {status}", flush=True)
    lowered = {k.lower(): v for k, v in got.items()}
    for name in _SHOWN_HEADERS:
        if name.lower() in lowered:
            print(f"     {name}: {lowered[name.lower()]}", flush=True)
    print(f"     {text}\n", flush=True)
    return status


async def _show(port: int, idp: DemoIdp, admin_port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    token = idp.token()
    print(f"A token the demo's identity provider signed (RS256, valid 1 h):\n\nTOKEN={token}\n")
    bearer = {"Authorization": f"Bearer {token}"}
    shown_bearer = {"Authorization": "Bearer $TOKEN"}
    key = {"X-API-Key": DEMO_API_KEY}
    await _request(base, "/api/orders/7", {}, {})
    await _request(base, "/api/orders/7", bearer, shown_bearer)
    await _request(
        base,
        "/api/orders/8",
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Bearer not-a-token"},
    )
    await _request(base, "/api/customers/42", {}, {})
    await _request(base, "/api/partners/1", key, key)
    print("(four more with the same key, then the fifth past the 5/min limit)\n", flush=True)
    for _ in range(4):
        await _request(base, "/api/partners/1", key, key, quiet=True)
    await _request(base, "/api/partners/1", key, key)
    await _request(base, "/nowhere", {}, {})
    await _show_split(base, idp, bearer, shown_bearer, admin_port)
    await _show_composition(base)


async def _show_composition(base: str) -> None:
    print(
        "Aggregation: /api/order-summary/{id} calls order-service, then customer-service "
        "with the order's customer_id (optional, 500 ms).\n",
        flush=True,
    )
    await _request(base, "/api/order-summary/7", {}, {})
    print(
        "Version mediation: /v1/orders/** is served by order-service-v2; the gateway maps "
        "v1 bodies to v2 and back.\n",
        flush=True,
    )
    await _request(base, "/v1/orders/7", {}, {})
    json_type = {"Content-Type": "application/json"}
    await _request(
        base,
        "/v1/orders/9",
        json_type,
        json_type,
        data=b'{"customer_id": "c-7", "total": 20.0, "status": "new"}',
    )


def _services(url: str, tokens: list[str], per_token: int) -> dict[str, int]:
    """How many of the requests each service answered (and failures by status)."""
    seen: dict[str, int] = {}
    for _ in range(per_token):
        for token in tokens:
            status, _, body = _fetch(url, {"Authorization": f"Bearer {token}"})
            try:
                service = str(json.loads(body)["service"]) if status == 200 else f"HTTP {status}"
            except (ValueError, KeyError, TypeError):
                service = f"HTTP {status}"
            seen[service] = seen.get(service, 0) + 1
    return seen


async def _show_split(
    base: str,
    idp: DemoIdp,
    bearer: dict[str, str],
    shown_bearer: dict[str, str],
    admin_port: int,
) -> None:
    total = SPLIT_USERS * SPLIT_PER_USER
    print(
        "Traffic shifting: /api/orders/** splits 90/10 between order-service and "
        f"order-service-v2.\n{total} requests from {SPLIT_USERS} users ({SPLIT_PER_USER} each, "
        "each with its own token: the route's 100/min limit counts per user) landed on:",
        flush=True,
    )
    tokens = [idp.token(subject=f"demo-user-{i}") for i in range(SPLIT_USERS)]
    seen = await asyncio.to_thread(_services, base + "/api/orders/7", tokens, SPLIT_PER_USER)
    for name in ("order-service", "order-service-v2", *sorted(set(seen) - _ORDER_SERVICES)):
        n = seen.get(name, 0)
        print(f"  {name:<18} {n:>4}  ({100 * n / total:.1f}%)", flush=True)
    print("\nA request with `x-canary: 1` always goes to v2:\n", flush=True)
    canary = {"x-canary": "1"}
    await _request(base, "/api/orders/7", {**bearer, **canary}, {**shown_bearer, **canary})
    status, _, body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{admin_port}/routes", {})
    print(
        f"$ curl -s http://127.0.0.1:{admin_port}/routes   # counted by the gateway\n  -> {status}",
        flush=True,
    )
    try:
        routes = json.loads(body)["routes"]
    except (ValueError, KeyError, TypeError):
        print(f"     {body}\n", flush=True)
        return
    for route in routes:
        split = route.get("split")
        if split is None:
            continue
        print(f"     {route['route']} {route['path']}:", flush=True)
        for b in split["backends"]:
            print(
                f"       {b['upstream']:<18} weight {b['weight']!s:>3}  requests {b['requests']}",
                flush=True,
            )
        for c in split["canary"]:
            source = f"header {c['header']}" if "header" in c else f"cookie {c['cookie']}"
            print(
                f"       ({c['requests']} sent to {c['upstream']} by the canary match on {source})",
                flush=True,
            )
    print(flush=True)


async def _demo(port: int) -> int:
    cfg_path = str(resources.files("meshgate.demo").joinpath("seed.yaml"))
    config = load_config(cfg_path)
    idp = DemoIdp()
    servers = [await asyncio.start_server(idp.serve, "127.0.0.1", IDP_PORT)]
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
        "order-service runs on 127.0.0.1:9001 and :9003 (least_request), its canary "
        "order-service-v2 on :9004, customer-service on :9002, and an identity provider "
        f"(JWKS) on :{IDP_PORT}.\n"
        "Requests the demo just sent, as curl commands:\n",
        flush=True,
    )
    await _show(port, idp, config.admin.port if config.admin else 9901)
    for line in describe(config)[1:]:
        print(f"note: {line}", flush=True)
    from meshgate.demo.mesh import MeshDemo

    mesh = MeshDemo([(name, bport) for name, bport in BACKENDS], port=0)
    await mesh.start()
    print("", flush=True)
    for line in await mesh.report():
        print(line, flush=True)
    if mesh.cp is not None and mesh.cp.admin_port:
        print(f"\nthe mesh dashboard: http://127.0.0.1:{mesh.cp.admin_port}/ui", flush=True)
    # Ctrl-C stops both gateways (each worker set its own handler).
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    print(
        "\nAlso try:\n"
        f'  curl -si -H "Authorization: Bearer $TOKEN" http://127.0.0.1:{port}/api/orders/7\n'
        f'  curl -s -H "Authorization: Bearer $TOKEN" -H "x-canary: 1" '
        f"http://127.0.0.1:{port}/api/orders/7\n"
        f'  curl -si -H "X-API-Key: {DEMO_API_KEY}" http://127.0.0.1:{port}/api/partners/1\n'
        f"  echo -n {DEMO_API_KEY} | meshgate hash-key   # the digest seed.yaml stores\n"
        "  curl -s http://127.0.0.1:9901/readyz      # admin listener\n"
        "  curl -s http://127.0.0.1:9901/upstreams   # pools and balancer state\n"
        "  curl -s http://127.0.0.1:9901/routes      # split weights and requests per backend\n"
        "  meshgate explain -c examples/seed.yaml GET /api/orders/7\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )
    await worker.wait_and_drain()
    await mesh.close()
    for server in servers:
        server.close()
    return 0


def run_demo(port: int = 8080) -> int:
    import uvloop

    return uvloop.run(_demo(port))
