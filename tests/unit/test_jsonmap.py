"""JsonMap: each BodyMap rule (allow, deny, rename, move, defaults, set,
drop_nulls), wildcards and array indexes, escaped pointers, absent paths and
non-containers on the way, compile-time refusals, NotJson, map_bytes, and a
v1 <-> v2 version mediation."""

from __future__ import annotations

import datetime
import json
from typing import Any

import orjson
import pytest

from meshgate.config.loader import ConfigError
from meshgate.config.schema import BodyMap
from meshgate.engine.load import load_config_text
from meshgate.transform.jsonmap import JsonMap, NotJson

WHERE = "route 'orders' response body"


def jm(**rules: Any) -> JsonMap:
    return JsonMap(BodyMap.model_validate(rules), WHERE)


def run(doc: Any, **rules: Any) -> Any:
    return jm(**rules).apply(doc)


# --- pointers ----------------------------------------------------------------


def test_escaped_pointers_name_members_with_slash_and_tilde() -> None:
    doc = {"a/b": 1, "m~n": 2, "a": {"b": 3}, "~1": 4, "/": 5}
    assert run(doc, deny=["/a~1b", "/m~0n", "/~01"]) == {"a": {"b": 3}, "/": 5}
    assert run({"a/b": 1, "x": 2}, rename={"/a~1b": "ab"}) == {"x": 2, "ab": 1}
    assert run({"x": 1}, set={"/p~1q/r~0s": True}) == {"x": 1, "p/q": {"r~s": True}}


def test_empty_segment_names_the_empty_member() -> None:
    assert run({"": {"": 1, "a": 2}, "b": 3}, allow=["//"]) == {"": {"": 1}}


def test_digit_and_star_segments_are_member_names_in_objects() -> None:
    doc = {"0": "zero", "*": "star", "a": 1}
    assert run(dict(doc), allow=["/0", "/*"]) == {"0": "zero", "*": "star"}
    assert run(dict(doc), deny=["/*"]) == {"0": "zero", "a": 1}
    assert run({"m": {"*": {"x": 1, "y": 2}}}, deny=["/m/*/x"]) == {"m": {"*": {"y": 2}}}


def test_non_canonical_index_finds_nothing_in_an_array() -> None:
    assert run({"a": [1, 2]}, deny=["/a/01", "/a/-", "/a/x"]) == {"a": [1, 2]}
    assert run({"a": {"01": 1, "-": 2}}, deny=["/a/01", "/a/-"]) == {}  # emptied: gone


def test_malformed_pointers_are_refused_even_without_the_schema() -> None:
    with pytest.raises(ValueError, match=r"^route 'orders' response body: deny 'a'"):
        JsonMap(BodyMap.model_construct(deny=["a"]), WHERE)
    with pytest.raises(ValueError, match=r"allow '/a~2': '~' is escaped as ~0 or ~1"):
        JsonMap(BodyMap.model_construct(allow=["/a~2"]), WHERE)


# --- allow -------------------------------------------------------------------


def test_allow_keeps_only_the_listed_members_whole_in_document_order() -> None:
    doc = {"z": 1, "id": 7, "secret": "s", "customer": {"name": "n", "tier": {"x": 1}}}
    out = run(doc, allow=["/customer", "/id", "/z"])
    assert out == {"z": 1, "id": 7, "customer": {"name": "n", "tier": {"x": 1}}}
    assert list(out) == ["z", "id", "customer"]


def test_allow_keeps_ancestors_with_only_their_allowed_parts() -> None:
    doc = {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}
    assert run(doc, allow=["/a/b/c"]) == {"a": {"b": {"c": 1}}}
    doc = {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}
    assert run(doc, allow=["/a/b", "/a/b/c", "/f"]) == {"a": {"b": {"c": 1, "d": 2}}, "f": 4}


