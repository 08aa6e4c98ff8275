"""`transform:` routes through the real gateway, over real sockets.

Header, query, path and status edits run on streamed routes (the route's
last filter); a JSON body mapping makes a route buffered
(`handlers.transform.BodyTransformer`). The upstreams are independent
witnesses: `JsonApi` servers (a v2 order service that stores what it is
sent, and one answering with encoded bodies) and the recording echo
`UpstreamServer`. Bodies are checked field by field on both sides, and what
the gateway must refuse is shown to have reached no upstream at all.
"""

from __future__ import annotations

import gzip
import hashlib
import http
import json
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from support.client import (
    CurlResponse,
    assert_problem,
    curl,
    fetch,
    free_port,
    raw_request,
)
from support.jsonapi import JsonApi, JsonRequest, Raw
from support.proxy import ProxyProcess, Stack, run_meshgate, upstream_block
from support.upstream import FIXED_BODY, pattern_sha256

pytestmark = pytest.mark.engine

PROBLEMS = "https://meshgate.dev/problems/"
KEY_ALICE = "mg_alice_" + "c3" * 16
SUNSET = datetime(2027, 6, 30, tzinfo=UTC)
DEPRECATED = datetime(2026, 6, 30, tzinfo=UTC)


# ---------------------------------------------------------------------------
# the upstreams


@dataclass(frozen=True)
class Coded:
    """A body sent with a Content-Encoding (what `JsonApi` cannot say)."""

    body: bytes
    encoding: str
    content_type: str = "application/json"


class CodedApi(JsonApi):
    """`JsonApi` that can also answer `Coded` bodies (Content-Encoding set)."""

    async def _write(  # type: ignore[override]
        self, writer: Any, method: str, status: int, doc: Any, *, close: bool
    ) -> None:
        if not isinstance(doc, Coded):
            await super()._write(writer, method, status, doc, close=close)
            return
        head = [
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
            f"Content-Length: {len(doc.body)}",
            f"Content-Type: {doc.content_type}",
            f"Content-Encoding: {doc.encoding}",
            'ETag: "v2-etag"',
            f"X-Served-By: {self.name}",
        ]
        if close:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if method != "HEAD":
            data += doc.body
        writer.write(data)
        await writer.drain()


class OrdersV2:
    """The v2 order service: stores the documents POSTed to /v2/orders/<id>
    and answers them, in v2 shape, with what v1 never had (`api_version`)."""

    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}

    def __call__(self, req: JsonRequest) -> tuple[int, Any]:
        parts = req.path.split("/")  # ["", "v2", "orders", id]
        if len(parts) != 4 or parts[1:3] != ["v2", "orders"] or not parts[3]:
            return 404, {"error": "not a v2 order path", "path": req.path}
        oid = parts[3]
        if req.method in ("POST", "PUT"):
            self.docs[oid] = json.loads(req.body)
            return 201, {**self.docs[oid], "api_version": 2}
        if req.method in ("GET", "HEAD"):
            if oid not in self.docs:
                return 404, {"error": "no such order", "state": "missing"}
            return 200, {**self.docs[oid], "api_version": 2}
        return 405, {"error": "method"}


BIG_STATES = [{"state": "s" * 50, "n": i} for i in range(200)]  # ~13 KB of JSON
BOMB = gzip.compress(b'{"state":"' + b"0" * 2_000_000 + b'"}')
"""2 MB of JSON in about 2 KB of gzip: within the /gz route's 4096 bytes."""
assert len(BOMB) < 4096


def _coded(req: JsonRequest) -> tuple[int, Any]:
    """Answers encoded the way a server honouring Accept-Encoding would."""
    doc = {"state": "shipped", "customer": {"name": "Zoë"}, "lines": [{"sku": "A-1"}]}
    raw = json.dumps(doc).encode()
    accepts = (req.header("accept-encoding") or "").lower()
    name = req.path.rsplit("/", 1)[-1]
    if name == "gzip":
        return 200, Coded(gzip.compress(raw), "gzip")
    if name == "deflate":
        return 200, Coded(zlib.compress(raw), "deflate")
    if name == "br":
        return 200, Coded(b"\x1b\x2a\x00\xf8\x8d\x94\x6e\xde", "br")
    if name == "bomb":
        return 200, Coded(BOMB, "gzip")
    if name == "big":
        return 200, {"items": BIG_STATES}
    if name == "fail":
        error = json.dumps({"state": "broken", "detail": "db down"}).encode()
        if "gzip" in accepts:
            return 503, Coded(gzip.compress(error), "gzip")
        return 503, Raw(error, "application/json")
    if name == "text":
        return 200, Raw(b'{"state": "as text"}', "text/plain")
    return 404, {"state": "nothing here"}


class Servers:
    def __init__(self, stack: Stack) -> None:
        self.orders = OrdersV2()
        self.v2 = JsonApi(self.orders, name="orders-v2").start()
        self.coded = CodedApi(_coded, name="coded").start()
        self.echo = stack.upstream("echo")
        self.refused = f"127.0.0.1:{free_port()}"

    def clear(self) -> None:
        self.v2.clear()
        self.coded.clear()
        self.echo.clear()

    def stop(self) -> None:
        self.v2.stop()
        self.coded.stop()


# ---------------------------------------------------------------------------
# the gateway


V1_ORDERS = {
    # the demo's route (src/meshgate/demo/seed.yaml), as written there
    "path": "/v1/orders/**",
    "upstream": "order-service-v2",
    "rewrite": "/v2/orders/{**}",
    "deprecation": {
        "since": "2026-06-30",
        "sunset": "2027-06-30",
        "link": "https://docs.example.com/orders/v2",
    },
    "transform": {
        "request": {
            "headers": {"set": {"x-api-version": "2"}},
            "body": {
                "move": {"/customer_id": "/customer/id", "/total": "/amount/value"},
                "rename": {"/status": "state"},
                "defaults": {"/amount/currency": "EUR"},
            },
        },
        "response": {
            "body": {
                "deny": ["/amount/currency", "/api_version"],
                "rename": {"/state": "status"},
                "move": {"/customer/id": "/customer_id", "/amount/value": "/total"},
            }
        },
    },
}

