"""Authorization policies (`config.authz`, `filters.authz`): the decision
engine, the filter (403s, audit, counters), the config's errors with file,
line and field, and per-service inbound limits (key `peer`, several limits
on a route, the snapshot's `inbound` section)."""

from __future__ import annotations

import itertools
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from meshgate.config.authz import AuthzConfig
from meshgate.config.loader import ConfigError, ConfigProblem
from meshgate.config.mesh import MeshConfig
from meshgate.config.schema import Config, RouteConfig
from meshgate.engine.load import load_config, load_mesh
from meshgate.filters import FilterRequest, LocalReply
from meshgate.filters.authz import AuthzFilter, AuthzPolicy, Decision, explain
from meshgate.filters.build import FilterServices, compile_filters
from meshgate.filters.ratelimit import RateLimitFilter
from meshgate.filters.sources import SourceCounts
from meshgate.http.problem import ProblemDetail, problem_body
from meshgate.mesh.control.snapshot import build_sections
from meshgate.ratelimit.local import SharedTable

TD = "spiffe://mesh.local"
ORDERS = f"{TD}/ns/default/sa/orders"
BILLING = f"{TD}/ns/default/sa/billing"
LEGACY = f"{TD}/ns/legacy/sa/old-orders"


def policy(**doc: Any) -> AuthzConfig:
    return AuthzConfig.model_validate(doc)


def rule(name: str, action: str = "allow", **fields: Any) -> dict[str, Any]:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return {"name": name, "action": action, **fields}


def decide(cfg: AuthzConfig, peer: str | None, method: str = "GET", path: str = "/", **h: str):
    headers = [(k.replace("_", "-").encode(), v.encode()) for k, v in h.items()]
    return explain(cfg, peer, method, path, headers, policy="payments")


# ---------------------------------------------------------------------------
# the decision


def test_deny_wins_over_allow_whatever_the_order() -> None:
    for rules in itertools.permutations(
        [rule("everyone", "allow"), rule("no-legacy", "deny", from_=[f"{TD}/ns/legacy/*"])]
    ):
        cfg = policy(default="allow", rules=list(rules))
        d = decide(cfg, LEGACY)
        assert d == Decision("deny", "payments", "no-legacy", "rule 'no-legacy' (deny) matches")
        assert not d.allowed
        assert decide(cfg, ORDERS).rule == "everyone"


def test_allow_rules_then_the_default() -> None:
    rules = [rule("orders", from_=[ORDERS])]
    deny_by_default = policy(default="deny", rules=rules)
    assert decide(deny_by_default, ORDERS).decision == "allow"
    d = decide(deny_by_default, BILLING)
    assert (d.decision, d.rule) == ("deny", None)
    assert d.reason == "no rule allows it, and the default is deny"
    allow_by_default = policy(default="allow", rules=[rule("x", "deny", from_=[LEGACY])])
    d = decide(allow_by_default, BILLING)
    assert (d.decision, d.rule, d.allowed) == ("allow", None, True)
    assert "default is allow" in d.reason


def test_identity_exact_and_prefix() -> None:
    cfg = policy(default="deny", rules=[rule("prod", from_=[f"{TD}/ns/prod/*", ORDERS])])
    assert decide(cfg, f"{TD}/ns/prod/sa/api").allowed
    assert decide(cfg, f"{TD}/ns/prod/sa/api/deeper").allowed
    assert decide(cfg, ORDERS).allowed
    # A prefix is a path prefix: not another namespace that starts alike, not the prefix itself.
    assert not decide(cfg, f"{TD}/ns/production/sa/api").allowed
    assert not decide(cfg, f"{TD}/ns/prod").allowed
    assert not decide(cfg, ORDERS + "-v2").allowed
    assert not decide(cfg, "spiffe://other.domain/ns/prod/sa/api").allowed


