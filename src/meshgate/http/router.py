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

Path patterns
=============
`/`-separated segments: a literal; `*`, exactly one non-empty segment;
`{name}`, one non-empty segment captured into `params`; `**`, zero or more
trailing segments (last segment only), captured as `rest` without its leading
slash. `/api/orders/**` matches `/api/orders`, `/api/orders/` and
`/api/orders/7/items` (rest `''`, `''`, `'7/items'`).

A trailing slash is significant for exact patterns: `/a` and `/a/` are
distinct routes and `/a` does not match the request path `/a/` (give both, or
use `/a/**`). A literal segment may not be `.` or `..`, may not be empty except
as the trailing slash, and must already be in the form `normalize_path`
produces (so that it can ever match).

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

Requests
========
The engine calls `normalize_path()` on the raw request path (without its
query) and answers 400 when it returns None; it then passes that normalized
path both to `match()` and to `Route.upstream_path()`, so the gateway routes
on the same bytes it forwards. `normalize_path` merges runs of `/` into one
(as nginx's `merge_slashes` does): with `//` kept, `//admin/x` would miss an
`/admin/**` route and reach a broader one while an upstream that merges
slashes sees `/admin/x`.

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

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Generic, NamedTuple, TypeVar

from meshgate.config.schema import RouteConfig

__all__ = ["PathPattern", "Route", "RouteMatch", "Router", "normalize_path"]

T = TypeVar("T")

# Path segment kinds, in precedence order (lower wins); a pattern's path rank
# is the tuple of its segments' kinds followed by _END or _REST.
_LIT = 0
_PARAM = 1
_END = 2
_REST = 3

# Host entry kinds, in precedence order.
_HOST_EXACT = 0
_HOST_WILD = 1
_HOST_ANY = 2

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAM_RE = re.compile(r"\{(" + _NAME_RE.pattern + r")\}")


def route_params(path: str) -> frozenset[str]:
    """The `{name}` parameters of a route's path pattern (what `match` puts
    in `params`), for templates checked at load."""
    return frozenset(_PARAM_RE.findall(path))


_HOST_PORT_RE = re.compile(r"[^:\[\]]+:\d+")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL_RE = re.compile(r"[\x00-\x1f\x7f]")

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# A host entry: (kind, value). value is the host for _HOST_EXACT, the suffix
# with its leading dot for _HOST_WILD ('.example.com'), '' for _HOST_ANY.
_HostEntry = tuple[int, str]
# A compiled header matcher: (lowercase name, exact value | True | False).
HeaderCheck = tuple[bytes, bytes | bool]


# --------------------------------------------------------------------------
# normalize_path


def normalize_path(raw: str) -> str | None:
    """Normalize a raw request path (without its query), or None if invalid.

    Invalid: not starting with '/', a raw control character (C0 or DEL), a
    `%` not followed by two hex digits, or a `..` that would climb above the
    root. An escaped control character (`%00`) is kept as an escape.
    Percent-escapes of unreserved characters (ALPHA DIGIT - . _ ~) are
    decoded; other escapes are kept, with uppercase hex (`%2f` -> `%2F`, so an
    encoded slash is never a separator). Then `.` and `..` segments are
    resolved as RFC 3986 remove_dot_segments does (also when written `%2e`),
    and runs of `/` are merged into one. A trailing slash is kept.

    Fast path: a path with no `%`, no `/.` and no `//` is returned as is.
    """
    if (
        raw[:1] == "/"
        and "%" not in raw
        and "/." not in raw
        and "//" not in raw
        and raw.isprintable()
    ):
        return raw
    return _normalize_slow(raw)


def _normalize_slow(raw: str) -> str | None:
    if raw[:1] != "/" or _CTL_RE.search(raw) is not None:
        return None
    if "%" in raw:
        chunks = raw.split("%")
        out = [chunks[0]]
        for chunk in itertools.islice(chunks, 1, None):
            if len(chunk) < 2 or chunk[0] not in _HEX or chunk[1] not in _HEX:
                return None
            ch = chr(int(chunk[:2], 16))
            if ch in _UNRESERVED:
                out.append(ch)
            else:
                out.append("%" + chunk[:2].upper())
            out.append(chunk[2:])
        path = "".join(out)
    else:
        path = raw
    segments = path[1:].split("/")
    last = len(segments) - 1
    stack: list[str] = []
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == last:
                stack.append("")
        elif seg == "..":
            if not stack:
                return None
            stack.pop()
            if i == last:
                stack.append("")
        elif seg or i == last:
            stack.append(seg)
    return "/" + "/".join(stack)


# --------------------------------------------------------------------------
# compiled routes


class _Pattern:
    """A parsed path pattern."""

    __slots__ = ("catch_all", "literal_prefix", "names", "params", "rank", "shape", "tokens")

    def __init__(self, path: str, where: str) -> None:
        tokens = path[1:].split("/")
        shape: list[str | None] = []  # literal text, or None for a parameter
        params: list[tuple[str, int]] = []
        names: set[str] = set()
        catch_all = False
        last = len(tokens) - 1
        for pos, tok in enumerate(tokens):
            what = f"{where}: path {path!r} segment {pos + 1} {tok!r}"
            if tok == "**":
                if pos != last:
                    raise ValueError(f"{what}: '**' is only allowed as the last segment")
                catch_all = True
            elif tok == "*":
                shape.append(None)
            elif tok.startswith("{") and tok.endswith("}"):
                name = tok[1:-1]
                if _NAME_RE.fullmatch(name) is None:
                    raise ValueError(
                        f"{what}: a parameter is {{name}} with a name of letters, digits "
                        "and '_' not starting with a digit"
                    )
                if name in names:
                    raise ValueError(f"{what}: parameter {{{name}}} appears twice")
                names.add(name)
                params.append((name, pos))
                shape.append(None)
            elif "*" in tok or "{" in tok or "}" in tok:
                raise ValueError(
                    f"{what}: '*', '**' and '{{name}}' must be a whole segment "
                    "(partial-segment wildcards are not supported)"
                )
            elif tok == "" and pos != last:
                raise ValueError(
                    f"{what}: an empty segment ('//') can never match, request paths "
                    "have runs of '/' merged"
                )
            elif tok in (".", ".."):
                raise ValueError(f"{what}: a '.' or '..' segment can never match")
            elif tok and normalize_path("/" + tok) != "/" + tok:
                norm = normalize_path("/" + tok)
                hint = f"; write {norm[1:]!r}" if norm is not None else ""
                raise ValueError(
                    f"{what}: can never match a normalized request path "
                    f"(unreserved characters are decoded, escapes uppercased){hint}"
                )
            elif "?" in tok or "#" in tok:
                raise ValueError(f"{what}: a path never contains '?' or '#'")
            else:
                shape.append(tok)
        self.tokens = tuple(tokens)
        self.shape = tuple(shape)
        self.params = tuple(params)
        self.names = frozenset(names)
        self.catch_all = catch_all
        kinds = [_PARAM if s is None else _LIT for s in shape]
        kinds.append(_REST if catch_all else _END)
        self.rank = tuple(kinds)
        prefix: list[str] = []
        for s in shape:
            if s is None:
                break
            prefix.append(s)
        self.literal_prefix = "/" + "/".join(prefix) if prefix else ""

    @property
    def static(self) -> bool:
        return not self.catch_all and not self.params and None not in self.shape

    def mismatch(self, segs: list[str]) -> str | None:
        """Why the path (split into segments) does not match, or None."""
        n = len(segs)
        for pos, want in enumerate(self.shape):
            tok = self.tokens[pos]
            if pos >= n:
                return f"path ends after segment {n}, pattern needs {tok!r} as segment {pos + 1}"
            seg = segs[pos]
            if want is None:
                if not seg:
                    return f"path segment {pos + 1} is empty, {tok!r} needs a value"
            elif seg != want:
                return f"path segment {pos + 1} {seg!r} != {want!r}"
        k = len(self.shape)
        if not self.catch_all and n > k:
            return f"path segment {k + 1} {segs[k]!r} is extra: the pattern ends after segment {k}"
        return None


class PathPattern:
    """A route-style path pattern on its own (an authorization rule's
    `paths:`), parsed and refused by the same rules as a route's: it matches
    exactly the request paths a route with this `path` (and nothing else)
    would."""

    __slots__ = ("catch_all", "shape", "static", "text")

    def __init__(self, path: str, where: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"{where}: a path pattern starts with '/', found {path!r}")
        pattern = _Pattern(path, where)
        self.text = path
        self.shape = pattern.shape
        self.catch_all = pattern.catch_all
        self.static = pattern.static
        """All literal: it matches the one path equal to `text`."""

    def match_segments(self, segs: Sequence[str]) -> bool:
        """Whether a normalized path, as `path[1:].split('/')`, matches."""
        shape = self.shape
        n = len(segs)
        if n < len(shape) or (n > len(shape) and not self.catch_all):
            return False
        for want, seg in zip(shape, segs, strict=False):
            if want is None:
                if not seg:
                    return False
            elif seg != want:
                return False
        return True

    def matches(self, path: str) -> bool:
        """Whether a normalized request path (no query) matches."""
        return path[:1] == "/" and self.match_segments(path[1:].split("/"))


def _parse_hosts(host: str | list[str] | None, where: str) -> tuple[_HostEntry, ...]:
    if host is None:
        return ((_HOST_ANY, ""),)
    items = [host] if isinstance(host, str) else host
    if not items:
        raise ValueError(f"{where}: host is an empty list (omit host to match every host)")
    entries: list[_HostEntry] = []
    for item in items:
        h = item.strip().lower()
        if not h:
            raise ValueError(f"{where}: host {item!r} is empty")
        if h.startswith("*."):
            suffix = h[1:]
            if "*" in suffix or len(suffix) < 2:
                raise ValueError(
                    f"{where}: host {item!r}: a wildcard host is '*.' followed by a domain"
                )
            entry: _HostEntry = (_HOST_WILD, suffix)
        elif "*" in h:
            raise ValueError(
                f"{where}: host {item!r}: '*' is only allowed as the first label ('*.example.com');"
                " omit host to match every host"
            )
        elif _HOST_PORT_RE.fullmatch(h) is not None:
            raise ValueError(f"{where}: host {item!r}: hosts are matched without the port")
        else:
            entry = (_HOST_EXACT, h)
        if entry not in entries:
            entries.append(entry)
    return tuple(entries)


def _host_rank(entry: _HostEntry) -> tuple[int, int]:
    kind, value = entry
    return (kind, -len(value) if kind == _HOST_WILD else 0)


def _host_matches(entry: _HostEntry, host: str) -> bool:
    kind, value = entry
    if kind == _HOST_EXACT:
        return host == value
    if kind == _HOST_WILD:
        return host.endswith(value) and len(host) > len(value)
    return True


def _host_text(entry: _HostEntry) -> str:
    kind, value = entry
    return value if kind == _HOST_EXACT else "*" + value if kind == _HOST_WILD else "*"


def parse_header_checks(
    headers: dict[str, str | bool] | None, where: str
) -> tuple[HeaderCheck, ...]:
    """`{X-Fault: "1", X-Debug: true}` -> ((b"x-fault", b"1"), (b"x-debug", True)):
    exact value, `true` present, `false` absent. Routes and filters share it."""
    if not headers:
        return ()
    checks: list[HeaderCheck] = []
    seen: set[bytes] = set()
    for name, want in headers.items():
        if _TOKEN_RE.fullmatch(name) is None:
            raise ValueError(f"{where}: headers: {name!r} is not a valid header name")
        key = name.lower().encode("ascii")
        if key in seen:
            raise ValueError(f"{where}: headers: {name!r} is given twice (names ignore case)")
        seen.add(key)
        checks.append((key, want if isinstance(want, bool) else want.encode("utf-8")))
    return tuple(checks)


def header_ok(headers: Sequence[tuple[bytes, bytes]], name: bytes, want: bytes | bool) -> bool:
    ln = len(name)
    if isinstance(want, bool):
        for n, _ in headers:
            if len(n) == ln and (n == name or n.lower() == name):
                return want
        return not want
    for n, v in headers:  # noqa: SIM110 - a plain loop, no generator, on the hot path
        if v == want and len(n) == ln and (n == name or n.lower() == name):
            return True
    return False


def headers_match(checks: tuple[HeaderCheck, ...], headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Every check holds (no checks: True)."""
    for name, want in checks:  # noqa: SIM110 - hot path, no generator
        if not header_ok(headers, name, want):
            return False
    return True


def _parse_rewrite(template: str, pattern: _Pattern, where: str) -> tuple[tuple[int, str], ...]:
    """`/orders/{id}/{**}` -> ((0, '/orders/'), (1, 'id'), (0, '/'), (2, ''))."""
    pieces: list[tuple[int, str]] = []
    pos = 0
    while pos < len(template):
        open_ = template.find("{", pos)
        close = template.find("}", pos)
        if open_ < 0:
            if close >= 0:
                raise ValueError(f"{where}: rewrite {template!r} has a '}}' without '{{'")
            pieces.append((0, template[pos:]))
            break
        if close >= 0 and close < open_:
            raise ValueError(f"{where}: rewrite {template!r} has a '}}' without '{{'")
        if close < 0:
            raise ValueError(f"{where}: rewrite {template!r} has a '{{' without '}}'")
        if open_ > pos:
            pieces.append((0, template[pos:open_]))
        name = template[open_ + 1 : close]
        if name == "**":
            if not pattern.catch_all:
                raise ValueError(
                    f"{where}: rewrite {template!r} uses {{**}} but the path has no trailing '**'"
                )
            pieces.append((2, ""))
        elif name in pattern.names:
            pieces.append((1, name))
        else:
            known = ", ".join("{" + n + "}" for n, _ in pattern.params)
            if pattern.catch_all:
                known = f"{known}, {{**}}" if known else "{**}"
            raise ValueError(
                f"{where}: rewrite {template!r} uses {{{name}}}, which the path does not "
                f"capture (it captures: {known or 'nothing'})"
            )
        pos = close + 1
    return tuple(pieces)


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


def _headers_text(checks: Iterable[HeaderCheck]) -> str:
    parts = []
    for name, want in checks:
        shown = name.decode("ascii")
        if want is True:
            parts.append(f"{shown} present")
        elif want is False:
            parts.append(f"{shown} absent")
        else:
            parts.append(f"{shown}={want.decode('utf-8', 'replace')}")
    return ",".join(parts)


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


def _order_key(route: Route[T]) -> tuple[int, int, int]:
    return route._order


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


# --------------------------------------------------------------------------
# load-time analysis

_OTHER = object()  # a method or header value no route mentions
_ABSENT = object()  # a header not sent
_MAX_CASES = 4096


def _covering(b: Route[T], before: list[Route[T]]) -> list[Route[T]] | None:
    """Routes of `before` (same group and path shape as `b`, preceding it)
    that together take every request `b` matches; None if some escape."""
    if not before:
        return None
    # Abstract every request into one method and one state per header name,
    # drawn from the values the routes mention plus "other" / "absent".
    methods: list[object]
    if b._methods is not None:
        methods = [*sorted(b._methods)]
    else:
        mentioned = {m for a in before if a._methods is not None for m in a._methods}
        methods = [*sorted(mentioned), _OTHER]
    values: dict[bytes, set[bytes]] = {}
    for r in (b, *before):
        for name, want in r._header_checks:
            bucket = values.setdefault(name, set())
            if not isinstance(want, bool):
                bucket.add(want)
    own = dict(b._header_checks)
    names = sorted(values)
    domains: list[list[object]] = []
    for name in names:
        mine = own.get(name)
        full: list[object] = [*sorted(values[name]), _OTHER]
        if mine is None:
            domains.append([*full, _ABSENT])
        elif mine is True:
            domains.append(full)
        elif mine is False:
            domains.append([_ABSENT])
        else:
            domains.append([mine])
    size = len(methods)
    for d in domains:
        size *= len(d)
    if size > _MAX_CASES:
        # Too many combinations: settle for one route covering b on its own.
        for a in before:
            if _alone_covers(a, b):
                return [a]
        return None
    takers: dict[int, Route[T]] = {}
    for method in methods:
        for states in itertools.product(*domains):
            state = dict(zip(names, states, strict=True))
            for a in before:
                if _abstract_accepts(a, method, state):
                    takers[a.index] = a
                    break
            else:
                return None
    return sorted(takers.values(), key=_order_key)


def _abstract_accepts(a: Route[T], method: object, state: dict[bytes, object]) -> bool:
    if a._methods is not None and method not in a._methods:
        return False
    for name, want in a._header_checks:
        got = state[name]
        if want is True:
            if got is _ABSENT:
                return False
        elif want is False:
            if got is not _ABSENT:
                return False
        elif got != want:
            return False
    return True


def _alone_covers(a: Route[T], b: Route[T]) -> bool:
    if a._methods is not None and (b._methods is None or not b._methods <= a._methods):
        return False
    own = dict(b._header_checks)
    for name, want in a._header_checks:
        have = own.get(name)
        if have is None:
            return False
        if want is True:
            if have is False:
                return False
        elif have != want:
            return False
    return True


def _overlap(a: Route[T], b: Route[T]) -> bool:
    """Whether some request (one value per header) satisfies both routes'
    methods and headers."""
    if a._methods is not None and b._methods is not None and not a._methods & b._methods:
        return False
    other = dict(b._header_checks)
    for name, want in a._header_checks:
        have = other.get(name)
        if have is None or have == want:
            continue
        if want is False or have is False:
            return False
        if want is not True and have is not True:
            return False
    return True


def _same_conditions(a: Route[T], b: Route[T]) -> bool:
    return (
        set(a._hosts) == set(b._hosts)
        and a._pattern.shape == b._pattern.shape
        and a._catch_all == b._catch_all
        and a._methods == b._methods
        and dict(a._header_checks) == dict(b._header_checks)
    )


def _label(route: Route[T]) -> str:
    return f"routes[{route.index}] ({route.describe()})"


def _analyze(routes: Sequence[Route[T]], groups: list[tuple[_HostEntry, _Group[T]]]) -> list[str]:
    dead: dict[int, dict[_HostEntry, list[Route[T]]]] = {}
    ties: dict[tuple[int, int], None] = {}
    for entry, group in groups:
        by_shape: dict[tuple[object, ...], list[Route[T]]] = {}
        for route in group.members:
            shape = (route._pattern.shape, route._catch_all)
            by_shape.setdefault(shape, []).append(route)
        for same in by_shape.values():
            same.sort(key=_order_key)
            for j, b in enumerate(same):
                before = same[:j]
                takers = _covering(b, before)
                if takers is not None:
                    dead.setdefault(b.index, {})[entry] = takers
                    continue
                for a in before:
                    if a._order[:2] == b._order[:2] and _overlap(a, b):
                        ties[(b.index, a.index)] = None
    out: list[str] = []
    for route in routes:
        lost = dead.get(route.index)
        if not lost:
            continue
        takers = sorted({a.index: a for ts in lost.values() for a in ts}.values(), key=_order_key)
        if len(lost) == len(route._hosts):
            text = ", ".join(_label(a) for a in takers)
            msg = f"{_label(route)} is unreachable: every request it matches is taken by {text}"
            dups = [a for a in takers if _same_conditions(a, route)]
            if dups:
                msg += f" (it duplicates routes[{dups[0].index}])"
            out.append(msg)
        else:
            for entry, ts in lost.items():
                text = ", ".join(_label(a) for a in ts)
                out.append(
                    f"{_label(route)}: its host {_host_text(entry)!r} never reaches it, "
                    f"every such request is taken by {text}"
                )
    for b_index, a_index in ties:
        if b_index in dead and len(dead[b_index]) == len(routes[b_index]._hosts):
            continue
        a, b = routes[a_index], routes[b_index]
        out.append(
            f"{_label(b)} overlaps {_label(a)} with equal precedence: requests that match "
            f"both go to routes[{a.index}] only because it comes first in the config"
        )
    names: dict[str, Route[T]] = {}
    for route in routes:
        name = route.config.name
        if name is None:
            continue
        first = names.setdefault(name, route)
        if first is not route:
            out.append(f"routes[{route.index}] has the same name {name!r} as routes[{first.index}]")
    return out
