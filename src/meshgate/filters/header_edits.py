"""Header edits (remove, rename, set, add) for a route's `transform:`, and
its response edits.

`_HeaderOps` is one side's header edits, compiled once, at config load:
names to the bytes they are compared as, each value into a `Template`
(`filters.template`) that may not hold a control character. The filter
(`filters.transform`) applies the request's to the headers that go upstream.

`ResponseEdits` is a route's status and header edits for one response (or
for all of them, when no value depends on the request): the request's
response hook (`req.on_response`, a `filters.ResponseHook`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from meshgate.config.schema import HeaderOps
from meshgate.filters import FilterRequest
from meshgate.filters.template import Template, _encode, compile_template

__all__ = ["ResponseEdits"]

# Field values: no control characters but HTAB (RFC 9110 section 5.5).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


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
