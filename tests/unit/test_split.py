"""`Splitter` (weights, sticky keys, canary matches) and the cookie parser,
without sockets: backends are plain strings."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from meshgate.config.describe import describe
from meshgate.config.schema import RouteConfig
from meshgate.engine.load import load_config_text
from meshgate.http import split as split_mod
from meshgate.http.split import Splitter, cookie_value, sticky_hash

H = list[tuple[bytes, bytes]]


def splitter(
    weights: list[tuple[str, int]],
    *,
    sticky: str | None = None,
    canary: list[dict[str, Any]] | None = None,
) -> Splitter[str]:
    route = RouteConfig(
        path="/x/**",
        split=[{"upstream": n, "weight": w} for n, w in weights],  # type: ignore[misc]
        sticky=sticky,
        canary=canary,  # type: ignore[arg-type]
    )
    names = route.upstream_names()
    return Splitter(route, {n: n for n in names}, "routes[0]")


def assignments(s: Splitter[str], keys: list[bytes]) -> list[str]:
    return [s.names[s.assign(k)] for k in keys]


KEYS = [b"client-%d" % i for i in range(20000)]


# --- the cookie parser --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "name", "expected"),
    [
        ([(b"cookie", b"canary=1")], b"canary", b"1"),
        ([(b"cookie", b"a=b; canary=always; c=d")], b"canary", b"always"),
        ([(b"cookie", b"a=b;canary=x")], b"canary", b"x"),  # no space after ';'
        ([(b"cookie", b" \tcanary \t= \tx \t;")], b"canary", b"x"),  # whitespace around
        ([(b"cookie", b'canary="quoted value"')], b"canary", b"quoted value"),
        ([(b"cookie", b'canary="')], b"canary", b'"'),  # a lone quote is a value
        ([(b"cookie", b"canary=")], b"canary", b""),  # present, empty
        ([(b"cookie", b"token=a=b==")], b"token", b"a=b=="),  # '=' inside a value
        ([(b"cookie", b"xcanary=1; canary=2")], b"canary", b"2"),  # not a suffix match
        ([(b"cookie", b"canaryx=1")], b"canary", None),  # not a prefix match
        ([(b"cookie", b"a=canary=1")], b"canary", None),  # the name inside a value
        ([(b"cookie", b"canary; a=b")], b"canary", None),  # a pair without '='
        ([(b"cookie", b"Canary=1")], b"canary", None),  # names are case-sensitive
        ([(b"cookie", b"canary=1; canary=2")], b"canary", b"1"),  # the first wins
        ([(b"cookie", b"a=1"), (b"cookie", b"canary=2")], b"canary", b"2"),  # two headers
        ([(b"cookie", b"canary=1"), (b"cookie", b"canary=2")], b"canary", b"1"),
        ([(b"cookie", b"")], b"canary", None),
        ([(b"x-cookie", b"canary=1")], b"canary", None),  # another header
        ([], b"canary", None),
    ],
)
def test_cookie_value(headers: H, name: bytes, expected: bytes | None) -> None:
    assert cookie_value(headers, name) == expected


# --- compile ------------------------------------------------------------------------


def test_needs_a_split_route() -> None:
    with pytest.raises(ValueError, match="split"):
        Splitter(RouteConfig(path="/x", upstream="a"), {"a": "a"})


def test_names_weights_and_canary_only_upstreams() -> None:
    s = splitter(
        [("v1", 60), ("v2", 30), ("v1", 10)],
        canary=[{"header": "X-Beta", "upstream": "beta"}],
    )
    # A name listed twice has its weights added; a canary-only upstream has none.
    assert s.names == ("v1", "v2", "beta")
    assert s.weights == (70, 30, None)
    assert s.targets == ("v1", "v2", "beta")


# --- weighted random -------------------------------------------------------------------


def test_weighted_random_follows_the_weights() -> None:
    random.seed(11)
    s = splitter([("v1", 90), ("v2", 10)])
    seen = Counter(s.pick([], b"10.0.0.1") for _ in range(100_000))
    assert abs(seen["v2"] / 100_000 - 0.10) < 0.005, seen
    assert s.counts == [seen["v1"], seen["v2"]]


def test_three_way_random_and_weight_zero_gets_nothing() -> None:
    random.seed(12)
    s = splitter([("a", 0), ("b", 1), ("c", 0), ("d", 3), ("e", 0)])
    seen = Counter(s.pick([], b"") for _ in range(40_000))
    assert set(seen) == {"b", "d"}
    assert abs(seen["b"] / 40_000 - 0.25) < 0.01, seen


def test_random_edges_of_the_unit_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    s = splitter([("v1", 0), ("v2", 9), ("v3", 1)])
    for r, expected in ((0.0, "v2"), (0.8999, "v2"), (0.9, "v3"), (0.9999999999999999, "v3")):
        monkeypatch.setattr(split_mod, "_random", lambda r=r: r)
        assert s.pick([], b"") == expected, r


# --- canary -------------------------------------------------------------------------------


CANARY = [
    {"header": "X-Canary", "value": "1", "upstream": "v2"},
    {"cookie": "beta", "upstream": "v3"},  # present, any value
    {"header": "x-preview", "upstream": "v3"},  # present, any value
    {"cookie": "track", "value": "v2", "upstream": "v2"},
]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-canary", b"1")], "v2"),
        ([(b"x-other", b"1"), (b"x-canary", b"2"), (b"x-canary", b"1")], "v2"),  # any line
        ([(b"x-canary", b"2")], "v1"),
        ([(b"x-canary", b"1 ")], "v1"),  # exact value
        ([(b"x-canary", b"")], "v1"),
        ([(b"cookie", b"beta=")], "v3"),
        ([(b"cookie", b"a=1; beta=no")], "v3"),
        ([(b"cookie", b"abeta=1")], "v1"),
        ([(b"x-preview", b"")], "v3"),
        ([(b"cookie", b"track=v2")], "v2"),
        ([(b"cookie", b'track="v2"')], "v2"),
        ([(b"cookie", b"track=v3")], "v1"),
        # In config order: the x-canary match comes before the beta cookie.
        ([(b"cookie", b"beta=1"), (b"x-canary", b"1")], "v2"),
        ([(b"cookie", b"beta=1; track=v2")], "v3"),
        ([], "v1"),
    ],
)
def test_canary_matches(headers: H, expected: str) -> None:
    s = splitter([("v1", 1), ("v2", 0), ("v3", 0)], canary=CANARY)
    assert s.pick(headers, b"10.0.0.1") == expected


def test_canary_beats_sticky_and_is_counted() -> None:
    s = splitter([("v1", 1), ("v2", 0)], sticky="header:x-user", canary=CANARY[:1])
    for _ in range(5):
        assert s.pick([(b"x-user", b"u1"), (b"x-canary", b"1")], b"") == "v2"
        assert s.pick([(b"x-user", b"u1")], b"") == "v1"
    assert s.counts == [5, 5]
    assert s.canary_counts == [5]
    stats = s.stats()
    assert stats["requests"] == 10
    assert stats["canary"] == [
        {"header": "x-canary", "value": "1", "upstream": "v2", "requests": 5}
    ]


# --- sticky ------------------------------------------------------------------------------


def _spread(s: Splitter[str], make: Any, n: int = 200) -> Counter[str]:
    """Each of `n` keys, picked 5 times: always the same backend; the count per backend."""
    seen: Counter[str] = Counter()
    for i in range(n):
        headers, client, consumer, subject = make(i)
        got = {s.pick(headers, client, consumer, subject) for _ in range(5)}
        assert len(got) == 1, (i, got)
        seen[got.pop()] += 1
    return seen


@pytest.mark.parametrize(
    ("sticky", "make"),
    [
        ("header:X-User", lambda i: ([(b"x-user", b"u%d" % i)], b"10.0.0.1", None, None)),
        ("cookie:sid", lambda i: ([(b"cookie", b"a=1; sid=s%d" % i)], b"10.0.0.1", None, None)),
        ("ip", lambda i: ([], b"10.0.%d.%d" % (i // 200, i % 200), None, None)),
        ("consumer", lambda i: ([], b"10.0.0.1", f"consumer-{i}", f"sub-{i}")),
        ("consumer", lambda i: ([], b"10.0.0.1", None, f"subject-{i}")),  # no consumer: subject
        ("consumer", lambda i: ([], b"10.1.0.%d" % i, None, None)),  # anonymous: the IP
    ],
)
def test_sticky_keys_are_stable_and_spread(sticky: str, make: Any) -> None:
    s = splitter([("v1", 50), ("v2", 50)], sticky=sticky)
    seen = _spread(s, make)
    assert 70 <= seen["v1"] <= 130, seen


def test_sticky_consumer_ignores_the_ip_when_it_knows_the_consumer() -> None:
    s = splitter([("v1", 50), ("v2", 50)], sticky="consumer")
    for name in ("alice", "bob", "carol"):
        assert len({s.pick([], b"10.0.0.%d" % i, name) for i in range(50)}) == 1


def test_sticky_source_absent_falls_back_to_random() -> None:
    random.seed(13)
    for sticky, headers in (
        ("header:x-user", [(b"x-other", b"1")]),
        ("header:x-user", [(b"x-user", b"")]),  # empty is absent
        ("cookie:sid", [(b"cookie", b"other=1")]),
        ("cookie:sid", [(b"cookie", b"sid=")]),
        ("ip", []),  # no client address
    ):
        s = splitter([("v1", 50), ("v2", 50)], sticky=sticky)
        seen = Counter(s.pick(headers, b"") for _ in range(400))
        assert 140 <= seen["v1"] <= 260, (sticky, seen)


def test_sticky_shares_follow_the_weights() -> None:
    for weights in ([("v1", 90), ("v2", 10)], [("a", 5), ("b", 3), ("c", 2)]):
        s = splitter(weights, sticky="header:x-user")
        total = sum(w for _, w in weights)
        seen = Counter(assignments(s, KEYS))
        for name, w in weights:
            assert abs(seen[name] / len(KEYS) - w / total) < 0.01, (weights, seen)


def test_sticky_weight_zero_gets_nothing() -> None:
    s = splitter([("v1", 0), ("v2", 5), ("v3", 0)], sticky="ip")
    assert set(assignments(s, KEYS[:2000])) == {"v2"}


def test_raising_the_canary_moves_clients_only_to_it() -> None:
    """90/10 -> 90/20: every client on v2 stays there; those that move come
    from v1; the new share is 20/110."""
    before = assignments(splitter([("v1", 90), ("v2", 10)], sticky="consumer"), KEYS)
    after = assignments(splitter([("v1", 90), ("v2", 20)], sticky="consumer"), KEYS)
    moves = Counter((a, b) for a, b in zip(before, after, strict=True) if a != b)
    assert set(moves) == {("v1", "v2")}, moves
    assert abs(after.count("v2") / len(KEYS) - 20 / 110) < 0.01
    # Only as many as the new share needs (about 8.2% of clients), not more.
    assert abs(moves["v1", "v2"] / len(KEYS) - (20 / 110 - 10 / 100)) < 0.01


def test_shifting_weight_between_two_moves_only_that_way() -> None:
    for old, new in (((90, 10), (50, 50)), ((50, 50), (100, 1)), ((1, 99), (99, 1))):
        before = assignments(splitter([("v1", old[0]), ("v2", old[1])], sticky="ip"), KEYS)
        after = assignments(splitter([("v1", new[0]), ("v2", new[1])], sticky="ip"), KEYS)
        gainer = "v2" if new[1] / sum(new) > old[1] / sum(old) else "v1"
        moves = {(a, b) for a, b in zip(before, after, strict=True) if a != b}
        assert moves <= {("v1" if gainer == "v2" else "v2", gainer)}, (old, new, moves)


@pytest.mark.parametrize("raised", ["a", "b", "c"])
def test_three_backends_raising_one_moves_clients_only_to_it(raised: str) -> None:
    """Where cumulative buckets would move clients between the other two."""
    base = {"a": 50, "b": 30, "c": 20}
    before = assignments(splitter(list(base.items()), sticky="ip"), KEYS)
    raised_weights = {**base, raised: base[raised] * 2}
    after = assignments(splitter(list(raised_weights.items()), sticky="ip"), KEYS)
    moved_to = {b for a, b in zip(before, after, strict=True) if a != b}
    assert moved_to == {raised}
    # And lowering it back moves them only away from it, back where they were.
    back = assignments(splitter(list(base.items()), sticky="ip"), KEYS)
    assert back == before


def test_order_of_split_entries_does_not_matter_and_a_new_backend_only_takes() -> None:
    one = assignments(splitter([("v1", 80), ("v2", 20)], sticky="ip"), KEYS)
    two = assignments(splitter([("v2", 20), ("v1", 80)], sticky="ip"), KEYS)
    assert one == two
    three = assignments(splitter([("v1", 80), ("v2", 20), ("v3", 25)], sticky="ip"), KEYS)
    assert {b for a, b in zip(one, three, strict=True) if a != b} == {"v3"}


def test_sticky_hash_is_stable() -> None:
    """Clients keep their backend across restarts and releases: the hash and
    the assignment of known keys are pinned (changing them reshuffles everyone)."""
    assert sticky_hash(b"alice") == 0x89DA54CE0CECEA4D
    s = splitter([("order-service", 90), ("order-service-v2", 10)], sticky="consumer")
    got = [s.names[s.assign(b"user-%d" % i)] for i in range(30)]
    assert [i for i, name in enumerate(got) if name == "order-service-v2"] == [2, 12, 22, 27]


def test_memo_is_bounded_and_skips_long_keys() -> None:
    s = splitter([("v1", 50), ("v2", 50)], sticky="header:x-user")
    for i in range(split_mod.MEMO_SIZE + 10):
        s.pick([(b"x-user", b"u%d" % i)], b"")
    assert 0 < len(s._memo) <= split_mod.MEMO_SIZE
    s._memo.clear()
    long_key = b"k" * (split_mod.MEMO_MAX_KEY + 1)
    first = s.pick([(b"x-user", long_key)], b"")
    assert s._memo == {}
    assert all(s.pick([(b"x-user", long_key)], b"") == first for _ in range(10))


def test_stats() -> None:
    random.seed(14)
    s = splitter([("v1", 3), ("v2", 1)], canary=[{"cookie": "c", "upstream": "v3"}])
    for _ in range(100):
        s.pick([], b"")
    s.pick([(b"cookie", b"c=1")], b"")
    stats = s.stats()
    assert stats["sticky"] is None
    assert stats["requests"] == 101
    assert [(b["upstream"], b["weight"], b["share"]) for b in stats["backends"]] == [
        ("v1", 3, 0.75),
        ("v2", 1, 0.25),
        ("v3", None, 0.0),
    ]
    assert sum(b["requests"] for b in stats["backends"]) == 101
    assert stats["backends"][2]["requests"] == 1
    assert stats["canary"] == [{"cookie": "c", "value": None, "upstream": "v3", "requests": 1}]


# --- describe ------------------------------------------------------------------------------


def test_describe_split_routes() -> None:
    config = load_config_text(
        """\