def test_allow_absent_pointers_and_non_containers_on_the_way() -> None:
    assert run({"a": 1}, allow=["/x"]) == {}
    # a container on the way stays (pruned), a scalar on the way goes
    assert run({"a": {"c": 1}, "b": 5}, allow=["/a/x", "/b/x"]) == {"a": {}}
    assert run({"a": None}, allow=["/a/x"]) == {}
    assert run({"a": [1, 2]}, allow=["/a/x"]) == {"a": []}


def test_allow_through_arrays_with_wildcards_and_indexes() -> None:
    items = [{"id": 1, "p": 2}, {"id": 3, "p": 4, "name": "n"}, 5, {"p": 6}]
    assert run({"items": items, "x": 0}, allow=["/items/*/id"]) == {
        "items": [{"id": 1}, {"id": 3}, {}]
    }
    items = [{"id": 1, "p": 2}, {"id": 3, "p": 4, "name": "n"}, {"p": 6}]
    assert run({"items": items}, allow=["/items/*/id", "/items/1/name"]) == {
        "items": [{"id": 1}, {"id": 3, "name": "n"}, {}]
    }
    items = [{"id": 1}, {"id": 3}, {"id": 5}]
    assert run({"items": items}, allow=["/items/2", "/items/0/id", "/items/9"]) == {
        "items": [{"id": 1}, {"id": 5}]
    }


def test_allow_on_a_top_level_array() -> None:
    assert run([{"id": 1, "s": 2}, {"s": 3}, "x"], allow=["/*/id"]) == [{"id": 1}, {}]
    assert run([1, 2, 3], allow=["/1"]) == [2]
    assert run([1, 2], allow=["/a"]) == []


def test_allow_leaves_a_top_level_scalar_alone() -> None:
    for doc in ("text", 1, None, True, 2.5):
        assert run(doc, allow=["/a"]) == doc


# --- deny ----------------------------------------------------------------------


def test_deny_removes_members_at_any_depth() -> None:
    doc = {"a": {"b": 1, "c": 2}, "d": 3, "e": {"f": {"g": 4}}}
    # objects the deny empties go too, up the path; ones already empty stay
    assert run(doc, deny=["/a/b", "/d", "/e/f/g"]) == {"a": {"c": 2}}
    assert run({"a": {}, "b": {"c": 1}}, deny=["/a/x", "/b/c"]) == {"a": {}}
    assert run({"l": [{"x": 1}]}, deny=["/l/0/x"]) == {"l": [{}]}  # elements stay


def test_deny_absent_and_through_non_containers_does_nothing() -> None:
    doc = {"a": 1, "b": "s", "c": None, "d": [1]}
    assert run(doc, deny=["/x", "/a/b", "/b/0", "/c/x", "/d/5", "/d/x/y"]) == {
        "a": 1,
        "b": "s",
        "c": None,
        "d": [1],
    }


def test_deny_with_wildcards() -> None:
    doc = {"items": [{"id": 1, "cost": 2}, {"id": 3}, 7, {"cost": 4, "sub": [{"cost": 1}]}]}
    assert run(doc, deny=["/items/*/cost", "/items/*/sub/*/cost"]) == {
        "items": [{"id": 1}, {"id": 3}, 7, {"sub": [{}]}]
    }
    assert run({"items": [1, 2], "x": 1}, deny=["/items/*"]) == {"items": [], "x": 1}


def test_deny_array_indexes_refer_to_the_original_positions() -> None:
    assert run({"a": [0, 1, 2, 3]}, deny=["/a/0", "/a/1"]) == {"a": [2, 3]}
    assert run({"a": [0, 1, 2, 3]}, deny=["/a/3", "/a/1", "/a/7"]) == {"a": [0, 2]}
    doc = {"a": [{"x": 1, "y": 1}, {"x": 2, "y": 2}, {"x": 3}]}
    assert run(doc, deny=["/a/*/x", "/a/1"]) == {"a": [{"y": 1}, {}]}


