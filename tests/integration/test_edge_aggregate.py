"""`aggregate:` routes through the real gateway: one client request, several
real JSON backends (`support.jsonapi.JsonApi`) over loopback, one composed
answer.

Each test checks the composed body field by field, and, for what must fail,
that the backends that should not be called received nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from support.client import CurlResponse, assert_problem, fetch, free_port
from support.jsonapi import JsonApi, JsonRequest, Raw
from support.proxy import ProxyProcess, Stack, run_meshgate, upstream_block

pytestmark = pytest.mark.engine

PROBLEMS = "https://meshgate.dev/problems/"
SLACK = 0.05
"""The bar: an answer cut by a deadline arrives within it + 50 ms."""

ORDERS: dict[str, dict[str, Any]] = {
    "o-1": {"id": "o-1", "customer_id": "c-42", "total": 99.5, "lines": [{"sku": "A-1", "qty": 2}]},
    "o-slash": {"id": "o-slash", "customer_id": "a/b", "total": 1},
    "o-climb": {"id": "o-climb", "customer_id": "../../admin?x=1#f", "total": 2},
    "o-num": {"id": "o-num", "customer_id": 42, "total": 3},
    "o-nocust": {"id": "o-nocust", "total": 4},
    "o-slowcust": {"id": "o-slowcust", "customer_id": "c-slow", "total": 5},
    "o-slow": {"id": "o-slow", "customer_id": "c-42", "total": 6},
    "s-slow": {"id": "s-slow", "customer_id": "c-42", "total": 7},
    "o-utf8": {"id": "o-utf8", "customer_id": "Zoë 1+1", "total": 8},
}
CUSTOMER_NAMES = {
    "c-42": "Ada Lovelace",
    "a/b": "Slash",
    "c-slow": "Slow Poke",
    "42": "Number",
    "Zoë 1+1": "Zoë",
}
SLOW = 1.5
DEEP = 400
"""How long the slow paths take to answer: past every deadline they meet."""
KEY_ALICE = "mg_alice_" + "a1" * 16


def _orders(req: JsonRequest) -> tuple[int, Any]:
    parts = req.path.split("/")  # ["", "orders", id]
    if len(parts) == 3 and parts[1] == "orders" and unquote(parts[2]) in ORDERS:
        return 200, ORDERS[unquote(parts[2])]
    if req.path == "/orders/boom":
        return 500, {"error": "the database is on fire"}
    return 404, {"error": "no such order"}


def _customers(req: JsonRequest) -> tuple[int, Any]:
    parts = req.path.split("/")
    if len(parts) == 3 and parts[1] == "customers":
        cid = unquote(parts[2])
        if cid in CUSTOMER_NAMES:
            return 200, {"id": cid, "name": CUSTOMER_NAMES[cid]}
    return 404, {"error": "no such customer"}


def _stock(req: JsonRequest) -> tuple[int, Any]:
    return 200, {"order": req.path.rsplit("/", 1)[-1], "ready": True, "warehouse": "north"}


def _envelope(req: JsonRequest) -> tuple[int, Any]:
    if req.path.startswith("/profiles/"):
        return 200, {"name": "Ada", "tier": "gold", "since": 2019}
    if req.path.startswith("/wrapped/"):
        return 200, {"data": {"invoice": {"no": "INV-7", "paid": False}, "a/b": "slash-key"}}
    if req.path.startswith("/list/"):
        return 200, [1, 2, 3]
    if req.path.startswith("/deep/"):
        # Deeper than orjson encodes (254 levels), which it still parses.
        return 200, Raw(b'{"d":' + b"[" * DEEP + b"1" + b"]" * DEEP + b"}", "application/json")
    return 404, {"error": "no"}


def _html(req: JsonRequest) -> tuple[int, Any]:
    if req.path.startswith("/banner/"):
        return 200, Raw("<b>Sale — 20% off</b>".encode(), "text/html; charset=utf-8")
    if req.path.startswith("/badjson/"):
        return 200, Raw(b"{not json", "application/json")
    return 200, Raw(b"<html>not json</html>", "text/html")


class Apis:
    """The module's backends, and an address that refuses connections."""

    def __init__(self) -> None:
        self.orders = JsonApi(_orders, name="orders", delays={"/orders/o-slow": SLOW}).start()
        self.customers = JsonApi(
            _customers, name="customers", delays={"/customers/c-slow": SLOW}
        ).start()
        self.stock = JsonApi(
            _stock, name="stock", delays={"/stock/s-slow": SLOW, "/stock/o-slow": SLOW}
        ).start()
        self.envelope = JsonApi(_envelope, name="envelope").start()
        self.html = JsonApi(_html, name="html").start()
        gone = JsonApi({}, name="gone").start()
        gone.stop()
        self.stopped = gone.address
        """A server that was up and is now stopped: its port refuses."""
        self.refused = f"127.0.0.1:{free_port()}"
        """A port nobody listens on."""
        self.all = [self.orders, self.customers, self.stock, self.envelope, self.html]

    def stop(self) -> None:
        for api in self.all:
            api.stop()

    def clear(self) -> None:
        for api in self.all:
            api.clear()


