"""SPIFFE IDs: the only shape the mesh issues, parsed strictly."""

from __future__ import annotations

import dataclasses

import pytest

from meshgate.mesh.identity import MAX_ID_LENGTH, TRUST_DOMAIN_RE, SpiffeId


def test_format_and_parse_round_trip() -> None:
    sid = SpiffeId("td.test", "default", "orders")
    assert sid.uri == "spiffe://td.test/ns/default/sa/orders"
    assert str(sid) == sid.uri
    assert SpiffeId.parse(sid.uri) == sid


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://mesh.local/ns/prod/sa/orders",
        "spiffe://a/ns/b/sa/c",
        "spiffe://my-td_1.example/ns/Kube-System/sa/svc.v2_beta",
        "spiffe://td/ns/.hidden/sa/x..y",
    ],
)
def test_parse_accepts(uri: str) -> None:
    assert SpiffeId.parse(uri).uri == uri


def test_parse_gives_fields() -> None:
    sid = SpiffeId.parse("spiffe://td.test/ns/prod/sa/payments")
    assert (sid.trust_domain, sid.namespace, sid.service) == ("td.test", "prod", "payments")


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://td/ns/a/sa/b", "scheme"),
        ("SPIFFE://td/ns/a/sa/b", "scheme"),
        ("spiffe:/td/ns/a/sa/b", "scheme"),
        ("td/ns/a/sa/b", "scheme"),
        ("", "scheme"),
        ("spiffe://", "empty"),
        ("spiffe:///ns/a/sa/b", "empty"),
        ("spiffe://TD/ns/a/sa/b", "trust domain"),
        ("spiffe://td!/ns/a/sa/b", "trust domain"),
        ("spiffe://-td/ns/a/sa/b", "trust domain"),
        ("spiffe://td./ns/a/sa/b", "trust domain"),
        ("spiffe://t%64/ns/a/sa/b", "trust domain"),
        ("spiffe://td:8443/ns/a/sa/b", "port"),
        ("spiffe://user@td/ns/a/sa/b", "userinfo"),
        ("spiffe://td/ns/a/sa/b?x=1", "query"),
        ("spiffe://td/ns/a/sa/b#frag", "fragment"),
        ("spiffe://td", "not a workload"),
        ("spiffe://td/", "not /ns/"),
        ("spiffe://td/ns/a", "not /ns/"),
        ("spiffe://td/ns/a/sa", "not /ns/"),
        ("spiffe://td/ns/a/sa/b/", "not /ns/"),
        ("spiffe://td/ns/a/sa/b/c", "not /ns/"),
        ("spiffe://td/ns/a/svc/b", "not /ns/"),
        ("spiffe://td/namespace/a/sa/b", "not /ns/"),
        ("spiffe://td//ns/a/sa/b", "not /ns/"),
        ("spiffe://td/ns//sa/b", "namespace segment is empty"),
        ("spiffe://td/ns/a/sa/", "service segment is empty"),
        ("spiffe://td/ns/../sa/b", "relative"),
        ("spiffe://td/ns/./sa/b", "relative"),
        ("spiffe://td/ns/a/sa/..", "relative"),
        ("spiffe://td/ns/a b/sa/c", "character"),
        ("spiffe://td/ns/a/sa/c%2F", "character"),
        ("spiffe://td/ns/a/sa/caf\u00e9", "character"),
        ("spiffe://td/ns/a/sa/*", "character"),
        ("spiffe://td/ns/a/sa/b\n", "character"),
    ],
)
def test_parse_refuses_with_reason(uri: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        SpiffeId.parse(uri)


def test_parse_refuses_overlong() -> None:
    uri = "spiffe://td/ns/a/sa/" + "x" * MAX_ID_LENGTH
    with pytest.raises(ValueError, match="at most 2048"):
        SpiffeId.parse(uri)
    at_limit = "spiffe://td/ns/a/sa/" + "x" * (MAX_ID_LENGTH - len("spiffe://td/ns/a/sa/"))
    assert len(SpiffeId.parse(at_limit).uri) == MAX_ID_LENGTH


def test_constructor_checks_too() -> None:
    with pytest.raises(ValueError, match="trust domain"):
        SpiffeId("Bad", "a", "b")
    with pytest.raises(ValueError, match="namespace"):
        SpiffeId("td", "a/b", "c")
    with pytest.raises(ValueError, match="service segment is empty"):
        SpiffeId("td", "a", "")


def test_frozen_and_hashable() -> None:
    sid = SpiffeId("td", "a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.service = "c"  # type: ignore[misc]
    assert {sid, SpiffeId.parse("spiffe://td/ns/a/sa/b")} == {sid}


def test_trust_domain_re_matches_config_syntax() -> None:
    assert TRUST_DOMAIN_RE.fullmatch("mesh.local")
    assert TRUST_DOMAIN_RE.fullmatch("a")
    assert TRUST_DOMAIN_RE.fullmatch("a_b-c.d9")
    assert not TRUST_DOMAIN_RE.fullmatch("a" * 256)
    assert TRUST_DOMAIN_RE.fullmatch("a" * 255)
    assert not TRUST_DOMAIN_RE.fullmatch("_a")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("spiffe://td/ns/prod/sa/orders", True),
        ("spiffe://td/ns/prod/*", True),
        ("spiffe://td/*", True),
        ("spiffe://td/ns/prod/sa/*", True),
        ("*", True),
        ("spiffe://td/ns/prod/sa/orders*", True),
        ("spiffe://td/ns/prod/sa/order", False),
        ("spiffe://td/ns/prod/sa/orders/", False),
        ("spiffe://td/ns/staging/*", False),
        ("spiffe://other/*", False),
        ("spiffe://td/ns/*/sa/orders", False),  # '*' only at the end
        ("spiffe://td/ns/prod/sa/ORDERS", False),
        ("", False),
    ],
)
def test_matches(pattern: str, expected: bool) -> None:
    assert SpiffeId.parse("spiffe://td/ns/prod/sa/orders").matches(pattern) is expected


def test_prefix_pattern_is_textual() -> None:
    # A pattern ending in '/*' stops at a segment boundary; one without the
    # slash is a plain prefix, as documented.
    sid = SpiffeId.parse("spiffe://td/ns/production/sa/x")
    assert not sid.matches("spiffe://td/ns/prod/*")
    assert sid.matches("spiffe://td/ns/prod*")


def test_control_addresses_one_parser_for_every_proxy() -> None:
    from meshgate.mesh.wire import control_addresses

    assert control_addresses("https://cp.example:15012/, 10.0.0.2:15012,[::1]:1") == [
        ("cp.example", 15012),
        ("10.0.0.2", 15012),
        ("::1", 1),
    ]
    assert control_addresses(":15012") == [("127.0.0.1", 15012)]
    with pytest.raises(ValueError, match="expected host:port"):
        control_addresses("cp.example")