HEADER_OPS = {
    "remove": ["x-internal"],
    "rename": {"x-old": "x-new", "x-a": "x-b", "x-b": "x-a"},
    "set": {
        "x-tenant": "{path.tenant}",
        "x-user": "{consumer}",
        "x-rid": "req-{request_id}",
        "x-search": "{query.q}",
        "x-copied": "from {header.x-src}",
        "x-literal": "{{braces}}",
        "x-peer": "{client_ip}",
    },
    "add": {"x-trace": "t-{query.trace}", "x-static": "gw"},
}

RESPONSE_EDITS = {
    "status": {"404": 410},
    "headers": {
        "remove": ["x-conn-id"],
        "rename": {"x-target": "x-upstream-target"},
        "set": {"x-seq": "hidden", "x-rid-echo": "rid={request_id}"},
        "add": {"x-added": "yes"},
    },
}


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _config(s: Servers) -> dict[str, Any]:
    return {
        "auth": {"keys": {"type": "api_key"}},
        "consumers": {"alice": {"api_keys": [_digest(KEY_ALICE)]}},
        "upstreams": {
            "order-service-v2": upstream_block(s.v2),
            "echo": upstream_block(s.echo),
            "coded": upstream_block(s.coded),
            "refused": upstream_block(s.refused),
        },
        "routes": [
            V1_ORDERS,
            {
                "path": "/hdr/{tenant}/**",
                "upstream": "echo",
                "auth": "keys",
                "transform": {"request": {"headers": HEADER_OPS}},
            },
            {
                "path": "/anon/{tenant}/**",
                "upstream": "echo",
                "transform": {"request": {"headers": HEADER_OPS}},
            },
            {
                "path": "/rx/users/{uid}/items/{item}",
                "upstream": "echo",
                "transform": {
                    "request": {
                        "path": {
                            "pattern": r"^/rx/users/(?P<uid>[0-9]+)/items/(?P<item>[^/]+)$",
                            "substitution": r"/api/v2/items/\g<item>/owner/\1",
                        },
                        "query": {
                            "remove": ["debug"],
                            "rename": {"q": "search"},
                            "set": {"page": "1", "lang": "{header.x-lang}"},
                            "add": {"source": "gw", "tenant": "{query.t}", "owner": "u-{path.uid}"},
                        },
                    }
                },
            },
            {"path": "/st/**", "upstream": "echo", "transform": {"response": RESPONSE_EDITS}},
            {
                "path": "/bst/**",
                "upstream": "order-service-v2",
                "strip_prefix": "/bst",
                "transform": {
                    "response": {**RESPONSE_EDITS, "body": {"rename": {"/state": "status"}}}
                },
            },
            {
                "path": "/down/**",
                "upstream": "refused",
                "transform": {
                    "response": {
                        "status": {"502": 503},
                        "headers": {"add": {"x-added": "yes"}},
                        "body": {"rename": {"/state": "status"}},
                    }
                },
            },
            {
                "path": "/b/**",
                "upstream": "echo",
                "transform": {
                    "max_body": 1024,
                    "request": {
                        "body": {
                            "rename": {"/a": "b"},
                            "set": {"/mapped": True},
                            "move": {"/items/*/qty": "/items/*/quantity"},
                        }
                    },
                },
            },
            {
                "path": "/gz/**",
                "upstream": "coded",
                "transform": {
                    "max_body": 4096,
                    "response": {"body": {"rename": {"/state": "status"}}},
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def servers(module_stack: Stack) -> Iterator[Servers]:
    s = Servers(module_stack)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, servers: Servers) -> ProxyProcess:
    return module_stack.proxy(_config(servers))


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "servers" in request.fixturenames:
        request.getfixturevalue("servers").clear()


def _settled(wait: float = 0.2) -> None:
    """Give a call that should not happen the time to show up."""
    time.sleep(wait)


def _json(r: CurlResponse, ctype: str = "application/json") -> Any:
    assert r.header("content-type") == ctype, r.describe()
    assert r.header("content-length") == str(len(r.body)), r.describe()
    return json.loads(r.body)


def _post(proxy: ProxyProcess, path: str, body: bytes, *args: str) -> CurlResponse:
    """POST `body` as is (curl adds no Content-Type of its own when args set one)."""
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        return fetch(proxy.url(path), "-X", "POST", "--data-binary", f"@{f.name}", *args)


def _echo(r: CurlResponse) -> dict[str, Any]:
    """The echo upstream's account of the request, passed through."""
    assert r.status == 200, r.describe()
    doc = json.loads(r.body)
    assert isinstance(doc, dict) and "headers" in doc, r.describe()
    return doc


JSON = ("-H", "Content-Type: application/json")


def _deprecated(r: CurlResponse) -> None:
    assert r.header("deprecation") == f"@{int(DEPRECATED.timestamp())}", r.describe()
    assert r.header("sunset") == format_datetime(SUNSET, usegmt=True), r.describe()
    assert r.header("link") == '<https://docs.example.com/orders/v2>; rel="deprecation"'


# ---------------------------------------------------------------------------
# 1. version mediation: v1 clients, a v2 service


ROUND_TRIPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # id: (what a v1 client POSTs, what the v2 service must receive)
    "o-100": (
        {"customer_id": "c-42", "total": 99.5, "status": "open", "lines": [{"sku": "A", "qty": 2}]},
        {
            "lines": [{"sku": "A", "qty": 2}],
            "state": "open",
            "customer": {"id": "c-42"},
            "amount": {"value": 99.5, "currency": "EUR"},
        },
    ),
    "o-unicode": (
        {
            "customer_id": 'Zoë/½ "q" \\ 😀',
            "total": 0,
            "status": "versandt — 発送済み",
            "lines": [
                {"sku": "Ä-1", "qty": 1, "meta": {"tags": ["ü", None, True], "deep": {"x": [[1]]}}}
            ],
            "note": None,
        },
        {
            "lines": [
                {"sku": "Ä-1", "qty": 1, "meta": {"tags": ["ü", None, True], "deep": {"x": [[1]]}}}
            ],
            "note": None,
            "state": "versandt — 発送済み",
            "customer": {"id": 'Zoë/½ "q" \\ 😀'},
            "amount": {"value": 0, "currency": "EUR"},
        },
    ),
    "o-nostatus": (  # status is optional in v1: no state in v2, none back
        {"customer_id": 7, "total": 12345678901234, "lines": []},
        {
            "lines": [],
            "customer": {"id": 7},
            "amount": {"value": 12345678901234, "currency": "EUR"},
        },
    ),
}


@pytest.mark.parametrize("oid", list(ROUND_TRIPS))
def test_v1_documents_round_trip_through_the_v2_service(
    proxy: ProxyProcess, servers: Servers, oid: str
) -> None:
    v1, v2 = ROUND_TRIPS[oid]
    body = json.dumps(v1, ensure_ascii=False).encode()
    r = _post(proxy, f"/v1/orders/{oid}", body, *JSON, "-H", "X-Api-Version: 1")
    assert r.status == 201, r.describe()
    # the v2 service received the v2 shape, field by field
    (rec,) = servers.v2.requests
    assert (rec.method, rec.target) == ("POST", f"/v2/orders/{oid}")
    received = json.loads(rec.body)
    assert list(received) == list(v2)  # renamed and moved members go last, in rule order
    for key in v2:
        assert received[key] == v2[key], key
    assert received == v2
    assert received["amount"]["currency"] == "EUR"  # the default
    assert rec.header_all("content-length") == [str(len(rec.body))]
    assert rec.header_all("x-api-version") == ["2"]  # set replaces the client's 1
    assert rec.header_all("content-type") == ["application/json"]
    assert rec.header_all("transfer-encoding") == []
    assert rec.header_all("x-request-id") == [r.header("x-request-id")]
    # the client got the v1 shape back: what it sent, nothing the v2 service added
    doc = _json(r)
    assert set(doc) == set(v1)
    for key in v1:
        assert doc[key] == v1[key], key
    assert "api_version" not in doc and "amount" not in doc and "customer" not in doc
    assert r.header("content-encoding") is None
    _deprecated(r)
    # and a GET answers v1 too
    g = fetch(proxy.url(f"/v1/orders/{oid}"))
    assert g.status == 200, g.describe()
    assert _json(g) == v1
    _deprecated(g)
    assert servers.v2.paths == [f"/v2/orders/{oid}", f"/v2/orders/{oid}"]
    assert servers.v2.requests[1].header_all("x-api-version") == ["2"]


def test_several_documents_stay_apart(proxy: ProxyProcess, servers: Servers) -> None:
    """Stored one after another, every one comes back as it was sent."""
    for oid, (v1, _) in ROUND_TRIPS.items():
        r = _post(proxy, f"/v1/orders/many-{oid}", json.dumps(v1).encode(), *JSON)
        assert r.status == 201, r.describe()
    for oid, (v1, v2) in ROUND_TRIPS.items():
        assert servers.orders.docs[f"many-{oid}"] == v2
        g = fetch(proxy.url(f"/v1/orders/many-{oid}"))
        assert _json(g) == v1, oid


def test_an_unknown_order_is_a_404_passed_unmapped(proxy: ProxyProcess, servers: Servers) -> None:
    r = fetch(proxy.url("/v1/orders/o-missing"))
    assert r.status == 404, r.describe()
    # an error body is never mapped: `state` is not renamed to `status`
    assert _json(r) == {"error": "no such order", "state": "missing"}
    _deprecated(r)
    assert servers.v2.paths == ["/v2/orders/o-missing"]


def test_an_order_without_total_round_trips(proxy: ProxyProcess, servers: Servers) -> None:
    """A v1 order without `total`: the request's default creates `amount`
    with only the currency; the response's deny empties it, and an object a
    deny empties is removed, so the client gets its v1 shape back."""
    v1 = {"customer_id": "c-1", "status": "draft"}
    r = _post(proxy, "/v1/orders/o-nototal", json.dumps(v1).encode(), *JSON)
    assert r.status == 201, r.describe()
    assert json.loads(servers.v2.requests[0].body) == {
        "state": "draft",
        "customer": {"id": "c-1"},
        "amount": {"currency": "EUR"},
    }
    assert _json(r) == v1


# ---------------------------------------------------------------------------
# 2. request header edits, as the upstream sees them

ALICE = ("-H", f"X-API-Key: {KEY_ALICE}")


def _raw_lines(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")


def test_header_edits_with_templates(proxy: ProxyProcess, servers: Servers) -> None:
    r = fetch(
        proxy.url("/hdr/acme/orders/7?q=hello%20w%C3%B6rld+x&trace=9"),
        *ALICE,
        *("-H", "X-Request-Id: rid-0077"),
        *("-H", "X-Old: 1", "-H", "X-Old: 2", "-H", "X-New: replaced"),
        *("-H", "X-A: was-a", "-H", "X-B: was-b"),
        *("-H", "X-Internal: secret", "-H", "X_Internal: secret-too"),
        *("-H", "X-Src: the client", "-H", "X-Static: mine", "-H", "X-Keep: kept"),
        *("-H", "X-Tenant: forged", "-H", "X-User: mallory", "-H", "X-Literal: forged"),
    )
    assert r.status == 200, r.describe()
    assert r.header("x-request-id") == "rid-0077"
    (rec,) = servers.echo.requests
    assert rec.target == "/hdr/acme/orders/7?q=hello%20w%C3%B6rld+x&trace=9"
    names = rec.header_names()
    # remove, both spellings
    assert "x-internal" not in names and "x_internal" not in names
    assert b"secret" not in rec.raw_head
    # rename moves every value, in order, replacing the new name's
    assert rec.header_all("x-old") == []
    assert rec.header_all("x-new") == ["1", "2"]
    # renames apply together: a swap
    assert rec.header_all("x-a") == ["was-b"]
    assert rec.header_all("x-b") == ["was-a"]
    # set, from each source; the client's own lines of those names are gone
    assert rec.header_all("x-tenant") == ["acme"]
    assert rec.header_all("x-user") == ["alice"]
    assert rec.header_all("x-consumer") == ["alice"]  # auth's own line
    assert rec.header_all("x-rid") == ["req-rid-0077"]
    assert b"\r\nx-search: hello w\xc3\xb6rld x\r\n" in rec.raw_head  # decoded, UTF-8
    assert rec.header_all("x-copied") == ["from the client"]
    assert rec.header_all("x-literal") == ["{braces}"]
    assert rec.header_all("x-peer") == ["127.0.0.1"]
    # add keeps what was there
    assert rec.header_all("x-trace") == ["t-9"]
    assert rec.header_all("x-static") == ["mine", "gw"]
    # untouched, and the credential auth consumed
    assert rec.header_all("x-keep") == ["kept"]
    assert rec.header_all("x-api-key") == []
    assert b"mallory" not in rec.raw_head and b"forged" not in rec.raw_head


def test_a_generated_request_id_is_the_one_rendered(proxy: ProxyProcess, servers: Servers) -> None:
    r = fetch(proxy.url("/hdr/acme/x"), *ALICE)
    assert r.status == 200, r.describe()
    rid = r.header("x-request-id")
    assert rid
    (rec,) = servers.echo.requests
    assert rec.header_all("x-request-id") == [rid]
    assert rec.header_all("x-rid") == [f"req-{rid}"]


def test_a_missing_source_leaves_the_header_out(proxy: ProxyProcess, servers: Servers) -> None:
    """No consumer (no auth on /anon), no ?q, no ?trace, no X-Src: those
    headers are not sent at all, the client's own copies of them neither."""
    r = fetch(
        proxy.url("/anon/acme/x"),
        *("-H", "X-User: mallory", "-H", "X-Search: forged", "-H", "X-Copied: forged"),
        *("-H", "X-Trace: client-trace"),
    )
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    names = rec.header_names()
    for gone in ("x-user", "x-search", "x-copied", "x-consumer"):
        assert gone not in names, (gone, rec.headers)
    assert b"mallory" not in rec.raw_head and b"forged" not in rec.raw_head
    # add with a missing source adds nothing; the client's line is left alone
    assert rec.header_all("x-trace") == ["client-trace"]
    assert rec.header_all("x-tenant") == ["acme"]
    assert rec.header_all("x-static") == ["gw"]


def test_an_auth_refusal_reaches_no_upstream(proxy: ProxyProcess, servers: Servers) -> None:
    assert_problem(fetch(proxy.url("/hdr/acme/x")), 401)
    _settled()
    assert servers.echo.requests == []


@pytest.mark.parametrize(
    "query",
    [
        "q=a%0D%0AX-Evil:%201&trace=%0D%0AX-Evil:%202",
        "q=a%0AX-Evil:%201&trace=%0AX-Evil:%202",
        "q=a%0DX-Evil:%201&trace=%0DX-Evil:%202",
        "q=a%00X-Evil&trace=%00",
        "q=%7F&trace=%1B",
    ],
    ids=["crlf", "lf", "cr", "nul", "del-esc"],
)
def test_control_characters_from_the_client_cannot_inject(
    proxy: ProxyProcess, servers: Servers, query: str
) -> None:
    r = fetch(proxy.url(f"/hdr/acme/x?{query}"), *ALICE, "-H", "X-Search: forged")
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    assert "x-evil" not in rec.header_names(), rec.headers
    assert b"evil" not in rec.raw_head.lower().replace(query.encode().lower(), b"")
    assert rec.header_all("x-search") == []  # the value is not sent, the client's neither
    assert rec.header_all("x-trace") == []
    assert rec.header_all("x-static") == ["gw"]
    # every head line is one header: nothing was split
    for line in _raw_lines(rec.raw_head)[1:]:
        assert b":" in line and b"\r" not in line and b"\n" not in line, line
    assert rec.header_all("x-tenant") == ["acme"]


@pytest.mark.parametrize(
    "value", [b"a\rX-Evil: 1", b"a\nX-Evil: 1", b"a\x00b", b"a\x0bb", b"a\x7fb"]
)
def test_a_header_line_with_a_control_character_never_reaches_a_template(
    proxy: ProxyProcess, servers: Servers, value: bytes
) -> None:
    """`{header.x-src}` copies a client's line: one holding CR, LF or another
    control character is refused as the request arrives (400)."""
    head = (
        b"GET /hdr/acme/x HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + KEY_ALICE.encode() + b"\r\n"
        b"X-Src: " + value + b"\r\nConnection: close\r\n\r\n"
    )
    reply = raw_request(proxy.port, head, read_timeout=5)
    (resp,) = reply.responses()
    assert_problem(resp, 400)
    _settled()
    assert servers.echo.requests == []


def test_a_tab_in_a_value_is_kept(proxy: ProxyProcess, servers: Servers) -> None:
    r = fetch(proxy.url("/hdr/acme/x?q=a%09b"), *ALICE)
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    assert b"\r\nx-search: a\tb\r\n" in rec.raw_head


def test_a_path_parameter_cannot_inject(proxy: ProxyProcess, servers: Servers) -> None:
    """Path parameters keep their escapes: `%0D%0A` arrives as those bytes."""
    r = fetch(proxy.url("/hdr/a%0D%0AX-Evil:1/x"), *ALICE)
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    assert rec.header_all("x-tenant") == ["a%0D%0AX-Evil:1"]
    assert "x-evil" not in rec.header_names()


# ---------------------------------------------------------------------------
# 3. path regex rewrite and query edits


def test_path_rewrite_with_named_groups_and_query_edits(
    proxy: ProxyProcess, servers: Servers
) -> None:
    query = "debug=1&q=hello%20world&a=%41%2b+x&b=&c&z=%E2%9C%93&debug=2&page=9&lang=xx&t=acme"
    r = fetch(proxy.url(f"/rx/users/42/items/book?{query}"))
    (rec,) = servers.echo.requests
    assert _echo(r)["target"] == rec.target
    path, _, qs = rec.target.partition("?")
    assert path == "/api/v2/items/book/owner/42"
    assert qs.split("&") == [
        "search=hello%20world",  # renamed in place, the value's bytes kept
        "a=%41%2b+x",  # untouched: byte for byte
        "b=",
        "c",
        "z=%E2%9C%93",
        "page=1",  # set: replaced in place
        # lang: set from a missing header, so the client's lang is gone
        "t=acme",
        "source=gw",  # add, in config order
        "tenant=acme",
        "owner=u-42",
    ]


def test_query_set_from_a_header_and_names_compared_decoded(
    proxy: ProxyProcess, servers: Servers
) -> None:
    r = fetch(
        proxy.url("/rx/users/7/items/a%20b?%64ebug=x&lang=xx&lang=yy&keep=%2F"),
        "-H",
        "X-Lang: fr ch/ß",
    )
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    assert rec.target == (
        "/api/v2/items/a%20b/owner/7"
        "?lang=fr%20ch%2F%C3%9F&keep=%2F&page=1&source=gw&owner=u-7"  # ?t= absent: no tenant
    )


def test_a_query_rename_replaces_the_new_names_values(
    proxy: ProxyProcess, servers: Servers
) -> None:
    r = fetch(proxy.url("/rx/users/1/items/i?search=old&x=1&q=new&search=older&q=newer"))
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    assert rec.target == (
        "/api/v2/items/i/owner/1?x=1&search=new&search=newer&page=1&source=gw&owner=u-1"
    )


def test_a_path_the_regex_does_not_match_is_left_alone(
    proxy: ProxyProcess, servers: Servers
) -> None:
    r = fetch(proxy.url("/rx/users/abc/items/x"))
    assert r.status == 200, r.describe()
    (rec,) = servers.echo.requests
    assert rec.target == "/rx/users/abc/items/x?page=1&source=gw&owner=u-abc"


# ---------------------------------------------------------------------------
# 4. response status and header edits


def _edited(r: CurlResponse, target: str | None) -> None:
    """The route's response header edits, on what the client got."""
    names = r.header_names()
    assert "x-conn-id" not in names, r.headers
    assert "x-target" not in names
    assert r.header_all("x-upstream-target") == ([target] if target else [])
    assert r.header_all("x-rid-echo") == [f"rid={r.header('x-request-id')}"]
    assert r.header_all("x-added") == ["yes"]


def test_status_map_and_header_edits_on_a_streamed_route(
    proxy: ProxyProcess, servers: Servers
) -> None:
    r = fetch(proxy.url("/st/status?code=404"))
    assert r.status == 410, r.describe()
    assert r.body == b"status 404\n"
    assert r.header("content-length") == "11"
    assert r.header_all("x-seq") == ["hidden"]
    assert r.header("x-upstream") == "echo"
    _edited(r, "/st/status?code=404")
    for code in (200, 500, 503):
        r = fetch(proxy.url(f"/st/status?code={code}"))
        assert r.status == code, r.describe()
        assert r.body == f"status {code}\n".encode()
        _edited(r, f"/st/status?code={code}")
    assert [q.response_status for q in servers.echo.requests] == [404, 200, 500, 503]


def test_status_map_and_header_edits_on_a_buffered_route(
    proxy: ProxyProcess, servers: Servers
) -> None:
    servers.orders.docs["o-bst"] = {"state": "open", "n": 1}
    r = fetch(proxy.url("/bst/v2/orders/o-bst"))
    assert r.status == 200, r.describe()
    assert _json(r) == {"n": 1, "api_version": 2, "status": "open"}
    _edited(r, None)
    assert r.header_all("x-seq") == ["hidden"]
    assert r.header("x-served-by") == "orders-v2"
    r = fetch(proxy.url("/bst/v2/orders/o-gone"))
    assert r.status == 410, r.describe()
    assert _json(r) == {"error": "no such order", "state": "missing"}  # unmapped
    _edited(r, None)
    assert servers.v2.paths == ["/v2/orders/o-bst", "/v2/orders/o-gone"]


def test_the_gateways_own_problem_keeps_its_status(proxy: ProxyProcess) -> None:
    """`status: {502: 503}` and the header edits apply to upstream answers,
    never to the gateway's own answer (503: no endpoint accepts connections)."""
    r = fetch(proxy.url("/down/x"))
    doc = assert_problem(r, 503)
    assert doc["type"] == PROBLEMS + "upstream-unavailable"
    assert r.header("x-added") is None
    assert r.header("content-length") == str(len(r.body))


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_a_large_download_streams_through_header_edits(
    proxy: ProxyProcess, servers: Servers, mode: str
) -> None:
    """Only header edits: the route streams (a buffered one would refuse
    anything past its 1 MiB max_body with a 502)."""
    size = 2 * 1024 * 1024
    r = fetch(proxy.url(f"/st/download?size={size}&mode={mode}"))
    assert r.status == 200, r.describe()
    assert len(r.body) == size
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(size)
    assert r.header("content-type") == "application/octet-stream"
    _edited(r, f"/st/download?size={size}&mode={mode}")
    if mode == "length":
        assert r.header("content-length") == str(size)
    else:
        assert r.header("transfer-encoding") == "chunked"
    (rec,) = servers.echo.requests
    assert rec.response_body_sent == size


# ---------------------------------------------------------------------------
# 5. request and response bodies

V1_ITEMS = {"a": "ä", "items": [{"qty": 1}, {"qty": 2, "sku": "x"}], "keep": None}
MAPPED_ITEMS = {
    "items": [{"quantity": 1}, {"sku": "x", "quantity": 2}],
    "keep": None,
    "b": "ä",
    "mapped": True,
}


def _received(servers: Servers) -> Any:
    (rec,) = servers.echo.requests
    assert rec.body_complete, rec
    assert rec.framing == "length"
    assert rec.header_all("content-length") == [str(len(rec.body))]
    assert rec.header_all("transfer-encoding") == []
    return rec


@pytest.mark.parametrize(
    "ctype",
    ["application/json", "application/json; charset=utf-8", "application/vnd.api+json", None],
)
def test_a_json_request_body_is_mapped(
    proxy: ProxyProcess, servers: Servers, ctype: str | None
) -> None:
    header = f"Content-Type: {ctype}" if ctype else "Content-Type:"  # `Content-Type:` drops it
    r = _post(proxy, "/b/x", json.dumps(V1_ITEMS).encode(), "-H", header)
    doc = _echo(r)
    rec = _received(servers)
    assert json.loads(rec.body) == MAPPED_ITEMS
    assert list(json.loads(rec.body)) == list(MAPPED_ITEMS)
    assert rec.header_all("content-type") == ([ctype] if ctype else [])
    assert doc["body_len"] == len(rec.body)


def test_a_chunked_request_body_is_mapped(proxy: ProxyProcess, servers: Servers) -> None:
    r = _post(
        proxy,
        "/b/x",
        json.dumps(V1_ITEMS).encode(),
        *JSON,
        "-H",
        "Transfer-Encoding: chunked",
    )
    _echo(r)
    rec = _received(servers)  # sent on with a Content-Length
    assert json.loads(rec.body) == MAPPED_ITEMS


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("text/plain", b'{"a": 1}'),
        ("application/x-www-form-urlencoded", b"a=1&b=%7B"),
        ("application/octet-stream", bytes(range(256))),
    ],
)
def test_a_non_json_body_passes_unchanged(
    proxy: ProxyProcess, servers: Servers, ctype: str, body: bytes
) -> None:
    _echo(_post(proxy, "/b/x", body, "-H", f"Content-Type: {ctype}"))
    rec = _received(servers)
    assert rec.body == body
    assert rec.header_all("content-type") == [ctype]


def test_an_empty_json_body_passes(proxy: ProxyProcess, servers: Servers) -> None:
    _echo(_post(proxy, "/b/x", b"", *JSON))
    (rec,) = servers.echo.requests
    assert rec.body == b""
    assert rec.header("content-length") == "0"


def test_identity_content_encoding_is_mapped(proxy: ProxyProcess, servers: Servers) -> None:
    _echo(_post(proxy, "/b/x", b'{"a": 1}', *JSON, "-H", "Content-Encoding: identity"))
    rec = _received(servers)
    assert json.loads(rec.body) == {"b": 1, "mapped": True}


def test_a_body_at_max_body_passes_and_one_byte_more_is_413(
    proxy: ProxyProcess, servers: Servers
) -> None:
    pad = 1024 - len(b'{"a":""}')
    at_limit = b'{"a":"' + b"x" * pad + b'"}'
    assert len(at_limit) == 1024
    # (the echo's answer would be larger than max_body: it answers a fixed text)
    r = _post(proxy, "/b/x", at_limit, *JSON, "-H", "X-Test-Behavior: fixed")
    assert (r.status, r.body) == (200, FIXED_BODY), r.describe()
    assert json.loads(_received(servers).body) == {"b": "x" * pad, "mapped": True}
    servers.clear()
    over = b'{"a":"' + b"x" * (pad + 1) + b'"}'
    for extra in ((), ("-H", "Transfer-Encoding: chunked")):
        r = _post(proxy, "/b/x", over, *JSON, *extra)
        doc = assert_problem(r, 413)
        assert doc["type"] == PROBLEMS + "body-too-large"
        assert "1024" in doc["detail"]
    big = b'{"a":"' + b"x" * 300_000 + b'"}'
    assert_problem(_post(proxy, "/b/x", big, *JSON), 413)
    _settled()
    assert servers.echo.requests == []


def test_a_compressed_request_body_is_415(proxy: ProxyProcess, servers: Servers) -> None:
    body = gzip.compress(json.dumps(V1_ITEMS).encode())
    for coding in ("gzip", "deflate", "br", "GZIP"):
        r = _post(proxy, "/b/x", body, *JSON, "-H", f"Content-Encoding: {coding}")
        doc = assert_problem(r, 415)
        assert doc["type"] == PROBLEMS + "compressed-body"
        assert doc["request_id"] == r.header("x-request-id")
    _settled()
    assert servers.echo.requests == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"a": 1', b'{"a": 1}}', b"\xff\xfe", b'{"a": NaN}', b"'single'"],
    ids=["garbage", "truncated", "trailing", "not-utf8", "nan", "quotes"],
)
def test_invalid_json_is_400(proxy: ProxyProcess, servers: Servers, body: bytes) -> None:
    r = _post(proxy, "/b/x", body, *JSON)
    doc = assert_problem(r, 400)
    assert doc["type"] == PROBLEMS + "bad-json"
    assert "not JSON" in doc["detail"]
    if len(body) > 3:
        assert body.decode(errors="replace") not in doc["detail"]  # never echoes the body
    _settled()
    assert servers.echo.requests == []


