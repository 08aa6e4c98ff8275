"""A route's JSON body mapping (`BodyMap`), compiled once and applied to
parsed documents.

Rules run in this order: allow, deny, rename, move, defaults, set,
drop_nulls. Pointers are RFC 6901 (`~1` is `/`, `~0` is `~`) and are compiled
once, in `JsonMap.__init__`, into tuples of segments. How a segment is used
depends on the container it meets:

- in an object it is always a member name, literally (`*` and `0` included);
- in an array, `*` means every element and a decimal index without leading
  zeros (`0`, `12`) one element; any other segment finds nothing.

Shape mismatches never raise: a rule whose path is absent, or whose path
meets a value that is not a container on the way, does nothing. defaults,
set and move create the objects missing on the way to their target, but
never replace a value that is there, and never create array elements.

The rules:

- allow: a whitelist. What is at or under an allowed pointer is kept whole;
  containers on the way to an allowed pointer are kept with only their
  allowed parts (possibly empty); anything else is removed, including a
  non-container on the way (`allow: [/a/b]` removes `"a": 5`) and array
  elements that no segment selects (`allow: [/items/0]` keeps one element).
  The top-level value itself is never removed; a top-level value that is not
  a container is returned as it is.
- deny: removes the members (or array elements) named. All deny pointers act
  on the document as it was before any of them: `deny: [/a/0, /a/1]` removes
  the first two elements of `a`. An object member that the deny empties is
  removed too, as a move does (`deny: [/amount/currency]` on
  `{"amount": {"currency": "EUR"}}` gives `{}`); an object that is an array
  element stays, and an object that was empty already is left alone.
- rename: `{/customer: customer_id}` renames a member within its own object
  (a member of an array element with `/items/*/qty`). An existing member of
  the new name is overwritten (its place in the member order is kept);
  otherwise the renamed member moves to the end of its object's member
  order. A rename whose parent is an array does nothing.
- move: `{/street: /address/street}` removes the source and sets it at the
  target. With wildcards, source and target must have the same segments up
  to their last `*` (`{/items/*/qty: /items/*/quantity}` moves within each
  element). An existing value at the target is overwritten. Objects that
  the move leaves empty on the source's path are removed too, up to the top
  level (or the wildcard's element): `{/address/street: /street}` removes
  `address` when the street was all it held (an object that is an array
  element, or that holds the target, stays). When the target cannot be
  reached (a non-container on the way, an array index out of range or a
  non-index segment in an array, or the same array as the source), the move
  does nothing and the source stays. Paths are resolved on the document
  before the move: `{/items/0: /items/2/x}` puts the first element into what
  was the third one.
- rename and move rules run one after another, in the order written: a rule
  sees the document the previous rules left.
- defaults: sets the value where the member is absent (a member holding null
  is present). set: always sets it. In an array, set replaces an existing
  element (`/items/0`, or every element with a last segment `*`); defaults
  never changes an array (its elements are all present). The values are
  normalized through JSON when the map is compiled (YAML dates become
  strings, integer keys become strings) and copied for every document, so no
  two results share a mutable value.
- drop_nulls: removes every object member whose value is null, at every
  depth (members that set or defaults gave null included). Null elements of
  arrays are kept: removing them would shift the positions of the others.

Contradictory rules are refused when the map is compiled (ValueError naming
`where` and the field): a deny at or above an allowed pointer; a rename or
move whose source is denied, or outside allow, or whose target is itself a
deny pointer; a move onto itself or into its own source, or whose source and
target differ before their last `*`; a source or target ending with `*`; two
renames or moves writing the same pointer; a default that a set overwrites.
These checks compare pointers segment by segment (they cannot know which
containers are arrays).

`map_bytes` parses with orjson, so integers outside the 64-bit range come
back as floats, and a member given twice keeps its last value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from meshgate.config.schema import BodyMap

__all__ = ["JsonMap", "NotJson"]

Json = Any
"""A parsed JSON value: dict, list, str, int, float, bool or None."""

_Seg = tuple[str, int]
"""A compiled pointer segment: the member name and, when the name is an
array index, its value (else -1)."""
_Path = tuple[_Seg, ...]

_STAR: Final = "*"
_BAD_ESCAPE_RE = re.compile(r"~(?![01])")
_MISSING: Final = object()
MISSING: Final = _MISSING
"""What `lookup` gives for a path that is not there."""
_DROP: Final = object()
_JSON_SPACE = b" \t\r\n"
_CONTAINERS: Final = (dict, list)


class NotJson(ValueError):
    """The body is not valid JSON (the message says why, never what the body
    holds)."""


def _index(name: str) -> int:
    """The array index a segment names, or -1."""
    if name.isascii() and name.isdigit() and (name == "0" or name[0] != "0"):
        return int(name)
    return -1


def _parse(pointer: str, where: str, field: str) -> _Path:
    if not pointer.startswith("/"):
        raise ValueError(f"{where}: {field} {pointer!r} is not a JSON pointer (starts with '/')")
    segs: list[_Seg] = []
    for raw in pointer[1:].split("/"):
        name = raw
        if "~" in raw:
            if _BAD_ESCAPE_RE.search(raw):
                raise ValueError(f"{where}: {field} {pointer!r}: '~' is escaped as ~0 or ~1")
            name = raw.replace("~1", "/").replace("~0", "~")
        segs.append((name, _index(name)))
    return tuple(segs)


def _pointer(path: _Path) -> str:
    return "".join("/" + name.replace("~", "~0").replace("/", "~1") for name, _ in path)


def _split(path: _Path) -> tuple[_Path, _Path]:
    """(segments up to the last `*` before the final segment, the rest)."""
    cut = 0
    for i in range(len(path) - 1):
        if path[i][0] == _STAR:
            cut = i + 1
    return path[:cut], path[cut:]


def _may_match(a: _Seg, b: _Seg) -> bool:
    if a[0] == b[0]:
        return True
    return (a[0] == _STAR and b[1] >= 0) or (b[0] == _STAR and a[1] >= 0)


def _may_meet(a: _Path, b: _Path) -> bool:
    """Whether one pointer can be at, above or under the other."""
    return all(_may_match(x, y) for x, y in zip(a, b, strict=False))


# --- allow and deny: pointer tries, applied in one walk ---------------------


class _Raw:
    __slots__ = ("kids", "whole")

    def __init__(self) -> None:
        self.whole = False
        self.kids: dict[str, _Raw] = {}

    def insert(self, path: _Path) -> None:
        node = self
        for name, _ in path:
            if node.whole:
                return
            node = node.kids.setdefault(name, _Raw())
        node.whole = True
        node.kids.clear()


def _merge(a: _Raw, b: _Raw) -> _Raw:
    out = _Raw()
    if a.whole or b.whole:
        out.whole = True
        return out
    out.kids = dict(a.kids)
    for name, kid in b.kids.items():
        mine = out.kids.get(name)
        out.kids[name] = kid if mine is None else _merge(mine, kid)
    return out


class _Node:
    """A compiled trie node. `whole`: the pointer ends here (kept whole by
    allow, removed by deny). `members`: children in an object, by literal
    name. `every`: the `*` child in an array. `by_index` / `elements`: the
    index children in an array, each merged with `every`."""

    __slots__ = ("by_index", "elements", "every", "members", "whole")

    def __init__(self, raw: _Raw) -> None:
        self.whole = raw.whole
        self.members = {name: _Node(kid) for name, kid in raw.kids.items()}
        self.every = self.members.get(_STAR)
        star = raw.kids.get(_STAR)
        by_index: dict[int, _Node] = {}
        for name, kid in raw.kids.items():
            i = _index(name)
            if i >= 0:
                by_index[i] = self.members[name] if star is None else _Node(_merge(kid, star))
        self.by_index = by_index
        self.elements = tuple(sorted(by_index.items()))


def _trie(paths: list[_Path]) -> _Node:
    root = _Raw()
    for path in paths:
        root.insert(path)
    return _Node(root)


def _keep(node: _Node, value: Json) -> Json:
    """allow: the allowed parts of `value` (a new container), or _DROP for a
    non-container on the way."""
    if isinstance(value, dict):
        out: dict[str, Json] = {}
        members = node.members
        for key, sub in value.items():
            child = members.get(key)
            if child is None:
                continue
            if child.whole:
                out[key] = sub
            else:
                kept = _keep(child, sub)
                if kept is not _DROP:
                    out[key] = kept
        return out
    if isinstance(value, list):
        items: list[Json] = []
        every = node.every
        if every is not None:
            by_index = node.by_index
            for i, sub in enumerate(value):
                child = by_index.get(i, every) if by_index else every
                if child.whole:
                    items.append(sub)
                else:
                    kept = _keep(child, sub)
                    if kept is not _DROP:
                        items.append(kept)
        else:
            n = len(value)
            for i, child in node.elements:
                if i >= n:
                    break
                sub = value[i]
                if child.whole:
                    items.append(sub)
                else:
                    kept = _keep(child, sub)
                    if kept is not _DROP:
                        items.append(kept)
        return items
    return _DROP


def _remove(node: _Node, value: Json) -> None:
    """deny: removes what the trie names from `value`, in place."""
    if isinstance(value, dict):
        for key, child in node.members.items():
            if key in value:
                if child.whole:
                    del value[key]
                else:
                    sub = value[key]
                    if isinstance(sub, dict):
                        if sub:
                            _remove(child, sub)
                            if not sub:
                                del value[key]  # an object the deny emptied goes too
                    elif isinstance(sub, list):
                        _remove(child, sub)
    elif isinstance(value, list):
        every = node.every
        gone: list[int] = []
        if every is not None:
            if every.whole:
                value.clear()
                return
            by_index = node.by_index
            for i, sub in enumerate(value):
                child = by_index.get(i, every) if by_index else every
                if child.whole:
                    gone.append(i)
                elif isinstance(sub, _CONTAINERS):
                    _remove(child, sub)
        else:
            n = len(value)
            for i, child in node.elements:
                if i >= n:
                    break
                if child.whole:
                    gone.append(i)
                else:
                    sub = value[i]
                    if isinstance(sub, _CONTAINERS):
                        _remove(child, sub)
        for i in reversed(gone):
            del value[i]


# --- rename, move, defaults, set: walks from each wildcard context ----------


def _contexts(doc: Json, prefix: _Path) -> list[Json]:
    """The values a wildcard prefix reaches (`*` fans out over arrays)."""
    level = [doc]
    for name, idx in prefix:
        nxt: list[Json] = []
        for node in level:
            if isinstance(node, dict):
                sub = node.get(name, _MISSING)
                if sub is not _MISSING:
                    nxt.append(sub)
            elif isinstance(node, list):
                if name == _STAR:
                    nxt.extend(node)
                elif 0 <= idx < len(node):
                    nxt.append(node[idx])
        if not nxt:
            return nxt
        level = nxt
    return level


def parse_pointer(pointer: str, where: str, field: str) -> _Path:
    """A JSON pointer, compiled once for `lookup` (ValueError names `where`
    and `field`)."""
    return _parse(pointer, where, field)


def path_of(names: tuple[str, ...]) -> _Path:
    """The compiled path of member names or array indexes (`a.b.0` split)."""
    return tuple((name, _index(name)) for name in names)


def lookup(node: Json, path: _Path) -> Json:
    """The value at `path` under `node`, or `MISSING` (read only)."""
    for name, idx in path:
        if isinstance(node, dict):
            node = node.get(name, _MISSING)
            if node is _MISSING:
                return _MISSING
        elif isinstance(node, list):
            if not 0 <= idx < len(node):
                return _MISSING
            node = node[idx]
        else:
            return _MISSING
    return node


def _walk(node: Json, path: _Path) -> Json:
    """The container at `path` under `node`, or None (read only)."""
    node = lookup(node, path)
    return node if isinstance(node, _CONTAINERS) else None


def _make(node: Json, path: _Path) -> Json:
    """The container at `path` under `node`, creating the objects missing on
    the way; None (and nothing created) when a value on the way is not a
    container, or an array has no such element."""
    if not isinstance(node, _CONTAINERS):
        return None
    for i, (name, idx) in enumerate(path):
        if isinstance(node, dict):
            nxt = node.get(name, _MISSING)
            if nxt is _MISSING:
                for new_name, _ in path[i:]:
                    new: dict[str, Json] = {}
                    node[new_name] = new
                    node = new
                return node
        elif 0 <= idx < len(node):
            nxt = node[idx]
        else:
            return None
        if not isinstance(nxt, _CONTAINERS):
            return None
        node = nxt
    return node


class _Rename:
    __slots__ = ("new", "old", "parent", "prefix")

    def __init__(self, path: _Path, new: str) -> None:
        self.prefix, rest = _split(path)
        self.parent = rest[:-1]
        self.old = rest[-1][0]
        self.new = new

    def apply(self, doc: Json) -> None:
        old, new, parent_path = self.old, self.new, self.parent
        for ctx in _contexts(doc, self.prefix) if self.prefix else (doc,):
            parent = _walk(ctx, parent_path)
            if isinstance(parent, dict) and old in parent:
                parent[new] = parent.pop(old)


class _Move:
    __slots__ = ("dst_last", "dst_parent", "prefix", "src_last", "src_parent")

    def __init__(self, src: _Path, dst: _Path) -> None:
        self.prefix, src_rest = _split(src)
        dst_rest = dst[len(self.prefix) :]
        self.src_parent, self.src_last = src_rest[:-1], src_rest[-1]
        self.dst_parent, self.dst_last = dst_rest[:-1], dst_rest[-1]

    def apply(self, doc: Json) -> None:
        for ctx in _contexts(doc, self.prefix) if self.prefix else (doc,):
            self._one(ctx)

    def _one(self, ctx: Json) -> None:
        # The source's parent, and the (holder, key) pairs on the way to it.
        chain: list[tuple[Json, Any]] = []
        parent = ctx
        for seg_name, seg_idx in self.src_parent:
            if isinstance(parent, dict):
                sub = parent.get(seg_name, _MISSING)
                if sub is _MISSING:
                    return
                chain.append((parent, seg_name))
            elif isinstance(parent, list) and 0 <= seg_idx < len(parent):
                sub = parent[seg_idx]
                chain.append((parent, seg_idx))
            else:
                return
            parent = sub
        name, idx = self.src_last
        if isinstance(parent, dict):
            value = parent.get(name, _MISSING)
            if value is _MISSING:
                return
        elif isinstance(parent, list) and 0 <= idx < len(parent):
            value = parent[idx]
        else:
            return
        target = _make(ctx, self.dst_parent)
        dst_name, dst_idx = self.dst_last
        if target is None or (
            isinstance(target, list) and (target is parent or not 0 <= dst_idx < len(target))
        ):
            return
        if isinstance(parent, dict):
            del parent[name]
            # Objects the move leaves empty go too (the target's excepted).
            while not parent and chain and parent is not target:
                holder, key = chain.pop()
                if not isinstance(holder, dict):
                    break
                del holder[key]
                parent = holder
        else:
            del parent[idx]
        if isinstance(target, dict):
            target[dst_name] = value
        else:
            target[dst_idx] = value


def _fresh(value: Json, where: str, field: str, pointer: str) -> Callable[[], Json]:
    """A function returning a new copy of a configured value for every call."""
    try:
        data = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as e:  # orjson.JSONEncodeError
        raise ValueError(f"{where}: {field} {pointer!r}: the value is not JSON ({e})") from None
    normalized = orjson.loads(data)
    if isinstance(normalized, _CONTAINERS):
        return lambda: orjson.loads(data)
    return lambda: normalized


class _Put:
    __slots__ = ("fresh", "last", "overwrite", "parent", "prefix")

    def __init__(self, path: _Path, fresh: Callable[[], Json], overwrite: bool) -> None:
        self.prefix, rest = _split(path)
        self.parent, self.last = rest[:-1], rest[-1]
        self.fresh = fresh
        self.overwrite = overwrite

    def apply(self, doc: Json) -> None:
        name, idx = self.last
        for ctx in _contexts(doc, self.prefix) if self.prefix else (doc,):
            target = _make(ctx, self.parent)
            if isinstance(target, dict):
                if self.overwrite or name not in target:
                    target[name] = self.fresh()
            elif isinstance(target, list) and self.overwrite:
                if name == _STAR:
                    for i in range(len(target)):
                        target[i] = self.fresh()
                elif 0 <= idx < len(target):
                    target[idx] = self.fresh()


def _drop_nulls(doc: Json) -> None:
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            nulls: list[str] = []
            for key, sub in node.items():
                if sub is None:
                    nulls.append(key)
                elif isinstance(sub, _CONTAINERS):
                    stack.append(sub)
            for key in nulls:
                del node[key]
        elif isinstance(node, list):
            stack.extend(sub for sub in node if isinstance(sub, _CONTAINERS))


def encode(doc: Json) -> bytes:
    """A document as compact JSON: orjson, or the standard library for one
    nested deeper than orjson encodes (`NotJson` past Python's recursion
    limit)."""
    try:
        return orjson.dumps(doc)
    except TypeError:  # orjson.JSONEncodeError: nested deeper than orjson encodes
        return _encode_deep(doc)


def _encode_deep(doc: Json) -> bytes:
    """orjson refuses documents nested deeper than 254 levels (it parses up
    to 1024): the standard library encodes those."""
    try:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise NotJson("the document is nested too deeply to be encoded again") from None
    return text.encode()


class JsonMap:
    """A compiled `BodyMap`; `where` (for example `route 'orders' response
    body`) starts the message of every ValueError it raises."""

    __slots__ = ("_allow", "_deny", "_drop_nulls", "_steps", "empty", "where")

    def __init__(self, cfg: BodyMap, where: str) -> None:
        self.where = where
        allow = None if cfg.allow is None else [(p, _parse(p, where, "allow")) for p in cfg.allow]
        deny = [(p, _parse(p, where, "deny")) for p in cfg.deny]
        if allow is not None:
            for dp, d in deny:
                for ap, a in allow:
                    if a[: len(d)] == d:
                        raise ValueError(f"{where}: deny {dp!r} removes allowed {ap!r}")

        steps: list[_Rename | _Move | _Put] = []
        targets: dict[_Path, str] = {}

        def check_shift(field: str, sp: str, src: _Path, dst: _Path) -> None:
            label = f"{field} {sp!r}"
            for name, path in (("source", src), ("target", dst)):
                if path[-1][0] == _STAR:
                    raise ValueError(f"{where}: {label}: its {name} names one member, not '*'")
            if src == dst:
                raise ValueError(f"{where}: {label}: moves onto itself")
            if dst[: len(src)] == src:
                raise ValueError(f"{where}: {label}: its target {_pointer(dst)!r} is inside it")
            if _split(src)[0] != _split(dst)[0]:
                raise ValueError(
                    f"{where}: {label}: source and target must have the same segments up to "
                    f"their last '*' (target {_pointer(dst)!r})"
                )
            for dp, d in deny:
                if src[: len(d)] == d:
                    raise ValueError(f"{where}: {label}: deny {dp!r} removes it first")
                if dst == d:
                    raise ValueError(f"{where}: {label}: its target {dp!r} is also denied")
            if allow is not None and not any(_may_meet(src, a) for _, a in allow):
                raise ValueError(f"{where}: {label} is outside allow, which removes it first")
            other = targets.get(dst)
            if other is not None:
                raise ValueError(f"{where}: {label} and {other} both write {_pointer(dst)!r}")
            targets[dst] = label

        for sp, new in cfg.rename.items():
            src = _parse(sp, where, "rename")
            if not new or "/" in new:
                raise ValueError(f"{where}: rename {sp!r}: a member name (no '/'), found {new!r}")
            if new == src[-1][0]:
                raise ValueError(f"{where}: rename {sp!r}: renames to the same name")
            check_shift("rename", sp, src, (*src[:-1], (new, _index(new))))
            steps.append(_Rename(src, new))
        for sp, dp in cfg.move.items():
            src = _parse(sp, where, "move")
            dst = _parse(dp, where, "move")
            check_shift("move", sp, src, dst)
            steps.append(_Move(src, dst))

        sets = [(p, _parse(p, where, "set")) for p in cfg.set]
        for p, value in cfg.defaults.items():
            path = _parse(p, where, "defaults")
            for sp, s in sets:
                if path[: len(s)] == s:
                    raise ValueError(
                        f"{where}: defaults {p!r} never shows: set {sp!r} overwrites it"
                    )
            steps.append(_Put(path, _fresh(value, where, "defaults", p), overwrite=False))
        for (p, path), value in zip(sets, cfg.set.values(), strict=True):
            steps.append(_Put(path, _fresh(value, where, "set", p), overwrite=True))

        self._allow = None if allow is None else _trie([a for _, a in allow])
        self._deny = _trie([d for _, d in deny]) if deny else None
        self._steps = tuple(steps)
        self._drop_nulls = cfg.drop_nulls
        self.empty = allow is None and not deny and not steps and not cfg.drop_nulls
        """Whether the map leaves every document as it is."""

    def apply(self, doc: Json) -> Json:
        """Maps a parsed JSON document and returns the result. `doc` may be
        changed (pass a freshly parsed one); never raises on its shape."""
        if not isinstance(doc, _CONTAINERS):
            return doc
        if self._allow is not None:
            doc = _keep(self._allow, doc)
        if self._deny is not None:
            _remove(self._deny, doc)
        for step in self._steps:
            step.apply(doc)
        if self._drop_nulls:
            _drop_nulls(doc)
        return doc

    def map_bytes(self, body: bytes) -> bytes:
        """Parses, maps and encodes a body. An empty body (or only
        whitespace) is returned as it is; NotJson when it is not JSON."""
        if not body.strip(_JSON_SPACE):
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise NotJson(f"not JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        return encode(self.apply(doc))
