"""The route table: matchers, precedence, upstream paths, normalization,
load-time errors and warnings, explain and the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from meshgate.config.schema import RouteConfig
from meshgate.http.paths import normalize_path
from meshgate.http.router import Route, RouteMatch, Router

Headers = Sequence[tuple[bytes, bytes]]


def rc(path: str, **kw: Any) -> RouteConfig:
    kw.setdefault("upstream", "u")
    return RouteConfig(path=path, **kw)


def router(*cfgs: RouteConfig) -> Router[int]:
    return Router([(c, i) for i, c in enumerate(cfgs)])


def hit(
    r: Router[int],
    path: str,
    method: str = "GET",
    host: str = "example.com",
    headers: Headers = (),
) -> int | None:
    m = r.match(method, host, path, headers)
    return None if m is None else m.route.target


def full(
    r: Router[int], path: str, method: str = "GET", host: str = "example.com"
) -> tuple[int, dict[str, str], str] | None:
    m = r.match(method, host, path, ())
    return None if m is None else (m.route.target, m.params, m.rest)


# --------------------------------------------------------------------------
# matchers


def test_literal_path() -> None:
    r = router(rc("/health"), rc("/api/users"))
    assert hit(r, "/health") == 0
    assert hit(r, "/api/users") == 1
    assert hit(r, "/api") is None
    assert hit(r, "/api/users/1") is None
    assert hit(r, "/healthz") is None


def test_trailing_slash_is_significant_for_exact_patterns() -> None:
    r = router(rc("/a"), rc("/b/"))
    assert hit(r, "/a") == 0
    assert hit(r, "/a/") is None
    assert hit(r, "/b/") == 1
    assert hit(r, "/b") is None


def test_root() -> None:
    r = router(rc("/"))
    assert hit(r, "/") == 0
    assert hit(r, "/x") is None


def test_star_is_one_non_empty_segment() -> None:
    r = router(rc("/a/*/c"))
    assert full(r, "/a/b/c") == (0, {}, "")
    assert hit(r, "/a/c") is None
    assert hit(r, "/a//c") is None
    assert hit(r, "/a/b/x/c") is None


def test_named_param_captures() -> None:
    r = router(rc("/users/{uid}/orders/{oid}"))
    assert full(r, "/users/7/orders/42") == (0, {"uid": "7", "oid": "42"}, "")
    assert hit(r, "/users/7/orders/") is None
    assert hit(r, "/users/7/orders") is None


def test_catch_all_matches_prefix_slash_and_deeper() -> None:
    r = router(rc("/api/orders/**"))
    assert full(r, "/api/orders") == (0, {}, "")
    assert full(r, "/api/orders/") == (0, {}, "")
    assert full(r, "/api/orders/7") == (0, {}, "7")
    assert full(r, "/api/orders/7/items") == (0, {}, "7/items")
    assert full(r, "/api/orders/7/items/") == (0, {}, "7/items/")
    assert hit(r, "/api/ordersx") is None
    assert hit(r, "/api") is None


def test_root_catch_all() -> None:
    r = router(rc("/**"))
    assert full(r, "/") == (0, {}, "")
    assert full(r, "/a/b") == (0, {}, "a/b")


def test_params_and_catch_all_together() -> None:
    r = router(rc("/t/{tenant}/**"))
    assert full(r, "/t/acme/x/y") == (0, {"tenant": "acme"}, "x/y")
    assert full(r, "/t/acme") == (0, {"tenant": "acme"}, "")
    assert hit(r, "/t") is None


def test_match_returns_route_match() -> None:
    r = router(rc("/a/{x}"))
    m = r.match("GET", "h", "/a/1", ())
    assert isinstance(m, RouteMatch)
    assert isinstance(m.route, Route)
    assert m.route.index == 0 and m.route.name == "routes[0]"
    assert m == (m.route, {"x": "1"}, "")


def test_path_not_starting_with_slash_never_matches() -> None:
    r = router(rc("/"), rc("/**"))
    assert hit(r, "*", method="OPTIONS") is None


def test_host_exact_wildcard_list_and_any() -> None:
    r = router(
        rc("/e", host="API.example.com"),
        rc("/w", host="*.example.com"),
        rc("/l", host=["a.test", "*.b.test"]),
        rc("/n"),
    )
    assert hit(r, "/e", host="api.example.com") == 0
    assert hit(r, "/e", host="www.example.com") is None
    assert hit(r, "/w", host="a.example.com") == 1
    assert hit(r, "/w", host="a.b.example.com") == 1
    assert hit(r, "/w", host="example.com") is None
    assert hit(r, "/w", host="badexample.com") is None
    assert hit(r, "/l", host="a.test") == 2
    assert hit(r, "/l", host="x.b.test") == 2
    assert hit(r, "/l", host="b.test") is None
    assert hit(r, "/n", host="anything.at.all") == 3


def test_methods() -> None:
    r = router(rc("/m", methods=["get", "POST"]))
    assert hit(r, "/m", method="GET") == 0
    assert hit(r, "/m", method="POST") == 0
    assert hit(r, "/m", method="DELETE") is None
    assert hit(r, "/m", method="HEAD") is None


def test_header_matchers() -> None:
    r = router(
        rc("/v", headers={"X-Env": "staging"}),
        rc("/p", headers={"x-debug": True}),
        rc("/a", headers={"X-Debug": False}),
    )
    assert hit(r, "/v", headers=[(b"x-env", b"staging")]) == 0
    assert hit(r, "/v", headers=[(b"x-env", b"prod")]) is None
    assert hit(r, "/v", headers=[(b"x-env", b"prod"), (b"x-env", b"staging")]) == 0
    assert hit(r, "/v", headers=[(b"x-env", b"Staging")]) is None
    assert hit(r, "/v") is None
    assert hit(r, "/p", headers=[(b"x-debug", b"")]) == 1
    assert hit(r, "/p", headers=[(b"other", b"1")]) is None
    assert hit(r, "/a") == 2
    assert hit(r, "/a", headers=[(b"x-debug", b"1")]) is None
    # Names compare case-insensitively even if a caller passes them mixed case.
    assert hit(r, "/p", headers=[(b"X-Debug", b"1")]) == 1


# --------------------------------------------------------------------------
# precedence


def test_exact_host_beats_wildcard_beats_any_regardless_of_order() -> None:
    r = router(rc("/**"), rc("/**", host="*.example.com"), rc("/**", host="api.example.com"))
    assert hit(r, "/x", host="api.example.com") == 2
    assert hit(r, "/x", host="www.example.com") == 1
    assert hit(r, "/x", host="other.org") == 0


def test_longer_wildcard_suffix_first() -> None:
    r = router(rc("/x", host="*.example.com"), rc("/x", host="*.eu.example.com"))
    assert hit(r, "/x", host="a.eu.example.com") == 1
    assert hit(r, "/x", host="a.us.example.com") == 0
    assert hit(r, "/x", host="eu.example.com") == 0


def test_host_falls_back_to_less_specific_group() -> None:
    # The exact host has a route, but not for this path: the any-host route takes it.
    r = router(rc("/a", host="api.example.com"), rc("/b"))
    assert hit(r, "/b", host="api.example.com") == 1


def test_host_beats_path_specificity() -> None:
    r = router(rc("/users/1"), rc("/**", host="api.example.com"))
    assert hit(r, "/users/1", host="api.example.com") == 1
    assert hit(r, "/users/1", host="other") == 0


def test_literal_beats_param_beats_catch_all() -> None:
    r = router(rc("/u/**"), rc("/u/{id}"), rc("/u/me"))
    assert hit(r, "/u/me") == 2
    assert hit(r, "/u/7") == 1
    assert hit(r, "/u/7/x") == 0
    assert hit(r, "/u") == 0


def test_star_and_param_rank_equal_config_order_breaks_tie() -> None:
    r = router(rc("/u/*"), rc("/u/{id}"))
    assert hit(r, "/u/1") == 0
    r = router(rc("/u/{id}"), rc("/u/*"))
    assert hit(r, "/u/1") == 0


def test_comparison_is_left_to_right() -> None:
    # The first segment decides: a literal there wins even if later segments are wild.
    r = router(rc("/{a}/b/c"), rc("/a/{b}/{c}"))
    assert hit(r, "/a/b/c") == 1
    r = router(rc("/a/**"), rc("/{x}/b"))
    assert hit(r, "/a/b") == 0


def test_exact_end_beats_catch_all_at_same_position() -> None:
    r = router(rc("/a/**"), rc("/a"))
    assert hit(r, "/a") == 1
    assert hit(r, "/a/") == 0
    r = router(rc("/a/**"), rc("/a/"))
    assert hit(r, "/a/") == 1


def test_deeper_catch_all_beats_shallower() -> None:
    r = router(rc("/**"), rc("/api/**"), rc("/api/v1/**"))
    assert hit(r, "/api/v1/x") == 2
    assert hit(r, "/api/v2/x") == 1
    assert hit(r, "/web") == 0


def test_methods_list_beats_none() -> None:
    r = router(rc("/x"), rc("/x", methods=["POST"]))
    assert hit(r, "/x", method="POST") == 1
    assert hit(r, "/x", method="GET") == 0


def test_more_headers_beat_fewer() -> None:
    r = router(
        rc("/x", headers={"a": True}),
        rc("/x", headers={"a": True, "b": "1"}),
        rc("/x"),
    )
    assert hit(r, "/x", headers=[(b"a", b""), (b"b", b"1")]) == 1
    assert hit(r, "/x", headers=[(b"a", b"")]) == 0
    assert hit(r, "/x") == 2


def test_methods_rank_before_headers() -> None:
    r = router(rc("/x", headers={"a": True}), rc("/x", methods=["GET"]))
    assert hit(r, "/x", headers=[(b"a", b"")]) == 1
    assert hit(r, "/x", method="PUT", headers=[(b"a", b"")]) == 0


def test_config_order_breaks_exact_ties() -> None:
    r = router(rc("/x", methods=["GET"]), rc("/x", methods=["GET", "POST"]))
    assert hit(r, "/x", method="GET") == 0
    assert hit(r, "/x", method="POST") == 1


def test_backtracks_when_filters_fail_deep() -> None:
    r = router(
        rc("/a/b/c", methods=["POST"]),
        rc("/a/{x}/c", methods=["PUT"]),
        rc("/a/b/**", methods=["PATCH"]),
        rc("/{x}/b/{y}", methods=["GET"]),
        rc("/**", methods=["DELETE"]),
    )
    assert hit(r, "/a/b/c", method="POST") == 0
    assert hit(r, "/a/b/c", method="PUT") == 1
    assert hit(r, "/a/b/c", method="PATCH") == 2
    assert hit(r, "/a/b/c", method="GET") == 3
    assert hit(r, "/a/b/c", method="DELETE") == 4
    assert hit(r, "/a/x/y", method="GET") is None


def test_backtracks_out_of_literal_into_param() -> None:
    r = router(rc("/a/b/c"), rc("/a/{x}/d"))
    assert hit(r, "/a/b/d") == 1


def test_routes_listed_in_precedence_order() -> None:
    r = router(
        rc("/**"),
        rc("/a/{x}"),
        rc("/a/b"),
        rc("/a/**", host="*.h.test"),
        rc("/z", host="x.h.test"),
    )
    assert [route.index for route in r.routes] == [4, 3, 2, 1, 0]


# --------------------------------------------------------------------------
# upstream paths


def upstream(cfg: RouteConfig, path: str, query: str = "") -> str:
    r = router(cfg)
    m = r.match("GET", "h", path, ())
    assert m is not None, path
    return m.route.upstream_path(path, query, m.params, m.rest)


def test_no_strip_no_rewrite_passes_path_and_query() -> None:
    assert upstream(rc("/api/**"), "/api/x", "?a=b") == "/api/x?a=b"


def test_strip_prefix_true() -> None:
    cfg = rc("/api/orders/**", strip_prefix=True)
    assert upstream(cfg, "/api/orders/7") == "/7"
    assert upstream(cfg, "/api/orders") == "/"
    assert upstream(cfg, "/api/orders/") == "/"
    assert upstream(cfg, "/api/orders/7/x", "?q=1") == "/7/x?q=1"
    assert upstream(rc("/api/{id}/x", strip_prefix=True), "/api/1/x") == "/1/x"
    assert upstream(rc("/svc/health", strip_prefix=True), "/svc/health") == "/"
    assert upstream(rc("/{t}/**", strip_prefix=True), "/a/b") == "/a/b"


def test_strip_prefix_string() -> None:
    assert upstream(rc("/api/**", strip_prefix="/api"), "/api/v1/x") == "/v1/x"
    assert upstream(rc("/api/**", strip_prefix="/api/"), "/api/v1/x") == "/v1/x"
    assert upstream(rc("/api/**", strip_prefix="/api"), "/api") == "/"
    assert upstream(rc("/**", strip_prefix="/api"), "/apiary") == "/apiary"
    assert upstream(rc("/**", strip_prefix="/api"), "/other", "?x") == "/other?x"


def test_rewrite_with_params_and_rest() -> None:
    assert upstream(rc("/api/orders/{id}", rewrite="/orders/{id}"), "/api/orders/7") == "/orders/7"
    legacy = rc("/legacy/**", rewrite="/v2/{**}")
    assert upstream(legacy, "/legacy/a/b", "?x=1") == "/v2/a/b?x=1"
    assert upstream(legacy, "/legacy") == "/v2/"
    both = rc("/t/{tenant}/**", rewrite="/{**}/by-tenant/{tenant}")
    assert upstream(both, "/t/acme/x") == "/x/by-tenant/acme"
    assert upstream(rc("/a/**", rewrite="{**}"), "/a/b/c") == "/b/c"
    assert upstream(rc("/a/**", rewrite="{**}"), "/a") == "/"
    assert upstream(rc("/a", rewrite="/b"), "/a", "?q") == "/b?q"


# --------------------------------------------------------------------------
# normalize_path


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/", "/"),
        ("/api/orders/7", "/api/orders/7"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/..", "/"),
        ("/.", "/"),
        ("/a/%41", "/a/A"),
        ("/%7euser", "/~user"),
        ("/a%2Fb", "/a%2Fb"),
        ("/a%2fb", "/a%2Fb"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/100%25", "/100%25"),
        ("/a%00b", "/a%00b"),
        ("/a//b", "/a/b"),
        ("//a", "/a"),
        ("/a//", "/a/"),
        ("/a/.hidden", "/a/.hidden"),
        ("/a/..b", "/a/..b"),
        ("/a/b/../../c/", "/c/"),
    ],
)
def test_normalize_path(raw: str, want: str) -> None:
    assert normalize_path(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a/b",
        "/../x",
        "/..",
        "/a/../..",
        "/%2e%2e/x",
        "/a\x00b",
        "/a\nb",
        "/a\x7f",
        "/a%",
        "/a%4",
        "/a%zz",
    ],
)
def test_normalize_path_invalid(raw: str) -> None:
    assert normalize_path(raw) is None


def test_normalize_path_fast_path_returns_same_object() -> None:
    raw = "/api/orders/123?"[:-1]
    assert normalize_path(raw) is raw


# --------------------------------------------------------------------------
# load-time errors


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        (rc("/a/**/b"), "'**' is only allowed as the last segment"),
        (rc("/a/{1x}"), "a parameter is {name}"),
        (rc("/a/{}"), "a parameter is {name}"),
        (rc("/a/{id}/{id}"), "parameter {id} appears twice"),
        (rc("/a/x*"), "must be a whole segment"),
        (rc("/a/{id}.json"), "must be a whole segment"),
        (rc("/a//b"), "empty segment"),
        (rc("/a/../b"), "'.' or '..' segment"),
        (rc("/a/%7e"), "write '~'"),
        (rc("/a/{id}", rewrite="/b/{uid}"), "uses {uid}, which the path does not capture"),
        (rc("/a/{id}", rewrite="/b/{**}"), "no trailing '**'"),
        (rc("/a/**", rewrite="/b/{x"), "'{' without '}'"),
        (rc("/a/**", rewrite="/b/x}"), "'}' without '{'"),
        (rc("/a/**", rewrite="/b", strip_prefix=True), "cannot both be set"),
        (rc("/a", strip_prefix="a"), "must start with '/'"),
        (rc("/a", methods=[]), "methods is an empty list"),
        (rc("/a", host=[]), "host is an empty list"),
        (rc("/a", host="a.*.com"), "'*' is only allowed as the first label"),
        (rc("/a", host="*"), "'*' is only allowed as the first label"),
        (rc("/a", host="a.com:8080"), "without the port"),
        (rc("/a", headers={"bad name": True}), "not a valid header name"),
        (rc("/a", headers={"X-A": True, "x-a": False}), "given twice"),
    ],
)
def test_bad_routes_raise_naming_the_route(cfg: RouteConfig, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        router(rc("/ok"), cfg)
    assert "routes[1]" in str(info.value)
    assert fragment in str(info.value)


def test_error_names_the_route_name_too() -> None:
    with pytest.raises(ValueError, match=r"routes\[0\] \('orders'\)"):
        router(rc("/a/**/b", name="orders"))


# --------------------------------------------------------------------------
# warnings


def test_no_warnings_for_a_sane_table() -> None:
    r = router(rc("/api/**"), rc("/api/orders/{id}"), rc("/", host="a.test"), rc("/health"))
    assert r.warnings() == []


def test_identical_catch_all_listed_twice() -> None:
    r = router(rc("/api/**"), rc("/other"), rc("/api/**"))
    assert r.warnings() == [
        "routes[2] (/api/**) is unreachable: every request it matches is taken by "
        "routes[0] (/api/**) (it duplicates routes[0])"
    ]


def test_duplicate_with_different_param_names_is_unreachable() -> None:
    r = router(rc("/u/{id}"), rc("/u/{uid}", methods=["GET"]), rc("/u/*"))
    (w,) = r.warnings()
    assert w.startswith("routes[2] (/u/*) is unreachable")
    assert "routes[0] (/u/{id})" in w


def test_method_restricted_and_unrestricted_twins_are_both_reachable() -> None:
    # Rule 3 puts the methods list first whatever the config order: GET goes to
    # one, everything else to the other, so nothing is unreachable.
    for cfgs in [
        (rc("/x"), rc("/x", methods=["GET"])),
        (rc("/x", methods=["GET"]), rc("/x")),
    ]:
        r = router(*cfgs)
        assert r.warnings() == []
        assert hit(r, "/x", method="GET") == [c.methods for c in cfgs].index(["GET"])


def test_method_subset_listed_later_is_unreachable() -> None:
    r = router(rc("/x", methods=["GET", "POST"]), rc("/x", methods=["GET"]))
    (w,) = r.warnings()
    assert w.startswith("routes[1] (/x methods=GET) is unreachable")


def test_more_specific_route_listed_later_is_not_shadowed() -> None:
    r = router(rc("/api/**"), rc("/api/orders/**"))
    assert r.warnings() == []
    assert hit(r, "/api/orders/1") == 1


def test_union_of_header_routes_covers_a_plain_one() -> None:
    r = router(
        rc("/h", headers={"x-a": True}),
        rc("/h", headers={"x-a": False}),
        rc("/h"),
    )
    (w,) = r.warnings()
    assert w == (
        "routes[2] (/h) is unreachable: every request it matches is taken by "
        "routes[0] (/h headers=x-a present), routes[1] (/h headers=x-a absent)"
    )


def test_header_presence_listed_first_covers_exact_value() -> None:
    r = router(rc("/h", headers={"x-a": True}), rc("/h", headers={"x-a": "1"}))
    (w,) = r.warnings()
    assert w.startswith("routes[1] (/h headers=x-a=1) is unreachable")
    # The other way round both are reachable, but for `x-a: 1` only config
    # order decides between the two, which deserves a note.
    r = router(rc("/h", headers={"x-a": "1"}), rc("/h", headers={"x-a": True}))
    (w,) = r.warnings()
    assert w.startswith("routes[1] (/h headers=x-a present) overlaps routes[0]")


def test_host_entry_that_never_reaches_its_route() -> None:
    r = router(rc("/w", host="*.example.com"), rc("/w", host=["a.example.com", "*.example.com"]))
    (w,) = r.warnings()
    assert "routes[1]" in w and "its host '*.example.com' never reaches it" in w
    assert hit(r, "/w", host="a.example.com") == 1
    assert hit(r, "/w", host="b.example.com") == 0


def test_overlap_decided_by_config_order() -> None:
    r = router(rc("/x", methods=["GET", "POST"]), rc("/x", methods=["GET", "PUT"]))
    (w,) = r.warnings()
    assert w.startswith("routes[1] (/x methods=GET,PUT) overlaps routes[0] (/x methods=GET,POST)")
    assert "only because it comes first in the config" in w


def test_disjoint_routes_do_not_overlap() -> None:
    r = router(
        rc("/x", methods=["GET"]),
        rc("/x", methods=["POST"]),
        rc("/y", headers={"a": "1"}),
        rc("/y", headers={"a": "2"}),
        rc("/z", headers={"a": True}),
        rc("/z", headers={"b": True}),
    )
    # /z: both have one header matcher and a request may carry a and b.
    (w,) = r.warnings()
    assert w.startswith("routes[5] (/z headers=b present) overlaps routes[4]")


def test_repeated_names() -> None:
    r = router(rc("/a", name="svc"), rc("/b", name="svc"))
    assert r.warnings() == ["routes[1] has the same name 'svc' as routes[0]"]


# --------------------------------------------------------------------------
# explain and the table


def test_explain() -> None:
    r = router(
        rc("/api/**"),
        rc("/api/orders/{id}", methods=["GET"]),
        rc("/api/users/{id}"),
        rc("/api/**", host="*.example.com"),
        rc("/api/orders/{id}", headers={"x-env": "staging"}),
        rc("/api/orders/{id}", name="dup"),
    )
    rows = r.explain("POST", "a.other.com", "/api/orders/7", [(b"x-env", b"prod")])
    got = [(route.index, ok, why) for route, ok, why in rows]
    assert got == [
        (1, False, "method POST not in [GET]"),
        (4, False, "header 'x-env' is 'prod', not 'staging'"),
        (2, False, "path segment 2 'orders' != 'users'"),
        (5, True, "matches (id='7')"),
        (0, True, "matches, but shadowed by routes[5]"),
        (3, False, "host 'a.other.com' does not match '*.example.com'"),
    ]
    m = r.match("POST", "a.other.com", "/api/orders/7", [(b"x-env", b"prod")])
    assert m is not None and m.route.index == 5


def test_explain_orders_by_request_host_and_reports_path_shapes() -> None:
    r = router(rc("/a/{id}"), rc("/a/b"), rc("/a/**", host="*.x.test"), rc("/a", host="x.test"))
    rows = r.explain("GET", "h.x.test", "/a/b/c", [])
    got = [(route.index, ok, why) for route, ok, why in rows]
    assert got == [
        (2, True, "matches (rest='b/c')"),
        (1, False, "path segment 3 'c' is extra: the pattern ends after segment 2"),
        (0, False, "path segment 3 'c' is extra: the pattern ends after segment 2"),
        (3, False, "host 'h.x.test' does not match 'x.test'"),
    ]
    rows = r.explain("GET", "x.test", "/a", [(b"x-debug", b"1")])
    got = [(route.index, ok, why) for route, ok, why in rows]
    assert got == [
        (3, True, "matches"),
        (1, False, "path ends after segment 1, pattern needs 'b' as segment 2"),
        (0, False, "path ends after segment 1, pattern needs '{id}' as segment 2"),
        (2, False, "host 'x.test' does not match '*.x.test'"),
    ]


def test_explain_header_reasons() -> None:
    r = router(
        rc("/h", headers={"x-a": True}),
        rc("/h", headers={"x-b": False}),
        rc("/h", headers={"x-c": "1"}),
    )
    rows = r.explain("GET", "h", "/h", [(b"x-b", b"1")])
    assert [why for _, _, why in rows] == [
        "header 'x-a' is missing (must be present)",
        "header 'x-b' is present (must be absent)",
        "header 'x-c' is missing (must be '1')",
    ]


def test_format_table() -> None:
    r = router(
        rc("/api/**", strip_prefix=True, name="api"),
        rc("/api/orders/{id}", methods=["GET", "PUT"], rewrite="/orders/{id}", upstream="orders"),
        rc("/", host=["a.test", "*.b.test"], headers={"x-a": "1", "x-b": False}),
    )
    table = r.format_table()
    lines = table.splitlines()
    assert lines[0].split() == [
        "rank",
        "route",
        "name",
        "host",
        "methods",
        "path",
        "headers",
        "upstream",
        "rewrite",
    ]
    assert lines[1].split() == [
        "1",
        "routes[2]",
        "-",
        "a.test,*.b.test",
        "*",
        "/",
        "x-a=1,x-b",
        "absent",
        "u",
        "-",
    ]
    assert lines[2].split() == [
        "2",
        "routes[1]",
        "-",
        "*",
        "GET,PUT",
        "/api/orders/{id}",
        "-",
        "orders",
        "/orders/{id}",
    ]
    assert lines[3].split() == [
        "3",
        "routes[0]",
        "api",
        "*",
        "*",
        "/api/**",
        "-",
        "u",
        "strip",
        "/api",
    ]
    # Columns line up.
    assert {line.index("routes[") for line in lines[1:]} == {lines[0].index("route")}
    assert {line.index("/") for line in lines[1:]} == {lines[0].index("path")}