def test_a_gzip_json_response_is_decoded_and_mapped(proxy: ProxyProcess, servers: Servers) -> None:
    for coding in ("gzip", "deflate"):
        servers.clear()
        r = fetch(proxy.url(f"/gz/{coding}"), "-H", "Accept-Encoding: br, gzip;q=0.5")
        assert r.status == 200, r.describe()
        assert _json(r) == {
            "customer": {"name": "Zoë"},
            "lines": [{"sku": "A-1"}],
            "status": "shipped",
        }
        assert r.header("content-encoding") is None
        assert r.header("etag") is None  # no longer true of the bytes sent
        assert r.header("x-served-by") == "coded"
        (rec,) = servers.coded.requests
        assert rec.header_all("accept-encoding") == ["gzip"]


def test_an_unsupported_response_coding_is_a_502(proxy: ProxyProcess, servers: Servers) -> None:
    r = fetch(proxy.url("/gz/br"))
    doc = assert_problem(r, 502)
    assert doc["type"] == PROBLEMS + "upstream-encoding-unsupported"
    assert "'br'" in doc["detail"]
    assert r.header("content-encoding") is None
    assert servers.coded.paths == ["/gz/br"]


def test_responses_that_are_not_mapped_pass_unchanged(proxy: ProxyProcess) -> None:
    r = fetch(proxy.url("/gz/fail"), "-H", "Accept-Encoding: gzip")
    assert r.status == 503, r.describe()
    assert r.header("content-encoding") == "gzip"
    assert r.header("etag") == '"v2-etag"'
    assert r.header("content-length") == str(len(r.body))
    assert json.loads(gzip.decompress(r.body)) == {"state": "broken", "detail": "db down"}
    r = fetch(proxy.url("/gz/nothing"))
    assert r.status == 404, r.describe()
    assert _json(r) == {"state": "nothing here"}
    r = fetch(proxy.url("/gz/text"))
    assert r.status == 200, r.describe()
    assert r.body == b'{"state": "as text"}'
    assert r.header("content-type") == "text/plain"


