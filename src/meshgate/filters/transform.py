"""A route's `transform:` headers, query, path and status, as a filter.

Everything is compiled once, at config load: header and query names to the
bytes they are compared as, the path regex, and each value into a `Template`
of literal text and sources (`{path.<param>}`, `{query.<name>}`,
`{header.<name>}`, `{claims.<a.b>}`, `{consumer}`, `{request_id}`,
`{client_ip}`; `{{` and `}}` are literal braces).

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
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from meshgate.config.schema import HeaderOps, PathRewrite, QueryOps, TransformConfig
from meshgate.filters import FilterRequest

__all__ = [
    "ResponseEdits",
    "Template",
    "TransformFilter",
    "compile_template",
    "compile_transform",
]

Source = Callable[[FilterRequest], str | None]

# Field values: no control characters but HTAB (RFC 9110 section 5.5).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
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
_EXPECTED = (
    "{path.<param>}, {query.<name>}, {header.<name>}, {claims.<name>}, "
    "{consumer}, {request_id} or {client_ip}"
)


# -- templates --------------------------------------------------------------------


def _text(raw: bytes) -> str:
    """Bytes from the request as text that encodes back to the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _form_decode(raw: bytes) -> bytes:
    """A query name or value, form-decoded to bytes (never fails)."""
    if b"%" in raw or b"+" in raw:
        return unquote_to_bytes(raw.replace(b"+", b" "))
    return raw


def _percent(text: str) -> bytes:
    """`text` percent-encoded for a query (only unreserved characters stay)."""
    return quote(text, safe="", encoding="utf-8", errors="surrogateescape").encode("ascii")


class _PathParam:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, req: FilterRequest) -> str | None:
        params = req.params
        return params.get(self.name) if params is not None else None


class _QueryParam:
    """The first value of a query parameter of the request target, decoded."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = _encode(name)

    def __call__(self, req: FilterRequest) -> str | None:
        target = req.target
        i = target.find(b"?")
        if i < 0:
            return None
        name = self.name
        for piece in target[i + 1 :].split(b"&"):
            raw_name, _, raw_value = piece.partition(b"=")
            if _form_decode(raw_name) == name:
                return _text(_form_decode(raw_value))
        return None


class _Header:
    """The first value of a header as it would go upstream: the client's line
    (unless a filter dropped it, or it is an identity header only the gateway
    sets), else one an earlier filter added."""

    __slots__ = ("hidden", "name")

    def __init__(self, name: bytes, hidden: bool) -> None:
        self.name = name
        self.hidden = hidden

    def __call__(self, req: FilterRequest) -> str | None:
        name = self.name
        if not self.hidden and name not in req.drop:
            for n, v in req.headers:
                if n == name:
                    return _text(v)
        for n, v in req.add:
            if n.lower() == name:
                return _text(v)
        return None


class _Claim:
    """A claim of the verified token; dots reach into objects. A claim whose
    own name holds dots (`https://example.com/roles`) is found by that name."""

    __slots__ = ("keys", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = tuple(path.split("."))

    def __call__(self, req: FilterRequest) -> str | None:
        claims = req.claims
        if claims is None:
            return None
        value: Any = claims.get(self.path)
        if value is None and len(self.keys) > 1:
            value = claims
            for key in self.keys:
                if not isinstance(value, dict):
                    return None
                value = value.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            return None


def _consumer(req: FilterRequest) -> str | None:
    return req.consumer


def _request_id(req: FilterRequest) -> str | None:
    return req.request_id.decode("latin-1") if req.request_id else None


def _client_ip(req: FilterRequest) -> str | None:
    return req.client.decode("latin-1") if req.client else None


_SIMPLE: dict[str, Source] = {
    "consumer": _consumer,
    "request_id": _request_id,
    "client_ip": _client_ip,
}


class Template:
    """A value compiled into literal text and sources; see `compile_template`."""

    __slots__ = ("constant", "pieces", "placeholders", "text")

    def __init__(
        self, text: str, pieces: Sequence[str | Source], placeholders: Sequence[str]
    ) -> None:
        self.text = text
        self.pieces = tuple(pieces)
        self.placeholders = tuple(placeholders)
        """The placeholders it uses, as written (`path.id`, `consumer`)."""
        self.constant: str | None = None
        """The value, when the template has no placeholders."""
        if not self.placeholders:
            self.constant = "".join(p for p in self.pieces if isinstance(p, str))

    def render(self, req: FilterRequest) -> str | None:
        """The value for `req`; None when a source it names is missing."""
        constant = self.constant
        if constant is not None:
            return constant
        out: list[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                value = piece(req)
                if value is None:
                    return None
                out.append(value)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def compile_template(
    text: str,
    where: str,
    *,
    params: Collection[str] | None = None,
    hidden: Collection[bytes] = (),
) -> Template:
    """Parse `text` into literal text and sources, once, at config load.

    `params`, when given, are the route's path parameters: `{path.x}` must
    name one of them. `hidden` are identity headers: `{header.x}` never reads
    a client's copy of them, only the line a filter added."""
    pieces: list[str | Source] = []
    names: list[str] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "{":
            if text.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            close = text.find("}", i + 1)
            nested = text.find("{", i + 1)
            if close < 0 or (0 <= nested < close):
                raise ValueError(
                    f"{where}: {text!r} has a '{{' without its '}}' (write '{{{{' for a brace)"
                )
            name = text[i + 1 : close]
            source = _source(name, text, where, params, hidden)
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(source)
            names.append(name)
            i = close + 1
        elif c == "}":
            if not text.startswith("}}", i):
                raise ValueError(
                    f"{where}: {text!r} has a '}}' without its '{{' (write '}}}}' for a brace)"
                )
            literal.append("}")
            i += 2
        else:
            j = i + 1
            while j < n and text[j] not in "{}":
                j += 1
            literal.append(text[i:j])
            i = j
    if literal:
        pieces.append("".join(literal))
    return Template(text, pieces, names)