def _b(upstream: str, path: str, group: str | None = None, **options: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"upstream": upstream, "path": path}
    if group is not None:
        out["group"] = group
    out.update(options)
    return out


def _agg(path: str, *backends: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"path": path, "aggregate": {"backends": list(backends), **options}}


ORDER = _b("order-service", "/orders/{id}", "order")
CUSTOMER = _b("customer-service", "/customers/{order.customer_id}", "customer")


def _config(apis: Apis) -> dict[str, Any]:
    return {
        "auth": {"keys": {"type": "api_key"}},
        "consumers": {"alice": {"api_keys": [_digest(KEY_ALICE)]}},
        "upstreams": {
            "order-service": upstream_block(apis.orders),
            "customer-service": upstream_block(apis.customers),
            "stock-service": upstream_block(apis.stock),
            "envelope-service": upstream_block(apis.envelope),
            "html-service": upstream_block(apis.html),
            "refused-service": upstream_block(apis.refused),
            "stopped-service": upstream_block(apis.stopped),
        },
        "routes": [
            _agg(
                "/api/order-summary/{id}",
                ORDER,
                _b("stock-service", "/stock/{id}", "stock"),
                {**CUSTOMER, "required": False, "timeout": "500ms"},
                timeout="2s",
            ),
            _agg(
                "/api/partial/{id}",
                ORDER,
                _b("refused-service", "/customers/{order.customer_id}", "customer", required=False),
                _b("stock-service", "/stock/{id}", "stock"),
            ),
            _agg(
                "/api/partial-stopped/{id}",
                ORDER,
                _b("stopped-service", "/loyalty/{id}", "loyalty", required=False),
                errors_key="problems",
            ),
            _agg(
                "/api/required-down/{id}",
                _b("refused-service", "/orders/{id}", "order"),
                CUSTOMER,
            ),
            _agg("/api/required/{id}", ORDER, CUSTOMER),
            _agg(
                "/api/chain-optional/{id}",
                _b("refused-service", "/orders/{id}", "order", required=False),
                {**CUSTOMER, "required": False},
                _b("stock-service", "/stock/{id}", "stock"),
            ),
            _agg(
                "/api/chain-required/{id}",
                _b("refused-service", "/orders/{id}", "order", required=False),
                CUSTOMER,
            ),
            _agg(
                "/api/slow-optional/{id}",
                ORDER,
                _b("stock-service", "/stock/{id}", "stock", required=False, timeout="300ms"),
                timeout="2s",
            ),
            _agg(
                "/api/fail-fast/{id}",
                ORDER,
                _b("stock-service", "/stock/s-slow", "stock", required=False),
                timeout="2s",
            ),
            _agg(
                "/api/slow-optional-agg/{id}",
                ORDER,
                _b("stock-service", "/stock/{id}", "stock", required=False),
                timeout="500ms",
            ),
            _agg(
                "/api/slow-required/{id}",
                _b("order-service", "/orders/{id}", "order"),
                timeout="500ms",
            ),
            {
                **_agg(
                    "/api/slow-route/{id}",
                    _b("stock-service", "/stock/{id}", "stock", required=False),
                    ORDER,
                    timeout="2s",
                ),
                "timeouts": {"total": "400ms"},
            },
            _agg(
                "/api/merged/{id}",
                _b("envelope-service", "/profiles/{id}"),
                _b("envelope-service", "/wrapped/{id}", "invoice", target="/data/invoice"),
                _b("envelope-service", "/wrapped/{id}", "escaped", target="/data/a~1b"),
                ORDER,
            ),
            _agg("/api/deep/{id}", ORDER, _b("envelope-service", "/deep/{id}", "deep")),
            _agg(
                "/api/merged-bad/{id}",
                ORDER,
                _b("envelope-service", "/list/{id}", required=False),
                _b(
                    "envelope-service", "/wrapped/{id}", "nothing", target="/data/x", required=False
                ),
            ),
            _agg(
                "/api/headers/{id}",
                _b("order-service", "/orders/{id}", "order"),
                _b("customer-service", "/customers/{header.x-customer}", "customer"),
            ),
            _agg(
                "/api/headers-custom/{id}",
                ORDER,
                forward_headers=["X-Secret", "accept-language"],
            ),
            {
                **_agg("/api/authed/{id}", ORDER, CUSTOMER),
                "auth": "keys",
            },
            {
                **_agg("/api/authed-listed/{id}", ORDER, forward_headers=["x-consumer"]),
                "auth": "keys",
            },
            _agg(
                "/api/query/{id}",
                ORDER,
                _b("customer-service", "/customers/{query.customer}", "customer", required=False),
            ),
            _agg(
                "/api/encoding/{id}",
                ORDER,
                _b("html-service", "/banner/{id}", "banner", encoding="string"),
                _b("html-service", "/page/{id}", "page", required=False),
                _b("html-service", "/badjson/{id}", "bad", required=False),
            ),
            _agg("/api/html-required/{id}", ORDER, _b("html-service", "/page/{id}", "page")),
        ],
    }


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def apis() -> Iterator[Apis]:
    a = Apis()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, apis: Apis) -> ProxyProcess:
    return module_stack.proxy(_config(apis))


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "apis" in request.fixturenames:
        request.getfixturevalue("apis").clear()