def test_deny_on_a_top_level_array() -> None:
    assert run([{"id": 1, "s": 2}, {"s": 3}], deny=["/*/s"]) == [{"id": 1}, {}]


# --- rename ------------------------------------------------------------------


def test_rename_in_its_own_object() -> None:
    assert run({"customer": "c1", "id": 1}, rename={"/customer": "customer_id"}) == {
        "id": 1,
        "customer_id": "c1",
    }
    assert run({"a": {"b": 1}}, rename={"/a/b": "c"}) == {"a": {"c": 1}}


def test_rename_overwrites_an_existing_member_of_the_new_name() -> None:
    assert run({"a": 1, "b": 2}, rename={"/a": "b"}) == {"b": 1}


def test_rename_in_every_element() -> None:
    doc = {"items": [{"qty": 1}, {"n": 2}, 3, {"qty": None}]}
    assert run(doc, rename={"/items/*/qty": "quantity"}) == {
        "items": [{"quantity": 1}, {"n": 2}, 3, {"quantity": None}]
    }


def test_rename_absent_or_not_in_an_object_does_nothing() -> None:
    doc = {"a": 1, "l": [1, 2], "s": "x"}
    assert run(doc, rename={"/x": "y", "/a/b": "c", "/l/0": "first", "/s/0": "z"}) == {
        "a": 1,
        "l": [1, 2],
        "s": "x",
    }


def test_renames_and_moves_run_in_the_order_written() -> None:
    assert run({"a": 1}, rename={"/a": "b"}, move={"/b": "/c/d"}) == {"c": {"d": 1}}
    assert run({"a": 1, "b": 2}, rename={"/a": "x", "/b": "a"}) == {"x": 1, "a": 2}


# --- move --------------------------------------------------------------------


def test_move_nests_creating_objects() -> None:
    assert run({"street": "Main", "id": 1}, move={"/street": "/address/street"}) == {
        "id": 1,
        "address": {"street": "Main"},
    }
    out = run({"s": 1, "c": 2, "address": {"zip": "z"}}, move={"/s": "/address/a/s", "/c": "/t"})
    assert out == {"address": {"zip": "z", "a": {"s": 1}}, "t": 2}


def test_move_within_each_element() -> None:
    doc = {"items": [{"qty": 1}, {"x": 0}, "s", {"qty": {"n": 2}, "deep": {}}]}
    out = run(doc, move={"/items/*/qty": "/items/*/amount/quantity"})
    assert out == {
        "items": [
            {"amount": {"quantity": 1}},
            {"x": 0},
            "s",
            {"deep": {}, "amount": {"quantity": {"n": 2}}},
        ]
    }


def test_move_overwrites_the_target() -> None:
    assert run({"a": 1, "b": {"c": 2}}, move={"/a": "/b"}) == {"b": 1}


def test_move_removes_the_objects_it_empties() -> None:
    doc = {"id": 1, "address": {"street": "Main", "geo": {"lat": 1}}}
    out = run(doc, move={"/address/street": "/street", "/address/geo/lat": "/lat"})
    assert out == {"id": 1, "street": "Main", "lat": 1}
    # hoisting a member into its parent's place
    assert run({"data": {"payload": {"a": 1}}}, move={"/data/payload": "/data"}) == {
        "data": {"a": 1}
    }
    # the target's object stays, and so do emptied array elements
    assert run({"a": {"b": {"x": 1}}}, move={"/a/b/x": "/a/y"}) == {"a": {"y": 1}}
    assert run({"a": {"x": 1}}, move={"/a/x": "/a/y"}) == {"a": {"y": 1}}
    assert run({"l": [{"x": 1}]}, move={"/l/0/x": "/x"}) == {"l": [{}], "x": 1}
    # an object that was empty before the move is not touched
    assert run({"e": {}, "a": {"x": 1, "k": 2}}, move={"/a/x": "/x"}) == {
        "e": {},
        "a": {"k": 2},
        "x": 1,
    }