def _source(
    name: str,
    text: str,
    where: str,
    params: Collection[str] | None,
    hidden: Collection[bytes],
) -> Source:
    simple = _SIMPLE.get(name)
    if simple is not None:
        return simple
    kind, dot, arg = name.partition(".")
    bad = f"{where}: {text!r} uses {{{name}}}"
    if dot and arg:
        if kind == "path":
            if _PARAM_NAME.fullmatch(arg) is None:
                raise ValueError(f"{bad}: a path parameter is a name of letters, digits and '_'")
            if params is not None and arg not in params:
                known = ", ".join("{" + p + "}" for p in sorted(params)) or "none"
                raise ValueError(
                    f"{bad}, but the route's path has no {{{arg}}} (its parameters: {known})"
                )
            return _PathParam(arg)
        if kind == "query":
            return _QueryParam(arg)
        if kind == "header":
            if _TOKEN.fullmatch(arg) is None:
                raise ValueError(f"{bad}: {arg!r} is not a header name")
            header = arg.lower().encode("ascii")
            hide = header in hidden or header.replace(b"_", b"-") in hidden
            return _Header(header, hide)
        if kind == "claims":
            if "" in arg.split("."):
                raise ValueError(f"{bad}: a claim path has no empty parts")
            return _Claim(arg)
    raise ValueError(f"{bad}, which is not a source: expected {_EXPECTED}")


# -- header edits -----------------------------------------------------------------


Values = dict[bytes, list[bytes]]


def _edit(
    state: Values,
    remove: Sequence[bytes],
    rename: Sequence[tuple[bytes, bytes]],
    set_values: Sequence[tuple[bytes, bytes | None]],
) -> None:
    """Apply remove, rename and set to `state` (touched name -> its values)."""
    for name in remove:
        state[name] = []
    if rename:
        moved = [(new, state[old]) for old, new in rename]
        for old, _ in rename:
            state[old] = []
        filled: set[bytes] = set()
        for new, values in moved:
            if values:
                state[new] = state[new] + values if new in filled else values
                filled.add(new)
    for name, value in set_values:
        state[name] = [value] if value is not None else []


class _Value:
    """A header value: its template, and its bytes when they are constant."""

    __slots__ = ("constant", "template")

    def __init__(self, template: Template, where: str) -> None:
        self.template = template
        self.constant: bytes | None = None
        for piece in template.pieces:
            if isinstance(piece, str) and _BAD_VALUE.search(_encode(piece)):
                raise ValueError(f"{where}: {template.text!r} holds a control character")
        if template.constant is not None:
            self.constant = _encode(template.constant)

    def render(self, req: FilterRequest) -> bytes | None:
        constant = self.constant
        if constant is not None:
            return constant
        text = self.template.render(req)
        if text is None:
            return None
        raw = _encode(text)
        return None if _BAD_VALUE.search(raw) else raw


