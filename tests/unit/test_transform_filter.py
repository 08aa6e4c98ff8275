"""meshgate.filters.transform: templates, header/query/path edits, response edits."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from meshgate.config.loader import ConfigError
from meshgate.config.schema import ResponseTransform, TransformConfig
from meshgate.engine.load import load_config_text
from meshgate.filters import FilterRequest, LocalReply
from meshgate.filters.build import FilterServices, compile_filters
from meshgate.filters.transform import (
    ResponseEdits,
    TransformFilter,
    compile_template,
    compile_transform,
)
from meshgate.http.paths import route_params

Headers = list[tuple[bytes, bytes]]


def request(
    target: bytes = b"/orders/7?a=1",
    headers: Headers | None = None,
    *,
    params: dict[str, str] | None = None,
    request_id: bytes = b"rid-1",
    client: bytes = b"10.0.0.9",
) -> FilterRequest:
    return FilterRequest(
        b"GET",
        target,
        list(headers or []),
        client,
        params={"id": "7"} if params is None else params,
        request_id=request_id,
    )


def transform(identity: frozenset[bytes] = frozenset(), **cfg: Any) -> TransformFilter:
    f = compile_transform(
        TransformConfig.model_validate(cfg), "r", params={"id"}, identity=identity
    )
    assert f is not None
    return f


def upstream(req: FilterRequest, identity: frozenset[bytes] = frozenset()) -> Headers:
    """The header lines that go upstream, as the protocol layer builds them."""
    drop = req.drop | identity
    return [h for h in req.headers if h[0] not in drop] + req.add


def render(text: str, req: FilterRequest) -> str | None:
    return compile_template(text, "here").render(req)


# -- templates ----------------------------------------------------------------------


def test_every_template_source() -> None:
    req = request(
        b"/orders/7?q=a%20b&plus=x+y&empty&n=1",
        [(b"x-trace", b"t-1"), (b"x-trace", b"t-2")],
    )
    req.consumer = "alice"
    req.claims = {
        "sub": "u1",
        "org": {"id": "o-9", "tier": {"name": "gold"}, "n": 3},
        "admin": True,
        "score": 1.5,
        "roles": ["a", "b"],
        "https://example.com/tenant": "t9",
        "nothing": None,
    }
    assert render("{path.id}", req) == "7"
    assert render("{query.q}|{query.plus}|{query.empty}", req) == "a b|x y|"
    assert render("{header.x-trace}", req) == "t-1"  # the first line
    assert render("{header.X-Trace}", req) == "t-1"  # names are case-insensitive
    assert render("{claims.sub}", req) == "u1"
    assert render("{claims.org.tier.name}/{claims.org.n}", req) == "gold/3"
    assert render("{claims.admin} {claims.score} {claims.roles}", req) == 'true 1.5 ["a","b"]'
    assert render("{claims.org.tier}", req) == '{"name":"gold"}'
    assert render("{claims.https://example.com/tenant}", req) == "t9"
    assert render("{consumer}:{request_id}:{client_ip}", req) == "alice:rid-1:10.0.0.9"
    assert render("{{literal}} {{{consumer}}}", req) == "{literal} {alice}"
    for missing in (
        "{path.other}",
        "{query.nope}",
        "{header.x-nope}",
        "{claims.org.nope}",
        "{claims.sub.deeper}",
        "{claims.nothing}",
    ):
        assert render("x-" + missing, req) is None, missing


def test_missing_identity_sources() -> None:
    req = request(b"/", params={}, request_id=b"", client=b"")
    for text in ("{consumer}", "{claims.sub}", "{request_id}", "{client_ip}", "{path.id}"):
        assert render(text, req) is None, text
    req.params = None
    assert render("{path.id}", req) is None


def test_constant_template_renders_without_work() -> None:
    t = compile_template("plain {{text}}", "here")
    assert t.constant == "plain {text}"
    assert t.placeholders == ()
    assert t.render(request()) is t.constant
    t = compile_template("{consumer}-{path.id}", "here")
    assert t.constant is None
    assert t.placeholders == ("consumer", "path.id")


def test_header_source_reads_what_goes_upstream() -> None:
    # A client's identity header is never read; the one auth added is.
    t = compile_template("{header.x-consumer}", "here", hidden={b"x-consumer"})
    req = request(headers=[(b"x-consumer", b"spoofed")])
    assert t.render(req) is None
    req.add.append((b"x-consumer", b"alice"))
    assert t.render(req) == "alice"
    # A header a filter dropped is not read either.
    t = compile_template("{header.authorization}", "here")
    req = request(headers=[(b"authorization", b"Bearer x")])
    assert t.render(req) == "Bearer x"
    req.drop.add(b"authorization")
    assert t.render(req) is None


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("{nope}", "{nope}"),
        ("a {query} b", "{query}"),
        ("{query.}", "{query.}"),
        ("{Consumer}", "{Consumer}"),
        ("{env.HOME}", "{env.HOME}"),
        ("{claims.a..b}", "{claims.a..b}"),
        ("{header.bad name}", "{header.bad name}"),
        ("{path.1x}", "{path.1x}"),
        ("{path.other}", "{path.other}"),
        ("{unclosed", "'{' without"),
        ("{a{b}}", "'{' without"),
        ("close}", "'}' without"),
    ],
)
def test_template_errors_name_the_field_and_placeholder(text: str, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_template(text, "r.transform.request.headers.set.x-a", params={"id"})
    msg = str(info.value)
    assert msg.startswith("r.transform.request.headers.set.x-a: "), msg
    assert bad in msg, msg


# -- request headers ----------------------------------------------------------------


def test_header_ops_each() -> None:
    f = transform(
        request={
            "headers": {
                "remove": ["X-Secret"],
                "rename": {"X-Old": "X-New"},
                "set": {"X-Set": "{consumer}"},
                "add": {"X-Add": "v-{path.id}"},
            }
        }
    )
    req = request(
        headers=[
            (b"accept", b"*/*"),
            (b"x-secret", b"s"),
            (b"x-old", b"1"),
            (b"x-set", b"client-1"),
            (b"x-old", b"2"),
            (b"x-set", b"client-2"),
            (b"x-add", b"client"),
        ]
    )
    req.consumer = "alice"
    f(req)
    sent = upstream(req)
    assert sent[0] == (b"accept", b"*/*")
    assert (b"x-secret", b"s") not in sent
    assert [v for n, v in sent if n == b"x-old"] == []
    assert [v for n, v in sent if n == b"x-new"] == [b"1", b"2"]  # all values, in order
    assert [v for n, v in sent if n == b"x-set"] == [b"alice"]  # replaces every value
    assert [v for n, v in sent if n == b"x-add"] == [b"client", b"v-7"]  # one more line


def test_header_ops_apply_in_order_remove_rename_set_add() -> None:
    f = transform(
        request={
            "headers": {
                # Removed before the rename: nothing is left to move.
                "remove": ["x-a"],
                "rename": {"x-a": "x-b", "x-c": "x-d"},
                # Set after the rename: the renamed value is replaced.
                "set": {"x-d": "set"},
                # Added after the set: one more line.
                "add": {"x-d": "added"},
            }
        }
    )
    req = request(headers=[(b"x-a", b"a"), (b"x-b", b"b"), (b"x-c", b"c")])
    f(req)
    sent = upstream(req)
    assert [h for h in sent if h[0] in (b"x-a", b"x-c")] == []
    assert [v for n, v in sent if n == b"x-b"] == [b"b"]  # no x-a to rename: kept
    assert [v for n, v in sent if n == b"x-d"] == [b"set", b"added"]


def test_rename_replaces_the_new_name_and_renames_together() -> None:
    f = transform(request={"headers": {"rename": {"x-a": "x-b", "x-b": "x-a", "x-c": "x-e"}}})
    req = request(headers=[(b"x-a", b"a1"), (b"x-b", b"b1"), (b"x-a", b"a2"), (b"x-e", b"client")])
    f(req)
    sent = upstream(req)
    assert [v for n, v in sent if n == b"x-a"] == [b"b1"]
    assert [v for n, v in sent if n == b"x-b"] == [b"a1", b"a2"]
    # x-c absent: x-e is left as the client sent it.
    assert [v for n, v in sent if n == b"x-e"] == [b"client"]


def test_rename_moves_a_header_auth_added_and_never_a_client_copy() -> None:
    identity = frozenset({b"x-consumer"})
    f = transform(identity, request={"headers": {"rename": {"X-Consumer": "X-User"}}})
    req = request(headers=[(b"x-consumer", b"mallory"), (b"x-user", b"mallory")])
    req.consumer = "alice"
    req.add.append((b"x-consumer", b"alice"))  # as auth does
    f(req)
    sent = upstream(req, identity)
    assert [h for h in sent if h[0] in (b"x-consumer", b"x-user")] == [(b"x-user", b"alice")]
    # Not authenticated: no X-Consumer to move, the client's X-User stays
    # (remove it too to forbid it).
    req = request(headers=[(b"x-consumer", b"mallory")])
    f(req)
    assert upstream(req, identity) == []


def test_set_and_remove_also_drop_the_underscore_spelling() -> None:
    f = transform(request={"headers": {"set": {"x-user": "{consumer}"}, "remove": ["x-role"]}})
    req = request(headers=[(b"x_user", b"mallory"), (b"x_role", b"admin"), (b"x_other", b"1")])
    req.consumer = "alice"
    f(req)
    assert upstream(req) == [(b"x_other", b"1"), (b"x-user", b"alice")]


def test_other_filters_lines_and_drops_are_kept() -> None:
    f = transform(request={"headers": {"set": {"x-b": "1"}}})
    req = request(headers=[(b"authorization", b"k"), (b"x-b", b"client")])
    req.drop.add(b"authorization")
    req.add.append((b"x-forwarded-claim", b"c"))
    f(req)
    assert upstream(req) == [(b"x-forwarded-claim", b"c"), (b"x-b", b"1")]


def test_missing_source_leaves_the_header_out() -> None:
    f = transform(
        request={
            "headers": {
                "set": {"x-user": "{claims.sub}"},
                "add": {"x-tenant": "{claims.tenant}", "x-const": "c"},
            }
        }
    )
    req = request(headers=[(b"x-user", b"spoofed")])
    f(req)
    # `set` leaves the header out entirely, the client's value too.
    assert upstream(req) == [(b"x-const", b"c")]


def test_control_characters_are_refused() -> None:
    f = transform(request={"headers": {"set": {"x-q": "{query.q}"}, "add": {"x-c": "{claims.c}"}}})
    for q, ok in (
        (b"%0D%0AX-Evil:%201", False),
        (b"a%0Ab", False),
        (b"a%00b", False),
        (b"a%7Fb", False),
        (b"a%09b", True),
        (b"caf%C3%A9", True),
    ):
        req = request(b"/?q=" + q, [(b"x-q", b"old")])
        req.claims = {"c": "x\r\ny"}
        f(req)
        sent = upstream(req)
        assert (b"x-c", b"x\r\ny") not in sent
        assert bool(sent) == ok, q
    req = request(b"/?q=caf%C3%A9")
    f(req)
    assert upstream(req) == [(b"x-q", "café".encode())]


def test_constant_control_character_is_a_compile_error() -> None:
    with pytest.raises(ValueError, match=r"r\.transform\.request\.headers\.add\.x-a: .*control"):
        transform(request={"headers": {"add": {"x-a": "a\nb"}}})
    with pytest.raises(ValueError, match=r"r\.transform\.response\.headers\.set\.x-b: .*\{bad\}"):
        transform(response={"headers": {"set": {"x-b": "{bad}"}}})
    with pytest.raises(ValueError, match=r"r\.transform\.request\.query\.add\.q: .*\{path\.x\}"):
        transform(request={"query": {"add": {"q": "{path.x}"}}})


@pytest.mark.parametrize(
    ("side", "ops"),
    [
        ("request", {"set": {"X-Forwarded-For": "1.2.3.4"}}),
        ("request", {"add": {"via": "x"}}),
        ("request", {"remove": ["x-request-id"]}),
        ("request", {"rename": {"x-a": "x-request-id"}}),
        ("response", {"set": {"x-request-id": "x"}}),
        ("response", {"rename": {"via": "x-via"}}),
    ],
)
def test_headers_the_gateway_writes_are_refused(side: str, ops: dict[str, Any]) -> None:
    kind = next(iter(ops))
    with pytest.raises(ValueError, match=rf"r\.transform\.{side}\.headers\.{kind}: .*gateway"):
        TransformFilter(TransformConfig.model_validate({side: {"headers": ops}}), "r")


def test_request_rename_may_read_a_header_the_gateway_writes() -> None:
    f = transform(request={"headers": {"rename": {"x-request-id": "x-trace"}}})
    req = request(headers=[(b"x-request-id", b"abc")])
    f(req)
    assert req.add == [(b"x-trace", b"abc")]
    assert b"x-request-id" in req.drop


# -- query --------------------------------------------------------------------------


def test_query_ops_keep_untouched_bytes_and_order() -> None:
    f = transform(
        request={
            "query": {
                "remove": ["api_key"],
                "rename": {"old": "new name"},
                "set": {"page": "{path.id}"},
                "add": {"who": "{consumer}", "tag": "a b&c=d/é"},
            }
        }
    )
    req = request(b"/o?z=%7e+x&api%5Fkey=s&old=1%2F2&&page=1&page=2&x&api_key=t&b=%41")
    req.consumer = "al ice"
    f(req)
    assert req.target == (
        b"/o?z=%7e+x&new%20name=1%2F2&&page=7&x&b=%41&who=al%20ice&tag=a%20b%26c%3Dd%2F%C3%A9"
    )


def test_query_rename_replaces_the_new_name_and_keeps_place() -> None:
    f = transform(request={"query": {"rename": {"a": "b"}}})
    req = request(b"/p?b=old&x=1&a=1&a&a=3")
    f(req)
    assert req.target == b"/p?x=1&b=1&b&b=3"
    req = request(b"/p?b=old")  # no `a`: nothing moves
    f(req)
    assert req.target == b"/p?b=old"


def test_query_set_appends_when_absent_and_missing_value_removes() -> None:
    f = transform(request={"query": {"set": {"tenant": "{claims.tenant}", "v": "2"}}})
    req = request(b"/p?tenant=spoof&a=1")
    f(req)
    assert req.target == b"/p?a=1&v=2"
    req = request(b"/p?tenant=spoof")
    req.claims = {"tenant": "t 1"}
    f(req)
    assert req.target == b"/p?tenant=t%201&v=2"


def test_query_unchanged_target_is_the_same_object() -> None:
    f = transform(request={"query": {"remove": ["x"], "rename": {"a": "b"}}})
    target = b"/p?y=1&c=%20"
    req = request(target)
    f(req)
    assert req.target is target
    req = request(b"/p")
    f(req)
    assert req.target == b"/p"
    req = request(b"/p?x=1&x=2")
    f(req)
    assert req.target == b"/p"  # an emptied query loses its '?'


def test_query_source_sees_the_target_before_edits() -> None:
    f = transform(
        request={
            "query": {"remove": ["token"]},
            "headers": {"set": {"x-token": "{query.token}"}},
        }
    )
    req = request(b"/p?token=abc")
    f(req)
    assert req.target == b"/p"
    assert upstream(req) == [(b"x-token", b"abc")]


# -- path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "substitution", "target", "expected"),
    [
        (r"^/v1/(\w+)/(\d+)$", r"/api/\2/\1", b"/v1/orders/42?x=1", b"/api/42/orders?x=1"),
        (
            r"^/users/(?P<id>[^/]+)/posts",
            r"/posts/by/\g<id>",
            b"/users/u%201/posts/3",
            b"/posts/by/u%201/3",
        ),
        (r"-", "_", b"/a-b/c-d?q=a-b", b"/a_b/c_d?q=a-b"),  # every match; the query is kept
        (r"^/nomatch", "/x", b"/a?b", b"/a?b"),
        (r"^/strip", "", b"/strip", b"/"),  # a path stays a path
        (r"^/a$", r"\g<0>/b", b"/a", b"/a/b"),
    ],
)
def test_path_rewrite(pattern: str, substitution: str, target: bytes, expected: bytes) -> None:
    f = transform(request={"path": {"pattern": pattern, "substitution": substitution}})
    req = request(target)
    f(req)
    assert req.target == expected


@pytest.mark.parametrize("substitution", ["/a b", "/a?b=1", r"/a\n", r"/\0", "/\u00e9", r"/\x41"])
def test_path_substitution_that_would_break_the_target_is_refused(substitution: str) -> None:
    with pytest.raises(ValueError, match=r"r\.transform\.request\.path\.substitution"):
        transform(request={"path": {"pattern": "^/(a)", "substitution": substitution}})


# -- response edits -----------------------------------------------------------------


def _parts(status: bytes, *pairs: tuple[bytes, bytes]) -> list[bytes]:
    parts = [status]
    for name, value in pairs:
        parts += (name, b": ", value, b"\r\n")
    return parts


def test_response_edits_on_pairs_and_parts() -> None:
    f = transform(
        response={
            "headers": {
                "remove": ["server"],
                "rename": {"x-upstream-id": "x-id"},
                "set": {"cache-control": "no-store"},
                "add": {"x-served-for": "{consumer}"},
            },
            "status": {404: 410},
        }
    )
    req = request()
    req.consumer = "alice"
    f(req)
    edits = req.response_edits
    assert isinstance(edits, ResponseEdits)
    pairs = [
        (b"content-type", b"application/json"),
        (b"server", b"nginx"),
        (b"x-upstream-id", b"1"),
        (b"cache-control", b"max-age=60"),
        (b"x-upstream-id", b"2"),
        (b"content-length", b"2"),
    ]
    expected = [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"x-id", b"1"),
        (b"x-id", b"2"),
        (b"cache-control", b"no-store"),
        (b"x-served-for", b"alice"),
    ]
    assert edits.apply_pairs(pairs) == expected
    assert edits.apply_parts(_parts(b"HTTP/1.1 200 OK\r\n", *pairs)) == _parts(
        b"HTTP/1.1 200 OK\r\n", *expected
    )
    assert edits.status(404) == 410
    assert edits.status(200) == 200


def test_response_edits_are_shared_unless_a_value_needs_the_request() -> None:
    static = transform(response={"headers": {"set": {"x-a": "1"}}, "status": {500: 502}})
    first, second = request(), request()
    static(first)
    static(second)
    assert first.response_edits is second.response_edits is static.response
    dynamic = transform(response={"headers": {"set": {"x-a": "{request_id}"}}})
    first, second = request(request_id=b"one"), request(request_id=b"two")
    dynamic(first)
    dynamic(second)
    assert first.response_edits is not second.response_edits
    assert first.response_edits.apply_pairs([(b"x-a", b"up")]) == [(b"x-a", b"one")]
    assert second.response_edits.apply_pairs([]) == [(b"x-a", b"two")]
    # A missing value leaves the header out, the upstream's too.
    third = request(request_id=b"")
    dynamic(third)
    assert third.response_edits.apply_pairs([(b"x-a", b"up"), (b"b", b"1")]) == [(b"b", b"1")]


def test_response_status_only_and_no_op_edits() -> None:
    f = transform(response={"status": {"404": 410}})
    req = request()
    f(req)
    edits = req.response_edits
    assert edits.status(404) == 410
    parts = _parts(b"HTTP/1.1 404 Not Found\r\n", (b"a", b"1"))
    assert edits.apply_parts(parts) is parts
    pairs = [(b"a", b"1")]
    assert edits.apply_pairs(pairs) is pairs
    assert ResponseEdits(add=[(b"x", b"1")]).apply_parts([b"S"]) == [
        b"S",
        b"x",
        b": ",
        b"1",
        b"\r\n",
    ]
    assert ResponseEdits().status(503) == 503


@pytest.mark.parametrize(("old", "new"), [(200, 204), (204, 200), (404, 304)])
def test_status_map_may_not_change_whether_there_is_a_body(old: int, new: int) -> None:
    # The schema refuses it; the filter does too, for a config built without it.
    with pytest.raises(ValueError, match=f"{old} -> {new}"):
        TransformConfig.model_validate({"response": {"status": {old: new}}})
    cfg = TransformConfig.model_construct(
        response=ResponseTransform.model_construct(headers=None, status={old: new}, body=None),
        request=None,
    )
    with pytest.raises(ValueError, match=rf"r\.transform\.response\.status: {old} -> {new}"):
        TransformFilter(cfg, "r")


def test_nothing_to_do_compiles_to_no_filter() -> None:
    empty = TransformConfig.model_validate(
        {"request": {"headers": {}, "query": {}}, "response": {"headers": {}}}
    )
    assert compile_transform(empty, "r") is None
    assert compile_transform(None, "r") is None
    body_only = TransformConfig.model_validate({"response": {"body": {"drop_nulls": True}}})
    assert compile_transform(body_only, "r") is None


def test_route_params() -> None:
    assert route_params("/users/{uid}/posts/{pid}/**") == {"uid", "pid"}
    assert route_params("/plain/*") == frozenset()


# -- in a route's chain -------------------------------------------------------------

KEY = "s3cret"
CONFIG = f"""
upstreams: {{u: {{endpoints: ['127.0.0.1:9']}}}}
auth: {{keys: {{type: api_key}}}}
consumers: {{alice: {{api_keys: ['sha256:{hashlib.sha256(KEY.encode()).hexdigest()}']}}}}
routes:
- path: /orders/{{id}}
  upstream: u
  auth: keys
  rate_limit: 10/s
  fault: {{abort: {{percent: 0, status: 503}}}}
  cors: {{origins: ['*']}}
  deprecation: {{since: 2025-01-01}}
  transform:
    request:
      headers:
        rename: {{X-Consumer: X-User}}
        set: {{X-Order: '{{path.id}}'}}
      query: {{add: {{by: '{{consumer}}'}}}}
    response: {{headers: {{add: {{x-for: '{{consumer}}'}}}}}}