def test_move_blocked_on_the_way_leaves_the_source() -> None:
    doc = {"a": 1, "b": "scalar", "n": None, "l": [1]}
    out = run(doc, move={"/a": "/b/c"})
    assert out == {"a": 1, "b": "scalar", "n": None, "l": [1]}
    assert run({"a": 1, "n": None}, move={"/a": "/n/x/y"}) == {"a": 1, "n": None}
    assert run({"a": 1, "l": [1]}, move={"/a": "/l/x"}) == {"a": 1, "l": [1]}
    assert run({"a": 1, "l": [1]}, move={"/a": "/l/3"}) == {"a": 1, "l": [1]}


def test_move_of_an_absent_source_creates_nothing() -> None:
    assert run({"x": 1}, move={"/a": "/b/c/d"}) == {"x": 1}


def test_move_with_array_elements() -> None:
    assert run({"l": [1, 2, 3]}, move={"/l/0": "/first"}) == {"l": [2, 3], "first": 1}
    assert run({"l": [1, 2], "a": "x"}, move={"/a": "/l/1"}) == {"l": [1, "x"]}
    # within one array: refused at run time (positions would shift)
    assert run({"l": [1, 2, 3]}, move={"/l/0": "/l/2"}) == {"l": [1, 2, 3]}
    # positions are those before the move
    doc = {"l": [1, {"k": 0}, {"k": 1}]}
    assert run(doc, move={"/l/0": "/l/2/x"}) == {"l": [{"k": 0}, {"k": 1, "x": 1}]}


# --- defaults and set ----------------------------------------------------------


def test_defaults_only_where_absent() -> None:
    rules = {"defaults": {"/a": 1, "/b": 2, "/c": 3, "/d/e/f": 4}}
    assert run({"a": 0, "b": None}, **rules) == {"a": 0, "b": None, "c": 3, "d": {"e": {"f": 4}}}


def test_set_always() -> None:
    rules = {"set": {"/a": 1, "/b": {"x": [1]}, "/c/d": "v"}}
    assert run({"a": 0, "b": None, "c": {"d": 0, "k": 1}}, **rules) == {
        "a": 1,
        "b": {"x": [1]},
        "c": {"d": "v", "k": 1},
    }


def test_defaults_and_set_never_replace_a_non_object_on_the_way() -> None:
    doc = {"a": 1, "n": None, "l": [1], "s": "x"}
    rules = {"set": {"/a/b": 1, "/n/b/c": 1, "/l/x": 1, "/l/5": 1, "/s/0": 1}}
    assert run(dict(doc), **rules) == doc
    rules = {"defaults": {"/a/b": 1, "/n/b/c": 1, "/l/x": 1, "/l/5": 1}}
    assert run(dict(doc), **rules) == doc


def test_defaults_and_set_in_every_element() -> None:
    doc = {"items": [{"c": "USD"}, {}, 3, {"c": None}]}
    assert run(doc, defaults={"/items/*/c": "EUR"}) == {
        "items": [{"c": "USD"}, {"c": "EUR"}, 3, {"c": None}]
    }
    doc = {"items": [{"c": "USD"}, {"k": 1}, 3]}
    assert run(doc, set={"/items/*/m/v": 0}) == {
        "items": [{"c": "USD", "m": {"v": 0}}, {"k": 1, "m": {"v": 0}}, 3]
    }


def test_set_and_defaults_on_array_elements() -> None:
    assert run({"l": [1, 2]}, set={"/l/1": "x"}) == {"l": [1, "x"]}
    assert run({"l": [1, 2]}, set={"/l/*": 0}) == {"l": [0, 0]}
    assert run({"l": [1, 2]}, defaults={"/l/1": "x", "/l/2": "y", "/l/*": 0}) == {"l": [1, 2]}
    assert run({"l": [{"a": 1}, {}]}, defaults={"/l/*/a": 0}) == {"l": [{"a": 1}, {"a": 0}]}