def test_a_response_larger_than_max_body_is_a_502(proxy: ProxyProcess) -> None:
    doc = assert_problem(fetch(proxy.url("/gz/big")), 502)
    assert doc["type"] == PROBLEMS + "upstream-body-too-large"
    assert "4096" in doc["detail"]
    # compressed under the limit, past it once decoded
    assert_problem(fetch(proxy.url("/gz/bomb")), 502)


def test_a_response_coding_the_client_refused_never_reaches_it(
    proxy: ProxyProcess, servers: Servers
) -> None:
    """The gateway asks the upstream for `Accept-Encoding: gzip` in place of
    the client's header (so that it can map 2xx JSON). An answer it does not
    map (an error, a non-JSON body) must still come in a coding the client
    accepts: `Accept-Encoding: identity` means no gzip."""
    r = fetch(proxy.url("/gz/fail"), "-H", "Accept-Encoding: identity")
    assert r.status == 503, r.describe()
    assert r.header("content-encoding") is None, r.describe()
    assert _json(r) == {"state": "broken", "detail": "db down"}


def test_a_response_past_max_body_once_decoded_is_reported_as_too_large(
    proxy: ProxyProcess,
) -> None:
    """A gzip body within max_body that decodes past it: 502, but as what
    it is, not as a coding the route "cannot map (gzip and deflate can be)"."""
    doc = assert_problem(fetch(proxy.url("/gz/bomb")), 502)
    assert doc["type"] == PROBLEMS + "upstream-body-too-large", doc
    assert "4096" in doc["detail"], doc