class _HeaderOps:
    __slots__ = (
        "add",
        "add_static",
        "remove",
        "rename",
        "set",
        "set_static",
        "static",
        "touched",
    )

    def __init__(
        self,
        cfg: HeaderOps,
        where: str,
        params: Collection[str] | None,
        hidden: Collection[bytes],
        owned: frozenset[str],
        read_owned: bool,
    ) -> None:
        for kind, names in (
            ("remove", cfg.remove),
            (
                "rename",
                [*cfg.rename.values()] if read_owned else [*cfg.rename, *cfg.rename.values()],
            ),
            ("set", cfg.set),
            ("add", cfg.add),
        ):
            for n in names:
                if n.lower() in owned:
                    raise ValueError(
                        f"{where}.{kind}: {n!r} is written by the gateway itself "
                        "and cannot be edited here"
                    )

        def name(n: str) -> bytes:
            return n.lower().encode("ascii")

        def value(kind: str, n: str, text: str) -> _Value:
            at = f"{where}.{kind}.{n}"
            return _Value(compile_template(text, at, params=params, hidden=hidden), at)

        self.remove = tuple(dict.fromkeys(name(n) for n in cfg.remove))
        self.rename = tuple(
            (name(old), name(new)) for old, new in cfg.rename.items() if name(old) != name(new)
        )
        self.set = tuple((name(n), value("set", n, v)) for n, v in cfg.set.items())
        self.add = tuple((name(n), value("add", n, v)) for n, v in cfg.add.items())
        touched = [*self.remove]
        for old, new in self.rename:
            touched += (old, new)
        touched += (n for n, _ in self.set)
        self.touched = tuple(dict.fromkeys(touched))
        """Every name whose values the edits decide, in config order."""
        self.static = all(v.constant is not None for _, v in (*self.set, *self.add))
        self.set_static: tuple[tuple[bytes, bytes | None], ...] = ()
        self.add_static: tuple[tuple[bytes, bytes], ...] = ()
        if self.static:
            self.set_static = tuple((n, v.constant) for n, v in self.set)
            self.add_static = tuple((n, v.constant) for n, v in self.add if v.constant is not None)

    def render(
        self, req: FilterRequest
    ) -> tuple[Sequence[tuple[bytes, bytes | None]], Sequence[tuple[bytes, bytes]]]:
        if self.static:
            return self.set_static, self.add_static
        set_values = [(n, v.render(req)) for n, v in self.set]
        add_values: list[tuple[bytes, bytes]] = []
        for n, v in self.add:
            raw = v.render(req)
            if raw is not None:
                add_values.append((n, raw))
        return set_values, add_values


class ResponseEdits:
    """A route's status and header edits for one response (or for all of
    them, when no value depends on the request): a `filters.ResponseHook`."""

    __slots__ = ("add", "remove", "rename", "set", "status_map", "touched")

    def __init__(
        self,
        status_map: dict[int, int] | None = None,
        remove: Sequence[bytes] = (),
        rename: Sequence[tuple[bytes, bytes]] = (),
        set_values: Sequence[tuple[bytes, bytes | None]] = (),
        add: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.status_map: dict[int, int] = status_map or {}
        """Upstream status -> the status the client gets."""
        self.remove = tuple(remove)
        self.rename = tuple(rename)
        self.set = tuple(set_values)
        """(name, value); a None value means the header is left out."""
        self.add = tuple(add)
        touched = [*self.remove]
        for old, new in self.rename:
            touched += (old, new)
        touched += (n for n, _ in self.set)
        self.touched = tuple(dict.fromkeys(touched))

    def _rendered(
        self,
        set_values: Sequence[tuple[bytes, bytes | None]],
        add: Sequence[tuple[bytes, bytes]],
    ) -> ResponseEdits:
        """This object's edits with one request's values (no re-validation)."""
        edits = ResponseEdits.__new__(ResponseEdits)
        edits.status_map = self.status_map
        edits.remove = self.remove
        edits.rename = self.rename
        edits.touched = self.touched
        edits.set = tuple(set_values)
        edits.add = tuple(add)
        return edits

    def status(self, status: int) -> int:
        """The status the client gets for the upstream's `status`."""
        status_map = self.status_map
        return status_map.get(status, status) if status_map else status

    def apply_pairs(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` (name, value) edited; `headers` itself when nothing changes.
        Untouched lines keep their place; the edited names' lines follow them."""
        touched = self.touched
        if not touched:
            return headers + list(self.add) if self.add else headers
        state: Values = {n: [] for n in touched}
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            values = state.get(name.lower())
            if values is None:
                out.append((name, value))
            else:
                values.append(value)
        _edit(state, self.remove, self.rename, self.set)
        for name in touched:
            out += ((name, v) for v in state[name])
        out += self.add
        return out

    def apply_parts(self, parts: list[bytes]) -> list[bytes]:
        """The same edits on a streamed head's layout: parts[0] is the status
        line, then (name, b": ", value, b"\\r\\n") quads with lower-case
        names. Returns `parts` itself when nothing changes."""
        touched = self.touched
        if not touched:
            if not self.add:
                return parts
            out = list(parts)
        else:
            state: Values = {n: [] for n in touched}
            out = [parts[0]]
            for i in range(1, len(parts), 4):
                values = state.get(parts[i])
                if values is None:
                    out += parts[i : i + 4]
                else:
                    values.append(parts[i + 2])
            _edit(state, self.remove, self.rename, self.set)
            for name in touched:
                for v in state[name]:
                    out += (name, b": ", v, b"\r\n")
        for name, v in self.add:
            out += (name, b": ", v, b"\r\n")
        return out

    def __repr__(self) -> str:
        return (
            f"ResponseEdits(status={self.status_map}, remove={self.remove}, "
            f"rename={self.rename}, set={self.set}, add={self.add})"
        )


# -- query and path -----------------------------------------------------------------


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
