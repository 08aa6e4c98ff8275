"""The route table: config routes compiled, at load time, into segment tries.

Precedence
==========
`match()` returns the first route, in this order, whose every condition holds.
The order is by specificity; the order of routes in the config file only
breaks exact ties (rule 5).

1. Host: a route listing the request's host exactly, then a route whose
   `*.suffix` wildcard matches it (the longer suffix first), then a route with
   no `host`. A route with a list of hosts ranks by the best entry that
   matches the request.
2. Path, compared segment by segment from the left: a literal segment beats
   `{name}` / `*` (equal to each other), which beat `**`; a pattern that ends
   at a position beats a `**` at the same position (`/a` beats `/a/**` for
   the path `/a`).
3. A route with a `methods` list beats one without.
4. A route with more `headers` matchers beats one with fewer.
5. Config order.

Path patterns and the request paths they match: see `meshgate.http.paths`.

Hosts and headers
=================
`host` given to `match()` is lowercased and has no port; config hosts are
lowercased at load. `*.example.com` matches `a.example.com` and
`a.b.example.com`, not `example.com`. Header matchers compare names
case-insensitively; an exact value matches when any request line of that name
carries exactly that value (UTF-8 encoded, case-sensitive); `true` means at
least one line of that name, `false` none. `methods` are compared exactly
(`GET` does not imply `HEAD`).

Upstream path
=============
`Route.upstream_path()` builds the path sent upstream, plus the query as is.
`strip_prefix: true` removes the pattern's literal segments before its first
wildcard (`/api/orders/**`: `/api/orders/7` -> `/7`, `/api/orders` -> `/`); a
string removes that prefix when the path equals it or continues with `/`
(`/api` strips `/api/x`, not `/apiary`). `rewrite` is a template of literal
text, `{name}` and `{**}` compiled into pieces at load (`/legacy/**` with
`/v2/{**}`: `/legacy/a/b` -> `/v2/a/b`, `/legacy` -> `/v2/`). The result
always starts with `/`. A route may not set both.

How match works
===============
Routes are grouped by host entry (exact host, wildcard suffix, any host). In
each group, routes whose pattern is all literals sit in a dict keyed by the
path string (such a route beats every other route of its group for that
path); the rest form a trie: a dict of literal children, one parameter child,
a terminal list and a catch-all list per node, each list sorted by rules 3-5.
The search is depth first, literal -> parameter -> (terminal) -> catch-all,
so the first full match found is the most specific; methods and headers are
checked at the terminal, and the search backtracks when none passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, NamedTuple, TypeVar

from meshgate.config.schema import RouteConfig
from meshgate.http.conditions import (
    _HOST_ANY,
    _HOST_EXACT,
    _HOST_WILD,
    _headers_text,
    _host_matches,
    _host_rank,
    _host_text,
    _HostEntry,
    _parse_hosts,
    header_ok,
    headers_match,
    parse_header_checks,
)
from meshgate.http.paths import _parse_rewrite, _Pattern
from meshgate.http.route_analysis import _analyze, _order_key

__all__ = ["Route", "RouteMatch", "Router"]

T = TypeVar("T")


# --------------------------------------------------------------------------
# compiled routes


class Route(Generic[T]):
    """A compiled route. `index` is its position in the config (`routes[i]`)."""

    __slots__ = (
        "_catch_all",
        "_header_checks",
        "_hosts",
        "_methods",
        "_order",
        "_params",
        "_pattern",
        "_plain",
        "_rest_at",
        "_rewrite",
        "_rewrite_slash",
        "_strip",
        "config",
        "index",
        "name",
        "target",
    )

    def __init__(self, index: int, config: RouteConfig, target: T) -> None:
        where = f"routes[{index}]" + (f" ({config.name!r})" if config.name else "")
        self.index = index
        self.name = config.name or f"routes[{index}]"
        self.config = config
        self.target = target
        pattern = _Pattern(config.path, where)
        self._pattern = pattern
        # Positions in `path.split('/')`, whose item 0 is the '' before the
        # leading slash: what the hot path splits.
        self._params = tuple((name, pos + 1) for name, pos in pattern.params)
        self._catch_all = pattern.catch_all
        self._rest_at = len(pattern.shape) + 1
        self._hosts = _parse_hosts(config.host, where)
        if config.methods is not None and not config.methods:
            raise ValueError(f"{where}: methods is an empty list (omit it to allow every method)")
        self._methods = frozenset(config.methods) if config.methods is not None else None
        self._header_checks = parse_header_checks(config.headers, where)
        self._plain = self._methods is None and not self._header_checks
        # Rules 3-5 of the precedence, shared by every host group and node.
        self._order = (
            0 if self._methods is not None else 1,
            -len(self._header_checks),
            index,
        )
        strip = config.strip_prefix
        if config.rewrite is not None and strip is not False:
            raise ValueError(
                f"{where}: strip_prefix and rewrite cannot both be set "
                "(rewrite already gives the whole upstream path)"
            )
        self._rewrite: tuple[tuple[int, str], ...] | None = None
        self._rewrite_slash = False
        if config.rewrite is not None:
            self._rewrite = _parse_rewrite(config.rewrite, pattern, where)
            self._rewrite_slash = not config.rewrite.startswith("/")
        self._strip: str | None = None
        if strip is True:
            self._strip = pattern.literal_prefix or None
        elif isinstance(strip, str):
            if not strip.startswith("/"):
                raise ValueError(f"{where}: strip_prefix {strip!r} must start with '/'")
            prefix = strip.rstrip("/")
            self._strip = prefix or None

    def __repr__(self) -> str:
        return f"<Route routes[{self.index}] {self.name!r} {self.describe()}>"

    def describe(self) -> str:
        """A short human form: `/api/** host=a.example.com methods=GET`."""
        cfg = self.config
        out = cfg.path
        if cfg.host is not None:
            out += " host=" + ",".join(_host_text(e) for e in self._hosts)
        if cfg.methods is not None:
            out += " methods=" + ",".join(cfg.methods)
        if self._header_checks:
            out += " headers=" + _headers_text(self._header_checks)
        return out

    def upstream_path(self, path: str, query: str, params: dict[str, str], rest: str) -> str:
        """The path + query to send upstream. `path` is the normalized request
        path this route matched; `query` is '' or '?...' and is appended as is."""
        pieces = self._rewrite
        if pieces is not None:
            parts: list[str] = []
            for kind, value in pieces:
                parts.append(value if kind == 0 else params[value] if kind == 1 else rest)
            out = "".join(parts)
            if self._rewrite_slash and out[:1] != "/":
                out = "/" + out
            return out + query
        prefix = self._strip
        if prefix is not None and path.startswith(prefix):
            lp = len(prefix)
            if len(path) == lp:
                return "/" + query
            if path[lp] == "/":
                return path[lp:] + query
            if prefix[-1] == "/":
                return "/" + path[lp:] + query
        return path + query

    def _accepts(self, method: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        methods = self._methods
        if methods is not None and method not in methods:
            return False
        return headers_match(self._header_checks, headers)

    def _key_for(self, host: str) -> tuple[object, ...]:
        """The full precedence key of this route for a request to `host`."""
        ranks = [_host_rank(e) for e in self._hosts if _host_matches(e, host)]
        if not ranks:
            # Cannot take the request at all: after every route that can.
            return ((_HOST_ANY + 1, 0), *self._static_key())
        return (min(ranks), self._pattern.rank, *self._order)

    def _static_key(self) -> tuple[object, ...]:
        return (min(_host_rank(e) for e in self._hosts), self._pattern.rank, *self._order)

    def _mismatch(
        self, method: str, host: str, segs: list[str], headers: Sequence[tuple[bytes, bytes]]
    ) -> str | None:
        """Why this route does not take the request, or None when it matches."""
        if not any(_host_matches(e, host) for e in self._hosts):
            texts = [_host_text(e) for e in self._hosts]
            if len(texts) == 1:
                return f"host {host!r} does not match {texts[0]!r}"
            return f"host {host!r} does not match any of {texts!r}"
        reason = self._pattern.mismatch(segs)
        if reason is not None:
            return reason
        if self._methods is not None and method not in self._methods:
            return f"method {method} not in [{', '.join(self.config.methods or ())}]"
        for name, want in self._header_checks:
            if header_ok(headers, name, want):
                continue
            shown = name.decode("ascii")
            if want is True:
                return f"header {shown!r} is missing (must be present)"
            if want is False:
                return f"header {shown!r} is present (must be absent)"
            values = [v for n, v in headers if n.lower() == name]
            wanted = want.decode("utf-8", "replace")
            if not values:
                return f"header {shown!r} is missing (must be {wanted!r})"
            got = ", ".join(repr(v.decode("utf-8", "replace")) for v in values)
            return f"header {shown!r} is {got}, not {wanted!r}"
        return None


class RouteMatch(NamedTuple, Generic[T]):
    route: Route[T]
    params: dict[str, str]
    rest: str
    """What a trailing `**` matched, without its leading slash ('' if none)."""


# --------------------------------------------------------------------------
# the trie


class _Node(Generic[T]):
    """A trie node. The trie is a tree, so backtracking climbs `parent`."""

    __slots__ = ("catch_all", "literal", "param", "parent", "terminal")

    def __init__(self, parent: _Node[T] | None = None) -> None:
        self.literal: dict[str, _Node[T]] = {}
        self.param: _Node[T] | None = None
        self.terminal: list[Route[T]] = []
        self.catch_all: list[Route[T]] = []
        self.parent = parent

    def insert(self, route: Route[T]) -> None:
        node = self
        for want in route._pattern.shape:
            if want is None:
                if node.param is None:
                    node.param = _Node(node)
                node = node.param
            else:
                child = node.literal.get(want)
                if child is None:
                    child = node.literal[want] = _Node(node)
                node = child
        (node.catch_all if route._catch_all else node.terminal).append(route)

    def finish(self) -> None:
        self.terminal.sort(key=_order_key)
        self.catch_all.sort(key=_order_key)
        for child in self.literal.values():
            child.finish()
        if self.param is not None:
            self.param.finish()


def _search(
    root: _Node[T], segs: list[str], method: str, headers: Sequence[tuple[bytes, bytes]]
) -> Route[T] | None:
    """The first route, depth first: literal child -> parameter child ->
    terminal -> catch-all. `segs` is `path.split('/')`: segs[0] is the ''
    before the leading slash and node depth d consumes segs[1..d].

    No recursion and no allocation: on a dead end the search climbs `parent`
    links, and a node reached through a literal child still has its
    parameter child and then its catch-all list to try."""
    n = len(segs)
    node = root
    i = 1
    while True:
        # Descend as far as the path allows, literals first.
        while i < n:
            seg = segs[i]
            child = node.literal.get(seg)
            if child is None:
                child = node.param
                if child is None or not seg:
                    break
            node = child
            i += 1
        else:
            for route in node.terminal:
                if route._plain or route._accepts(method, headers):
                    return route
        # Dead end at `node` (depth i - 1): its catch-all, then climb.
        while True:
            for route in node.catch_all:
                if route._plain or route._accepts(method, headers):
                    return route
            parent = node.parent
            if parent is None:
                return None
            i -= 1
            if node is not parent.param and parent.param is not None and segs[i]:
                node = parent.param
                i += 1
                break
            node = parent


_new_match = tuple.__new__


class _Group(Generic[T]):
    """The routes of one host entry."""

    __slots__ = ("members", "root", "static")

    def __init__(self) -> None:
        self.members: list[Route[T]] = []
        self.static: dict[str, list[Route[T]]] = {}
        self.root: _Node[T] | None = None

    def add(self, route: Route[T]) -> None:
        self.members.append(route)
        if route._pattern.static:
            self.static.setdefault(route.config.path, []).append(route)
        else:
            if self.root is None:
                self.root = _Node()
            self.root.insert(route)

    def finish(self) -> None:
        for routes in self.static.values():
            routes.sort(key=_order_key)
        if self.root is not None:
            self.root.finish()

    def lookup(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> RouteMatch[T] | None:
        candidates = self.static.get(path)
        if candidates is not None:
            for route in candidates:
                if route._plain or route._accepts(method, headers):
                    return _new_match(RouteMatch, (route, {}, ""))
        root = self.root
        if root is None:
            return None
        segs = path.split("/")
        if segs[0]:
            return None  # not starting with '/'
        found = _search(root, segs, method, headers)
        if found is None:
            return None
        params: dict[str, str] = {}
        for name, pos in found._params:
            params[name] = segs[pos]
        if found._catch_all:
            return _new_match(RouteMatch, (found, params, "/".join(segs[found._rest_at :])))
        return _new_match(RouteMatch, (found, params, ""))


# --------------------------------------------------------------------------
# the router


class Router(Generic[T]):
    """The compiled route table; see the module docstring for precedence."""

    __slots__ = (
        "_any",
        "_any_root",
        "_any_static",
        "_by_index",
        "_exact",
        "_hosted",
        "_warnings",
        "_wild",
        "routes",
    )

    def __init__(self, routes: Sequence[tuple[RouteConfig, T]]) -> None:
        compiled = [Route(i, cfg, target) for i, (cfg, target) in enumerate(routes)]
        self._by_index: tuple[Route[T], ...] = tuple(compiled)
        self.routes: tuple[Route[T], ...] = tuple(sorted(compiled, key=Route._static_key))
        self._exact: dict[str, _Group[T]] = {}
        self._wild: dict[str, _Group[T]] = {}
        self._any: _Group[T] | None = None
        for route in compiled:
            for kind, value in route._hosts:
                if kind == _HOST_EXACT:
                    group = self._exact.get(value)
                    if group is None:
                        group = self._exact[value] = _Group()
                elif kind == _HOST_WILD:
                    group = self._wild.get(value)
                    if group is None:
                        group = self._wild[value] = _Group()
                else:
                    if self._any is None:
                        self._any = _Group()
                    group = self._any
                group.add(route)
        for group in self._groups():
            group.finish()
        self._hosted = bool(self._exact or self._wild)
        self._any_static: dict[str, list[Route[T]]] = {}
        self._any_root: _Node[T] | None = None
        if self._any is not None:
            self._any_static = self._any.static
            self._any_root = self._any.root
        self._warnings = _analyze(self._by_index, self._groups_by_entry())

    def _groups(self) -> list[_Group[T]]:
        groups = [*self._exact.values(), *self._wild.values()]
        if self._any is not None:
            groups.append(self._any)
        return groups

    def _groups_by_entry(self) -> list[tuple[_HostEntry, _Group[T]]]:
        out: list[tuple[_HostEntry, _Group[T]]] = [
            ((_HOST_EXACT, h), g) for h, g in self._exact.items()
        ]
        out.extend(((_HOST_WILD, s), g) for s, g in self._wild.items())
        if self._any is not None:
            out.append(((_HOST_ANY, ""), self._any))
        return out

    def match(
        self, method: str, host: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> RouteMatch[T] | None:
        """The route for a request, or None. `host` is lowercase without port;
        `path` is the output of `normalize_path`; header names are lowercase."""
        if self._hosted:
            group = self._exact.get(host)
            if group is not None:
                found = group.lookup(method, path, headers)
                if found is not None:
                    return found
            wild = self._wild
            if wild:
                # Longest suffix first: '.b.example.com' before '.example.com'.
                i = host.find(".", 1)
                while i > 0:
                    group = wild.get(host[i:])
                    if group is not None:
                        found = group.lookup(method, path, headers)
                        if found is not None:
                            return found
                    i = host.find(".", i + 1)
        # The any-host group: _Group.lookup, inlined (the common case).
        candidates = self._any_static.get(path)
        if candidates is not None:
            for route in candidates:
                if route._plain or route._accepts(method, headers):
                    return _new_match(RouteMatch, (route, {}, ""))
        root = self._any_root
        if root is None:
            return None
        segs = path.split("/")
        if segs[0]:
            return None  # not starting with '/'
        found_route = _search(root, segs, method, headers)
        if found_route is None:
            return None
        params: dict[str, str] = {}
        for name, pos in found_route._params:
            params[name] = segs[pos]
        if found_route._catch_all:
            rest = "/".join(segs[found_route._rest_at :])
            return _new_match(RouteMatch, (found_route, params, rest))
        return _new_match(RouteMatch, (found_route, params, ""))

    def explain(
        self, method: str, host: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> list[tuple[Route[T], bool, str]]:
        """Every route, in precedence order for this request (routes whose host
        does not match come last): whether all its conditions match, and why.
        The first row with True is what `match` returns ("matches"); later
        matching rows say which route shadows them."""
        segs = path[1:].split("/") if path[:1] == "/" else [path]
        order = sorted(self._by_index, key=lambda r: r._key_for(host))
        out: list[tuple[Route[T], bool, str]] = []
        winner: Route[T] | None = None
        for route in order:
            reason = route._mismatch(method, host, segs, headers)
            if reason is not None:
                out.append((route, False, reason))
            elif winner is None:
                winner = route
                out.append((route, True, _match_text(route, segs)))
            else:
                out.append((route, True, f"matches, but shadowed by routes[{winner.index}]"))
        return out

    def warnings(self) -> list[str]:
        """Problems found at load: unreachable routes, host entries that never
        reach their route, overlapping routes only config order separates, and
        repeated route names.

        With specificity precedence a route can only be hidden by routes of
        the same host entry and the same path shape (literals, wildcards) that
        rank before it on methods/headers/config order: e.g. a later
        duplicate, a `[GET]` route after a `[GET, POST]` twin, or a plain
        route after `x-a: true` and `x-a: false` twins. A methods-restricted
        route and an unrestricted twin are both reachable, whatever their
        order. The check is sound (a route reported unreachable is never
        matched) but not complete: a `**` route covered by several more
        specific paths together is not reported."""
        return list(self._warnings)

    def format_table(self) -> str:
        """The routes in precedence order, as a text table."""
        head = (
            "rank",
            "route",
            "name",
            "host",
            "methods",
            "path",
            "headers",
            "upstream",
            "rewrite",
        )
        rows: list[tuple[str, ...]] = [head]
        for rank, route in enumerate(self.routes, 1):
            cfg = route.config
            if cfg.rewrite is not None:
                rewrite = cfg.rewrite
            elif route._strip is not None:
                rewrite = f"strip {route._strip}"
            else:
                rewrite = "-"
            rows.append(
                (
                    str(rank),
                    f"routes[{route.index}]",
                    cfg.name or "-",
                    ",".join(_host_text(e) for e in route._hosts),
                    ",".join(cfg.methods) if cfg.methods is not None else "*",
                    cfg.path,
                    _headers_text(route._header_checks) or "-",
                    cfg.target_label(),
                    rewrite,
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        return "\n".join(lines) + "\n"


def _match_text(route: Route[T], segs: list[str]) -> str:
    pattern = route._pattern
    details = [f"{name}={segs[pos]!r}" for name, pos in pattern.params]
    if pattern.catch_all:
        details.append(f"rest={'/'.join(segs[len(pattern.shape) :])!r}")
    return "matches" + (f" ({', '.join(details)})" if details else "")
