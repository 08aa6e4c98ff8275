"""The config loader: values, and errors that name file, line and field."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshgate.config.describe import describe
from meshgate.config.loader import ConfigError, ConfigProblem
from meshgate.config.schema import Config
from meshgate.engine.load import load_config, load_config_text, load_mesh_text

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed.yaml"

BASE = """\
upstreams:
  orders:
    endpoints: [127.0.0.1:9001]
routes:
- path: /api/**
  upstream: orders
"""


def write(tmp_path: Path, text: str, name: str = "meshgate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    assert info.value.problems
    return info.value.problems


def only_problem(path: Path, env: dict[str, str] | None = None) -> ConfigProblem:
    problems = problems_of(path, env)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid files ------------------------------------------------------------------------


def test_seed_example_loads() -> None:
    config = load_config(SEED, env={})
    assert isinstance(config, Config)
    assert [r.path for r in config.routes][:2] == ["/api/orders/**", "/api/customers/**"]
    rate = config.routes[0].rate_limit
    assert rate is not None
    assert rate.limit == 100
    assert rate.period == 60
    assert (rate.key, rate.algorithm, rate.policy) == ("default", "gcra", "local")
    auth = config.routes[0].auth
    assert auth is not None and auth.use == ["jwt"]
    assert config.auth["jwt"].type == "jwt"
    assert [str(e.host) for e in config.upstreams["order-service"].endpoints] == [
        "127.0.0.1",
        "127.0.0.1",
    ]
    assert [e.port for e in config.upstreams["order-service"].endpoints] == [9001, 9003]
    assert str(config.listen) == "0.0.0.0:8080"
    assert str(config.admin) == "127.0.0.1:9901"


def test_load_config_accepts_str_path_and_text(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert load_config(str(path), env={}) == load_config_text(BASE, env={})


def test_scalars_keep_their_yaml_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        workers: 4
        access_log: true
        limits: {header_timeout: 1.5, max_header_bytes: 16KiB}
        upstreams:
          orders:
            endpoints: [127.0.0.1:9001]
        routes:
        - path: /a
          upstream: orders
          rate_limit: 10/s
          headers: {x-debug: true, x-env: prod}
        """,
    )
    config = load_config(path, env={})
    assert config.workers == 4
    assert config.access_log is True
    assert config.limits.header_timeout == 1.5
    assert config.limits.max_header_bytes == 16 * 1024
    assert config.routes[0].headers == {"x-debug": True, "x-env": "prod"}
    rate = config.routes[0].rate_limit
    assert rate is not None and (rate.limit, rate.period) == (10, 1.0)


def test_merge_keys_and_aliases(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          a: &defaults
            endpoints: [127.0.0.1:9001]
            balancer: ewma
          b:
            <<: *defaults
            balancer: least_request
        routes:
        - {path: /a, upstream: a}
        - {path: /b, upstream: b}
        """,
    )
    config = load_config(path, env={})
    assert config.upstreams["a"].balancer == "ewma"
    assert config.upstreams["b"].balancer == "least_request"
    assert config.upstreams["b"].endpoints == config.upstreams["a"].endpoints


# --- errors: schema -----------------------------------------------------------------------


def test_unknown_upstream_names_file_line_and_field(tmp_path: Path) -> None:
    text = SEED.read_text().replace("upstream: customer-service", "upstream: customer-svc", 1)
    path = write(tmp_path, text)
    problem = only_problem(path)
    line = text.splitlines().index("  upstream: customer-svc") + 1
    assert line == 40
    assert problem.file == str(path)
    assert (problem.line, problem.column) == (40, 13)
    assert problem.field == "routes[1].upstream"
    assert "'customer-svc' is not defined" in problem.message
    assert "customer-service, order-service" in problem.message
    assert str(problem).startswith(f"{path}:40:13: field 'routes[1].upstream': upstream ")


def test_error_string_has_one_line_per_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        workers: 0
        routes:
        - path: /a
          upstream: nowhere
        - path: b
          upstream: nowhere
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    lines = str(info.value).splitlines()
    assert lines == [str(p) for p in info.value.problems]
    assert lines[0] == (
        f"{path}:1:10: field 'workers': Input should be greater than or equal to 1 (found: 0)"
    )
    assert lines[1].startswith(f"{path}:5:9: field 'routes[1].path': a route path starts with '/'")
    # The error survives pickling (multiprocessing workers, say).
    again = pickle.loads(pickle.dumps(info.value))
    assert again.problems == info.value.problems


def test_bad_duration(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoints: [127.0.0.1:9001]
            timeouts:
              connect: 2s
              read: 5 minutes
        """,
    )
    problem = only_problem(path)
    assert (problem.line, problem.column) == (6, 13)
    assert problem.field == "upstreams.orders.timeouts.read"
    assert problem.message.startswith("expected a duration such as 250ms, 2s or 1m")
    assert "'5 minutes'" in problem.message
    assert "Value error" not in problem.message


def test_resource_limits_and_their_errors(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            BASE
            + "limits:\n"
            + "  body_timeout: 5s\n"
            + "  write_timeout: 250ms\n"
            + "  max_connections: 100\n"
            + "  max_connections_per_ip: 10\n"
            + "  max_requests_per_connection: 1000\n"
            + "  max_body: 1MiB\n"
            + "  max_response_header_bytes: 16KiB\n",
        ),
        env={},
    )
    limits = config.limits
    assert (limits.body_timeout, limits.write_timeout) == (5.0, 0.25)
    assert (limits.max_connections, limits.max_connections_per_ip) == (100, 10)
    assert limits.max_requests_per_connection == 1000
    assert (limits.max_body, limits.max_response_header_bytes) == (1 << 20, 16 << 10)
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoints: [127.0.0.1:9001]
        routes:
        - path: /api/**
          upstream: orders
          max_body: lots
        limits:
          max_connections_per_ip: -1
        """,
    )
    problems = {p.field: p for p in problems_of(path)}
    assert problems["routes[0].max_body"].line == 7, problems
    assert problems["routes[0].max_body"].message.startswith("expected a size")
    assert problems["limits.max_connections_per_ip"].line == 9, problems


def test_bad_endpoint(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoints:
            - 127.0.0.1:9001
            - https://orders.internal
        """,
    )
    problem = only_problem(path)
    assert (problem.line, problem.column) == (5, 7)
    assert problem.field == "upstreams.orders.endpoints[1]"
    assert "expected an http:// URL or host:port" in problem.message


def test_endpoint_of_the_wrong_type_says_what_was_found(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoints: [9001]
        """,
    )
    problem = only_problem(path)
    assert (problem.line, problem.field) == (3, "upstreams.orders.endpoints[0]")
    assert problem.message.endswith("(found: 9001)")


def test_unknown_field_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoint:
            - 127.0.0.1:9001
        """,
    )
    problems = problems_of(path)
    by_field = {p.field: p for p in problems}
    unknown = by_field["upstreams.orders.endpoint"]
    assert (unknown.line, unknown.column) == (3, 5)
    assert "unknown field 'endpoint'" in unknown.message
    assert "did you mean 'endpoints'?" in unknown.message
    assert "endpoints, balancer, timeouts, pool, host" in unknown.message
    # `endpoints` may be absent (a mesh upstream has `service:` instead):
    # the typo is the one problem named.
    assert "upstreams.orders.endpoints" not in by_field


def test_an_upstream_needs_endpoints_or_a_service(tmp_path: Path) -> None:
    path = write(tmp_path, "upstreams:\n  orders:\n    balancer: ewma\n")
    problem = only_problem(path)
    assert problem.field == "upstreams.orders"
    assert "at least one endpoint (or `service:`" in problem.message


def test_unknown_top_level_field(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "rout:\n- path: /b\n")
    problem = only_problem(path)
    assert (problem.line, problem.field) == (7, "rout")
    assert "did you mean 'routes'?" in problem.message


def test_missing_field_points_at_its_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "- upstream: orders\n  strip_prefix: true\n")
    problem = only_problem(path)
    assert (problem.line, problem.column) == (7, 3)
    assert problem.field == "routes[1].path"
    assert problem.message == "required field 'path' is missing"


def test_a_route_needs_an_upstream_or_a_split(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "- path: /b\n  strip_prefix: true\n")
    problem = only_problem(path)
    assert (problem.line, problem.column) == (7, 3)
    assert problem.field == "routes[1]"
    assert "exactly one of upstream:, split: or aggregate:" in problem.message


def test_union_errors_are_reported_once(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  strip_prefix: [1, 2]\n")
    problem = only_problem(path)
    assert (problem.line, problem.field) == (7, "routes[0].strip_prefix")
    assert problem.message == ("Input should be a valid boolean or a valid string (found: [1, 2])")


def test_value_rewritten_by_a_validator_is_shown_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  rate_limit: 0/min\n")
    problem = only_problem(path)
    assert (problem.line, problem.field) == (7, "routes[0].rate_limit")
    assert problem.message == ("limit: Input should be greater than or equal to 1 (found: '0/min')")


def test_problems_are_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        routes:
        - path: nope
          upstream: a
        workers: many
        """,
    )
    lines = [p.line or 0 for p in problems_of(path)]
    assert lines == sorted(lines)
    assert lines[0] == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # These three were accepted (or crashed with KeyError) before schema.py's fixes.
        ("limits: {max_header_bytes: 1KİB}", "expected a size"),
        ("limits: {header_timeout: .inf}", "a duration must be a finite number"),
        ("routes: [{path: /a, upstream: orders, rate_limit: 5/0s}]", "greater than zero"),
    ],
)
def test_schema_edge_values_are_config_errors(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, "upstreams: {orders: {endpoints: [a:1]}}\n" + line + "\n")
    problem = only_problem(path)
    assert problem.line == 2
    assert message in problem.message


# --- errors: YAML ---------------------------------------------------------------------------


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoints: [127.0.0.1:9001]
            balancer: ewma
            balancer: round_robin
        """,
    )
    problem = only_problem(path)
    assert (problem.line, problem.column) == (5, 5)
    assert problem.field == "upstreams.orders.balancer"
    assert "duplicate key 'balancer'" in problem.message
    assert "first defined at line 4" in problem.message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listen: 0.0.0.0:8080
        upstreams:
          orders:
            endpoints: [127.0.0.1:9001
        routes: []
        """,
    )
    problem = only_problem(path)
    assert problem.file == str(path)
    assert problem.line == 5
    assert problem.message.startswith("invalid YAML: ")
    assert "flow sequence at line 4" in problem.message


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: x\n  workers: 2\n")
    problem = only_problem(path)
    assert problem.line == 2
    assert "mapping values are not allowed here" in problem.message


def test_empty_file(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "---\n"):
        problem = only_problem(write(tmp_path, text))
        assert problem.message.startswith("the file is empty")
        assert "ConfigProblem" not in str(problem)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path, "- listen: x\n- workers: 1\n"))
    assert problem.line == 1
    assert "expected a mapping at the top level" in problem.message
    assert "found: a list" in problem.message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    problem = only_problem(path)
    assert problem == ConfigProblem(str(path), None, None, "", "no such file")
    assert str(problem) == f"{path}: no such file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"workers: 1\nlisten: caf\xe9\n")
    problem = only_problem(path)
    assert (problem.line, problem.column) == (2, 12)
    assert "UTF-8" in problem.message


def test_non_string_keys_and_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          8080:
            endpoints: [127.0.0.1:9001]
        limits: !!python/object:os.system {}
        """,
    )
    first, second = problems_of(path)
    assert first.line == 2
    assert "a key must be a string, found the integer '8080'" in first.message
    assert second.line == 4
    assert second.field == "limits"
    assert "unsupported YAML tag" in second.message


def test_recursive_alias_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("routes: &r [*r]\n", env={})
    assert "recursion" in str(info.value)


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    with pytest.raises(ConfigError) as info:
        load_config_text("\n".join(lines) + "\n", env={})
    assert "too large" in str(info.value)


# --- environment interpolation --------------------------------------------------------------


ENV_TEXT = """\
listen: ${LISTEN}
admin: 127.0.0.1:${ADMIN_PORT:-9901}
workers: ${WORKERS}
upstreams:
  orders:
    endpoints: ["${ORDERS_HOST:-127.0.0.1}:9001"]
    host: price$$tag
routes:
- path: /api/**
  upstream: orders
"""


def test_env_present(tmp_path: Path) -> None:
    path = write(tmp_path, ENV_TEXT)
    config = load_config(
        path, env={"LISTEN": ":8088", "WORKERS": "3", "ORDERS_HOST": "orders", "ADMIN_PORT": "7"}
    )
    assert str(config.listen) == "0.0.0.0:8088"
    assert str(config.admin) == "127.0.0.1:7"
    assert config.workers == 3
    assert config.upstreams["orders"].endpoints[0].host == "orders"
    assert config.upstreams["orders"].host == "price$tag"


def test_env_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, ENV_TEXT)
    # An empty variable takes the default too, as in the shell.
    config = load_config(path, env={"LISTEN": "8080", "WORKERS": "2", "ORDERS_HOST": ""})
    assert str(config.admin) == "127.0.0.1:9901"
    assert config.upstreams["orders"].endpoints[0].host == "127.0.0.1"


def test_env_whole_value_is_read_as_yaml_scalar(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: ${W}\naccess_log: ${LOG:-true}\n")
    config = load_config(path, env={"W": "8"})
    assert config.workers == 8
    assert config.access_log is True
    # Quoted, it stays a string (which pydantic then converts for an int field).
    raw = write(tmp_path, "listen: '${PORT}'\n", name="quoted.yaml")
    assert load_config(raw, env={"PORT": "8081"}).listen.port == 8081


def test_env_whole_value_type_errors_point_at_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: :8080\nworkers: ${W}\n")
    problem = only_problem(path, env={"W": "lots"})
    assert (problem.line, problem.field) == (2, "workers")
    assert "(found: 'lots')" in problem.message


def test_env_missing_is_an_error_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, ENV_TEXT)
    problems = problems_of(path, env={"WORKERS": "2"})
    assert [(p.line, p.field) for p in problems] == [(1, "listen")]
    assert "environment variable 'LISTEN' is not set" in problems[0].message
    problems = problems_of(path, env={})
    assert [(p.line, p.field) for p in problems] == [(1, "listen"), (3, "workers")]
    assert "'WORKERS'" in problems[1].message


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_TEST_WORKERS", "5")
    path = write(tmp_path, "workers: ${MESHGATE_TEST_WORKERS}\n")
    assert load_config(path).workers == 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${BAD-NAME}", "invalid reference '${BAD-NAME}'"),
        ("${}", "invalid reference '${}'"),
        ("x${OPEN", "unterminated '${'"),
    ],
)
def test_env_malformed_reference(tmp_path: Path, value: str, expected: str) -> None:
    path = write(tmp_path, f"workers: 1\nlisten: '{value}'\n")
    problem = only_problem(path)
    assert problem.line == 2
    assert expected in problem.message


def test_lone_dollar_is_kept() -> None:
    text = BASE.replace("path: /api/**", "path: /price$")
    assert load_config_text(text, env={}).routes[0].path == "/price$"


# --- describe ------------------------------------------------------------------------------


def test_describe_seed() -> None:
    lines = describe(load_config(SEED, env={}))
    assert lines == [
        "3 upstreams, 5 routes, listening on 0.0.0.0:8080, admin on 127.0.0.1:9901",
        "routes[0] (/api/orders/**): split order-service 90% (weight 90), "
        "order-service-v2 10% (weight 10), random per request",
        'routes[0] (/api/orders/**): canary: header x-canary = "1" -> order-service-v2',
        "routes[0] (/api/orders/**): auth by any of jwt",
        "routes[0] (/api/orders/**): rate limit 100/min per default (gcra, local)",
        "routes[2] (/api/partners/**): auth by any of jwt, keys",
        "routes[2] (/api/partners/**): rate limit 5/min per consumer (gcra, local)",
        "routes[3] (/api/order-summary/{id}): aggregate order (order-service), "
        "customer (customer-service, optional, 0.5s) within 2s",
        "routes[4] (/v1/orders/**): transform: request headers, body; response body "
        "(bodies buffered up to 1048576 bytes)",
        "failure accrual is on for every upstream (outlier_detection's defaults): an "
        "endpoint is ejected after 5 5xx answers or 3 gateway failures in a row",
    ]


def test_describe_minimal_and_unused() -> None:
    config = load_config_text(
        """\
listen: 9000
workers: 2
upstreams:
  orders: {endpoints: [a:1]}
  spare: {endpoints: [b:1]}
auth:
  jwt: {type: jwt, secret: "0123456789abcdef0123456789abcdef"}
  key: {type: api_key}
routes:
- {path: /x, name: x, upstream: orders, auth: [jwt, key], rate_limit: 5/h}
""",
        env={},
    )
    lines = describe(config)
    assert lines[0] == (
        "2 upstreams, 1 route, listening on 0.0.0.0:9000, no admin listener, 2 workers"
    )
    assert "upstreams.spare is not used by any route" in lines
    assert "routes[0] (x, /x): auth by any of jwt, key" in lines
    assert "routes[0] (x, /x): rate limit 5/h per default (gcra, local)" in lines
    assert "auth.key: no consumer has an API key, so no key is accepted" in lines


def test_describe_no_routes() -> None:
    lines = describe(Config())
    assert lines[0] == "0 upstreams, 0 routes, listening on 0.0.0.0:8080, no admin listener"
    assert any("no routes" in line for line in lines)


# --- property: never anything but Config or ConfigError ---------------------------------


def _check_total(text: str, env: dict[str, str]) -> None:
    try:
        result = load_config_text(text, "fuzz.yaml", env=env)
    except ConfigError as exc:
        assert exc.problems
        # YAML also breaks lines at NEL, LS and PS.
        n_lines = sum(text.count(c) for c in "\n\r\x85\u2028\u2029") + 2
        for problem in exc.problems:
            assert problem.file == "fuzz.yaml"
            assert problem.line is None or 1 <= problem.line <= n_lines
            assert str(problem).startswith("fuzz.yaml")
        assert str(exc)
    else:
        assert isinstance(result, Config)


YAML_BITS = st.sampled_from(
    [
        ":",
        ": ",
        "- ",
        "\n",
        "\n  ",
        "  ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "&a ",
        "*a",
        "<<: ",
        "!!str ",
        "!x ",
        "'",
        '"',
        "#",
        "|",
        ">",
        "---",
        "${A}",
        "${B:-2}",
        "$$",
        "${",
        "~",
        "null",
        "yes",
        "1e3",
        "0x1F",
        "100/min",
        "250ms",
        "routes",
        "upstreams",
        "endpoints",
        "path",
        "upstream",
        "/api/**",
        "127.0.0.1:9001",
        "listen",
        "workers",
        "rate_limit",
        "timeouts",
        "KİB",
        "\t",
        "\x00",
    ]
)

SEED_TEXT = SEED.read_text(encoding="utf-8")


@st.composite
def mutated_seed(draw: st.DrawFn) -> str:
    text = SEED_TEXT
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 20)))
        insert = "".join(draw(st.lists(YAML_BITS | st.text(max_size=3), max_size=4)))
        text = text[:start] + insert + text[end:]
    return text


KEYS = st.sampled_from(
    [
        *Config.model_fields,
        "endpoints",
        "balancer",
        "path",
        "upstream",
        "host",
        "methods",
        "headers",
        "auth",
        "rate_limit",
        "connect",
        "pool",
        "limit",
        "period",
        "orders",
    ]
) | st.text(max_size=5)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["2s", "0s", "100/min", "0/0s", "a:1", "http://x", "/p/**", "orders", "8KiB"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
ENVS = st.dictionaries(st.sampled_from(["A", "B", "W"]), st.text(max_size=6), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200) | mutated_seed(), env=ENVS)
def test_any_text_gives_config_or_config_error(text: str, env: dict[str, str]) -> None:
    _check_total(text, env)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.dictionaries(KEYS, VALUES, max_size=5), env=ENVS)
def test_any_yaml_document_gives_config_or_config_error(
    value: dict[str, Any], env: dict[str, str]
) -> None:
    _check_total(yaml.safe_dump(value, allow_unicode=True), env)


def test_router_pattern_error_names_the_route_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "upstreams:\n"
        "  a: {endpoints: [127.0.0.1:1]}\n"
        "routes:\n"
        "- path: /ok\n"
        "  upstream: a\n"
        "- path: /api/**/x\n"
        "  upstream: a\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.line == 6
    assert problem.field == "routes[1].path"
    assert "'**'" in problem.message