def test_every_field_a_rule_gives_must_match() -> None:
    cfg = policy(
        default="deny",
        rules=[
            rule(
                "charge",
                from_=[ORDERS],
                methods=["get", "POST"],
                paths=["/charge", "/charge/{id}/refund", "/v1/**"],
                headers={"x-tenant": "acme", "x-debug": False},
            )
        ],
    )
    ok = {"x_tenant": "acme"}
    assert decide(cfg, ORDERS, "GET", "/charge", **ok).allowed
    assert decide(cfg, ORDERS, "post", "/charge/7/refund", **ok).allowed
    assert decide(cfg, ORDERS, "GET", "/v1", **ok).allowed
    assert decide(cfg, ORDERS, "GET", "/v1/a/b/c?x=1", **ok).allowed
    # Each field alone failing is enough.
    assert not decide(cfg, BILLING, "GET", "/charge", **ok).allowed
    assert not decide(cfg, ORDERS, "HEAD", "/charge", **ok).allowed  # GET is not HEAD
    assert not decide(cfg, ORDERS, "GET", "/charge/", **ok).allowed  # exact: no trailing slash
    assert not decide(cfg, ORDERS, "GET", "/charge/7", **ok).allowed
    assert not decide(cfg, ORDERS, "GET", "/charge//refund", **ok).allowed
    assert not decide(cfg, ORDERS, "GET", "/v2/a", **ok).allowed
    assert not decide(cfg, ORDERS, "GET", "/charge").allowed  # x-tenant missing
    assert not decide(cfg, ORDERS, "GET", "/charge", x_tenant="ACME").allowed
    assert not decide(cfg, ORDERS, "GET", "/charge", x_tenant="acme", x_debug="1").allowed


def test_paths_match_the_normalized_path() -> None:
    cfg = policy(default="deny", rules=[rule("admin", "allow", paths=["/admin/**"])])
    deny_admin = policy(default="allow", rules=[rule("admin", "deny", paths=["/admin/**"])])
    for sneaky in ("//admin/users", "/x/../admin/users", "/%61dmin/users", "/./admin"):
        assert decide(cfg, ORDERS, "GET", sneaky).allowed, sneaky
        assert not decide(deny_admin, ORDERS, "GET", sneaky).allowed, sneaky
    with pytest.raises(ValueError, match="not a valid request path"):
        decide(cfg, ORDERS, "GET", "/../etc")


def test_plaintext_is_matched_only_by_plaintext() -> None:
    cfg = policy(
        default="deny",
        rules=[
            rule("mesh", from_=[f"{TD}/*"]),
            rule("probes", from_=["plaintext"], methods=["GET"], paths=["/healthz"]),
        ],
    )
    assert not decide(cfg, None, "GET", "/charge").allowed  # `spiffe://.../*` is not "anyone"
    assert decide(cfg, None, "GET", "/healthz").rule == "probes"
    assert decide(cfg, ORDERS, "GET", "/charge").rule == "mesh"
    # `plaintext` alone never matches a caller with an identity.
    only_plain = policy(default="deny", rules=[rule("p", from_=["plaintext"])])
    assert not decide(only_plain, ORDERS).allowed
    # A rule without from: matches a plaintext caller too (it says nothing of the source).
    no_from = policy(default="deny", rules=[rule("get", methods=["GET"])])
    assert decide(no_from, None).allowed
    deny_plain = policy(default="allow", rules=[rule("no-plain", "deny", from_=["plaintext"])])
    assert not decide(deny_plain, None).allowed
    assert decide(deny_plain, ORDERS).allowed


def test_audit_mode_decides_audit_deny_and_lets_it_through() -> None:
    cfg = policy(
        default="deny", mode="audit", rules=[rule("legacy", "deny", from_=[f"{TD}/ns/legacy/*"])]
    )
    d = decide(cfg, LEGACY)
    assert (d.decision, d.rule, d.allowed) == ("audit_deny", "legacy", True)
    assert "audit mode" in d.reason
    d = decide(cfg, ORDERS)
    assert (d.decision, d.rule, d.allowed) == ("audit_deny", None, True)


def test_trace_names_the_field_that_does_not_match() -> None:
    cfg = policy(
        default="deny",
        rules=[
            rule("a", from_=[ORDERS]),
            rule("b", methods=["POST"]),
            rule("c", paths=["/x/*"]),
            rule("d", headers={"x-k": True}),
            rule("e", "deny", from_=[LEGACY]),
        ],
    )
    trace = AuthzPolicy(cfg, "p").trace(BILLING, b"GET", "/y")
    assert [(t.name, t.action, t.matched) for t in trace] == [
        ("e", "deny", False),
        ("a", "allow", False),
        ("b", "allow", False),
        ("c", "allow", False),
        ("d", "allow", False),
    ]
    whys = [t.why for t in trace]
    assert BILLING in whys[0] and "from:" in whys[0]
    assert "method GET" in whys[2]
    assert "path /y" in whys[3]
    assert "x-k is missing" in whys[4]
    assert AuthzPolicy(cfg, "p").trace(ORDERS, b"GET", "/y")[1].why == "matches"


