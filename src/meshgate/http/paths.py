"""Request paths and route path patterns: `normalize_path`, the pattern a
route's `path` is parsed into (also `PathPattern`, for rules outside routes)
and a route's `rewrite` template.

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

Requests
========
The engine calls `normalize_path()` on the raw request path (without its
query) and answers 400 when it returns None; it then passes that normalized
path both to `match()` and to `Route.upstream_path()`, so the gateway routes
on the same bytes it forwards. `normalize_path` merges runs of `/` into one
(as nginx's `merge_slashes` does): with `//` kept, `//admin/x` would miss an
`/admin/**` route and reach a broader one while an upstream that merges
slashes sees `/admin/x`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

__all__ = ["PathPattern", "normalize_path", "route_params"]

# Path segment kinds, in precedence order (lower wins); a pattern's path rank
# is the tuple of its segments' kinds followed by _END or _REST.
_LIT = 0
_PARAM = 1
_END = 2
_REST = 3

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAM_RE = re.compile(r"\{(" + _NAME_RE.pattern + r")\}")


def route_params(path: str) -> frozenset[str]:
    """The `{name}` parameters of a route's path pattern (what `match` puts
    in `params`), for templates checked at load."""
    return frozenset(_PARAM_RE.findall(path))


_CTL_RE = re.compile(r"[\x00-\x1f\x7f]")

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


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
# path patterns


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
