"""The `meshgate` CLI's offline commands on real files: check, routes, explain.

The router owns the wording of `routes` and `explain`, so those assertions
are loose: the route's index, its path and upstream, and the word 'matched'.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.proxy import REPO, run_meshgate

pytestmark = pytest.mark.engine

SEED = REPO / "examples" / "seed.yaml"


def test_check_seed_ok_and_describes_auth_and_rate_limits() -> None:
    proc = run_meshgate("check", "-c", str(SEED))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "routes[0] (/api/orders/**): auth by any of jwt" in out, out
    assert "rate limit 100/min per default (gcra, local)" in out, out
    assert "not enforced" not in out.lower(), out


def test_check_and_routes_show_the_seeds_split() -> None:
    proc = run_meshgate("check", "-c", str(SEED))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert (
        "routes[0] (/api/orders/**): split order-service 90% (weight 90), "
        "order-service-v2 10% (weight 10), random per request"
    ) in out, out
    assert 'routes[0] (/api/orders/**): canary: header x-canary = "1" -> order-service-v2' in out
    proc = run_meshgate("routes", "-c", str(SEED))
    assert proc.returncode == 0, proc.stderr
    assert "split(order-service:90, order-service-v2:10)" in proc.stdout, proc.stdout


def test_check_refuses_an_unreadable_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "auth:\n  jwt: {type: jwt, public_key_file: missing.pem}\n"
        "upstreams:\n  a: {endpoints: [127.0.0.1:1]}\n"
        "routes:\n- {path: /x, upstream: a, auth: jwt}\n"
    )
    proc = run_meshgate("check", "-c", str(path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "auth.jwt" in proc.stderr and "missing.pem" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("upstreams:\n  a:\n    endpoints: [127.0.0.1:1]\n    balancer: fastest\n", 4, "balancer"),
        ("upstreams:\n  a:\n    endpoints: [127.0.0.1:1]\nroutes:\n- path: /x\n  upstrem: a\n",
         6, "upstrem"),
        ("limits:\n  header_timeout: soon\n", 2, "header_timeout"),
        ("upstreams:\n  a:\n    endpoints: [127.0.0.1:1]\nroutes:\n- path: /x/**\n"
         "  upstream: b\n", 6, "upstream"),
    ],
    ids=["bad-enum", "typo-key", "bad-duration", "unknown-upstream"],
)  # fmt: skip
def test_check_bad_config_names_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_meshgate("check", "-c", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"{path}:{line}" in out, out
    assert field in out, out


def test_check_missing_file_fails(tmp_path: Path) -> None:
    proc = run_meshgate("check", "-c", str(tmp_path / "absent.yaml"))
    assert proc.returncode != 0
    assert "absent.yaml" in proc.stdout + proc.stderr


def test_routes_lists_every_route() -> None:
    proc = run_meshgate("routes", "-c", str(SEED))
    assert proc.returncode == 0, proc.stderr
    for text in ("/api/orders/**", "order-service", "/api/customers/**", "customer-service"):
        assert text in proc.stdout, proc.stdout


def test_explain_says_which_route_matched() -> None:
    proc = run_meshgate("explain", "-c", str(SEED), "GET", "/api/orders/7")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # The wording is the router's ("matched", "matches"); the index is route 0.
    assert re.search(r"match", out, re.IGNORECASE), out
    assert re.search(r"\b0\b", out), out
    assert "order-service" in out, out


def test_explain_lists_an_aggregations_calls() -> None:
    proc = run_meshgate("explain", "-c", str(SEED), "GET", "/api/order-summary/7")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "answered by an aggregation (within 2s) of:" in out, out
    assert "order: GET /orders/7 on order-service\n" in out, out
    assert "customer: GET /customers/{order.customer_id} on customer-service (optional)" in out


def test_explain_no_match() -> None:
    proc = run_meshgate("explain", "-c", str(SEED), "GET", "/nowhere")
    out = proc.stdout + proc.stderr
    assert "404" in out or "no route" in out.lower(), out
