"""A route's `transform:` headers, query, path and status, as a filter.

Everything is compiled once, at config load: header and query names to the
bytes they are compared as, the path regex, and each value into a `Template`
of literal text and sources (`filters.template`).

The filter runs last in a route's chain, so the consumer and claims auth
found are known when values render. Per request it:

- renders every value first, from the request as the earlier filters left
  it (so `{query.x}` never sees what this filter adds, and a credential auth
  took out of the query is not there to copy);
- rewrites the path part of the target (every match of the regex);
- edits the query: remove, rename, set, add. Untouched parameters keep
  their bytes and order; names are compared percent-decoded (`api%5Fkey` is
  `api_key`), rendered names and values are percent-encoded;
- edits the headers that go upstream: remove, rename, set, add. The
  filter sees what would go upstream (the client's lines minus the ones
  dropped, identity headers never; then the lines earlier filters added,
  such as auth's `X-Consumer`) and says what it decided as `req.drop` and
  `req.add`: every name it touches is dropped from the client's lines and
  its final values are added. A client's `x_name` spelling of a touched
  name is dropped as well (CGI-style servers read it as `x-name`);
- registers the route's response edits as the request's response hook
  (`req.on_response`, a `ResponseEdits`): one shared object when no
  response value depends on the request.

Edits apply in the order remove, rename, set, add. A rename moves every
value of the old name, in order, to the new name, replacing what the new
name had (when the old name is absent, nothing changes); renames apply
together (`{a: b, b: a}` swaps). A value whose template names a missing
source, or that would hold a control character (CR, LF, NUL, ... ; a tab is
kept), is not sent: `set` then leaves the header (or parameter) out
entirely, `add` adds nothing.

This module holds the query and path edits and the filter itself; values
are compiled by `filters.template`, header edits and `ResponseEdits` live
in `filters.header_edits`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from urllib.parse import quote

from meshgate.config.schema import PathRewrite, QueryOps, TransformConfig
from meshgate.filters import FilterRequest
from meshgate.filters.header_edits import ResponseEdits, Values, _edit, _HeaderOps
from meshgate.filters.template import Template, _encode, _form_decode, compile_template

__all__ = [
    "ResponseEdits",
    "Template",
    "TransformFilter",
    "compile_template",
    "compile_transform",
]

# What a path substitution may hold besides group references: visible ASCII
# but `?`, `#` and `\`. Python's own escapes (`\n`, `\0`) are refused.
_SUBST_LITERAL = re.compile(r"[\x21-\x3e\x40-\x5b\x5d-\x7e]")
_SUBST_ESCAPE = re.compile(r"\\(?:g<\w+>|[1-9][0-9]?(?![0-9])|\\)")
_NO_BODY_STATUS = frozenset({204, 304})
# Headers the gateway writes itself (http.headers.REQUEST_OWN and the response
# tail), whatever a filter says: editing them would do nothing, or send two.
# A request rename may still read one (`rename: {x-request-id: x-trace}`).
_GATEWAY_REQUEST_HEADERS = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "via",
        "x-meshgate-deadline",
        "grpc-timeout",
        "expect",
    }
)
_GATEWAY_RESPONSE_HEADERS = frozenset({"x-request-id", "via"})


# -- query and path -----------------------------------------------------------------


def _percent(text: str) -> bytes:
    """`text` percent-encoded for a query (only unreserved characters stay)."""
    return quote(text, safe="", encoding="utf-8", errors="surrogateescape").encode("ascii")


class _QueryOps:
    __slots__ = ("add", "remove", "rename", "set")

    def __init__(self, cfg: QueryOps, where: str, params: Collection[str] | None) -> None:
        for kind, names in (
            ("remove", cfg.remove),
            ("rename", [*cfg.rename, *cfg.rename.values()]),
            ("set", cfg.set),
            ("add", cfg.add),
        ):
            for n in names:
                if not n:
                    raise ValueError(f"{where}.{kind}: a query parameter name is not empty")
        self.remove = frozenset(_encode(n) for n in cfg.remove)
        self.rename = {
            _encode(old): (_encode(new), _percent(new))
            for old, new in cfg.rename.items()
            if old != new
        }
        """Decoded old name -> (decoded new name, encoded new name)."""
        self.set = tuple(
            (_encode(n), _percent(n), compile_template(v, f"{where}.set.{n}", params=params))
            for n, v in cfg.set.items()
        )
        self.add = tuple(
            (_percent(n), compile_template(v, f"{where}.add.{n}", params=params))
            for n, v in cfg.add.items()
        )

    def render(
        self, req: FilterRequest
    ) -> tuple[list[tuple[bytes, bytes, bytes | None]], list[bytes]]:
        set_values: list[tuple[bytes, bytes, bytes | None]] = []
        for name, encoded, t in self.set:
            text = t.render(req)
            set_values.append((name, encoded, None if text is None else _percent(text)))
        add_pieces: list[bytes] = []
        for encoded, t in self.add:
            text = t.render(req)
            if text is not None:
                add_pieces.append(encoded + b"=" + _percent(text))
        return set_values, add_pieces

    def apply(
        self,
        query: bytes,
        set_values: Sequence[tuple[bytes, bytes, bytes | None]],
        add_pieces: Sequence[bytes],
    ) -> bytes | None:
        """The edited query string, or None when it is unchanged."""
        pieces = (
            [(p, _form_decode(p.partition(b"=")[0])) for p in query.split(b"&")] if query else []
        )
        changed = False
        remove = self.remove
        if remove:
            kept = [p for p in pieces if p[1] not in remove]
            changed = len(kept) != len(pieces)
            pieces = kept
        rename = self.rename
        if rename and any(name in rename for _, name in pieces):
            filled = {rename[name][0] for _, name in pieces if name in rename}
            renamed: list[tuple[bytes, bytes]] = []
            for piece, name in pieces:
                to = rename.get(name)
                if to is not None:
                    _, eq, rest = piece.partition(b"=")
                    renamed.append((to[1] + eq + rest, to[0]))
                elif name not in filled:
                    renamed.append((piece, name))
            pieces = renamed
            changed = True
        for name, encoded, value in set_values:
            at = [i for i, (_, n) in enumerate(pieces) if n == name]
            if value is not None:
                line = (encoded + b"=" + value, name)
                if at:
                    pieces[at[0]] = line
                    at = at[1:]
                else:
                    pieces.append(line)
                changed = True
            if at:
                skip = set(at)
                pieces = [p for i, p in enumerate(pieces) if i not in skip]
                changed = True
        if add_pieces:
            pieces += ((p, b"") for p in add_pieces)
            changed = True
        if not changed:
            return None
        return b"&".join(p for p, _ in pieces)


def _check_substitution(text: str, where: str) -> None:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            m = _SUBST_ESCAPE.match(text, i)
            if m is None:
                raise ValueError(
                    f"{where}: {text!r}: a '\\' starts a group reference (\\1, \\g<name>) "
                    "or is written '\\\\'"
                )
            i = m.end()
        elif _SUBST_LITERAL.match(text, i) is None:
            raise ValueError(
                f"{where}: {text!r} holds {text[i]!r}; a path is visible ASCII "
                "without spaces, '?' or '#'"
            )
        else:
            i += 1


class _PathRewrite:
    __slots__ = ("pattern", "substitution")

    def __init__(self, cfg: PathRewrite, where: str) -> None:
        try:
            self.pattern = re.compile(cfg.pattern)
        except re.error as exc:
            raise ValueError(
                f"{where}.pattern: {cfg.pattern!r} is not a valid regex: {exc}"
            ) from None
        _check_substitution(cfg.substitution, f"{where}.substitution")
        self.substitution = cfg.substitution

    def apply(self, path: bytes) -> bytes | None:
        """The rewritten path, or None when no match changed it."""
        text = path.decode("latin-1")
        new = self.pattern.sub(self.substitution, text)
        if new == text:
            return None
        if not new.startswith("/"):
            new = "/" + new
        return new.encode("latin-1")


# -- the filter ---------------------------------------------------------------------


class TransformFilter:
    """A route's `transform:` request edits, and its response edits handed
    on as a response hook (`req.on_response`)."""

    __slots__ = (
        "headers",
        "hidden",
        "label",
        "path",
        "query",
        "response",
        "response_headers",
    )

    def __init__(
        self,
        cfg: TransformConfig,
        label: str,
        *,
        params: Collection[str] | None = None,
        identity: Collection[bytes] = (),
    ) -> None:
        """`params` are the route's path parameters (checked against
        `{path.x}`); `identity` the headers only the gateway sets."""
        self.label = label
        where = f"{label}.transform"
        identity = frozenset(identity)
        request, response = cfg.request, cfg.response
        self.headers: _HeaderOps | None = None
        self.query: _QueryOps | None = None
        self.path: _PathRewrite | None = None
        self.hidden: frozenset[bytes] = frozenset()
        if request is not None:
            if request.headers is not None:
                ops = _HeaderOps(
                    request.headers,
                    f"{where}.request.headers",
                    params,
                    identity,
                    _GATEWAY_REQUEST_HEADERS,
                    read_owned=True,
                )
                if ops.touched or ops.add:
                    self.headers = ops
                    self.hidden = frozenset(
                        n for n in ops.touched if n in identity or n.replace(b"_", b"-") in identity
                    )
            if request.query is not None:
                q = _QueryOps(request.query, f"{where}.request.query", params)
                if q.remove or q.rename or q.set or q.add:
                    self.query = q
            if request.path is not None:
                self.path = _PathRewrite(request.path, f"{where}.request.path")
        self.response: ResponseEdits | None = None
        """The response edits; with `response_headers`, a base to render."""
        self.response_headers: _HeaderOps | None = None
        """Response header edits whose values depend on the request."""
        if response is not None:
            for old, new in response.status.items():
                if (old in _NO_BODY_STATUS) != (new in _NO_BODY_STATUS):
                    raise ValueError(
                        f"{where}.response.status: {old} -> {new} changes whether the "
                        "response has a body (204 and 304 have none)"
                    )
            rops = (
                _HeaderOps(
                    response.headers,
                    f"{where}.response.headers",
                    params,
                    identity,
                    _GATEWAY_RESPONSE_HEADERS,
                    read_owned=False,
                )
                if response.headers is not None
                else None
            )
            if rops is not None and not (rops.touched or rops.add):
                rops = None
            if rops is not None or response.status:
                set_values: Sequence[tuple[bytes, bytes | None]] = ()
                if rops is not None:
                    # A base for per-request values has the names, not the values.
                    set_values = (
                        rops.set_static if rops.static else [(n, None) for n, _ in rops.set]
                    )
                self.response = ResponseEdits(
                    dict(response.status),
                    rops.remove if rops else (),
                    rops.rename if rops else (),
                    set_values,
                    rops.add_static if rops else (),
                )
                if rops is not None and not rops.static:
                    self.response_headers = rops

    def needed(self) -> bool:
        """Whether the filter has anything to do."""
        return (
            self.headers is not None
            or self.query is not None
            or self.path is not None
            or self.response is not None
        )

    def __call__(self, req: FilterRequest) -> None:
        # Values first, from the request as the earlier filters left it.
        headers = self.headers
        if headers is not None:
            header_set, header_add = headers.render(req)
        query = self.query
        if query is not None:
            query_set, query_add = query.render(req)
        response = self.response
        if response is not None:
            rops = self.response_headers
            if rops is None:
                req.on_response(response)
            else:
                set_values, add = rops.render(req)
                req.on_response(response._rendered(set_values, add))
        if query is not None or self.path is not None:
            target = req.target
            path, sep, qs = target.partition(b"?")
            changed = False
            if self.path is not None:
                new_path = self.path.apply(path)
                if new_path is not None:
                    path = new_path
                    changed = True
            if query is not None:
                new_qs = query.apply(qs, query_set, query_add)
                if new_qs is not None:
                    qs = new_qs
                    sep = b"?" if qs else b""
                    changed = True
            if changed:
                req.target = path + sep + qs
        if headers is not None:
            self._edit_headers(req, headers, header_set, header_add)
        return None

    def _edit_headers(
        self,
        req: FilterRequest,
        ops: _HeaderOps,
        set_values: Sequence[tuple[bytes, bytes | None]],
        add_values: Sequence[tuple[bytes, bytes]],
    ) -> None:
        touched = ops.touched
        if touched:
            state: Values = {n: [] for n in touched}
            drop = req.drop
            hidden = self.hidden
            spellings: list[bytes] = []
            for name, value in req.headers:
                values = state.get(name)
                if values is not None:
                    if name not in drop and name not in hidden:
                        values.append(value)
                elif b"_" in name and name.replace(b"_", b"-") in state:
                    spellings.append(name)
            kept: list[tuple[bytes, bytes]] = []
            for line in req.add:
                values = state.get(line[0].lower())
                if values is None:
                    kept.append(line)
                else:
                    values.append(line[1])
            _edit(state, ops.remove, ops.rename, set_values)
            drop.update(touched)
            drop.update(spellings)
            for name in touched:
                kept += ((name, v) for v in state[name])
            req.add = kept
        if add_values:
            req.add += add_values

    def __repr__(self) -> str:
        return f"TransformFilter({self.label!r})"


def compile_transform(
    cfg: TransformConfig | None,
    label: str,
    *,
    params: Collection[str] | None = None,
    identity: Collection[bytes] = (),
) -> TransformFilter | None:
    """The route's transform filter, or None when it would have nothing to
    do (no transform, or only body mappings, which are the handler's)."""
    if cfg is None or (cfg.request is None and cfg.response is None):
        return None
    f = TransformFilter(cfg, label, params=params, identity=identity)
    return f if f.needed() else None
