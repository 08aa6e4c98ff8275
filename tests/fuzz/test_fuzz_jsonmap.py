"""Fuzzing the JSON body mapping (`transform/jsonmap.py`): any mapping spec
either validates and compiles, or is refused with the config's error (a
pydantic `ValidationError`, or a `ValueError` naming `where`); a compiled
map given any body returns JSON (or the empty body as it is), or raises
`NotJson`, and only for a body that is not JSON or too deep to encode again.

1. Every map of corpus/jsonmap/*.map.json against every body of
   corpus/jsonmap/*.body (deep nesting, big numbers, duplicate keys, BOMs,
   invalid UTF-8...).
2. Generated specs (pointers of awkward segments, wrong types) against
   generated documents and mutated corpus bodies.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meshgate.config.schema import BodyMap
from meshgate.transform.jsonmap import JsonMap, NotJson
from support.fuzz import corpus, fuzz_settings

WHERE = "routes[0].transform.request.body"

FILES = corpus("jsonmap")
MAPS = [(n, orjson.loads(d)) for n, d in FILES if n.endswith(".map.json")]
BODIES = [(n, d) for n, d in FILES if n.endswith(".body")]


def check_map(spec: Any, bodies: list[bytes]) -> None:
    """The rule for one spec and the bodies it maps."""
    try:
        cfg = BodyMap.model_validate(spec)
    except ValidationError:
        return
    try:
        jmap = JsonMap(cfg, WHERE)
    except ValueError as exc:
        assert str(exc).startswith(WHERE + ":"), exc
        return
    for body in bodies:
        check_body(jmap, body)


def check_body(jmap: JsonMap, body: bytes) -> None:
    try:
        out = jmap.map_bytes(body)
    except NotJson as exc:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        assert "nested too deeply" in str(exc), (exc, body[:200])
        return
    if not body.strip(b" \t\r\n"):
        assert out == body
        return
    try:
        orjson.loads(out)
    except orjson.JSONDecodeError:
        # Deeper than orjson parses, or an integer beyond 64 bits set by
        # the map (a result the standard library encoded): still JSON.
        json.loads(out)


@pytest.mark.parametrize(("name", "spec"), MAPS, ids=[n for n, _ in MAPS])
def test_corpus_maps_every_corpus_body(name: str, spec: Any) -> None:
    check_map(spec, [b for _, b in BODIES])


# -- generated specs and documents ---------------------------------------------------------

SEGMENTS = ["a", "b", "items", "*", "0", "1", "01", "-", "", "~0", "~1", "a~1b", "é"]
# Now and then: not a pointer, or a bad escape (the spec is refused).
BAD_POINTERS = ["", "a", "a/b", "/~", "/a~2", "/~/b"]


@st.composite
def pointers(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 40)) == 0:
        return draw(st.sampled_from(BAD_POINTERS))
    segs = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4))
    return "".join("/" + s for s in segs)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(SEGMENTS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(SEGMENTS), inner),
    max_leaves=20,
)

# Member names for rename; now and then one it refuses.
names = st.integers(0, 30).flatmap(
    lambda i: (
        st.sampled_from(["", "a/b"])
        if i == 0
        else st.sampled_from(["a", "b", "n", "x y", "*", "0", "~"])
    )
)

good_specs = st.fixed_dictionaries(
    {},
    optional={
        "allow": st.lists(pointers(), max_size=3) | st.none(),
        "deny": st.lists(pointers(), max_size=3),
        "rename": st.dictionaries(pointers(), names, max_size=3),
        "move": st.dictionaries(pointers(), pointers(), max_size=3),
        "defaults": st.dictionaries(pointers(), json_values, max_size=2),
        "set": st.dictionaries(pointers(), json_values, max_size=2),
        "drop_nulls": st.booleans(),
    },
)
# Not a mapping spec at all, or fields of the wrong types.
bad_specs = st.one_of(
    json_values, st.dictionaries(st.sampled_from(["allow", "deny", "x"]), json_values)
)
specs = st.integers(0, 9).flatmap(lambda i: bad_specs if i == 0 else good_specs)


@st.composite
def mutated_body(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.sampled_from([b for _, b in BODIES])))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(buf)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "cut"]))
        if kind == "insert":
            buf[pos:pos] = draw(
                st.sampled_from([b"[", b"{", b"]", b"}", b",", b":", b'"', b"\\", b"null", b"-"])
                | st.binary(min_size=1, max_size=3)
            )
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 4))]
        elif kind == "replace" and buf:
            buf[min(pos, len(buf) - 1)] = draw(st.integers(0, 255))
        else:
            del buf[pos:]
    return bytes(buf)


bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_body(),
    st.integers(1, 1100).map(lambda n: b"[" * n + b"]" * n),
    st.binary(max_size=40),
)


@fuzz_settings(ci_examples=300)
@given(spec=specs, body_list=st.lists(bodies, min_size=1, max_size=3))
def test_generated_maps_and_bodies(spec: Any, body_list: list[bytes]) -> None:
    check_map(spec, body_list)


@fuzz_settings(ci_examples=100)
@given(name_spec=st.sampled_from(MAPS), body=bodies)
def test_corpus_maps_generated_bodies(name_spec: tuple[str, Any], body: bytes) -> None:
    check_map(name_spec[1], [body])