def test_set_values_are_copied_for_every_document() -> None:
    m = jm(set={"/meta": {"tags": ["a"]}}, defaults={"/list": [1]})
    first = m.apply({})
    first["meta"]["tags"].append("leak")
    first["list"].append(2)
    second = m.apply({})
    assert second == {"list": [1], "meta": {"tags": ["a"]}}
    assert second["meta"] is not first["meta"]
    # one rule applied through a wildcard: each element gets its own copy
    out = jm(set={"/l/*/m": {"k": []}}).apply({"l": [{}, {}]})
    assert out["l"][0]["m"] is not out["l"][1]["m"]


def test_set_values_are_normalized_through_json() -> None:
    m = jm(set={"/d": datetime.date(2024, 1, 2), "/codes": {200: "ok"}})
    assert m.apply({}) == {"d": "2024-01-02", "codes": {"200": "ok"}}
    with pytest.raises(ValueError, match=r"set '/x'.*not JSON"):
        jm(set={"/x": object()})
    with pytest.raises(ValueError, match=r"^route 'orders' response body: set '/x'.*not JSON"):
        JsonMap(BodyMap.model_construct(set={"/x": object()}), WHERE)
    with pytest.raises(ValueError, match=r"defaults '/x'.*not JSON"):
        jm(defaults={"/x": 2**70})


def test_top_level_scalar_is_never_changed() -> None:
    for doc in ("s", 1, None):
        out = run(doc, set={"/a": 1}, defaults={"/b": 1}, move={"/c": "/d"}, drop_nulls=True)
        assert out == doc


# --- drop_nulls --------------------------------------------------------------


def test_drop_nulls_removes_null_members_at_every_depth_and_keeps_array_elements() -> None:
    doc = {"a": None, "b": {"c": None, "d": 1}, "l": [None, {"e": None, "f": [None]}], "z": 0}
    assert run(doc, drop_nulls=True) == {"b": {"d": 1}, "l": [None, {"f": [None]}], "z": 0}
    assert run([None, {"a": None}], drop_nulls=True) == [None, {}]


def test_drop_nulls_runs_last() -> None:
    assert run({"a": 1}, set={"/b": None}, defaults={"/c/d": None}, drop_nulls=True) == {
        "a": 1,
        "c": {},
    }


def test_drop_nulls_on_a_deep_document() -> None:
    doc: Any = {"x": None}
    for _ in range(5000):
        doc = {"k": doc, "n": None}
    out = run(doc, drop_nulls=True)
    for _ in range(5000):
        assert list(out) == ["k"]
        out = out["k"]
    assert out == {}