def test_explain_and_the_filter_never_disagree() -> None:
    cfg = policy(
        default="deny",
        rules=[
            rule("no-legacy", "deny", from_=[f"{TD}/ns/legacy/*"]),
            rule("orders", from_=[ORDERS], methods=["GET", "POST"], paths=["/charge/**"]),
            rule("probe", from_=["plaintext"], paths=["/healthz"], headers={"x-probe": "1"}),
            rule("no-delete", "deny", methods=["DELETE"]),
        ],
    )
    f = AuthzFilter(cfg, "payments")
    peers = [None, ORDERS, BILLING, LEGACY]
    methods = ["GET", "POST", "DELETE"]
    paths = ["/charge", "/charge/7", "/healthz", "/other"]
    header_sets: list[list[tuple[bytes, bytes]]] = [[], [(b"x-probe", b"1")]]
    for peer, method, path, headers in itertools.product(peers, methods, paths, header_sets):
        d = explain(cfg, peer, method, path, headers, policy="payments")
        req = FilterRequest(method.encode(), path.encode() + b"?q=1", headers, b"127.0.0.1")
        req.peer = peer
        result = f(req)
        assert (result is None) == d.allowed, (peer, method, path, headers, d)


# ---------------------------------------------------------------------------
# the filter


def _request(peer: str | None, method: bytes = b"GET", target: bytes = b"/") -> FilterRequest:
    req = FilterRequest(method, target, [], b"127.0.0.1")
    req.peer = peer
    return req


def test_a_denial_is_a_403_naming_the_policy_and_the_rule(caplog: pytest.LogCaptureFixture) -> None:
    cfg = policy(default="deny", rules=[rule("no-legacy", "deny", from_=[f"{TD}/ns/legacy/*"])])
    f = AuthzFilter(cfg, "payments")
    with caplog.at_level(logging.INFO, logger="meshgate.authz"):
        reply = f(_request(LEGACY, b"POST", b"/charge?amount=5"))
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.kind) == (403, "authz-denied")
    assert isinstance(reply.detail, ProblemDetail)
    assert "'payments'" in reply.detail and "'no-legacy'" in reply.detail
    doc = json.loads(problem_body(reply.status, reply.kind, reply.detail, request_id="r1"))
    assert doc["type"] == "https://meshgate.dev/problems/authz-denied"
    assert (doc["status"], doc["policy"], doc["rule"], doc["decision"]) == (
        403,
        "payments",
        "no-legacy",
        "deny",
    )
    assert doc["source"] == LEGACY and doc["request_id"] == "r1"
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    text = record.getMessage()
    assert "payments" in text and LEGACY in text and "no-legacy" in text
    assert "POST /charge " in text  # the path, without its query

    reply = f(_request(None))
    assert isinstance(reply, LocalReply)
    doc = json.loads(problem_body(reply.status, reply.kind, reply.detail))
    assert (doc["rule"], doc["source"]) == (None, "plaintext")
    assert "no rule allows it" in doc["detail"] and "default is deny" in doc["detail"]


def test_standard_problem_members_win_over_extensions() -> None:
    detail = ProblemDetail("text", {"status": 200, "type": "x", "extra": 1})
    doc = json.loads(problem_body(403, "k", detail))
    assert (doc["status"], doc["type"], doc["detail"], doc["extra"]) == (
        403,
        "https://meshgate.dev/problems/k",
        "text",
        1,
    )


def test_audit_logs_would_deny_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    cfg = policy(default="deny", mode="audit", rules=[rule("orders", from_=[ORDERS])])
    f = AuthzFilter(cfg, "payments")
    with caplog.at_level(logging.INFO, logger="meshgate.authz"):
        assert f(_request(BILLING)) is None
        assert f(_request(ORDERS)) is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "would deny" in record.getMessage() and BILLING in record.getMessage()
    rows = {(s, d.decision, d.rule): n for s, d, n in f.metric_rows()}
    assert rows == {(BILLING, "audit_deny", None): 1, (ORDERS, "allow", "orders"): 1}