# ---------------------------------------------------------------------------
# 6. HEAD and keep-alive on a buffered route


def test_head_on_a_buffered_route(proxy: ProxyProcess, servers: Servers) -> None:
    v1, _ = ROUND_TRIPS["o-100"]
    assert _post(proxy, "/v1/orders/o-head", json.dumps(v1).encode(), *JSON).status == 201
    get = fetch(proxy.url("/v1/orders/o-head"))
    assert _json(get) == v1
    head = fetch(proxy.url("/v1/orders/o-head"), "-I")
    assert head.status == 200, head.describe()
    assert head.body.split(b"\r\n\r\n", 1)[1] == b""  # -I writes the head to -o
    assert head.header("content-type") == "application/json"
    _deprecated(head)
    assert head.header("x-served-by") == "orders-v2"
    assert [q.method for q in servers.v2.requests] == ["POST", "GET", "HEAD"]
    assert servers.v2.requests[2].header_all("x-api-version") == ["2"]
    assert servers.v2.requests[2].body == b""


def test_head_content_length_is_the_gets_or_absent(proxy: ProxyProcess) -> None:
    v1, _ = ROUND_TRIPS["o-100"]
    assert _post(proxy, "/v1/orders/o-head-cl", json.dumps(v1).encode(), *JSON).status == 201
    get = fetch(proxy.url("/v1/orders/o-head-cl"))
    assert get.header("content-length") == str(len(get.body)) != "0"
    head = fetch(proxy.url("/v1/orders/o-head-cl"), "-I")
    assert head.status == 200, head.describe()
    assert head.header("content-length") in (None, get.header("content-length")), head.headers