# --- compile-time refusals -----------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"allow": ["/a"], "deny": ["/a"]}, "deny '/a' removes allowed '/a'"),
        ({"allow": ["/a/b"], "deny": ["/a"]}, "deny '/a' removes allowed '/a/b'"),
        ({"move": {"/a": "/a/b"}}, "move '/a': its target '/a/b' is inside it"),
        ({"move": {"/a": "/a"}}, "move '/a': moves onto itself"),
        ({"move": {"/a": "/b"}, "deny": ["/b"]}, "move '/a': its target '/b' is also denied"),
        ({"rename": {"/a": "b"}, "deny": ["/b"]}, "rename '/a': its target '/b' is also denied"),
        ({"rename": {"/a/x": "y"}, "deny": ["/a"]}, "rename '/a/x': deny '/a' removes it first"),
        ({"move": {"/a": "/b"}, "allow": ["/b"]}, "move '/a' is outside allow"),
        ({"rename": {"/a/b": "c"}, "allow": ["/a/x"]}, "rename '/a/b' is outside allow"),
        (
            {"move": {"/items/*/a": "/other/*/a"}},
            "move '/items/*/a': source and target must have the same segments up to their last",
        ),
        ({"move": {"/items/*/a": "/a"}}, "move '/items/*/a': source and target"),
        ({"move": {"/a": "/l/*/a"}}, "move '/a': source and target"),
        ({"move": {"/items/*": "/x/*"}}, "move '/items/*': its source names one member"),
        ({"move": {"/a": "/b/*"}}, "move '/a': its target names one member"),
        ({"rename": {"/a": "*"}}, "rename '/a': its target names one member"),
        ({"rename": {"/a/b": "b"}}, "rename '/a/b': renames to the same name"),
        (
            {"rename": {"/a": "c"}, "move": {"/b": "/c"}},
            "move '/b' and rename '/a' both write '/c'",
        ),
        ({"move": {"/a": "/c/d", "/b": "/c/d"}}, "move '/b' and move '/a' both write '/c/d'"),
        ({"defaults": {"/a": 1}, "set": {"/a": 2}}, "defaults '/a' never shows: set '/a'"),
        ({"defaults": {"/a/b": 1}, "set": {"/a": {}}}, "defaults '/a/b' never shows"),
    ],
)
def test_contradictory_rules_are_refused(rules: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        JsonMap(BodyMap.model_construct(**rules), WHERE)
    assert str(info.value).startswith(WHERE + ": ")
    assert message in str(info.value)
    # the schema takes their shape; the config refuses them when it loads,
    # at the map's line
    BodyMap.model_validate(rules)
    text = (
        "upstreams: {a: {endpoints: ['127.0.0.1:1']}}\n"
        "routes:\n"
        "- path: /x\n"
        "  upstream: a\n"
        "  transform:\n"
        "    response:\n"
        f"      body: {json.dumps(rules)}\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config_text(text, "bad.yaml")
    [problem] = refused.value.problems
    assert (problem.file, problem.line, problem.field) == (
        "bad.yaml",
        7,
        "routes[0].transform.response.body",
    )
    assert problem.message.startswith("body: " + message)


def test_rename_names_are_checked_by_the_schema() -> None:
    with pytest.raises(ValueError, match="member name"):
        jm(rename={"/a": "b/c"})
    with pytest.raises(ValueError, match="member name"):
        JsonMap(BodyMap.model_construct(rename={"/a": ""}), WHERE)


def test_rules_that_only_look_alike_are_accepted() -> None:
    # deny under allow; set masking a denied member; a move rebuilding a denied object;
    # a move whose source is on the way to an allowed pointer; an index under a wildcard
    # allow. (`a`, emptied by the deny and the move, is removed by the move.)
    m = jm(
        allow=["/a", "/items/*/id", "/o/p/q"],
        deny=["/a/secret", "/addr", "/pw"],
        set={"/pw": "***"},
        move={"/a/street": "/addr/street", "/items/0/id": "/first", "/o": "/oo"},
    )
    doc = {
        "a": {"secret": 1, "street": "s"},
        "pw": "x",
        "addr": {"old": 1},
        "items": [{"id": 1, "x": 2}, {"id": 3}],
        "o": {"p": {"q": 1, "r": 2}, "z": 3},
    }
    assert m.apply(doc) == {
        "items": [{}, {"id": 3}],
        "addr": {"street": "s"},
        "first": 1,
        "oo": {"p": {"q": 1}},
        "pw": "***",
    }


# --- map_bytes and NotJson -----------------------------------------------------


def test_map_bytes_round_trip() -> None:
    m = jm(deny=["/b"], set={"/c": [1, "é"]})
    out = m.map_bytes(b' {"a": 1.5, "b": 2, "s": "\\u00e9\\n"} ')
    assert orjson.loads(out) == {"a": 1.5, "s": "é\n", "c": [1, "é"]}
    assert m.map_bytes(b"[1,2]") == b"[1,2]"
    assert m.map_bytes(b'"text"') == b'"text"'
    assert m.map_bytes(b"null") == b"null"


def test_map_bytes_leaves_an_empty_body_alone() -> None:
    m = jm(set={"/a": 1})
    body = b""
    assert m.map_bytes(body) is body
    assert m.map_bytes(b" \r\n\t") == b" \r\n\t"


@pytest.mark.parametrize(
    "body",
    [
        b'{"password": "hunter2"',
        b'{"password": "hunter2",}',
        b"hunter2",
        b'{"password": "hunter2\xff"}',
        b'["hunter2"] ["x"]',
        b"NaN",
        b"\x0c",
    ],
)
def test_map_bytes_raises_not_json_without_echoing_the_body(body: bytes) -> None:
    with pytest.raises(NotJson) as info:
        jm(deny=["/password"]).map_bytes(body)
    text = str(info.value)
    assert text.startswith("not JSON: ")
    assert "hunter2" not in text
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert isinstance(info.value, ValueError)


def test_map_bytes_on_a_document_deeper_than_orjson_encodes() -> None:
    body = b'{"a":' * 300 + b'{"x":1,"y":null}' + b"}" * 300
    out = jm(drop_nulls=True).map_bytes(body)
    assert out == b'{"a":' * 300 + b'{"x":1}' + b"}" * 300
    assert json.loads(out) == json.loads(body.replace(b',"y":null', b""))


def test_empty_map_is_the_identity() -> None:
    m = JsonMap(BodyMap(), WHERE)
    assert m.empty
    assert not jm(drop_nulls=True).empty
    doc = {"a": [1, {"b": None}], "c": "d"}
    assert m.apply(orjson.loads(orjson.dumps(doc))) == doc
    assert m.map_bytes(b'{"a":[1,{"b":null}],"c":"d"}') == b'{"a":[1,{"b":null}],"c":"d"}'


# --- version mediation: v1 <-> v2 ----------------------------------------------

V1_TO_V2 = {
    "rename": {"/customer": "customer_id"},
    "move": {"/total": "/amount/value", "/street": "/address/street"},
    "set": {"/amount/currency": "EUR"},
}
V2_TO_V1 = {
    "deny": ["/amount/currency"],
    "rename": {"/customer_id": "customer"},
    "move": {"/amount/value": "/total", "/address/street": "/street"},
    "defaults": {"/total": 0},
}


def test_mediation_v1_to_v2_and_back() -> None:
    to_v2 = jm(**V1_TO_V2)
    to_v1 = jm(**V2_TO_V1)
    v1 = b'{"id":"o-1","customer":"c1","total":12.5,"street":"Main St 1"}'

    v2 = orjson.loads(to_v2.map_bytes(v1))
    assert set(v2) == {"id", "customer_id", "amount", "address"}
    assert v2["id"] == "o-1"
    assert v2["customer_id"] == "c1"
    assert v2["amount"] == {"value": 12.5, "currency": "EUR"}
    assert v2["address"] == {"street": "Main St 1"}

    back = orjson.loads(to_v1.map_bytes(orjson.dumps(v2)))
    assert set(back) == {"id", "customer", "total", "street"}
    assert back["id"] == "o-1"
    assert back["customer"] == "c1"
    assert back["total"] == 12.5
    assert back["street"] == "Main St 1"
    assert back == orjson.loads(v1)


def test_mediation_v2_to_v1_with_parts_missing() -> None:
    to_v1 = jm(**V2_TO_V1)
    # no amount: the total is defaulted; an address with more than the street stays
    v2 = {"id": "o-2", "customer_id": "c2", "address": {"street": "S", "city": "C"}}
    v1 = to_v1.apply(v2)
    assert v1["id"] == "o-2"
    assert v1["customer"] == "c2"
    assert v1["total"] == 0
    assert v1["street"] == "S"
    assert v1["address"] == {"city": "C"}
    assert "customer_id" not in v1
    assert "amount" not in v1
    # a currency-only amount: the currency is dropped, and so is the emptied amount
    v1 = to_v1.apply({"id": "o-3", "amount": {"currency": "USD"}})
    assert v1 == {"id": "o-3", "total": 0}