def test_decisions_are_counted_by_rule_and_source() -> None:
    cfg = policy(default="allow", rules=[rule("no-legacy", "deny", from_=[LEGACY])])
    f = AuthzFilter(cfg, "payments")
    for peer in (ORDERS, ORDERS, LEGACY, None):
        f(_request(peer))
    rows = {(s, d.decision, d.rule): n for s, d, n in f.metric_rows()}
    assert rows == {
        (ORDERS, "allow", None): 2,
        (LEGACY, "deny", "no-legacy"): 1,
        ("plaintext", "allow", None): 1,
    }


def test_source_labels_are_bounded() -> None:
    counts = SourceCounts(2, limit=3)
    for i in range(10):
        counts.row(f"{TD}/ns/n/sa/s{i}")[0] += 1
    counts.row(None)[1] += 1
    assert list(counts.rows) == [f"{TD}/ns/n/sa/s{i}" for i in range(3)] + ["other"]
    assert counts.rows["other"] == [7, 1]
    counts.row(f"{TD}/ns/n/sa/s1")[0] += 1  # a known source keeps its own row
    assert counts.rows[f"{TD}/ns/n/sa/s1"] == [2, 0]


def test_a_route_compiles_authz_after_auth_and_before_limits() -> None:
    config = Config.model_validate(
        {
            "upstreams": {"app": {"endpoints": ["127.0.0.1:1"]}},
            "routes": [
                {
                    "path": "/**",
                    "name": "payments",
                    "upstream": "app",
                    "fault": {"abort": {"status": 503, "percent": 0}},
                    "rate_limit": "5/s",
                    "authz": {"default": "deny"},
                }
            ],
        }
    )
    out = compile_filters(config, FilterServices(), ["payments"], base_dir=Path("."))
    chain = out.chains[0]
    assert chain is not None
    assert chain.names == ("authz", "fault", "rate_limit")
    assert [label for label, _ in out.authz_filters] == ["payments"]
    reply = chain.run(_request(ORDERS))
    assert isinstance(reply, LocalReply) and reply.status == 403
    ((_, limit),) = out.limit_filters
    assert limit.allowed == limit.limited == 0  # a denied caller spends no quota


# ---------------------------------------------------------------------------
# limits: key peer, several per route


def _limit(cfg: dict[str, Any] | str, index: int = 0, by_source: bool = False) -> RateLimitFilter:
    route = RouteConfig.model_validate({"path": "/**", "upstream": "app", "rate_limit": cfg})
    (rl,) = route.rate_limits()
    return RateLimitFilter(
        route,
        "inbound",
        rl,
        {},
        table=SharedTable(64, shared=False),
        redis=None,
        index=index,
        by_source=by_source,
    )


def test_a_limit_by_peer_counts_each_identity_and_plaintext_together() -> None:
    f = _limit({"limit": 2, "period": "1h", "key": "peer"}, by_source=True)
    assert f.key(_request(ORDERS)) == b"p:" + ORDERS.encode()
    assert f.key(_request(None)) == b"p:plaintext"
    results = [f(_request(peer)) for peer in (ORDERS, ORDERS, ORDERS, BILLING, None, None, None)]
    statuses = [r.status if isinstance(r, LocalReply) else 200 for r in results]
    assert statuses == [200, 200, 429, 200, 200, 200, 429]
    assert f.limited_by_source is not None
    assert f.limited_by_source.rows == {ORDERS: [1], "plaintext": [1]}
    refusal = results[2]
    assert isinstance(refusal, LocalReply)
    names = [n for n, _ in refusal.headers]
    assert b"x-ratelimit-remaining" in names and b"retry-after" in names


def test_a_later_limit_on_a_route_sends_only_the_list_fields() -> None:
    second = _limit({"limit": 1, "period": "1h", "key": "route"}, index=1)
    assert second.name == "inbound:2"
    req = _request(ORDERS)
    assert second(req) is None
    assert req.response_extra == (
        b'ratelimit-policy: "inbound:2";q=1;w=3600\r\nratelimit: "inbound:2";r=0;t=3600\r\n'
    )
    refusal = second(_request(ORDERS))
    assert isinstance(refusal, LocalReply) and refusal.status == 429
    assert [n for n, _ in refusal.headers] == [b"ratelimit-policy", b"ratelimit", b"retry-after"]
    assert second.limited_by_source is None
    # Ids differ by position, so that two equal limits on a route count apart.
    first = _limit({"limit": 1, "period": "1h", "key": "route"})
    assert first.id != second.id and first.name == "inbound"