def _get(proxy: ProxyProcess, path: str, *args: str) -> CurlResponse:
    return fetch(proxy.url(path), *args)


def _timed(proxy: ProxyProcess, path: str, *args: str) -> tuple[CurlResponse, float]:
    """The response and the seconds it took, measured around the whole curl
    run (its start-up included: some 15-35 ms on a busy machine). Callers
    also hold curl's own `time_total` to the same bar."""
    start = time.monotonic()
    r = fetch(proxy.url(path), *args)
    return r, time.monotonic() - start


def _within(r: CurlResponse, took: float, deadline: float) -> None:
    """An answer cut by `deadline` (seconds): not much before it (a loose
    bound), and within it + 50 ms by curl's own clock (from the request's
    start to the response's end). Around the whole curl run, which adds the
    process's start (15-35 ms here, more on a loaded machine), the bound is
    loose: it only catches an answer that waited for the slow backend."""
    curl_took = float(r.info["time_total"])
    assert deadline * 0.9 <= curl_took <= took, (curl_took, took)
    assert curl_took < deadline + SLACK, f"curl: {curl_took:.3f}s > {deadline}s + 50 ms"
    assert took < deadline + 0.5, f"{took:.3f}s around curl"


def _error(kind: str, status: int, backend: str, title: str) -> dict[str, Any]:
    """The expected `errors` entry, all but its detail."""
    return {"type": PROBLEMS + kind, "title": title, "status": status, "backend": backend}


def _errors(doc: dict[str, Any], key: str = "errors") -> list[dict[str, Any]]:
    """`doc[key]` without the details (checked separately), in order."""
    out = []
    for e in doc[key]:
        assert set(e) == {"type", "title", "status", "detail", "backend"}, e
        assert isinstance(e["detail"], str) and e["detail"], e
        out.append({k: v for k, v in e.items() if k != "detail"})
    return out


def _json(r: CurlResponse) -> dict[str, Any]:
    assert r.header("content-type") == "application/json", r.describe()
    doc = json.loads(r.body)
    assert isinstance(doc, dict), r.describe()
    return doc


def _settled(wait: float = 0.2) -> None:
    """Give a call that should not happen the time to show up."""
    time.sleep(wait)


# ---------------------------------------------------------------------------
# 1. every backend answers


def test_every_backend_answers_concurrently_and_the_dependent_one_after(
    proxy: ProxyProcess, apis: Apis
) -> None:
    r = _get(proxy, "/api/order-summary/o-1")
    assert r.status == 200, r.describe()
    doc = _json(r)
    assert list(doc) == ["order", "stock", "customer"]
    assert doc["order"] == {
        "id": "o-1",
        "customer_id": "c-42",
        "total": 99.5,
        "lines": [{"sku": "A-1", "qty": 2}],
    }
    assert doc["stock"] == {"order": "o-1", "ready": True, "warehouse": "north"}
    assert doc["customer"] == {"id": "c-42", "name": "Ada Lovelace"}
    assert r.header("meshgate-partial") is None
    assert r.header("x-request-id")
    assert int(r.header("content-length") or -1) == len(r.body)
    assert apis.orders.paths == ["/orders/o-1"]
    assert apis.stock.paths == ["/stock/o-1"]
    assert apis.customers.paths == ["/customers/c-42"]
    order, stock, customer = (
        apis.orders.requests[0],
        apis.stock.requests[0],
        apis.customers.requests[0],
    )
    assert order.method == stock.method == customer.method == "GET"
    # the dependent call starts only once the order is in
    assert customer.received_at >= order.received_at
    # each call carries the milliseconds it has left: the aggregation's 2 s,
    # the customer's own 500 ms
    assert 1000 < int(order.header("x-meshgate-deadline") or 0) <= 2000, order.headers
    assert 0 < int(customer.header("x-meshgate-deadline") or 0) <= 500, customer.headers