- path: /status
  upstream: u
  transform: {{response: {{status: {{'404': 410}}}}}}
- path: /body
  upstream: u
  transform: {{response: {{body: {{drop_nulls: true}}}}}}
"""


def test_transform_runs_last_in_the_chain() -> None:
    config = load_config_text(CONFIG, "test.yaml")
    out = compile_filters(
        config, FilterServices(), ["orders", "status", "body"], base_dir=Path(".")
    )
    chain = out.chains[0]
    assert chain is not None
    assert chain.names == ("cors", "auth", "deprecation", "fault", "rate_limit", "transform")
    status = out.chains[1]
    assert status is not None and status.names == ("transform",)
    assert out.chains[2] is None  # a body mapping only: nothing for the filter to do

    req = request(
        b"/orders/7",
        [(b"x-api-key", KEY.encode()), (b"x-consumer", b"mallory"), (b"x-user", b"mallory")],
        params={"id": "7"},
    )
    result = chain.run(req)
    assert not isinstance(result, LocalReply) and result is None
    sent = upstream(req, out.identity_headers)
    assert (b"x-user", b"alice") in sent
    assert [h for h in sent if h[0] in (b"x-consumer", b"x-api-key")] == []
    assert [v for n, v in sent if n == b"x-user"] == [b"alice"]
    assert (b"x-order", b"7") in sent
    assert req.target == b"/orders/7?by=alice"
    assert req.response_edits.apply_pairs([]) == [(b"x-for", b"alice")]

    req = request(b"/status")
    assert status.run(req) is None
    assert req.response_edits.status(404) == 410


def test_a_bad_template_is_refused_at_load_naming_its_line() -> None:
    text = CONFIG.replace("'{path.id}'", "'{path.nope}'")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "test.yaml")
    (problem,) = info.value.problems
    assert problem.field == "routes[0].transform.request.headers.set.X-Order", problem
    assert (
        problem.line
        == text.splitlines().index(
            next(line for line in text.splitlines() if "{path.nope}" in line)
        )
        + 1
    )
    assert "{path.nope}" in problem.message, problem