def test_a_route_takes_one_limit_or_a_list() -> None:
    one = RouteConfig.model_validate({"path": "/x", "upstream": "u", "rate_limit": "10/s"})
    assert [(r.limit, r.period) for r in one.rate_limits()] == [(10, 1.0)]
    many = RouteConfig.model_validate(
        {
            "path": "/x",
            "upstream": "u",
            "rate_limit": [{"limit": 5, "period": 1, "key": "peer"}, "100/min"],
        }
    )
    assert [(r.limit, r.key) for r in many.rate_limits()] == [(5, "peer"), (100, "default")]
    assert RouteConfig.model_validate({"path": "/x", "upstream": "u"}).rate_limits() == []


# ---------------------------------------------------------------------------
# config errors, with file, line and field


def _problem(tmp_path: Path, text: str, *, mesh: bool = False) -> ConfigProblem:
    path = tmp_path / ("mesh.yaml" if mesh else "meshgate.yaml")
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        (load_mesh if mesh else load_config)(path, env={})
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].file == str(path)
    return problems[0]


ROUTE = """\
upstreams:
  app: {endpoints: [127.0.0.1:1]}
routes:
- path: /**
  upstream: app
  authz:
    default: deny
    rules:
"""


@pytest.mark.parametrize(
    ("rules", "line", "field", "message"),
    [
        (
            "    - {name: a, action: allow, from: [orders]}\n",
            9,
            "routes[0].authz.rules[0].from[0]",
            "'orders' is not a SPIFFE ID",
        ),
        (
            "    - name: a\n      action: allow\n      paths: [/ok, /a/**/b]\n",
            11,
            "routes[0].authz.rules[0].paths[1]",
            "'**' is only allowed as the last segment",
        ),
        (
            "    - name: a\n      action: allow\n      paths: [charge]\n",
            11,
            "routes[0].authz.rules[0].paths[0]",
            "a path pattern starts with '/'",
        ),
        (
            "    - name: a\n      action: permit\n",
            10,
            "routes[0].authz.rules[0].action",
            "'allow' or 'deny'",
        ),
        (
            "    - name: a\n      action: allow\n      method: [GET]\n",
            11,
            "routes[0].authz.rules[0].method",
            "did you mean 'methods'?",
        ),
        (
            "    - name: a\n      action: allow\n      methods: []\n",
            11,
            "routes[0].authz.rules[0].methods",
            "at least 1 item",
        ),
        (
            "    - name: a\n      action: allow\n      methods: [GET, 'GE T']\n",
            11,
            "routes[0].authz.rules[0].methods[1]",
            "expected an HTTP method",
        ),
        (
            "    - name: a\n      action: allow\n      headers: {'x bad': true}\n",
            11,
            "routes[0].authz.rules[0].headers",
            "'x bad' is not a valid header name",
        ),
        (
            "    - {name: a, action: allow}\n    - {name: a, action: deny}\n",
            8,
            "routes[0].authz.rules",
            "rule name 'a' is used twice",
        ),
        ("    - {action: allow}\n", 9, "routes[0].authz.rules[0].name", "'name' is missing"),
    ],
)
def test_bad_rules_are_errors_with_their_line(
    tmp_path: Path, rules: str, line: int, field: str, message: str
) -> None:
    problem = _problem(tmp_path, ROUTE + rules)
    assert (problem.line, problem.field) == (line, field), problem
    assert message in problem.message, problem