def _transfers(
    proxy: ProxyProcess, tmp: Path, *steps: tuple[str, list[str]]
) -> list[dict[str, Any]]:
    """Several transfers in one curl run (`--next` between them): curl reuses
    its connection when the server keeps it open. Returns, per transfer,
    curl's status, whether it connected anew, and the body."""
    args: list[str] = []
    outs = []
    for i, (path, extra) in enumerate(steps):
        out = tmp / f"body-{i}"
        outs.append(out)
        if i:
            args.append("--next")
        args += ["-o", str(out), "-w", "%{http_code} %{num_connects}\\n", *extra, proxy.url(path)]
    cp = curl(*args)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.decode().split()
    got = []
    for i, out in enumerate(outs):
        got.append(
            {
                "status": int(lines[2 * i]),
                "connects": int(lines[2 * i + 1]),
                "body": out.read_bytes() if out.exists() else b"",
            }
        )
    return got


def test_keep_alive_across_buffered_requests(
    proxy: ProxyProcess, servers: Servers, tmp_path: Path
) -> None:
    v1, v2 = ROUND_TRIPS["o-unicode"]
    body = tmp_path / "v1.json"
    body.write_bytes(json.dumps(v1).encode())
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{nope")
    post = ["-X", "POST", "-H", "Content-Type: application/json", "--data-binary"]
    got = _transfers(
        proxy,
        tmp_path,
        ("/v1/orders/o-ka", [*post, f"@{body}"]),
        ("/v1/orders/o-ka", []),
        ("/v1/orders/o-ka", ["-I"]),
        ("/v1/orders/o-ka", [*post, f"@{bad}"]),  # a 400 from the gateway keeps the connection
        ("/b/x", [*post, f"@{body}"]),
        ("/st/status?code=404", []),
        ("/v1/orders/o-ka", []),
    )
    assert [g["status"] for g in got] == [201, 200, 200, 400, 200, 410, 200]
    assert [g["connects"] for g in got] == [1, 0, 0, 0, 0, 0, 0]
    for i in (0, 1, 6):
        assert json.loads(got[i]["body"]) == v1, i
    assert json.loads(got[3]["body"])["type"] == PROBLEMS + "bad-json"
    assert json.loads(got[4]["body"])["body_len"] > 0
    assert got[5]["body"] == b"status 404\n"
    assert servers.orders.docs["o-ka"] == v2
    assert [q.method for q in servers.v2.requests] == ["POST", "GET", "HEAD", "GET"]


# ---------------------------------------------------------------------------
# 7. configs refused, naming the file, the line and the field

_ROUTE = (
    "upstreams:\n"
    "  a: {endpoints: ['127.0.0.1:1']}\n"
    "routes:\n"
    "- path: /x/{id}\n"
    "  upstream: a\n"
    "  transform:\n"
)
"""Six lines; a case's own text starts on line 7, its field on line 8."""


def _refused(stack: Stack, tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_meshgate("check", "-c", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    for needle in [f"{path}:8:", *expected]:
        assert needle in out, (needle, out)
    # and `meshgate run` does not start with it
    proxy = stack.proxy(text, start=False)
    try:
        with pytest.raises(AssertionError, match="exited with") as info:
            proxy.start()
    finally:
        proxy.stopped_on_purpose = True  # its exit is the point
    for needle in expected:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "    request:\n      body: {deny: [/customer], move: {/customer/id: /customer_id}}\n",
            ["field 'routes[0].transform.request.body'", "deny '/customer' removes it first"],
        ),
        (
            "    response:\n      body: {allow: [/a/b], deny: [/a]}\n",
            ["field 'routes[0].transform.response.body'", "deny '/a' removes allowed '/a/b'"],
        ),
        (
            "    request:\n      body: {rename: {/a: b}, move: {/c: /b}}\n",
            ["field 'routes[0].transform.request.body'", "both write '/b'"],
        ),
        (
            "    response:\n      body: {defaults: {/a/b: 1}, set: {/a: 2}}\n",
            ["field 'routes[0].transform.response.body'", "set '/a' overwrites it"],
        ),
        (
            "    request:\n      path: {pattern: '/x/(?P<id', substitution: /y}\n",
            ["field 'routes[0].transform.request.path'", "is not a valid regex"],
        ),
        (
            "    request:\n"
            "      path: {pattern: '^/x/(?P<id>[0-9]+)$', substitution: '/y/\\g<nope>'}\n",
            ["field 'routes[0].transform.request.path'", "group 'nope', which the pattern lacks"],
        ),
        (
            "    request:\n      path: {pattern: '^/x/([0-9]+)$', substitution: '/y/\\2'}\n",
            ["field 'routes[0].transform.request.path'", "group 2; the pattern has 1"],
        ),
        (
            "    response:\n      status: {'200': 204}\n",
            ["field 'routes[0].transform.response.status'", "200 -> 204"],
        ),
        (
            "    response:\n      status: {'304': 200}\n",
            ["field 'routes[0].transform.response.status'", "304 -> 200"],
        ),
        (
            "    response:\n      status: {0x194: 410}\n",
            ["field 'routes[0].transform.response.status'", "quote it"],
        ),
        (
            "    request:\n      headers: {set: {content-length: '5'}}\n",
            ["field 'routes[0].transform.request.headers'", "'content-length' is set by"],
        ),
        (
            "    response:\n      headers: {remove: [Transfer-Encoding]}\n",
            ["field 'routes[0].transform.response.headers'", "'Transfer-Encoding' is set by"],
        ),
    ],
    ids=["deny-then-move", "deny-above-allow", "two-writes", "default-overwritten",
         "bad-regex", "named-group-missing", "numbered-group-missing", "status-200-204",
         "status-304-200", "status-unquoted", "content-length", "transfer-encoding"],
)  # fmt: skip
def test_bad_transform_configs_are_refused_naming_the_field(
    stack: Stack, tmp_path: Path, case: str, expected: list[str]
) -> None:
    _refused(stack, tmp_path, _ROUTE + case, expected)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "    request:\n      headers: {set: {x-a: '{path.nope}'}}\n",
            ["routes[0].transform.request.headers.set", "no {nope}"],
        ),
        (
            "    request:\n      headers: {set: {x-request-id: x}}\n",
            ["routes[0].transform.request.headers.set", "written by the gateway"],
        ),
    ],
    ids=["unknown-path-param", "gateway-owned-header"],
)
def test_bad_templates_are_refused_naming_the_line(
    stack: Stack, tmp_path: Path, case: str, expected: list[str]
) -> None:
    _refused(stack, tmp_path, _ROUTE + case, expected)