def test_numeric_header_matcher_is_an_exact_value() -> None:
    config = load_config_text(
        "upstreams:\n  a: {endpoints: [127.0.0.1:1]}\n"
        "routes:\n- {path: /x, upstream: a, headers: {x-canary: 1, x-off: false}}\n"
    )
    assert config.routes[0].headers == {"x-canary": "1", "x-off": False}


def test_plain_on_and_yes_keys_are_words_and_statuses_may_be_numbers() -> None:
    config = load_config_text(
        """\
upstreams:
  orders:
    endpoints: [127.0.0.1:9001]
    retry: {attempts: 2, on: [reset, 503]}
routes:
- {path: /x, upstream: orders, retry: {on: [gateway-error]}}
""",
        env={},
    )
    retry = config.upstreams["orders"].retry
    assert retry is not None and retry.on == ["reset", "503"]
    route_retry = config.routes[0].retry
    assert route_retry is not None and route_retry.on == ["gateway-error"]


def test_a_status_map_takes_numbers_as_keys() -> None:
    config = load_config_text(
        """\
upstreams: {a: {endpoints: ["127.0.0.1:1"]}}
routes:
- path: /x
  upstream: a
  transform:
    response:
      status: {404: 410, "500": 503}
""",
        env={},
    )
    transform = config.routes[0].transform
    assert transform is not None and transform.response is not None
    assert transform.response.status == {404: 410, 500: 503}