def test_independent_backends_run_concurrently(stack: Stack) -> None:
    """Two backends of 400 ms each answer in ~400 ms, not 800; the one that
    needs the order starts after the order's 400 ms."""
    delay = 0.4
    with (
        JsonApi({"/orders/o-1": (200, ORDERS["o-1"])}, delays={"/orders/o-1": delay}) as orders,
        JsonApi({"/stock/o-1": (200, {"ready": True})}, delays={"/stock/o-1": delay}) as stock,
        JsonApi({"/customers/c-42": (200, {"name": "Ada"})}) as customers,
    ):
        proxy = stack.proxy(
            {
                "upstreams": {
                    "order-service": upstream_block(orders),
                    "stock-service": upstream_block(stock),
                    "customer-service": upstream_block(customers),
                },
                "routes": [
                    _agg(
                        "/s/{id}",
                        ORDER,
                        _b("stock-service", "/stock/{id}", "stock"),
                        CUSTOMER,
                    )
                ],
            }
        )
        r, took = _timed(proxy, "/s/o-1")
        assert r.status == 200, r.describe()
        assert _json(r) == {
            "order": ORDERS["o-1"],
            "stock": {"ready": True},
            "customer": {"name": "Ada"},
        }
        assert delay <= took < 2 * delay, took
        (o,), (s,), (c,) = orders.requests, stock.requests, customers.requests
        assert abs(o.received_at - s.received_at) < delay / 2  # side by side
        assert c.received_at - o.received_at >= delay * 0.9  # after the order
        # keep-alive: the next requests reuse the backends' connections
        for _ in range(2):
            assert fetch(proxy.url("/s/o-1")).status == 200
        assert len(orders.requests) == 3
        assert orders.connection_count == stock.connection_count == 1
        assert customers.connection_count == 1


# ---------------------------------------------------------------------------
# 2. an optional backend is down