MESH = """\
trust_domain: mesh.local
services:
  orders: {}
  payments:
"""


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        (
            "    authz:\n      rules:\n      - {name: x, action: deny, from: [spiffe://Mesh/*]}\n",
            7,
            "services.payments.authz.rules[0].from[0]",
            "is not a SPIFFE ID",
        ),
        (
            "    rate_limit:\n      per_source: {limit: 5, period: 1s, key: ip}\n",
            6,
            "services.payments.rate_limit.per_source",
            "this limit counts by peer (leave its key: out), found 'ip'",
        ),
        (
            "    rate_limit:\n      service: {limit: 5, period: 1s, policy: redis}\n",
            5,
            "services.payments.rate_limit",
            "service: policy: redis needs rate_limit.redis",
        ),
        ("    rate_limit: {}\n", 5, "services.payments.rate_limit", "needs per_source:"),
        (
            "    rate_limit: {per_source: 5/fortnight}\n",
            5,
            "services.payments.rate_limit.per_source",
            "expected a rate such as 100/min",
        ),
        (
            "    routes:\n    - path: /**\n      upstream: payments\n"
            "      authz: {default: deny}\n",
            8,
            "services.payments.routes[0].authz",
            "its policy is services.payments.authz",
        ),
    ],
)
def test_bad_mesh_policies_and_limits_are_errors_with_their_line(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    problem = _problem(tmp_path, MESH + text, mesh=True)
    assert (problem.line, problem.field) == (line, field), problem
    assert message in problem.message, problem


def test_bad_limit_in_a_route_list_names_its_item(tmp_path: Path) -> None:
    text = (
        "upstreams:\n  app: {endpoints: [127.0.0.1:1]}\n"
        "routes:\n- path: /**\n  upstream: app\n  rate_limit:\n"
        "  - 10/s\n  - {limit: 5, period: 1s, key: peers}\n"
    )
    problem = _problem(tmp_path, text)
    assert (problem.line, problem.field) == (8, "routes[0].rate_limit[1].key"), problem
    assert "route, peer, default" in problem.message
    redis = text.replace("key: peers", "policy: redis")
    problem = _problem(tmp_path, redis)
    assert (problem.line, problem.field) == (8, "routes[0].rate_limit[1].policy"), problem


def test_a_mesh_policy_from_the_module_docstring_loads(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            services:
              payments:
                authz:
                  default: deny
                  rules:
                  - {name: no-legacy, action: deny, from: ["spiffe://mesh.local/ns/legacy/*"]}
                  - name: probes
                    action: allow
                    from: [plaintext]
                    headers: {x-probe: 1}
                rate_limit:
                  per_source: 100/s
                  service: {limit: 1000, period: 1s}
            """
        )
    )
    mesh = load_mesh(path, env={})
    authz = mesh.services["payments"].authz
    assert authz.rules[1].headers == {"x-probe": "1"}  # YAML's 1 is the text "1"
    assert authz.rules[0].from_ == ["spiffe://mesh.local/ns/legacy/*"]


# ---------------------------------------------------------------------------
# the snapshot's inbound section


def test_the_inbound_section_carries_authz_and_limits_a_route_takes_as_is() -> None:
    mesh = MeshConfig.model_validate(
        {
            "services": {
                "orders": {},
                "payments": {
                    "authz": {
                        "default": "deny",
                        "rules": [{"name": "orders", "action": "allow", "from": [ORDERS]}],
                    },
                    "rate_limit": {
                        "per_source": "100/s",
                        "service": {"limit": 1000, "period": "1s", "policy": "redis"},
                        "redis": "redis://127.0.0.1:6379/0",
                    },
                },
            }
        }
    )
    inbound = build_sections(mesh, 1, "payments", [], 0.0)["inbound"]
    assert inbound["authz"]["rules"][0]["from"] == [ORDERS]
    assert [(r["key"], r["name"], r["limit"]) for r in inbound["rate_limit"]] == [
        ("peer", "per-source", 100),
        ("route", "service", 1000),
    ]
    assert inbound["redis"]["url"] == "redis://127.0.0.1:6379/0"
    # What a sidecar builds from it: one route, compiled like any other.
    config = Config.model_validate(
        {
            "redis": inbound["redis"],
            "upstreams": {"app": {"endpoints": ["127.0.0.1:1"]}},
            "routes": [
                {
                    "path": "/**",
                    "name": "payments",
                    "upstream": "app",
                    "authz": inbound["authz"],
                    "rate_limit": inbound["rate_limit"],
                }
            ],
        }
    )
    assert config.routes[0].authz == mesh.services["payments"].authz
    assert decide(config.routes[0].authz, ORDERS).allowed  # type: ignore[arg-type]
    plain = build_sections(mesh, 1, "orders", [], 0.0)["inbound"]
    assert (plain["rate_limit"], plain["redis"]) == (None, None)
    assert plain["authz"] == {"default": "allow", "mode": "enforce", "rules": []}