upstreams:
  v1: {endpoints: [127.0.0.1:1]}
  v2: {endpoints: [127.0.0.1:2]}
  v3: {endpoints: [127.0.0.1:3]}
routes:
- path: /a/**
  split: [{upstream: v1, weight: 2}, {upstream: v2, weight: 1}, {upstream: v3, weight: 0}]
  sticky: consumer
- path: /b/**
  split: [{upstream: v1, weight: 90}, {upstream: v2, weight: 10}, {upstream: v3, weight: 0}]
  sticky: header:x-user
  canary:
  - {header: x-canary, value: "1", upstream: v3}
  - {cookie: beta, upstream: v2}
""",
        env={},
    )
    lines = describe(config)
    assert lines[1:] == [
        "routes[0] (/a/**): split v1 66.7% (weight 2), v2 33.3% (weight 1), v3 0% (weight 0), "
        "sticky by consumer",
        "routes[0] (/a/**): split: v3 has weight 0 and gets no requests",
        "routes[0] (/a/**): sticky: consumer without auth: every request is sticky by client IP",
        "routes[1] (/b/**): split v1 90% (weight 90), v2 10% (weight 10), v3 0% (weight 0), "
        "sticky by header x-user",
        'routes[1] (/b/**): canary: header x-canary = "1" -> v3',
        "routes[1] (/b/**): canary: cookie beta present -> v2",
        "routes[1] (/b/**): split: v3 has weight 0 and gets only canary matches",
        "failure accrual is on for every upstream (outlier_detection's defaults): an "
        "endpoint is ejected after 5 5xx answers or 3 gateway failures in a row",
    ]