def test_optional_backend_refusing_gives_a_partial_answer(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/partial/o-1")
    assert r.status == 200, r.describe()
    assert r.header("meshgate-partial") == "true"
    doc = _json(r)
    assert list(doc) == ["order", "stock", "errors"]
    assert doc["order"] == ORDERS["o-1"]
    assert doc["stock"] == {"order": "o-1", "ready": True, "warehouse": "north"}
    assert _errors(doc) == [_error("upstream-unavailable", 503, "customer", "Service Unavailable")]
    assert apis.refused in doc["errors"][0]["detail"]
    assert apis.customers.requests == []


def test_optional_backend_stopped_with_a_custom_errors_key(proxy: ProxyProcess) -> None:
    r = _get(proxy, "/api/partial-stopped/o-1")
    assert r.status == 200, r.describe()
    assert r.header("meshgate-partial") == "true"
    doc = _json(r)
    assert list(doc) == ["order", "problems"]
    assert doc["order"] == ORDERS["o-1"]
    assert _errors(doc, "problems") == [
        _error("upstream-unavailable", 503, "loyalty", "Service Unavailable")
    ]


def test_metrics_count_partial_answers_and_failed_calls(proxy: ProxyProcess) -> None:
    def counts() -> dict[str, float]:
        text = fetch(proxy.admin_url("/metrics")).body.decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("meshgate_aggregate_") and 'route="routes[1]"' in line:
                name, _, value = line.rpartition(" ")
                out[
                    name.split("{")[0]
                    + ":"
                    + name.split('outcome="')[1].split('"')[0]
                    + ":"
                    + (name.split('backend="')[1].split('"')[0] if "backend=" in name else "")
                ] = float(value)
        return out

    before = counts()
    assert _get(proxy, "/api/partial/o-1").status == 200
    after = counts()
    assert after["meshgate_aggregate_responses_total:partial:"] == (
        before["meshgate_aggregate_responses_total:partial:"] + 1
    )
    assert (
        after["meshgate_aggregate_responses_total:complete:"]
        == (before["meshgate_aggregate_responses_total:complete:"])
    )
    for backend, outcome in (("order", "ok"), ("stock", "ok"), ("customer", "failed")):
        key = f"meshgate_aggregate_calls_total:{outcome}:{backend}"
        assert after[key] == before[key] + 1, (key, before, after)


# ---------------------------------------------------------------------------
# 3. a required backend fails


def test_required_backend_down_is_a_502_naming_it(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/required-down/o-1")
    doc = assert_problem(r, 502)
    assert doc["type"] == PROBLEMS + "aggregate-backend-failed"
    assert doc["backend"] == "order"
    assert "'order'" in doc["detail"] and apis.refused in doc["detail"], doc
    assert doc["request_id"] == r.header("x-request-id")
    assert r.header("meshgate-partial") is None
    _settled()
    assert apis.customers.requests == []  # it needed the order


def test_required_backend_404_passes_the_status(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/required/o-missing")
    doc = assert_problem(r, 404)
    assert doc["type"] == PROBLEMS + "backend-status"
    assert doc["backend"] == "order"
    assert apis.orders.paths == ["/orders/o-missing"]
    _settled()
    assert apis.customers.requests == []


def test_required_backend_500_is_a_502(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/required/boom")
    doc = assert_problem(r, 502)
    assert doc["type"] == PROBLEMS + "aggregate-backend-failed"
    assert doc["backend"] == "order"
    assert "500" in doc["detail"], doc
    _settled()
    assert apis.customers.requests == []


def test_required_dependent_404_passes_the_status(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/required/o-num")  # customer "42" exists: control
    assert r.status == 200, r.describe()
    assert _json(r)["customer"] == {"id": "42", "name": "Number"}
    r = _get(proxy, "/api/required/o-climb")
    doc = assert_problem(r, 404)
    assert doc["backend"] == "customer"


# ---------------------------------------------------------------------------
# 4. deadlines


def test_slow_optional_backend_is_cut_at_its_own_timeout(proxy: ProxyProcess, apis: Apis) -> None:
    r, took = _timed(proxy, "/api/slow-optional/s-slow")
    assert r.status == 200, r.describe()
    _within(r, took, 0.3)
    assert r.header("meshgate-partial") == "true"
    doc = _json(r)
    assert list(doc) == ["order", "errors"], doc
    assert doc["order"] == ORDERS["s-slow"]
    assert _errors(doc) == [_error("upstream-timeout", 504, "stock", "Gateway Timeout")]


def test_a_required_failure_answers_without_waiting_for_the_slow_ones(
    proxy: ProxyProcess, apis: Apis
) -> None:
    r, took = _timed(proxy, "/api/fail-fast/o-missing")
    doc = assert_problem(r, 404)
    assert doc["backend"] == "order"
    assert took < 0.5, took  # the optional stock call takes 1.5 s


def test_slow_optional_backend_is_cut_at_the_aggregation_timeout(
    proxy: ProxyProcess, apis: Apis
) -> None:
    """No timeout of its own: the aggregation's 500 ms cuts it."""
    r, took = _timed(proxy, "/api/slow-optional-agg/s-slow")
    assert r.status == 200, r.describe()
    _within(r, took, 0.5)
    assert r.header("meshgate-partial") == "true"
    doc = _json(r)
    assert list(doc) == ["order", "errors"], doc
    assert doc["order"] == ORDERS["s-slow"]
    (entry,) = doc["errors"]
    # the call's own timer and the aggregation's fire at the same moment
    assert entry["type"] in (PROBLEMS + "aggregate-timeout", PROBLEMS + "upstream-timeout")
    assert (entry["status"], entry["title"], entry["backend"]) == (504, "Gateway Timeout", "stock")


def test_slow_required_backend_is_cut_at_the_aggregation_timeout(
    proxy: ProxyProcess, apis: Apis
) -> None:
    r, took = _timed(proxy, "/api/slow-required/o-slow")
    doc = assert_problem(r, 502)
    _within(r, took, 0.5)
    assert doc["type"] == PROBLEMS + "aggregate-backend-failed"
    assert doc["backend"] == "order"
    assert apis.orders.paths == ["/orders/o-slow"]


def test_route_total_timeout_cuts_the_aggregation(proxy: ProxyProcess, apis: Apis) -> None:
    """`timeouts.total: 400ms` on the route wins over `aggregate.timeout: 2s`."""
    r, took = _timed(proxy, "/api/slow-route/o-slow")
    doc = assert_problem(r, 502)
    _within(r, took, 0.4)
    assert doc["backend"] == "order"


def test_a_shorter_client_deadline_cuts_the_aggregation(proxy: ProxyProcess) -> None:
    """`x-meshgate-deadline: 300` (ms) wins over `aggregate.timeout: 500ms`."""
    r, took = _timed(proxy, "/api/slow-required/o-slow", "-H", "x-meshgate-deadline: 300")
    doc = assert_problem(r, 502)
    _within(r, took, 0.3)
    assert doc["backend"] == "order"


def test_a_longer_client_deadline_does_not_extend_the_route_timeout(
    proxy: ProxyProcess,
) -> None:
    """`timeouts.total: 400ms` holds even when the client allows 10 s."""
    r, took = _timed(proxy, "/api/slow-route/o-slow", "-H", "x-meshgate-deadline: 10000")
    assert_problem(r, 502)
    _within(r, took, 0.4)


def test_optional_dependent_slow_is_cut_inside_the_aggregation(
    proxy: ProxyProcess, apis: Apis
) -> None:
    """customer: `required: false, timeout: 500ms`, after the order."""
    r, took = _timed(proxy, "/api/order-summary/o-slowcust")
    assert r.status == 200, r.describe()
    _within(r, took, 0.5)
    doc = _json(r)
    assert doc["order"] == ORDERS["o-slowcust"]
    assert _errors(doc) == [_error("upstream-timeout", 504, "customer", "Gateway Timeout")]


# ---------------------------------------------------------------------------
# 5. dependencies


def test_dependent_path_is_built_from_the_order(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/required/o-1")
    assert r.status == 200, r.describe()
    assert _json(r) == {"order": ORDERS["o-1"], "customer": {"id": "c-42", "name": "Ada Lovelace"}}
    assert [q.target for q in apis.customers.requests] == ["/customers/c-42"]


@pytest.mark.parametrize(
    ("order", "target"),
    [
        ("o-slash", "/customers/a%2Fb"),
        ("o-climb", "/customers/..%2F..%2Fadmin%3Fx%3D1%23f"),
        ("o-num", "/customers/42"),
        ("o-utf8", "/customers/Zo%C3%AB%201%2B1"),
    ],
)
def test_values_from_results_are_percent_encoded(
    proxy: ProxyProcess, apis: Apis, order: str, target: str
) -> None:
    r = _get(proxy, f"/api/order-summary/{order}")
    assert r.status == 200, r.describe()
    assert apis.customers.paths == [target]
    doc = _json(r)
    if order == "o-slash":
        assert doc["customer"] == {"id": "a/b", "name": "Slash"}
        assert r.header("meshgate-partial") is None
    if order == "o-climb":  # no such customer: optional, reported
        assert _errors(doc) == [_error("backend-status", 404, "customer", "Not Found")]
    if order == "o-utf8":
        assert doc["customer"] == {"id": "Zoë 1+1", "name": "Zoë"}


def test_a_missing_field_fails_the_dependent(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/order-summary/o-nocust")
    assert r.status == 200, r.describe()
    doc = _json(r)
    assert doc["order"] == ORDERS["o-nocust"]
    assert _errors(doc) == [_error("aggregate-missing-field", 502, "customer", "Bad Gateway")]
    assert "order.customer_id" in doc["errors"][0]["detail"]
    _settled()
    assert apis.customers.requests == []


def test_a_dependent_of_a_failed_optional_backend_is_reported_too(
    proxy: ProxyProcess, apis: Apis
) -> None:
    r = _get(proxy, "/api/chain-optional/o-1")
    assert r.status == 200, r.describe()
    assert r.header("meshgate-partial") == "true"
    doc = _json(r)
    assert list(doc) == ["stock", "errors"]
    assert doc["stock"] == {"order": "o-1", "ready": True, "warehouse": "north"}
    assert _errors(doc) == [
        _error("upstream-unavailable", 503, "order", "Service Unavailable"),
        _error("aggregate-dependency-failed", 502, "customer", "Bad Gateway"),
    ]
    assert "'order'" in doc["errors"][1]["detail"]
    _settled()
    assert apis.customers.requests == []


def test_a_required_dependent_of_a_failed_optional_backend_fails_it_all(
    proxy: ProxyProcess, apis: Apis
) -> None:
    doc = assert_problem(_get(proxy, "/api/chain-required/o-1"), 502)
    assert doc["backend"] == "customer"
    assert doc["type"] == PROBLEMS + "aggregate-backend-failed"
    _settled()
    assert apis.customers.requests == []


# ---------------------------------------------------------------------------
# 6. merging and target pointers


def test_merge_backend_and_target_pointers(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/merged/o-1")
    assert r.status == 200, r.describe()
    assert _json(r) == {
        "name": "Ada",
        "tier": "gold",
        "since": 2019,
        "invoice": {"no": "INV-7", "paid": False},
        "escaped": "slash-key",
        "order": ORDERS["o-1"],
    }
    assert sorted(apis.envelope.paths) == ["/profiles/o-1", "/wrapped/o-1", "/wrapped/o-1"]


def test_a_backend_document_nested_deeper_than_orjson_encodes_is_composed(
    proxy: ProxyProcess,
) -> None:
    r = _get(proxy, "/api/deep/o-1")
    assert r.status == 200, r.describe()
    doc = _json(r)
    assert doc["order"] == ORDERS["o-1"]
    node, depth = doc["deep"]["d"], 0
    while isinstance(node, list):
        node, depth = node[0], depth + 1
    assert (node, depth) == (1, DEEP)


def test_merge_of_a_non_object_and_a_missing_pointer_are_reported(
    proxy: ProxyProcess, apis: Apis
) -> None:
    r = _get(proxy, "/api/merged-bad/o-1")
    assert r.status == 200, r.describe()
    doc = _json(r)
    assert doc["order"] == ORDERS["o-1"]
    assert _errors(doc) == [
        _error("aggregate-not-object", 502, "envelope-service#1", "Bad Gateway"),
        _error("aggregate-missing-field", 502, "nothing", "Bad Gateway"),
    ]


# ---------------------------------------------------------------------------
# 7. what goes to the backends


def test_forward_headers_allow_list(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(
        proxy,
        "/api/headers/o-1",
        "-H",
        "Authorization: Bearer t0k3n",
        "-H",
        "Accept-Language: fr-CH",
        "-H",
        "Cookie: session=s3cr3t",
        "-H",
        "X-Secret: hush",
        "-H",
        "X-Customer: c-42",
        "-H",
        "X-Request-Id: agg-test-0001",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
    )
    assert r.status == 200, r.describe()
    assert _json(r) == {"order": ORDERS["o-1"], "customer": {"id": "c-42", "name": "Ada Lovelace"}}
    assert r.header("x-request-id") == "agg-test-0001"
    (order,), (customer,) = apis.orders.requests, apis.customers.requests
    assert customer.target == "/customers/c-42"  # {header.x-customer}
    for rec in (order, customer):
        names = rec.header_names()
        assert rec.header_all("authorization") == ["Bearer t0k3n"]
        assert rec.header_all("accept-language") == ["fr-CH"]
        assert rec.header_all("x-request-id") == ["agg-test-0001"]
        assert rec.header_all("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
        assert rec.header_all("via") == ["1.1 meshgate"]
        assert rec.header_all("accept") == ["application/json"]
        for hidden in ("cookie", "x-secret", "x-customer", "user-agent"):
            assert hidden not in names, rec.headers
        raw = "\n".join(f"{k}: {v}" for k, v in rec.headers)
        assert "s3cr3t" not in raw and "hush" not in raw


def test_a_custom_allow_list_replaces_the_default(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(
        proxy,
        "/api/headers-custom/o-1",
        "-H",
        "Authorization: Bearer t0k3n",
        "-H",
        "X-Secret: hush",
        "-H",
        "Cookie: a=b",
    )
    assert r.status == 200, r.describe()
    (rec,) = apis.orders.requests
    assert rec.header_all("x-secret") == ["hush"]
    assert rec.header_all("authorization") == []
    assert rec.header_all("cookie") == []
    assert rec.header_all("x-request-id") == [r.header("x-request-id")]


def test_a_missing_header_input_is_a_400(proxy: ProxyProcess, apis: Apis) -> None:
    doc = assert_problem(_get(proxy, "/api/headers/o-1"), 400)
    assert doc["type"] == PROBLEMS + "aggregate-missing-input"
    assert "x-customer" in doc["detail"]
    assert doc["backend"] == "customer"
    _settled()
    assert apis.orders.requests == [] and apis.customers.requests == []


def test_query_placeholders_are_percent_encoded(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/query/o-1?customer=a%2Fb")
    assert r.status == 200, r.describe()
    assert _json(r)["customer"] == {"id": "a/b", "name": "Slash"}
    assert apis.customers.paths == ["/customers/a%2Fb"]
    r = _get(proxy, "/api/query/o-1")  # optional: missing input reported
    doc = _json(r)
    assert _errors(doc) == [_error("aggregate-missing-input", 400, "customer", "Bad Request")]


def test_identity_headers_set_by_auth_reach_every_backend(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/authed/o-1", "-H", f"X-API-Key: {KEY_ALICE}", "-H", "X-Consumer: mallory")
    assert r.status == 200, r.describe()
    assert _json(r)["customer"] == {"id": "c-42", "name": "Ada Lovelace"}
    for rec in apis.orders.requests + apis.customers.requests:
        assert rec.header_all("x-consumer") == ["alice"], rec.headers
        assert rec.header_all("x-api-key") == []


@pytest.mark.parametrize("route", ["/api/authed/o-1", "/api/authed-listed/o-1"])
def test_a_client_cannot_forge_identity_headers(
    proxy: ProxyProcess, apis: Apis, route: str
) -> None:
    """The client's X-Consumer never reaches a backend, even with x-consumer
    in forward_headers (it is dropped before; the gateway's own one goes)."""
    r = _get(proxy, route, "-H", f"X-API-Key: {KEY_ALICE}", "-H", "X_Consumer: eve", "-H",
             "X-Consumer: mallory")  # fmt: skip
    assert r.status == 200, r.describe()
    recs = apis.orders.requests + apis.customers.requests
    assert recs
    for rec in recs:
        text = "\n".join(f"{k}: {v}" for k, v in rec.headers)
        assert "mallory" not in text and "eve" not in text, rec.headers
        assert rec.header_all("x-api-key") == []
        assert KEY_ALICE not in text
    if route == "/api/authed-listed/o-1":
        assert recs[0].header_all("x-consumer") == ["alice"]


def test_auth_refusal_reaches_no_backend(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/authed/o-1")
    assert_problem(r, 401)
    _settled()
    assert apis.orders.requests == [] and apis.customers.requests == []


# ---------------------------------------------------------------------------
# 8. encodings


def test_string_encoding_and_a_json_backend_answering_html(proxy: ProxyProcess, apis: Apis) -> None:
    r = _get(proxy, "/api/encoding/o-1")
    assert r.status == 200, r.describe()
    assert r.header("meshgate-partial") == "true"
    doc = _json(r)
    assert list(doc) == ["order", "banner", "errors"]
    assert doc["order"] == ORDERS["o-1"]
    assert doc["banner"] == "<b>Sale — 20% off</b>"
    assert _errors(doc) == [
        _error("backend-not-json", 502, "page", "Bad Gateway"),
        _error("backend-not-json", 502, "bad", "Bad Gateway"),
    ]
    assert "text/html" in doc["errors"][0]["detail"]


def test_required_backend_answering_html_is_a_502(proxy: ProxyProcess) -> None:
    doc = assert_problem(_get(proxy, "/api/html-required/o-1"), 502)
    assert doc["backend"] == "page"
    assert "text/html" in doc["detail"]


# ---------------------------------------------------------------------------
# 10. bodies and HEAD


def test_a_body_past_64_kib_is_refused_before_any_backend(
    proxy: ProxyProcess, apis: Apis, tmp_path: Path
) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    r = _get(proxy, "/api/required/o-1", "-X", "POST", "--data-binary", f"@{big}")
    assert_problem(r, 413)
    _settled()
    assert apis.orders.requests == [] and apis.customers.requests == []
    small = tmp_path / "small.json"
    small.write_bytes(b"y" * (64 * 1024))
    r = _get(proxy, "/api/required/o-1", "-X", "POST", "--data-binary", f"@{small}")
    assert r.status == 200, r.describe()
    assert [q.method for q in apis.orders.requests] == ["GET"]  # the backend's method
    assert apis.orders.requests[0].body == b""


def test_head_gets_the_headers_and_no_body(proxy: ProxyProcess, apis: Apis) -> None:
    get = _get(proxy, "/api/required/o-1")
    head = _get(proxy, "/api/required/o-1", "-I")
    assert head.status == 200, head.describe()
    assert head.header("content-type") == "application/json"
    assert head.header("content-length") == get.header("content-length")
    assert head.body.split(b"\r\n\r\n", 1)[1] == b""  # -I writes the head to -o
    assert [q.method for q in apis.orders.requests] == ["GET", "GET"]


# ---------------------------------------------------------------------------
# 9. configs refused with the field named

_UP = "upstreams:\n  a: {endpoints: ['127.0.0.1:1']}\n"


@pytest.mark.parametrize(
    ("backends", "extra", "expected"),
    [
        (
            '    - {upstream: a, path: "/a/{b.x}", group: a1}\n'
            '    - {upstream: a, path: "/b/{a1.y}", group: b}\n',
            "",
            ["aggregate.backends", "cycle", "a1, b"],
        ),
        (
            '    - {upstream: a, path: "/a/{id}", group: order}\n'
            '    - {upstream: a, path: "/b/{ordr.customer_id}", group: customer}\n',
            "",
            ["aggregate.backends[1].path", "ordr", "groups: customer, order"],
        ),
        (
            '    - {upstream: a, path: "/a/{order_id}", group: order}\n',
            "",
            ["aggregate.backends[0].path", "order_id", "parameters: id"],
        ),
        (
            '    - {upstream: a, path: "/a/{id}", group: query}\n',
            "",
            ["routes[0].aggregate.backends[0].group", "'query'"],
        ),
        (
            '    - {upstream: a, path: "/a/{id}", group: header}\n',
            "",
            ["routes[0].aggregate.backends[0].group", "'header'"],
        ),
        (
            '    - {upstream: a, path: "/a/{id}", group: order}\n',
            "  upstream: a\n",
            ["routes[0]", "exactly one of upstream:, split: or aggregate:"],
        ),
        (
            '    - {upstream: nope, path: "/a/{id}", group: order}\n',
            "",
            ["routes[0].aggregate.backends[0].upstream", "'nope'"],
        ),
        (
            '    - {upstream: a, path: "/a/{id}", group: order, sauce: hot}\n',
            "",
            ["routes[0].aggregate.backends[0]", "sauce"],
        ),
    ],
    ids=["cycle", "unknown-group", "unknown-param", "reserved-query", "reserved-header",
         "with-upstream", "unknown-upstream", "unknown-key"],
)  # fmt: skip
def test_bad_aggregate_configs_are_refused_naming_the_field(
    stack: Stack, tmp_path: Path, backends: str, extra: str, expected: list[str]
) -> None:
    text = _UP + "routes:\n- path: /x/{id}\n" + extra + "  aggregate:\n    backends:\n" + backends
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_meshgate("check", "-c", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"{path}:" in out, out
    for needle in expected:
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
