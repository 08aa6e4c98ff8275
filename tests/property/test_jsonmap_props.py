"""JsonMap properties on random documents and random rule sets.

"No field is lost unless a rule drops it": every leaf of the input (a scalar
or an empty container, named by its concrete path) is in the output with the
same value, unless it is outside allow, denied, a null member dropped by
drop_nulls, or overwritten by set or by a move's target; a leaf under a
rename or move source is at the destination instead (or, when the move could
not reach its target, still where it was). Conversely, denied pointers match
nothing in the output, no null member is left with drop_nulls, and every
scalar in the output is an input leaf left in place or comes from a rule's
target.

The rule sets are kept free of index shifts and of rules that interfere
with one another, so that each leaf's fate follows from the rules alone:
documents hold arrays of objects or of scalars, pointers use no index
segments (arrays are reached with `*`), and rename, move, set and defaults
touch pointers that are neither equal nor nested in one another (nor in a
deny pointer). The unit tests cover index segments and interfering rules.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.config.schema import BodyMap
from meshgate.transform.jsonmap import JsonMap

Path = tuple[str | int, ...]
Ptr = tuple[str, ...]

KEYS = ["a", "b", "c", "*", "a/b", "~0", ""]
NAMES = ["a", "b", "c", "*x", "~", "d"]
MISSING = object()

SCALARS: list[Any] = [None, True, False, 0, 1, -2, 3, "s", "t"]


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """An object or an array of objects; arrays hold objects or scalars, never
    both (so that allow, dropping scalars on its way, shifts no element).
    Drawn as small integers, which is much faster than st.recursive."""

    def pick(seq: list[Any]) -> Any:
        return seq[draw(st.integers(0, len(seq) - 1))]

    def count(most: int) -> int:
        return draw(st.integers(0, most))

    budget = [count(14)]  # containers still allowed

    def value(depth: int) -> Any:
        kind = count(3) if depth < 4 and budget[0] > 0 else 0
        budget[0] -= kind > 0
        if kind == 1:
            return obj(depth + 1)
        if kind == 2:
            return [obj(depth + 1) for _ in range(count(3))]
        if kind == 3:
            return [pick(SCALARS) for _ in range(count(3))]
        return pick(SCALARS)

    def obj(depth: int) -> dict[str, Any]:
        return {pick(KEYS): value(depth) for _ in range(count(4))}

    return obj(0) if draw(st.booleans()) else [obj(1) for _ in range(count(3))]


PUT_VALUES: list[Any] = [0, "v", None, True, {"k": 1}, [1, None], {}]
NEW_NAMES = ["a", "b", "n", "m", "*x"]


def doc_pointers(doc: Any) -> tuple[list[Ptr], list[Ptr]]:
    """The pointers naming something in `doc` (arrays reached with `*`), and
    those naming, somewhere, a value that is not an object."""
    seen: set[Ptr] = set()
    walls: set[Ptr] = set()
    stack: list[tuple[Any, Ptr]] = [(doc, ())]
    while stack:
        node, p = stack.pop()
        if p:
            seen.add(p)
            if not isinstance(node, dict):
                walls.add(p)
        if isinstance(node, dict):
            stack.extend((v, (*p, k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (*p, "*")) for v in node)
    return sorted(seen), sorted(walls)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, dict[str, Any]]:
    """A document and candidate rules whose pointers mostly name its parts
    (drawn as indexes into lists, which is much faster than building
    strategies from the document)."""
    doc = draw(documents())
    known, walls = doc_pointers(doc)

    def pick(seq: list[Any]) -> Any:
        return seq[draw(st.integers(0, len(seq) - 1))]

    def some(make: Any, most: int) -> list[Any]:
        return [make() for _ in range(draw(st.integers(0, most)))]

    def pointer() -> Ptr:
        """A part of the document, something just under one (absent, or under
        a scalar or an array), or anything."""
        kind = draw(st.integers(0, 2)) if known else 2
        if kind == 0:
            found: Ptr = pick(known)
            return found
        if kind == 1:
            return (*pick(known), pick([*KEYS, "*"]))
        return tuple(pick([*KEYS, "z"]) for _ in range(draw(st.integers(1, 3))))

    def relative(found: list[Ptr], prefix: Ptr) -> list[Ptr]:
        cut = len(prefix)
        return [p[cut:] for p in found if p[:cut] == prefix and p[cut:] and "*" not in p[cut:]]

    def move() -> tuple[Ptr, Ptr]:
        """A source, and a target with the same segments up to its last `*`:
        new names, a part of the document there, something under one, or
        something under a value that is not an object (a blocked move)."""
        use_known = bool(known) and draw(st.booleans())
        src: Ptr = pick(known) if use_known else pointer()
        if src[-1] == "*":
            src = (*src, pick(KEYS[:3]))
        cut = max((i + 1 for i, s in enumerate(src[:-1]) if s == "*"), default=0)
        there = relative(known, src[:cut])
        blocked = relative(walls, src[:cut])
        kind = draw(st.integers(0, 3))
        if kind == 1 and there:
            rest: Ptr = pick(there)
        elif kind == 2 and there:
            rest = (*pick(there), pick(["a", "b", "~0"]))
        elif kind == 3 and blocked:
            rest = (*pick(blocked), "w")
        else:
            rest = tuple(pick(NEW_NAMES) for _ in range(draw(st.integers(1, 2))))
        return src, (*src[:cut], *rest)

    cand = {
        "allow": some(pointer, 3) or None if draw(st.integers(0, 2)) else None,
        "deny": some(pointer, 2),
        "rename": some(lambda: (pointer(), pick(NAMES)), 3),
        "move": some(move, 3),
        "defaults": some(lambda: (pointer(), pick(PUT_VALUES)), 2),
        "set": some(lambda: (pointer(), pick(PUT_VALUES)), 2),
        "drop_nulls": draw(st.booleans()),
    }
    return doc, cand


def ptr(p: Ptr) -> str:
    return "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in p)


def nested(p: Ptr, q: Ptr) -> bool:
    """Equal, or one inside the other (a `*` segment meets only `*` here:
    the documents have no member named like an index)."""
    n = min(len(p), len(q))
    return p[:n] == q[:n]


class Rules:
    """A rule set built from candidates, keeping a rule only when the map
    compiles with it and it touches no pointer an earlier one touches
    (renames and moves first, then set and defaults, then deny)."""

    def __init__(self, cand: dict[str, Any]) -> None:
        self.cfg: dict[str, Any] = {"allow": None, "deny": [], "drop_nulls": cand["drop_nulls"]}
        self.cfg.update(rename={}, move={}, defaults={}, set={})
        if cand["allow"] is not None:
            self.cfg["allow"] = [ptr(p) for p in cand["allow"]]
        self.allow: list[Ptr] | None = cand["allow"]
        self.deny: list[Ptr] = []
        self.shifts: list[tuple[Ptr, Ptr]] = []  # (source, target) of renames and moves
        self.puts: list[Ptr] = []  # set and defaults pointers
        self.sets: list[Ptr] = []
        touched: list[Ptr] = []
        for kind, items in (("rename", cand["rename"]), ("move", cand["move"])):
            for item in items:
                if kind == "rename":
                    src, name = item
                    dst: Ptr = (*src[:-1], name)
                    value: Any = name
                else:
                    src, dst = item
                    value = ptr(dst)
                mine = [src, dst]
                if ptr(src) in self.cfg[kind] or any(nested(m, t) for m in mine for t in touched):
                    continue
                if self._try(kind, lambda c, k=kind, s=src, v=value: c[k].update({ptr(s): v})):
                    self.shifts.append((src, dst))
                    touched += mine
        for kind in ("defaults", "set"):
            for p, value in cand[kind]:
                if any(nested(p, t) for t in touched):
                    continue
                if self._try(kind, lambda c, k=kind, p=p, v=value: c[k].update({ptr(p): v})):
                    self.puts.append(p)
                    touched.append(p)
                    if kind == "set":
                        self.sets.append(p)
        for d in cand["deny"]:
            if any(nested(d, t) for t in touched):
                continue
            if self._try("deny", lambda c, d=d: c["deny"].append(ptr(d))):
                self.deny.append(d)
        self.map = JsonMap(BodyMap.model_validate(self.cfg), "props")

    def _try(self, kind: str, edit: Any) -> bool:
        trial = copy.deepcopy(self.cfg)
        edit(trial)
        try:
            JsonMap(BodyMap.model_validate(trial), "props")
        except ValueError:
            return False
        self.cfg = trial
        return True


def leaves(doc: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    if isinstance(doc, dict) and doc:
        for k, v in doc.items():
            yield from leaves(v, (*path, k))
    elif isinstance(doc, list) and doc:
        for i, v in enumerate(doc):
            yield from leaves(v, (*path, i))
    else:
        yield path, doc


def get(doc: Any, path: Path) -> Any:
    for k in path:
        if isinstance(k, int):
            if not isinstance(doc, list) or k >= len(doc):
                return MISSING
        elif not isinstance(doc, dict) or k not in doc:
            return MISSING
        doc = doc[k]
    return doc


def same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def seg_match(p: str, k: str | int) -> bool:
    return p == "*" if isinstance(k, int) else p == k


def under(p: Ptr, path: Path) -> bool:
    """The pointer names `path` or one of its ancestors."""
    return len(p) <= len(path) and all(seg_match(s, k) for s, k in zip(p, path, strict=False))


def above(p: Ptr, path: Path) -> bool:
    """The pointer names something strictly below `path`."""
    return len(p) > len(path) and under(p[: len(path)], path)


def find_all(doc: Any, p: Ptr) -> list[Any]:
    level = [doc]
    for s in p:
        nxt: list[Any] = []
        for node in level:
            if isinstance(node, dict) and s in node:
                nxt.append(node[s])
            elif isinstance(node, list) and s == "*":
                nxt.extend(node)
        level = nxt
    return level


def nulls_in_objects(doc: Any) -> bool:
    if isinstance(doc, dict):
        return any(v is None or nulls_in_objects(v) for v in doc.values())
    if isinstance(doc, list):
        return any(nulls_in_objects(v) for v in doc)
    return False


def blocked(doc: Any, out: Any, parent: Path, drop_nulls: bool) -> bool:
    """Whether a value that is not an object is on the way to `parent` (a
    move's target object) in the output, or was, as a null that drop_nulls
    removed after the move."""
    node = out
    for n, k in enumerate(parent):
        if isinstance(k, int):
            node = node[k]  # an array element that holds the source
        elif not isinstance(node, dict):
            return True
        elif k in node:
            node = node[k]
        else:
            return drop_nulls and get(doc, parent[: n + 1]) is None
    return not isinstance(node, dict)


def check_leaves(rules: Rules, doc: Any, out: Any) -> None:
    targets = [dst for _, dst in rules.shifts]
    for path, value in leaves(doc):
        empty = isinstance(value, dict | list)
        if (
            rules.allow is not None
            and not any(under(a, path) for a in rules.allow)
            and not (empty and any(above(a, path) for a in rules.allow))
        ):
            continue  # outside allow (or a scalar on the way to it)
        if any(under(d, path) for d in rules.deny):
            continue
        if empty and any(above(t, path) for t in [*targets, *rules.puts]):
            continue  # a rule writes into this empty container
        if any(under(s, path) for s in rules.sets):
            continue  # overwritten by set
        moved = [(s, t) for s, t in rules.shifts if under(s, path)]
        if moved:
            (src, dst), *others = moved
            assert not others
            cut = max((i + 1 for i, s in enumerate(src[:-1]) if s == "*"), default=0)
            dest_parent: Path = (*path[:cut], *dst[cut:-1])
            dest: Path = (*dest_parent, dst[-1], *path[len(src) :])
            if value is None and rules.cfg["drop_nulls"] and isinstance(dest[-1], str):
                continue
            got = get(out, dest)
            if got is MISSING or not same(got, value):
                # the move could not reach its target: the value is where it was
                assert same(get(out, path), value), (path, dest, out)
                assert blocked(doc, out, dest_parent, rules.cfg["drop_nulls"]), (path, dest, out)
            elif not nested(src, dst):  # (a hoist may leave a look-alike behind)
                assert get(out, path) is MISSING, (path, dest, out)
            continue
        if any(under(t, path) for t in targets):
            continue  # overwritten by a move's target
        if value is None and rules.cfg["drop_nulls"] and path and isinstance(path[-1], str):
            continue
        assert same(get(out, path), value), (path, value, out)


def check_output(rules: Rules, doc: Any, out: Any) -> None:
    for d in rules.deny:
        assert find_all(out, d) == [], (d, out)
    if rules.cfg["drop_nulls"]:
        assert not nulls_in_objects(out)
    written = [dst for _, dst in rules.shifts] + rules.puts
    for path, value in leaves(out):
        if isinstance(value, dict | list) or any(under(w, path) for w in written):
            continue
        assert same(get(doc, path), value), (path, value, doc)
        assert rules.allow is None or any(under(a, path) for a in rules.allow), (path, out)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_no_field_is_lost_unless_a_rule_drops_it(case: tuple[Any, dict[str, Any]]) -> None:
    doc, cand = case
    rules = Rules(cand)
    out = rules.map.apply(copy.deepcopy(doc))
    check_leaves(rules, doc, out)
    check_output(rules, doc, out)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_apply_is_deterministic_and_map_bytes_gives_json(case: tuple[Any, dict[str, Any]]) -> None:
    doc, cand = case
    rules = Rules(cand)
    first = rules.map.apply(copy.deepcopy(doc))
    second = rules.map.apply(copy.deepcopy(doc))
    assert orjson.dumps(first) == orjson.dumps(second)
    body = rules.map.map_bytes(orjson.dumps(doc))
    assert json.loads(body) == first
    assert body == orjson.dumps(first)


any_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=4), ch, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(any_json)
def test_an_empty_map_is_the_identity(doc: Any) -> None:
    m = JsonMap(BodyMap(), "props")
    assert m.apply(copy.deepcopy(doc)) == doc
    body = orjson.dumps(doc)
    assert m.map_bytes(body) == body
