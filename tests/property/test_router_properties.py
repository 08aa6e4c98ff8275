"""Router properties against a slow reference implementation of the documented
precedence: sort every route by its key for the request, take the first whose
every condition holds."""

from __future__ import annotations

import random
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.config.schema import RouteConfig
from meshgate.http.paths import normalize_path
from meshgate.http.router import Router

HOSTS_CFG: list[Any] = [
    None,
    "a.com",
    "x.a.com",
    "*.a.com",
    "*.x.a.com",
    ["a.com", "*.x.a.com"],
    ["x.a.com", "*.a.com"],
]
REQUEST_HOSTS = ["a.com", "x.a.com", "y.x.a.com", "y.a.com", "b.com"]
METHODS_CFG: list[list[str] | None] = [None, ["GET"], ["POST"], ["GET", "POST"]]
REQUEST_METHODS = ["GET", "POST", "PUT"]
HEADERS_CFG: list[dict[str, str | bool] | None] = [
    None,
    {"x-a": True},
    {"x-a": False},
    {"x-a": "1"},
    {"x-a": "1", "x-b": True},
    {"X-B": False},
]
HEADER_LINES = [(b"x-a", b"1"), (b"x-a", b"2"), (b"x-b", b"y")]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    kinds = draw(st.lists(st.sampled_from(["a", "b", "c", "*", "{}"]), max_size=3))
    segs = [f"{{p{i}}}" if k == "{}" else k for i, k in enumerate(kinds)]
    end = draw(st.sampled_from(["", "**", "/"]))
    if end == "**":
        segs.append("**")
    elif end == "/" or not segs:
        segs.append("")
    return "/" + "/".join(segs)


@st.composite
def route_configs(draw: st.DrawFn) -> RouteConfig:
    return RouteConfig(
        path=draw(patterns()),
        upstream="u",
        host=draw(st.sampled_from(HOSTS_CFG)),
        methods=draw(st.sampled_from(METHODS_CFG)),
        headers=draw(st.sampled_from(HEADERS_CFG)),
    )


@st.composite
def request_paths(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=4))
    slash = draw(st.booleans())
    return "/" + "/".join(segs) + ("/" if slash and segs else "")


Request = tuple[str, str, str, list[tuple[bytes, bytes]]]

requests = st.tuples(
    st.sampled_from(REQUEST_METHODS),
    st.sampled_from(REQUEST_HOSTS),
    request_paths(),
    st.lists(st.sampled_from(HEADER_LINES), max_size=3, unique=True),
)


# --------------------------------------------------------------------------
# the reference


def ref_host_rank(cfg: RouteConfig, host: str) -> tuple[int, int] | None:
    if cfg.host is None:
        return (2, 0)
    entries = [cfg.host] if isinstance(cfg.host, str) else cfg.host
    ranks = []
    for entry in entries:
        if entry.startswith("*."):
            suffix = entry[1:]
            if host.endswith(suffix) and len(host) > len(suffix):
                ranks.append((1, -len(suffix)))
        elif entry == host:
            ranks.append((0, 0))
    return min(ranks) if ranks else None


def ref_path(pattern: str, path: str) -> tuple[dict[str, str], str] | None:
    want = pattern[1:].split("/")
    have = path[1:].split("/")
    catch_all = want[-1] == "**"
    fixed = want[:-1] if catch_all else want
    if len(have) < len(fixed) or (not catch_all and len(have) != len(fixed)):
        return None
    params = {}
    for w, h in zip(fixed, have, strict=False):
        if w == "*" or w.startswith("{"):
            if not h:
                return None
            if w.startswith("{"):
                params[w[1:-1]] = h
        elif w != h:
            return None
    return params, "/".join(have[len(fixed) :]) if catch_all else ""


def ref_path_rank(pattern: str) -> tuple[int, ...]:
    want = pattern[1:].split("/")
    if want[-1] == "**":
        return (*(1 if w == "*" or w.startswith("{") else 0 for w in want[:-1]), 3)
    return (*(1 if w == "*" or w.startswith("{") else 0 for w in want), 2)


def ref_headers(cfg: RouteConfig, lines: list[tuple[bytes, bytes]]) -> bool:
    for name, want in (cfg.headers or {}).items():
        key = name.lower().encode()
        values = [v for n, v in lines if n == key]
        if want is True and not values:
            return False
        if want is False and values:
            return False
        if isinstance(want, str) and want.encode() not in values:
            return False
    return True


