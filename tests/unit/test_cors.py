"""meshgate.filters.cors: origin matching, config refusals, preflights, header bytes."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from meshgate.config.describe import describe
from meshgate.config.loader import ConfigError
from meshgate.config.schema import Config, CorsConfig
from meshgate.engine.load import load_config_text
from meshgate.filters import FilterRequest, LocalReply
from meshgate.filters.build import FilterServices, compile_filters
from meshgate.filters.cors import REFUSED_KIND, CorsFilter

ORIGIN = b"https://app.example.com"


def cors(**cfg: Any) -> CorsFilter:
    cfg.setdefault("origins", ["https://app.example.com"])
    return CorsFilter(CorsConfig.model_validate(cfg))


def request(method: bytes = b"GET", *headers: tuple[bytes, bytes]) -> FilterRequest:
    return FilterRequest(method, b"/", list(headers), b"127.0.0.1")


def preflight(
    origin: bytes = ORIGIN, method: bytes = b"GET", headers: bytes | None = None
) -> FilterRequest:
    lines = [(b"origin", origin), (b"access-control-request-method", method)]
    if headers is not None:
        lines.append((b"access-control-request-headers", headers))
    return request(b"OPTIONS", *lines)


def reply_headers(reply: LocalReply) -> dict[bytes, bytes]:
    out = dict(reply.headers)
    assert len(out) == len(reply.headers), f"a header twice: {reply.headers}"
    return out


# -- origin matching ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("origins", "origin", "allowed"),
    [
        (["https://app.example.com"], b"https://app.example.com", True),
        (["https://app.example.com"], b"https://APP.example.com", True),
        (["https://app.example.com"], b"http://app.example.com", False),
        (["https://app.example.com"], b"https://app.example.com:8443", False),
        (["https://app.example.com"], b"https://app.example.com.evil.com", False),
        (["https://app.example.com:443"], b"https://app.example.com", True),  # default port
        (["http://localhost:3000"], b"http://localhost:3000", True),
        (["http://localhost:3000"], b"http://localhost:3001", False),
        (["*"], b"https://anything.test", True),
        (["*"], b"null", True),
        (["https://*.example.com"], b"https://a.example.com", True),
        (["https://*.example.com"], b"https://a-b1.example.com", True),
        (["https://*.example.com"], b"https://example.com", False),
        (["https://*.example.com"], b"https://.example.com", False),
        (["https://*.example.com"], b"https://a.b.example.com", False),
        (["https://*.example.com"], b"http://a.example.com", False),
        (["https://*.example.com"], b"https://a.example.com:8443", False),
        (["https://*.example.com"], b"https://a.example.com.evil.com", False),
        (["https://*.example.com"], b"https://aexample.com", False),
        (["https://*.example.com:8443"], b"https://a.example.com:8443", True),
        (["https://*.example.com:8443"], b"https://a.example.com", False),
        (["https://*.a.com", "https://x.b.com"], b"https://x.b.com", True),
        (["https://*.a.com", "https://*.b.com"], b"https://y.b.com", True),
        (["https://*.a.com", "https://x.b.com"], b"https://y.b.com", False),
    ],
)
def test_origin_matching(origins: list[str], origin: bytes, allowed: bool) -> None:
    assert cors(origins=origins).allows_origin(origin) is allowed


# -- config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"origins": ["*"], "credentials": True}, "credentials"),
        ({"origins": ["https://a.com"], "headers": ["*"], "credentials": True}, "credentials"),
        (
            {"origins": ["https://a.com"], "expose_headers": ["*"], "credentials": True},
            "credentials",
        ),
        ({"origins": ["https://a.com/"]}, "no path"),
        ({"origins": ["https://a.com/app"]}, "no path"),
        ({"origins": ["a.com"]}, "expected an origin"),
        ({"origins": ["https://a.*.com"]}, "expected an origin"),
        ({"origins": ["https://*"]}, "expected an origin"),
        ({"origins": ["https://**.a.com"]}, "expected an origin"),
        ({"origins": ["https://a.com:99999"]}, "port"),
        ({"origins": ["https://a.com?x=1"]}, "expected an origin"),
        ({"origins": []}, "at least 1"),
        ({"origins": ["*"], "methods": ["GE T"]}, "method"),
        ({"origins": ["*"], "headers": ["x y"]}, "not a header name"),
        ({"origins": ["*"], "max_age": "0s"}, "greater than zero"),
    ],
)
def test_config_refusals(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CorsConfig.model_validate(cfg)


def test_config_normalises() -> None:
    c = CorsConfig.model_validate(
        {
            "origins": ["HTTPS://App.Example.com:443", "https://app.example.com"],
            "methods": ["get", "PATCH"],
            "headers": ["X-Trace", "x-trace"],
        }
    )
    assert c.origins == ["https://app.example.com"]
    assert c.methods == ["GET", "PATCH"]
    assert c.headers == ["x-trace"]


def _load(text: str) -> Config:
    return load_config_text("upstreams: {u: {endpoints: ['127.0.0.1:9']}}\n" + text)


def test_route_cors_wins_over_top_level_and_false_turns_it_off() -> None:
    config = _load(
        "cors: {origins: ['https://top.example.com']}\n"
        "routes:\n"
        "- {path: /a, upstream: u}\n"
        "- {path: /b, upstream: u, cors: {origins: ['https://own.example.com']}}\n"
        "- {path: /c, upstream: u, cors: false}\n"
    )
    own = [config.route_cors(r) for r in config.routes]
    assert own[0] is not None and own[0].origins == ["https://top.example.com"]
    assert own[1] is not None and own[1].origins == ["https://own.example.com"]
    assert own[2] is None
    compiled = compile_filters(
        config, FilterServices(), ["a", "b", "c"], base_dir=pathlib.Path(".")
    )
    assert [label for label, _ in compiled.cors_filters] == ["a", "b"]
    assert compiled.chains[2] is None


@pytest.mark.parametrize("value", ["true", "0", "yes"])
def test_route_cors_must_be_a_block_or_false(value: str) -> None:
    with pytest.raises(ConfigError, match="cors"):
        _load(f"routes: [{{path: /a, upstream: u, cors: {value}}}]\n")


def test_credentials_with_any_origin_is_a_config_error_with_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        _load("routes:\n- path: /a\n  upstream: u\n  cors: {origins: ['*'], credentials: true}\n")
    assert "credentials" in str(info.value)
    assert ":5" in str(info.value) or "line 5" in str(info.value), str(info.value)


def test_cors_runs_first_in_the_chain() -> None:
    config = _load(
        "auth: {keys: {type: api_key}}\n"
        "routes:\n"
        "- path: /a\n"
        "  upstream: u\n"
        "  auth: keys\n"
        "  rate_limit: 10/s\n"
        "  fault: {abort: {percent: 0, status: 503}}\n"
        "  cors: {origins: ['*']}\n"
    )
    compiled = compile_filters(config, FilterServices(), ["a"], base_dir=pathlib.Path("."))
    chain = compiled.chains[0]
    assert chain is not None
    assert chain.names == ("cors", "auth", "fault", "rate_limit")


def test_describe_names_each_cors_route() -> None:
    config = _load(
        "cors: {origins: ['*']}\n"
        "routes:\n"
        "- {path: /a, upstream: u}\n"
        "- {path: /b, upstream: u, cors: false}\n"
        "- path: /c\n"
        "  upstream: u\n"
        "  methods: [GET]\n"
        "  cors: {origins: ['https://*.example.com'], credentials: true, max_age: 10m}\n"
    )
    lines = [line for line in describe(config) if "CORS" in line]
    assert lines == [
        "routes[0] (/a): CORS for any origin (GET, HEAD, POST; from the top-level cors:)",
        "routes[2] (/c): CORS for https://*.example.com (GET, HEAD, POST; credentials; "
        "max age 600s)",
        "routes[2] (/c): methods has no OPTIONS, so CORS preflights do not match this route",
    ]


# -- preflights --------------------------------------------------------------------


def test_preflight_allowed() -> None:
    f = cors(methods=["GET", "PUT"], headers=["x-trace", "content-type"], max_age="10m")
    reply = f(preflight(method=b"PUT", headers=b"Content-Type, x-trace"))
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.kind) == (204, "")
    assert reply_headers(reply) == {
        b"access-control-allow-origin": ORIGIN,
        b"access-control-allow-methods": b"GET, PUT",
        b"access-control-allow-headers": b"content-type, x-trace",
        b"access-control-max-age": b"600",
        b"vary": b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }


def test_preflight_allows_only_what_was_asked_and_echoes_with_credentials() -> None:
    f = cors(headers=["x-a", "x-b"], credentials=True)
    reply = f(preflight(headers=b"x-b"))
    assert isinstance(reply, LocalReply) and reply.status == 204
    h = reply_headers(reply)
    assert h[b"access-control-allow-origin"] == ORIGIN
    assert h[b"access-control-allow-credentials"] == b"true"
    assert h[b"access-control-allow-headers"] == b"x-b"
    assert b"access-control-max-age" not in h
    no_headers = f(preflight())
    assert isinstance(no_headers, LocalReply)
    assert b"access-control-allow-headers" not in reply_headers(no_headers)


def test_preflight_any_origin_and_any_header() -> None:
    f = cors(origins=["*"], headers=["*"])
    reply = f(preflight(origin=b"https://elsewhere.test", headers=b"x-anything, authorization"))
    assert isinstance(reply, LocalReply) and reply.status == 204
    h = reply_headers(reply)
    assert h[b"access-control-allow-origin"] == b"*"
    assert h[b"access-control-allow-headers"] == b"x-anything, authorization"
    assert b"access-control-allow-credentials" not in h


def test_preflight_headers_over_several_lines() -> None:
    f = cors(headers=["x-a", "x-b"])
    req = preflight(headers=b"x-a")
    req.headers.append((b"access-control-request-headers", b"x-b, x-a"))
    reply = f(req)
    assert isinstance(reply, LocalReply) and reply.status == 204
    assert reply_headers(reply)[b"access-control-allow-headers"] == b"x-a, x-b"


@pytest.mark.parametrize(
    ("req", "detail"),
    [
        (preflight(origin=b"https://evil.example.net"), "origin"),
        (preflight(origin=b"https://a.b.example.com"), "origin"),
        (preflight(method=b"DELETE"), "method DELETE"),
        (preflight(method=b"get"), "method get"),
        (preflight(headers=b"x-trace, x-secret"), "header x-secret"),
        (preflight(headers=b"x trace"), "not a list of header names"),
    ],
)
def test_preflight_refused(req: FilterRequest, detail: str) -> None:
    f = cors(origins=["https://app.example.com", "https://*.example.com"], headers=["x-trace"])
    reply = f(req)
    assert isinstance(reply, LocalReply)
    assert (reply.status, reply.kind) == (403, REFUSED_KIND)
    assert detail in reply.detail
    assert not any(name.startswith(b"access-control-") for name, _ in reply.headers)
    assert req.response_extra == b""


def test_options_without_request_method_is_not_a_preflight() -> None:
    f = cors()
    req = request(b"OPTIONS", (b"origin", ORIGIN))
    assert f(req) is None
    assert req.response_extra.startswith(b"access-control-allow-origin: ")


# -- actual requests: the response header bytes ------------------------------------


def test_actual_request_allowed_origin() -> None:
    f = cors(expose_headers=["X-Total", "etag"])
    req = request(b"GET", (b"origin", ORIGIN))
    assert f(req) is None
    assert req.response_extra == (
        b"access-control-allow-origin: https://app.example.com\r\n"
        b"access-control-expose-headers: x-total, etag\r\n"
        b"vary: Origin\r\n"
    )


def test_actual_request_with_credentials_echoes_the_origin() -> None:
    f = cors(origins=["https://*.example.com"], credentials=True)
    req = request(b"POST", (b"origin", b"https://a.example.com"))
    assert f(req) is None
    assert req.response_extra == (
        b"access-control-allow-origin: https://a.example.com\r\n"
        b"access-control-allow-credentials: true\r\n"
        b"vary: Origin\r\n"
    )


def test_actual_request_any_origin_sends_a_star() -> None:
    req = request(b"GET", (b"origin", b"https://x.test"))
    assert cors(origins=["*"])(req) is None
    assert req.response_extra == b"access-control-allow-origin: *\r\nvary: Origin\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"origin", b"https://evil.test")],
        [],
        [(b"origin", ORIGIN), (b"origin", ORIGIN)],  # two lines: not a browser
    ],
)
def test_actual_request_without_an_allowed_origin_gets_only_vary(
    headers: list[tuple[bytes, bytes]],
) -> None:
    req = request(b"GET", *headers)
    assert cors()(req) is None  # it still goes upstream
    assert req.response_extra == b"vary: Origin\r\n"


def test_response_extra_is_appended_to() -> None:
    req = request(b"GET", (b"origin", ORIGIN))
    req.response_extra = b"x-before: 1\r\n"
    cors()(req)
    assert req.response_extra.startswith(b"x-before: 1\r\naccess-control-allow-origin: ")
