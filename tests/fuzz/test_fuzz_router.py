"""Fuzzing the router (`http/router.py`): a route table either compiles or is
refused with the config's error (pydantic's `ValidationError` for a route,
`ValueError` naming the route for the table); a compiled table, given any
request as the stream hands it over (method, Host, target, headers, all
from bytes read as latin-1), never raises:

- `normalize_path` returns None (400) or a path that normalizes to itself;
- `match` returns None (404) or a route whose `upstream_path` starts with '/';
- `explain`'s first matching row is the route `match` returns;
- `warnings()` and `format_table()` work for every table that compiles.

1. Every table of corpus/router/*.json (its own `routes`, also each route
   alone) against the requests of every corpus file.
2. Generated tables of awkward patterns, hosts, methods and headers against
   generated requests.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meshgate.config.schema import RouteConfig
from meshgate.http.paths import normalize_path
from meshgate.http.router import Router
from meshgate.stream.stream import _split_host
from support.fuzz import corpus, fuzz_settings

FILES = [(n, orjson.loads(d)) for n, d in corpus("router")]
# (method, Host, target, [(name, value)]) as the client wrote them.
Request = tuple[str, str, str, list[tuple[str, str]]]
REQUESTS: list[Request] = [
    (m, h, t, [(k, v) for k, v in hs]) for _, f in FILES for m, h, t, hs in f["requests"]
]


def _wire(text: str) -> bytes:
    return text.encode("utf-8")


def compile_table(specs: list[Any]) -> list[Router[int]]:
    """The routers these specs make: the whole table, and each route alone
    (so that one bad route does not hide the others from the requests)."""
    configs: list[RouteConfig] = []
    for spec in specs:
        try:
            configs.append(RouteConfig.model_validate(spec))
        except ValidationError:
            continue
    routers: list[Router[int]] = []
    for table in [configs, *([c] for c in configs)] if len(configs) > 1 else [configs]:
        try:
            router = Router([(cfg, i) for i, cfg in enumerate(table)])
        except ValueError as exc:
            assert str(exc).startswith("routes["), exc
            continue
        router.warnings()
        router.format_table()
        routers.append(router)
    return routers


def route_request(router: Router[int], request: Request) -> None:
    """What `ProxyStream` does with a request head: the same calls, the same
    decoding of the bytes."""
    method_s, host_s, target_s, header_list = request
    method = _wire(method_s).decode("latin-1")
    host = _split_host(_wire(host_s))
    raw_path_b, _, query_b = _wire(target_s).partition(b"?")
    headers = [(_wire(n).lower(), _wire(v)) for n, v in header_list]
    path = normalize_path(raw_path_b.decode("latin-1"))
    if path is None:
        return
    assert normalize_path(path) == path, (raw_path_b, path)
    match = router.match(method, host, path, headers)
    rows = router.explain(method, host, path, headers)
    first = next((route for route, matched, _ in rows if matched), None)
    if match is None:
        assert first is None, (request, first)
        return
    assert first is match.route, (request, first, match.route)
    query = "?" + query_b.decode("latin-1") if query_b else ""
    sent = match.route.upstream_path(path, query, match.params, match.rest)
    assert sent.startswith("/"), (request, sent)


@pytest.mark.parametrize(("name", "table"), FILES, ids=[n for n, _ in FILES])
def test_corpus_tables_route_every_corpus_request(name: str, table: dict[str, Any]) -> None:
    for router in compile_table(table["routes"]):
        for request in REQUESTS:
            route_request(router, request)


# -- generated tables and requests ------------------------------------------------------------

SEGMENTS = ["a", "b", "api", "{id}", "{x}", "*", "**", "", ".", "..", "%2F", "%2e", "a b", "é"]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.sampled_from(SEGMENTS), max_size=4))
    pattern = "/" + "/".join(segs)
    return pattern if draw(st.integers(0, 30)) else draw(st.sampled_from(["", "a", "/a?b", "/#"]))


@st.composite
def rewrites(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(["/", "v2", "{id}", "{x}", "{**}", "{", "}", "{y}"])))
    return "".join(parts)


hosts_cfg = st.sampled_from(
    ["a.com", "x.a.com", "*.a.com", "*.x.a.com", "A.COM", "*", "a.com:80", "", "[::1]", "é.com"]
)

route_specs = st.fixed_dictionaries(
    {"path": patterns(), "upstream": st.just("u")},
    optional={
        "host": hosts_cfg | st.lists(hosts_cfg, max_size=3),
        "methods": st.lists(st.sampled_from(["GET", "POST", "get", "", "PUT"]), max_size=3),
        "headers": st.dictionaries(
            st.sampled_from(["x-a", "X-A", "x-b", "bad name", ""]),
            st.booleans() | st.sampled_from(["1", "", "é"]),
            max_size=2,
        ),
        "strip_prefix": st.booleans() | st.sampled_from(["/a", "/api", "a", "/"]),
        "rewrite": rewrites(),
        "name": st.sampled_from(["r", "s"]),
    },
)

latin = st.characters(max_codepoint=0x2FF, exclude_categories=["Cs"])

requests_st = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "get", "M-SEARCH"]),
    st.sampled_from(["a.com", "x.a.com", "y.x.a.com", "b.com", "A.COM:8080", "[::1]:1", ""])
    | st.text(latin, max_size=12),
    st.lists(
        st.sampled_from(
            ["a", "b", "api", "v2", "", ".", "..", "%2e", "%2F", "%41", "%", "%zz", "?q"]
        )
        | st.text(latin, max_size=4),
        max_size=6,
    ).map(lambda segs: "/" + "/".join(segs)),
    st.lists(
        st.tuples(st.sampled_from(["x-a", "X-A", "x-b", "host"]), st.sampled_from(["1", "", "2"])),
        max_size=3,
    ),
)


@fuzz_settings(ci_examples=300)
@given(specs=st.lists(route_specs, min_size=1, max_size=6), reqs=st.lists(requests_st, max_size=6))
def test_generated_tables_and_requests(specs: list[Any], reqs: list[Request]) -> None:
    for router in compile_table(specs):
        for request in reqs:
            route_request(router, request)


@fuzz_settings(ci_examples=150)
@given(name_table=st.sampled_from(FILES), request=requests_st)
def test_corpus_tables_generated_requests(
    name_table: tuple[str, dict[str, Any]], request: Request
) -> None:
    for router in compile_table(name_table[1]["routes"]):
        route_request(router, request)