# --- compiled after validation (meshgate.engine.load) -----------------------------------

_AGGREGATE = """\
upstreams:
  a: {endpoints: [127.0.0.1:1]}
routes:
- path: /ok
  upstream: a
- path: /x/{id}
  aggregate:
    backends:
    - {upstream: a, path: "/a/{id}", group: order}
    - {upstream: a, path: "/b/{ordr.customer_id}", group: customer}
"""


def test_an_aggregate_plan_is_compiled_when_the_file_loads() -> None:
    # The schema takes its shape; the plan is refused at its route's line.
    Config.model_validate(yaml.safe_load(_AGGREGATE))
    with pytest.raises(ConfigError) as info:
        load_config_text(_AGGREGATE, "bad.yaml")
    assert str(info.value) == (
        "bad.yaml:6:3: field 'routes[1]': aggregate.backends[1].path: {ordr.…} names no "
        "backend's group (groups: customer, order) (found: a mapping with path, aggregate)"
    )


def test_every_refused_json_map_and_plan_is_reported_in_line_order() -> None:
    text = (
        _AGGREGATE
        + "- path: /y\n  upstream: a\n  transform:\n"
        + "    response:\n      body: {move: {/a: /a}}\n"
        + "    request:\n      body: {allow: [/a/b], deny: [/a]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "bad.yaml")
    assert [(p.line, p.field, p.message.split(" (found")[0]) for p in info.value.problems] == [
        (
            6,
            "routes[1]",
            "aggregate.backends[1].path: {ordr.…} names no backend's group "
            "(groups: customer, order)",
        ),
        (15, "routes[2].transform.response.body", "body: move '/a': moves onto itself"),
        (17, "routes[2].transform.request.body", "body: deny '/a' removes allowed '/a/b'"),
    ]


def test_a_mesh_route_json_map_is_compiled_when_mesh_yaml_loads() -> None:
    text = (
        "trust_domain: example.org\n"
        "services:\n"
        "  orders: {}\n"
        "  web:\n"
        "    routes:\n"
        "    - path: /o/**\n"
        "      upstream: orders\n"
        "      transform:\n"
        "        response:\n"
        "          body: {allow: [/a/b], deny: [/a]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_mesh_text(text, "mesh.yaml")
    assert str(info.value) == (
        "mesh.yaml:10:11: field 'services.web.routes[0].transform.response.body': body: "
        "deny '/a' removes allowed '/a/b' (found: a mapping with allow, deny)"
    )


def test_a_gateway_joining_the_mesh_needs_a_way_to_join(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        mesh:
          control: 127.0.0.1:15012
        upstreams:
          orders: {service: orders}
        routes:
        - {path: /orders/**, upstream: orders}
        """,
    )
    problem = only_problem(path)
    assert problem.field == "mesh"
    assert problem.line == 1
    assert "token_file: or attest_socket:" in problem.message


def test_a_mesh_upstream_needs_no_endpoints(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        mesh: {control: 127.0.0.1:15012, token_file: t}
        upstreams:
          orders: {service: orders, balancer: ewma}
        routes:
        - {path: /orders/**, upstream: orders}
        """,
    )
    config = load_config(path, env={})
    assert config.upstreams["orders"].endpoints == []
    assert config.mesh is not None and config.mesh.service == "gateway"


def test_an_endpoint_identity_must_be_a_spiffe_id(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          orders:
            endpoints:
            - {host: 127.0.0.1, port: 9001, identity: "https://orders"}
        routes:
        - {path: /orders/**, upstream: orders}
        """,
    )
    problem = only_problem(path)
    assert problem.line == 4
    assert "is not a SPIFFE ID" in problem.message


def test_an_unknown_field_in_mesh_yaml_lists_the_mesh_fields_allowed_there() -> None:
    """The "allowed here" list is the mesh file's model's, not the gateway
    config's (a `control:` block has listen, store..., not routes)."""
    text = "trust_domain: example.org\ncontrol:\n  bogus: 1\n  listen: 127.0.0.1:15012\n"
    with pytest.raises(ConfigError) as info:
        load_mesh_text(text, "mesh.yaml")
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.field) == ("mesh.yaml", 3, "control.bogus")
    assert "unknown field 'bogus'" in problem.message
    allowed = problem.message.split("allowed here: ")[1]
    assert "listen" in allowed and "store" in allowed and "metrics_source" in allowed
    assert "routes" not in allowed and "upstreams" not in allowed
