"""The dashboard page in a real Chromium, against a canned state
(fixtures/state.json, the shape of docs/dashboard-api.md) that a small
server in the test serves and pushes over Server-Sent Events."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from support.browser import (
    FixtureApi,
    axe_violations,
    css_color,
    edge_rows,
    eventually,
    fixture_api,
    graph,
    graph_marks,
    load_fixture,
    open_dashboard,
    screenshot,
    wait_updates,
)

pytestmark = pytest.mark.browser


@pytest.fixture
def api() -> Iterator[FixtureApi]:
    with fixture_api(load_fixture()) as served:
        yield served


@pytest.fixture
def state() -> dict[str, Any]:
    return load_fixture()


def test_every_node_and_edge_is_drawn_with_its_marks(
    browser: Any, api: FixtureApi, state: dict[str, Any]
) -> None:
    page, errors = open_dashboard(browser, api.url)
    g = graph(page)
    nodes = {n["id"]: n for n in g["nodes"]}
    edges = {e["id"]: e for e in g["edges"]}
    # Every node of the state, and `unknown` (a caller without an identity).
    assert set(nodes) == {n["id"] for n in state["nodes"]} | {"unknown"}
    assert nodes["gateway"]["kind"] == "gateway"
    assert nodes["external"]["kind"] == "external"
    assert set(edges) == {e["id"] for e in state["edges"]}

    # Widths follow rps; the table lists the busiest edge first.
    by_rps = sorted(state["edges"], key=lambda e: -e["rps"])
    rows = edge_rows(page)
    assert [r["id"] for r in rows] == [e["id"] for e in by_rps]
    widths = [edges[e["id"]]["widthPx"] for e in by_rps]
    assert widths == sorted(widths, reverse=True)

    # A padlock on every mTLS edge, in the graph and in the table; a warning
    # on the plaintext hop inside the mesh and on the permissive service;
    # neither on the clients' plain HTTP to the gateway.
    marks = graph_marks(page)
    assert marks == {
        **{e["id"]: "lock" for e in state["edges"] if e["mtls"]},
        "unknown->legacy-billing": "warn",
    }
    for e in state["edges"]:
        row = next(r for r in rows if r["id"] == e["id"])
        assert row["lock"] == e["mtls"], row
    assert next(r for r in rows if r["id"] == "unknown->legacy-billing")["warn"]
    assert not next(r for r in rows if r["id"] == "external->gateway")["warn"]
    assert nodes["legacy-billing"]["label"].startswith("⚠")
    assert edges["gateway->order-service"]["label"] == "9.0 rps · p99 8.1 ms"

    # Colour by success: green >= 99 %, amber >= 95 %, red below.
    assert edges["gateway->order-service"]["lineColor"] == css_color(page, "--ok")
    assert edges["order-service->customer-service"]["lineColor"] == css_color(page, "--warn")
    assert edges["unknown->legacy-billing"]["lineColor"] == css_color(page, "--bad")
    # A degraded node is amber.
    assert nodes["legacy-billing"]["color"] == css_color(page, "--warn")

    # The denied call: its own dashed red edge, explained by its policy.
    denied = edges["gateway->customer-service:denied"]
    assert denied["denied"] is True
    assert denied["lineStyle"] == "dashed"
    assert denied["lineColor"] == css_color(page, "--bad")
    # It bends clear of the nodes between its ends (order-service is on the straight line).
    mid = denied["mid"]
    for n in g["nodes"]:
        if n["id"] not in ("gateway", "customer-service"):
            assert abs(n["x"] - mid["x"]) + abs(n["y"] - mid["y"]) > 30, (n["id"], mid)
    assert "inbound/customer-service" in denied["explanation"]
    row = next(r for r in rows if r["denied"])
    assert "inbound/customer-service" in row["why"]
    assert "no rule allowed it" in row["why"]
    assert (
        page.locator("#denials-table tbody tr").first.inner_text().count("inbound/customer-service")
    )
    errors.check()


def test_the_service_panel_shows_instances_splits_and_policies(
    browser: Any, api: FixtureApi
) -> None:
    page, errors = open_dashboard(browser, api.url)
    page.select_option("#service-select", "order-service")
    split = page.locator("table.split[data-route='orders-canary']")
    v2 = split.locator("tr[data-upstream='order-service-v2']")
    assert v2.get_attribute("data-weight") == "10"
    assert "10.0%" in v2.inner_text()
    assert "90.0%" in split.locator("tr[data-upstream='order-service']").inner_text()
    # The instance whose certificate is inside the last 20 % of its life is amber.
    expiring = page.locator("#instances-table tr[data-expiring='true']")
    assert expiring.count() == 1
    assert "expiring" in expiring.inner_text()
    color = expiring.locator("td.expiring").evaluate("e => getComputedStyle(e).color")
    assert color.replace(" ", "") == css_color(page, "--warn-text")
    assert "7be01d44" in expiring.inner_text()
    golden = page.locator("#golden-table tbody tr")
    assert golden.count() == 3
    assert "99.8%" in golden.first.inner_text()

    # Clicking a node in the graph selects its service.
    pos = page.evaluate(
        "() => window.meshgateGraph.getElementById('customer-service').renderedPosition()"
    )
    box = page.locator("#graph").bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
    eventually(
        lambda: page.locator("#service-panel").get_attribute("data-service") == "customer-service",
        5,
        "the clicked node's panel",
    )
    policies = page.locator("#policies-table tbody tr")
    assert policies.count() == 2
    assert "orders-only" in policies.nth(0).inner_text()
    assert "240" in policies.nth(0).inner_text()
    assert "12" in policies.nth(1).inner_text()

    # The breaker and the NACK of a degraded service.
    page.select_option("#service-select", "legacy-billing")
    assert page.locator("#resilience dd[data-breaker='true']").inner_text() == "open"
    assert "NACK" in page.locator("#instances-table").inner_text()
    errors.check()


def test_live_updates_keep_the_layout_and_turn_a_down_node_red(
    browser: Any, api: FixtureApi, state: dict[str, Any]
) -> None:
    page, errors = open_dashboard(browser, api.url)
    api.wait_streams(1)
    before = {n["id"]: (n["x"], n["y"]) for n in graph(page)["nodes"]}

    later = copy.deepcopy(state)
    svc = next(n for n in later["nodes"] if n["id"] == "customer-service")
    svc.update(health="down", instances_up=0)
    next(e for e in later["edges"] if e["id"] == "gateway->order-service")["rps"] = 30.0
    api.push(later)
    eventually(
        lambda: (
            page.evaluate(
                "() => window.meshgateGraph.getElementById('customer-service').data('health')"
            )
            == "down"
        ),
        10,
        "customer-service's node says down",
    )
    g = graph(page)
    node = next(n for n in g["nodes"] if n["id"] == "customer-service")
    assert node["color"] == css_color(page, "--bad")
    row = page.locator("#nodes-table tr[data-node-id='customer-service']")
    assert row.get_attribute("data-health") == "down"
    # Data changed in place: nothing moved.
    assert {n["id"]: (n["x"], n["y"]) for n in g["nodes"]} == before
    assert edge_rows(page)[0]["id"] == "gateway->order-service"

    # A new service is placed; the others stay where they were.
    later2 = copy.deepcopy(later)
    later2["nodes"].append(
        {"id": "audit", "kind": "service", "name": "audit", "health": "healthy", "mtls": "strict"}
    )
    later2["edges"].append(
        {
            "id": "order-service->audit",
            "source": "order-service",
            "target": "audit",
            "rps": 1.5,
            "success": 1.0,
            "p99_ms": 3.0,
            "requests": 90,
            "mtls": True,
            "denied": False,
        }
    )
    api.push(later2)
    eventually(
        lambda: page.evaluate("() => window.meshgateGraph.getElementById('audit').nonempty()"),
        10,
        "the new node",
    )
    g = graph(page)
    after = {n["id"]: (n["x"], n["y"]) for n in g["nodes"]}
    assert {k: after[k] for k in before} == before
    new = after["audit"]
    assert all(abs(new[0] - x) + abs(new[1] - y) > 30 for x, y in before.values())

    # Back up, and the stream survives a drop: the page reconnects.
    api.drop_streams()
    api.wait_streams(1)
    api.push(state)
    eventually(
        lambda: (
            page.evaluate(
                "() => window.meshgateGraph.getElementById('customer-service').data('health')"
            )
            == "healthy"
        ),
        10,
        "customer-service's node is back",
    )
    assert page.locator("#conn").get_attribute("data-state") == "live"
    errors.check()


def test_why_was_this_denied_and_the_config_diff(browser: Any, api: FixtureApi) -> None:
    page, errors = open_dashboard(browser, api.url)
    # The form, filled from the keyboard.
    page.focus("#explain-source")
    page.keyboard.type("gateway")
    page.select_option("#explain-destination", "customer-service")
    page.select_option("#explain-method", "GET")
    page.fill("#explain-path", "/customers/1")
    page.focus("#explain-form button[type=submit]")
    page.keyboard.press("Enter")
    result = page.locator("#explain-result")
    eventually(lambda: result.get_attribute("data-decision") == "deny", 5, "a decision")
    assert "inbound/customer-service" in result.locator(".policy").inner_text()
    assert "no rule allowed it" in result.inner_text()
    assert api.explains[-1] == {
        "source": "gateway",
        "destination": "customer-service",
        "method": "GET",
        "path": "/customers/1",
    }
    # A denial's own button asks about that request.
    page.locator("#denials-table button").first.click()
    eventually(lambda: len(api.explains) == 2, 5, "the second explain")
    assert api.explains[-1]["path"] == "/hops"
    assert api.explains[-1]["source"] == "spiffe://demo.mesh/ns/edge/sa/gateway"

    # The generations, newest first; the diff of the last two.
    gens = page.locator("#generations-table tbody tr")
    assert gens.count() == 3
    assert gens.first.get_attribute("data-generation") == "3"
    assert page.input_value("#diff-from") == "2"
    assert page.input_value("#diff-to") == "3"
    page.click("#diff-form button")
    page.wait_for_selector("#diff-output .add")
    assert page.locator("#diff-output .add").inner_text().strip() == "+mtls: strict"
    assert page.locator("#diff-output .del").inner_text().strip() == "-mtls: permissive"
    nack = page.locator("#proxies-table tr.nack")
    assert nack.count() == 1
    assert "upstream 'ledger' is not a service" in nack.inner_text()

    # The edge: routes by rps, refusals by reason, top consumers.
    assert page.locator("#edge-routes-table tbody tr").first.get_attribute("data-route") == (
        "orders"
    )
    assert page.locator("#refusals-table tr[data-reason='authz']").inner_text().endswith("12")
    assert page.locator("#consumers-table tbody tr").first.get_attribute("data-consumer") == (
        "acme"
    )
    errors.check()


@pytest.mark.parametrize("viewport", ["desktop", "tablet"])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_accessible_responsive_and_screenshots(
    browser: Any, api: FixtureApi, viewport: str, scheme: str
) -> None:
    page, errors = open_dashboard(browser, api.url, viewport=viewport, scheme=scheme)
    wait_updates(page, 1)
    violations = axe_violations(page)
    assert not violations, violations
    # Nothing wider than the window (tables scroll inside their cards).
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    # Every control can be reached with Tab and has a name.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, select, input, a[href]')]
            .filter(e => e.tabIndex < 0 || !(e.labels?.length || e.getAttribute('aria-label')
                || e.textContent.trim()))
            .map(e => e.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []
    seen = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        seen.add(page.evaluate("() => document.activeElement.id"))
    assert {"service-select", "explain-source", "explain-path", "diff-from"} <= seen
    screenshot(page, f"fixture-{viewport}-{scheme}")
    errors.check()


def test_with_a_token_the_page_sends_it_and_streams_with_fetch(
    browser: Any, state: dict[str, Any]
) -> None:
    with fixture_api(state, token="s3cret") as served:
        page, errors = open_dashboard(browser, served.url + "#token=s3cret")
        # The fragment is gone from the address bar; the stream is live.
        assert "s3cret" not in page.url
        served.wait_streams(1)
        later = copy.deepcopy(state)
        next(n for n in later["nodes"] if n["id"] == "order-service")["health"] = "down"
        served.push(later)
        eventually(
            lambda: (
                page.evaluate(
                    "() => window.meshgateGraph.getElementById('order-service').data('health')"
                )
                == "down"
            ),
            10,
            "the update over the fetch stream",
        )
        assert page.locator("#conn").get_attribute("data-state") == "live"
        errors.check()
        page.context.close()


def test_the_header_says_where_the_numbers_come_from(
    browser: Any, api: FixtureApi, state: dict[str, Any]
) -> None:
    """`metrics_source`: the proxies' reports, or a Prometheus, and whether
    that Prometheus answers (docs/dashboard-api.md)."""
    page, errors = open_dashboard(browser, api.url)
    api.wait_streams(1)
    source = page.locator("#metrics-source")
    eventually(lambda: source.inner_text() == "proxy reports", 10, "reports by default")
    later = copy.deepcopy(state)
    later["metrics_source"] = {
        "kind": "prometheus",
        "url": "http://127.0.0.1:9090",
        "healthy": False,
        "last_error": "connection refused",
    }
    api.push(later)
    eventually(
        lambda: source.inner_text() == "Prometheus (failing: connection refused)",
        10,
        "a failing Prometheus is shown",
    )
    assert source.get_attribute("data-state") == "failing"
    assert source.get_attribute("title") == "http://127.0.0.1:9090"
    later["metrics_source"] = {
        "kind": "prometheus",
        "url": "http://127.0.0.1:9090",
        "healthy": True,
    }
    api.push(later)
    eventually(lambda: source.inner_text() == "Prometheus (answering)", 10, "it answers again")
    assert source.get_attribute("data-state") == "ok"
    errors.check()