def ref_match(cfgs: list[RouteConfig], request: Request) -> tuple[int, dict[str, str], str] | None:
    method, host, path, lines = request
    keyed = []
    for i, cfg in enumerate(cfgs):
        rank = ref_host_rank(cfg, host)
        if rank is None:
            continue
        key = (
            rank,
            ref_path_rank(cfg.path),
            0 if cfg.methods else 1,
            -len(cfg.headers or {}),
            i,
        )
        keyed.append((key, i, cfg))
    keyed.sort(key=lambda item: item[0])
    for _, i, cfg in keyed:
        found = ref_path(cfg.path, path)
        if found is None:
            continue
        if cfg.methods is not None and method not in cfg.methods:
            continue
        if not ref_headers(cfg, lines):
            continue
        return i, found[0], found[1]
    return None


def build(cfgs: list[RouteConfig]) -> Router[int]:
    return Router([(cfg, i) for i, cfg in enumerate(cfgs)])


_UNREACHABLE = re.compile(r"^routes\[(\d+)\] \(.*?\) is unreachable:")


# --------------------------------------------------------------------------
# properties


@settings(max_examples=100, deadline=None)
@given(st.lists(route_configs(), max_size=12), st.lists(requests, min_size=1, max_size=12))
def test_match_agrees_with_reference(cfgs: list[RouteConfig], reqs: list[Request]) -> None:
    router = build(cfgs)
    unreachable = {int(m.group(1)) for w in router.warnings() if (m := _UNREACHABLE.match(w))}
    for req in reqs:
        method, host, path, lines = req
        got = router.match(method, host, path, lines)
        want = ref_match(cfgs, req)
        assert (None if got is None else (got.route.target, got.params, got.rest)) == want, req
        # explain() agrees: its first matching row is the match.
        rows = router.explain(method, host, path, lines)
        assert len(rows) == len(cfgs)
        first = next((route.target for route, ok, _ in rows if ok), None)
        assert first == (None if want is None else want[0])
        # A route reported unreachable is never the answer.
        assert want is None or want[0] not in unreachable


def precedence_class(cfg: RouteConfig) -> list[tuple[object, ...]]:
    """What makes two routes tie (and so depend on config order) when both
    can match one request: a shared host entry and equal path shape, methods
    presence and header count. Different literals cannot match one path."""
    shape = tuple("*" if s == "*" or s.startswith("{") else s for s in cfg.path.split("/"))
    hosts = [cfg.host] if not isinstance(cfg.host, list) else cfg.host
    return [(h, shape, cfg.methods is None, len(cfg.headers or {})) for h in hosts]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(route_configs(), max_size=12),
    st.lists(requests, min_size=1, max_size=10),
    st.randoms(use_true_random=False),
)
def test_config_order_only_breaks_ties(
    cfgs: list[RouteConfig], reqs: list[Request], rnd: random.Random
) -> None:
    seen: set[tuple[object, ...]] = set()
    distinct = []
    for cfg in cfgs:
        keys = precedence_class(cfg)
        if seen.isdisjoint(keys):
            seen.update(keys)
            distinct.append(cfg)
    pairs = list(enumerate(distinct))
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    a = Router([(cfg, i) for i, cfg in pairs])
    b = Router([(cfg, i) for i, cfg in shuffled])
    for method, host, path, lines in reqs:
        ma = a.match(method, host, path, lines)
        mb = b.match(method, host, path, lines)
        assert (ma and (ma.route.target, ma.params, ma.rest)) == (
            mb and (mb.route.target, mb.params, mb.rest)
        )


raw_paths = st.one_of(
    st.lists(
        st.sampled_from(["a", ".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%41", "%2f", "%7E", ""]),
        max_size=6,
    ).map(lambda segs: "/" + "/".join(segs)),
    st.text(alphabet="/.a%2eEfF4~1", max_size=16),
    st.text(max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(raw_paths)
def test_normalize_path_idempotent_and_dot_free(raw: str) -> None:
    out = normalize_path(raw)
    if out is None:
        return
    assert out.startswith("/")
    assert normalize_path(out) == out
    segments = out[1:].split("/")
    assert "." not in segments and ".." not in segments
    assert "" not in segments[:-1]
    # No escape of an unreserved character is left, and escapes are uppercase.
    for m in re.finditer(r"%(..)", out):
        assert m.group(1) == m.group(1).upper()
        assert not re.fullmatch(r"[A-Za-z0-9\-._~]", chr(int(m.group(1), 16)))
