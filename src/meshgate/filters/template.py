"""Templates: a route's `transform:` values, compiled once, at config load.

Each value is compiled into a `Template` of literal text and sources
(`{path.<param>}`, `{query.<name>}`, `{header.<name>}`, `{claims.<a.b>}`,
`{consumer}`, `{request_id}`, `{client_ip}`; `{{` and `}}` are literal
braces), rendered per request from the `FilterRequest`: None when a source
it names is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from meshgate.filters import FilterRequest

__all__ = ["Template", "compile_template"]

Source = Callable[[FilterRequest], str | None]

_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_EXPECTED = (
    "{path.<param>}, {query.<name>}, {header.<name>}, {claims.<name>}, "
    "{consumer}, {request_id} or {client_ip}"
)


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
