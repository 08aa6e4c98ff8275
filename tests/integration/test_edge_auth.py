"""Edge authentication through the real gateway: JWT (a JWKS served over
HTTP, a PEM public key file, an HMAC secret) and API keys, against a real
recording upstream.

Every refusal is checked the same way (`assert_refused`): its status, its
`WWW-Authenticate` challenges, an application/problem+json body that never
echoes the credential, and an upstream that received not one byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from support.client import CurlResponse, RawConnection, RawResponse, assert_problem, fetch
from support.jwks import JwksServer
from support.proxy import ProxyProcess, Stack, meshgate_cmd, run_meshgate, upstream_block
from support.upstream import RecordedRequest, UpstreamServer

pytestmark = pytest.mark.engine

# ---------------------------------------------------------------------------
# keys, consumers and tokens

RSA_JWKS = rsa.generate_private_key(public_exponent=65537, key_size=2048)
"""Published in the JWKS of the `idp` entry (kid "k1")."""
RSA_PEM = rsa.generate_private_key(public_exponent=65537, key_size=2048)
"""Its public half is the `pem` entry's public_key_file."""
RSA_NEW = rsa.generate_private_key(public_exponent=65537, key_size=2048)
"""Rotated into the `rotating` entry's JWKS after the gateway started."""
RSA_ROGUE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
"""Never published anywhere."""
HS_SECRET = "edge-auth-test-secret-0123456789abcdef"

ISSUER = "https://idp.meshgate.test"
AUDIENCE = "meshgate-edge"

KEY_ALICE = "mg_alice_" + "a1" * 16
KEY_BOB = "mg_bob_" + "b2" * 16
KEY_UNKNOWN = "mg_mallory_" + "c3" * 16


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_json(obj: Any) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


def unb64u_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def pem_of(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def public_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    d = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return {**d, "kid": kid, "use": "sig", "alg": "RS256"}


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice-sub",
        "iat": now,
        "exp": now + 600,
        "jti": secrets.token_hex(8),  # every token differs (no verifier cache hit)
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def rs256(private: Any = RSA_JWKS, kid: str | None = "k1", **extra: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**extra), private, algorithm="RS256", headers=headers)


def hs256(secret: str | bytes = HS_SECRET, **extra: Any) -> str:
    return jwt.encode(claims(**extra), secret, algorithm="HS256")


def crafted(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token put together by hand: `b64u(header).b64u(payload).b64u(signature)`."""
    return f"{b64u_json(header)}.{b64u_json(payload)}.{b64u(signature)}"


def hmac_signed(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64u_json(header)}.{b64u_json(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64u(mac)}"


def bearer(token: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {token}")


# ---------------------------------------------------------------------------
# a JWKS endpoint


# ---------------------------------------------------------------------------
# one gateway for the module


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def idp() -> Iterator[JwksServer]:
    server = JwksServer([public_jwk(RSA_JWKS, "k1")])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def throttle_idp() -> Iterator[JwksServer]:
    server = JwksServer([public_jwk(RSA_JWKS, "t1")])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rotate_idp() -> Iterator[JwksServer]:
    server = JwksServer([public_jwk(RSA_JWKS, "r1")])
    yield server
    server.stop()


def _config(
    up: UpstreamServer, idp: str, throttle: str, rotate: str, pem_file: Path
) -> dict[str, Any]:
    jwt_common = {"issuer": ISSUER, "audience": AUDIENCE}
    route = [
        ("/jwt/**", "idp"),
        ("/pem/**", "pem"),
        ("/hs/**", "hs"),
        ("/scoped/**", {"use": ["idp"], "scopes": ["orders:write"]}),
        ("/claims/**", {"use": ["idp"], "required_claims": ["department"]}),
        ("/throttled/**", "throttled"),
        ("/rotating/**", "rotating"),
        ("/keys/**", "keys"),
        ("/keys-query/**", "keys_q"),
        ("/any/**", ["idp", "keys"]),
        ("/any-query/**", ["idp", "keys_q"]),
        ("/open/**", None),
    ]
    return {
        "upstreams": {"up": upstream_block(up)},
        "auth": {
            "idp": {
                "type": "jwt",
                "jwks_url": idp,
                "jwks_refetch_interval": "60s",
                **jwt_common,
                "forward_claims": {"email": "X-User-Email", "tenant": "X-Tenant"},
                "strip_authorization": True,
            },
            "pem": {"type": "jwt", "public_key_file": str(pem_file), **jwt_common},
            "hs": {"type": "jwt", "secret": HS_SECRET, **jwt_common},
            "throttled": {
                "type": "jwt",
                "jwks_url": throttle,
                "jwks_refetch_interval": "60s",
                **jwt_common,
            },
            "rotating": {
                "type": "jwt",
                "jwks_url": rotate,
                "jwks_refetch_interval": "60s",
                **jwt_common,
            },
            "keys": {"type": "api_key"},
            "keys_q": {"type": "api_key", "query": "api_key"},
        },
        "consumers": {
            "alice": {"api_keys": [digest(KEY_ALICE)], "jwt_subjects": ["alice-sub"]},
            "bob": {"api_keys": [digest(KEY_BOB)]},
        },
        "routes": [
            {"path": path, "upstream": "up", **({"auth": auth} if auth is not None else {})}
            for path, auth in route
        ],
    }


@pytest.fixture(scope="module")
def proxy(
    module_stack: Stack,
    up: UpstreamServer,
    idp: JwksServer,
    throttle_idp: JwksServer,
    rotate_idp: JwksServer,
) -> ProxyProcess:
    pem_file = module_stack.directory / "pem-entry-public.pem"
    pem_file.write_bytes(pem_of(RSA_PEM))
    config = _config(up, idp.url, throttle_idp.url, rotate_idp.url, pem_file)
    return module_stack.proxy(config)


@pytest.fixture(autouse=True)
def _clear(up: UpstreamServer) -> None:
    up.clear()


# ---------------------------------------------------------------------------
# assertions


Response = CurlResponse | RawResponse


def one(up: UpstreamServer) -> RecordedRequest:
    requests = up.wait_for_requests(1)
    assert len(requests) == 1, [(r.method, r.target) for r in requests]
    return requests[0]


def challenge(value: str) -> tuple[str, dict[str, str]]:
    """`Scheme k="v", k2="v2"` -> ("Scheme", {k: v, k2: v2})."""
    scheme, _, rest = value.partition(" ")
    params = dict(re.findall(r'([A-Za-z_]+)="([^"]*)"', rest))
    return scheme, params


def assert_admitted(resp: CurlResponse, up: UpstreamServer) -> RecordedRequest:
    assert resp.status == 200, resp.describe()
    return one(up)


def assert_refused(
    resp: Response,
    up: UpstreamServer,
    status: int,
    *,
    scheme: str | None = "Bearer",
    error: str | None = "invalid_token",
    hidden: tuple[str, ...] = (),
) -> tuple[dict[str, Any], list[str]]:
    """The refusal: status, problem+json body, the first `WWW-Authenticate`
    (`scheme` with `error`; no `error` at all when `error` is None), no
    credential echoed anywhere, and nothing at all sent upstream."""
    doc = assert_problem(resp, status)
    values = resp.header_all("www-authenticate")
    if scheme is not None:
        assert values, f"no WWW-Authenticate on {resp!r}"
        got_scheme, params = challenge(values[0])
        assert got_scheme == scheme, values
        assert params.get("realm") == "meshgate", values
        if error is None:
            assert "error" not in params, values
        else:
            assert params.get("error") == error, values
            assert params.get("error_description"), values
    text = resp.body.decode("latin-1") + "\n".join(f"{k}: {v}" for k, v in resp.headers)
    for secret in hidden:
        assert secret not in text, f"the response echoes a credential: {text}"
    assert up.requests == [], [(r.method, r.target) for r in up.requests]
    assert up.bytes_received == 0
    return doc, values


def description(values: list[str]) -> str:
    return challenge(values[0])[1]["error_description"]


# ---------------------------------------------------------------------------
# JWT: tokens that are admitted


def test_jwks_token_admitted_with_consumer_forwarded_claims_and_authorization_stripped(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    tok = rs256(email="alice@example.com", tenant=42)
    rec = assert_admitted(fetch(proxy.url("/jwt/orders?x=1"), *bearer(tok)), up)
    assert rec.target == "/jwt/orders?x=1"
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.header_all("x-user-email") == ["alice@example.com"]
    assert rec.header_all("x-tenant") == ["42"]
    assert rec.header_all("authorization") == []  # strip_authorization: true
    assert tok not in rec.raw_head.decode("latin-1")


def test_jwks_token_with_an_unmapped_subject_has_no_consumer(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    rec = assert_admitted(fetch(proxy.url("/jwt/x"), *bearer(rs256(sub="stranger"))), up)
    assert rec.header_all("x-consumer") == []
    assert rec.header_all("x-user-email") == []  # the claim is absent


def test_pem_file_token_admitted_and_authorization_kept(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    tok = rs256(RSA_PEM, kid=None)
    rec = assert_admitted(fetch(proxy.url("/pem/x"), *bearer(tok)), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.header_all("authorization") == [f"Bearer {tok}"]  # strip_authorization: false


def test_hs256_secret_token_admitted_and_authorization_kept(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    tok = hs256()
    rec = assert_admitted(fetch(proxy.url("/hs/x"), *bearer(tok)), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.header_all("authorization") == [f"Bearer {tok}"]


# ---------------------------------------------------------------------------
# JWT: attacks


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("route", ["/jwt/x", "/pem/x", "/hs/x"])
@pytest.mark.parametrize("kid", [None, "k1"])
def test_alg_none_refused(
    proxy: ProxyProcess, up: UpstreamServer, alg: str, route: str, kid: str | None
) -> None:
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    tok = crafted(header, claims())
    resp = fetch(proxy.url(route), *bearer(tok))
    assert_refused(resp, up, 401, hidden=(tok,))


@pytest.mark.parametrize("route", ["/jwt/x", "/pem/x"])
@pytest.mark.parametrize("kid", [None, "k1"])
def test_hs256_signed_with_the_rsa_public_key_refused(
    proxy: ProxyProcess, up: UpstreamServer, route: str, kid: str | None
) -> None:
    """Key confusion: the RSA public key (public knowledge) used as an HMAC secret."""
    public_pem = pem_of(RSA_JWKS if route.startswith("/jwt") else RSA_PEM)
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    tok = hmac_signed(header, claims(), public_pem)
    resp = fetch(proxy.url(route), *bearer(tok))
    _, values = assert_refused(resp, up, 401, hidden=(tok,))
    assert "algorithm" in description(values)


def test_hs256_signed_with_another_secret_refused(proxy: ProxyProcess, up: UpstreamServer) -> None:
    tok = hs256("not-the-configured-secret-0123456789abcdef")
    assert_refused(fetch(proxy.url("/hs/x"), *bearer(tok)), up, 401, hidden=(tok,))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"iss": None}, "issuer"),
        ({"aud": "another-audience"}, "audience"),
        ({"aud": ["x", "y"]}, "audience"),
        ({"aud": None}, "audience"),
        ({"iat": int(time.time()) + 3600}, "issued in the future"),
    ],
    ids=[
        "expired",
        "nbf-future",
        "wrong-iss",
        "no-iss",
        "wrong-aud",
        "wrong-aud-list",
        "no-aud",
        "iat-future",
    ],
)
@pytest.mark.parametrize("route", ["/jwt/x", "/pem/x", "/hs/x"])
def test_claims_window_issuer_and_audience_checked(
    proxy: ProxyProcess, up: UpstreamServer, route: str, extra: dict[str, Any], words: str
) -> None:
    if route.startswith("/hs"):
        tok = hs256(**extra)
    else:
        tok = rs256(RSA_PEM, kid=None, **extra) if route.startswith("/pem") else rs256(**extra)
    _, values = assert_refused(fetch(proxy.url(route), *bearer(tok)), up, 401, hidden=(tok,))
    assert words in description(values), values


@pytest.mark.parametrize("route", ["/jwt/x", "/pem/x", "/hs/x"])
def test_tampered_payload_refused(proxy: ProxyProcess, up: UpstreamServer, route: str) -> None:
    good = {"/jwt/x": rs256, "/pem/x": lambda: rs256(RSA_PEM, kid=None), "/hs/x": hs256}[route]()
    head, payload, signature = good.split(".")
    doc = unb64u_json(payload)
    doc["sub"] = "admin"
    doc["scope"] = "orders:write"
    tok = f"{head}.{b64u_json(doc)}.{signature}"
    _, values = assert_refused(fetch(proxy.url(route), *bearer(tok)), up, 401, hidden=(tok,))
    assert "signature" in description(values), values
    # the untampered token is fine
    assert fetch(proxy.url(route), *bearer(good)).status == 200


@pytest.mark.parametrize("route", ["/jwt/x", "/pem/x", "/hs/x"])
def test_stripped_signature_refused(proxy: ProxyProcess, up: UpstreamServer, route: str) -> None:
    good = {"/jwt/x": rs256, "/pem/x": lambda: rs256(RSA_PEM, kid=None), "/hs/x": hs256}[route]()
    head, payload, _ = good.split(".")
    for tok in (f"{head}.{payload}.", f"{head}.{payload}"):
        up.clear()
        resp = fetch(proxy.url(route), *bearer(tok))
        assert_refused(resp, up, 401, hidden=(f"{head}.{payload}",))


def test_token_signed_by_an_unpublished_key_with_a_known_kid_refused(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    tok = rs256(RSA_ROGUE, kid="k1")
    _, values = assert_refused(fetch(proxy.url("/jwt/x"), *bearer(tok)), up, 401, hidden=(tok,))
    assert "signature" in description(values)


def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(
    proxy: ProxyProcess, up: UpstreamServer, throttle_idp: JwksServer
) -> None:
    assert throttle_idp.hit_count() == 1  # the fetch at start
    tokens = [rs256(RSA_ROGUE, kid=f"kid-{secrets.token_hex(6)}") for _ in range(24)]
    for tok in tokens[:8]:
        up.clear()
        resp = fetch(proxy.url("/throttled/x"), *bearer(tok))
        _, values = assert_refused(resp, up, 401, hidden=(tok,))
        assert "key id is unknown" in description(values)
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda t: fetch(proxy.url("/throttled/x"), *bearer(t)), tokens[8:]))
    assert [r.status for r in burst] == [401] * len(burst), [r.describe() for r in burst]
    assert up.requests == []
    # at most one refetch (the jwks_refetch_interval is 60 s), plus the first fetch
    assert 1 <= throttle_idp.hit_count() <= 2
    # a token whose kid is published still verifies, without another fetch
    hits = throttle_idp.hit_count()
    rec = assert_admitted(fetch(proxy.url("/throttled/x"), *bearer(rs256(kid="t1"))), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert throttle_idp.hit_count() == hits


def test_key_rotated_in_with_a_new_kid_is_accepted_after_exactly_one_refetch(
    proxy: ProxyProcess, up: UpstreamServer, rotate_idp: JwksServer
) -> None:
    assert rotate_idp.hit_count() == 1
    rotate_idp.set_keys([public_jwk(RSA_JWKS, "r1"), public_jwk(RSA_NEW, "r2")])
    rec = assert_admitted(fetch(proxy.url("/rotating/x"), *bearer(rs256(RSA_NEW, kid="r2"))), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rotate_idp.hit_count() == 2
    # the new key is known now: more tokens, no more fetches
    for _ in range(3):
        assert fetch(proxy.url("/rotating/x"), *bearer(rs256(RSA_NEW, kid="r2"))).status == 200
        assert fetch(proxy.url("/rotating/x"), *bearer(rs256(kid="r1"))).status == 200
    assert rotate_idp.hit_count() == 2


def test_two_authorization_headers_refused(proxy: ProxyProcess, up: UpstreamServer) -> None:
    a, b = rs256(), rs256()
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"GET /jwt/x HTTP/1.1\r\nHost: gw.test\r\n"
            + f"Authorization: Bearer {a}\r\nAuthorization: Bearer {b}\r\n\r\n".encode()
        )
        resp = conn.read_response()
    assert_refused(resp, up, 400, error="invalid_request", hidden=(a, b))


def test_empty_bearer_token_refused(proxy: ProxyProcess, up: UpstreamServer) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /jwt/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer   \r\n\r\n")
        resp = conn.read_response()
    assert_refused(resp, up, 400, error="invalid_request")


@pytest.mark.parametrize("route", ["/jwt/x", "/pem/x", "/hs/x"])
def test_missing_token_gets_a_bare_bearer_challenge(
    proxy: ProxyProcess, up: UpstreamServer, route: str
) -> None:
    _, values = assert_refused(fetch(proxy.url(route)), up, 401, error=None)
    assert values == ['Bearer realm="meshgate"']


def test_another_authorization_scheme_is_not_a_bearer_token(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    resp = fetch(proxy.url("/jwt/x"), "-H", "Authorization: Basic dXNlcjpwYXNz")
    _, values = assert_refused(resp, up, 401, error=None, hidden=("dXNlcjpwYXNz",))
    assert values == ['Bearer realm="meshgate"']


# ---------------------------------------------------------------------------
# JWT: scopes and required claims


@pytest.mark.parametrize(
    "extra",
    [{}, {"scope": "orders:read"}, {"scope": "orders:writer"}, {"scp": ["orders:read"]}],
    ids=["none", "other-scope", "prefix-only", "scp-other"],
)
def test_missing_scope_is_403_insufficient_scope(
    proxy: ProxyProcess, up: UpstreamServer, extra: dict[str, Any]
) -> None:
    tok = rs256(**extra)
    resp = fetch(proxy.url("/scoped/x"), *bearer(tok))
    _, values = assert_refused(resp, up, 403, error="insufficient_scope", hidden=(tok,))
    assert challenge(values[0])[1].get("scope") == "orders:write", values


@pytest.mark.parametrize(
    "extra",
    [
        {"scope": "orders:read orders:write"},
        {"scope": "orders:write"},
        {"scp": ["orders:read", "orders:write"]},
        {"scp": "orders:write"},
    ],
    ids=["scope-space-separated", "scope-single", "scp-array", "scp-string"],
)
def test_present_scope_admits(
    proxy: ProxyProcess, up: UpstreamServer, extra: dict[str, Any]
) -> None:
    rec = assert_admitted(fetch(proxy.url("/scoped/x"), *bearer(rs256(**extra))), up)
    assert rec.header_all("x-consumer") == ["alice"]


def test_scoped_route_without_a_token_gets_a_bare_challenge(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    _, values = assert_refused(fetch(proxy.url("/scoped/x")), up, 401, error=None)
    assert values == ['Bearer realm="meshgate"']


def test_required_claim_missing_is_403(proxy: ProxyProcess, up: UpstreamServer) -> None:
    for extra in ({}, {"department": None}):
        up.clear()
        tok = rs256(**extra)
        resp = fetch(proxy.url("/claims/x"), *bearer(tok))
        _, values = assert_refused(resp, up, 403, error="insufficient_scope", hidden=(tok,))
        assert "department" in description(values)
    up.clear()
    rec = assert_admitted(fetch(proxy.url("/claims/x"), *bearer(rs256(department="ops"))), up)
    assert rec.header_all("x-consumer") == ["alice"]


# ---------------------------------------------------------------------------
# API keys


@pytest.mark.parametrize("name", ["X-API-Key", "x-api-key", "X-API-KEY"])
def test_api_key_header_admits_and_is_removed(
    proxy: ProxyProcess, up: UpstreamServer, name: str
) -> None:
    rec = assert_admitted(fetch(proxy.url("/keys/x"), "-H", f"{name}: {KEY_ALICE}"), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.header_all("x-api-key") == []
    assert KEY_ALICE not in rec.raw_head.decode("latin-1")


def test_api_key_in_authorization_admits_and_is_removed(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    rec = assert_admitted(fetch(proxy.url("/keys/x"), "-H", f"Authorization: ApiKey {KEY_BOB}"), up)
    assert rec.header_all("x-consumer") == ["bob"]
    assert rec.header_all("authorization") == []
    assert KEY_BOB not in rec.raw_head.decode("latin-1")


@pytest.mark.parametrize(
    "args",
    [
        ("-H", f"X-API-Key: {KEY_UNKNOWN}"),
        ("-H", f"Authorization: ApiKey {KEY_UNKNOWN}"),
        ("-H", f"X-API-Key: {KEY_ALICE}x"),
        ("-H", f"X-API-Key: {digest(KEY_ALICE)}"),  # the stored digest is not a key
    ],
    ids=["header", "authorization", "near-miss", "digest"],
)
def test_wrong_api_key_refused(proxy: ProxyProcess, up: UpstreamServer, args: tuple[str]) -> None:
    sent = args[1].split(" ")[-1]
    resp = fetch(proxy.url("/keys/x"), *args)
    _, values = assert_refused(resp, up, 401, scheme="ApiKey", hidden=(sent,))
    assert "not valid" in description(values)


def test_missing_api_key_gets_a_bare_apikey_challenge(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    _, values = assert_refused(fetch(proxy.url("/keys/x")), up, 401, scheme="ApiKey", error=None)
    assert values == ['ApiKey realm="meshgate"']


def test_two_api_key_headers_refused(proxy: ProxyProcess, up: UpstreamServer) -> None:
    resp = fetch(
        proxy.url("/keys/x"), "-H", f"X-API-Key: {KEY_ALICE}", "-H", f"X-API-Key: {KEY_BOB}"
    )
    assert_refused(
        resp, up, 400, scheme="ApiKey", error="invalid_request", hidden=(KEY_ALICE, KEY_BOB)
    )


@pytest.mark.parametrize(("route", "scheme"), [("/keys/x", "ApiKey"), ("/any/x", "Bearer")])
def test_two_authorization_apikey_headers_refused(
    proxy: ProxyProcess, up: UpstreamServer, route: str, scheme: str
) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(
            f"GET {route} HTTP/1.1\r\nHost: gw.test\r\n"
            f"Authorization: ApiKey {KEY_ALICE}\r\n"
            f"Authorization: ApiKey {KEY_BOB}\r\n\r\n".encode()
        )
        resp = conn.read_response()
    assert_refused(
        resp, up, 400, scheme=scheme, error="invalid_request", hidden=(KEY_ALICE, KEY_BOB)
    )


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        (f"api_key={KEY_ALICE}", ""),
        (f"a=1&api_key={KEY_ALICE}&b=2", "?a=1&b=2"),
        (f"z=9&b=2&api_key={KEY_ALICE}", "?z=9&b=2"),
        (f"api_key={KEY_ALICE}&z=9&a=1&z=8", "?z=9&a=1&z=8"),
        (f"a=1&api%5Fkey={KEY_ALICE}&b=%20x", "?a=1&b=%20x"),
        (f"a=1&api_key={KEY_ALICE}&api_key={KEY_BOB}&c=3", "?a=1&c=3"),
    ],
    ids=["only", "middle", "last", "first-and-repeated-names", "encoded-name", "twice"],
)
def test_api_key_in_query_admits_and_is_removed_from_the_target(
    proxy: ProxyProcess, up: UpstreamServer, query: str, forwarded: str
) -> None:
    rec = assert_admitted(fetch(proxy.url(f"/keys-query/items?{query}")), up)
    assert rec.target == f"/keys-query/items{forwarded}"
    assert rec.header_all("x-consumer") == ["alice"]
    assert KEY_ALICE not in rec.raw_head.decode("latin-1")
    assert KEY_BOB not in rec.raw_head.decode("latin-1")


def test_wrong_api_key_in_query_refused(proxy: ProxyProcess, up: UpstreamServer) -> None:
    resp = fetch(proxy.url(f"/keys-query/x?a=1&api_key={KEY_UNKNOWN}"))
    assert_refused(resp, up, 401, scheme="ApiKey", hidden=(KEY_UNKNOWN,))


def test_api_key_in_query_is_not_accepted_when_query_is_off(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    resp = fetch(proxy.url(f"/keys/x?api_key={KEY_ALICE}"))
    _, values = assert_refused(resp, up, 401, scheme="ApiKey", error=None, hidden=(KEY_ALICE,))
    assert values == ['ApiKey realm="meshgate"']


# ---------------------------------------------------------------------------
# identity headers a client cannot set


@pytest.mark.parametrize("name", ["X-Consumer", "x-consumer", "x-CONSUMER", "X-CONSUMER"])
def test_client_x_consumer_removed_on_an_open_route(
    proxy: ProxyProcess, up: UpstreamServer, name: str
) -> None:
    rec = assert_admitted(fetch(proxy.url("/open/x"), "-H", f"{name}: admin"), up)
    assert "x-consumer" not in rec.header_names(), rec.headers


@pytest.mark.parametrize("name", ["X-Consumer", "x-CONSUMER"])
def test_client_x_consumer_replaced_by_the_real_consumer(
    proxy: ProxyProcess, up: UpstreamServer, name: str
) -> None:
    resp = fetch(
        proxy.url("/keys/x"),
        "-H",
        f"{name}: admin",
        "-H",
        f"{name}: root",
        "-H",
        f"X-API-Key: {KEY_BOB}",
    )
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-consumer") == ["bob"], rec.headers
    # a token whose subject is not a consumer: no X-Consumer at all
    up.clear()
    resp = fetch(proxy.url("/jwt/x"), "-H", f"{name}: admin", *bearer(rs256(sub="stranger")))
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-consumer") == [], rec.headers


@pytest.mark.parametrize("route", ["/open/x", "/keys/x", "/hs/x"])
def test_client_copies_of_forward_claims_headers_removed_everywhere(
    proxy: ProxyProcess, up: UpstreamServer, route: str
) -> None:
    creds: tuple[str, ...] = ()
    if route == "/keys/x":
        creds = ("-H", f"X-API-Key: {KEY_ALICE}")
    elif route == "/hs/x":
        creds = bearer(hs256(email="alice@example.com", tenant="t1"))
    resp = fetch(proxy.url(route), "-H", "X-User-Email: root@evil", "-H", "x-TENANT: other", *creds)
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-user-email") == [], rec.headers
    assert rec.header_all("x-tenant") == [], rec.headers


def test_client_copies_of_forward_claims_headers_replaced_by_the_claims(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    tok = rs256(email="alice@example.com")  # no tenant claim
    resp = fetch(
        proxy.url("/jwt/x"), "-H", "x-user-EMAIL: root@evil", "-H", "X-Tenant: other", *bearer(tok)
    )
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-user-email") == ["alice@example.com"], rec.headers
    assert rec.header_all("x-tenant") == [], rec.headers


# ---------------------------------------------------------------------------
# any of several entries


def test_any_of_admits_a_jwt(proxy: ProxyProcess, up: UpstreamServer) -> None:
    rec = assert_admitted(fetch(proxy.url("/any/x"), *bearer(rs256(email="a@x"))), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.header_all("x-user-email") == ["a@x"]
    assert rec.header_all("authorization") == []


@pytest.mark.parametrize(
    "args",
    [("-H", f"X-API-Key: {KEY_BOB}"), ("-H", f"Authorization: ApiKey {KEY_BOB}")],
    ids=["x-api-key", "authorization"],
)
def test_any_of_admits_an_api_key(
    proxy: ProxyProcess, up: UpstreamServer, args: tuple[str, str]
) -> None:
    rec = assert_admitted(fetch(proxy.url("/any/x"), *args), up)
    assert rec.header_all("x-consumer") == ["bob"]
    assert KEY_BOB not in rec.raw_head.decode("latin-1")


@pytest.mark.parametrize("bad", ["expired", "tampered", "alg-none", "unknown-kid"])
def test_any_of_bad_jwt_with_a_good_api_key_is_admitted(
    proxy: ProxyProcess, up: UpstreamServer, bad: str
) -> None:
    if bad == "expired":
        tok = rs256(exp=int(time.time()) - 3600)
    elif bad == "tampered":
        head, _, sig = rs256().split(".")
        tok = f"{head}.{b64u_json(claims(sub='admin'))}.{sig}"
    elif bad == "alg-none":
        tok = crafted({"alg": "none"}, claims())
    else:
        tok = rs256(RSA_ROGUE, kid="never-published")
    resp = fetch(proxy.url("/any/x"), *bearer(tok), "-H", f"X-API-Key: {KEY_BOB}")
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-consumer") == ["bob"]
    assert rec.header_all("x-user-email") == []


def test_any_of_bad_jwt_and_no_key_is_refused_with_both_challenges(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    tok = rs256(exp=int(time.time()) - 3600)
    _, values = assert_refused(fetch(proxy.url("/any/x"), *bearer(tok)), up, 401, hidden=(tok,))
    assert values[1:] == ['ApiKey realm="meshgate"'], values


def test_any_of_neither_credential_is_401_with_both_challenges(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    _, values = assert_refused(fetch(proxy.url("/any/x")), up, 401, error=None)
    assert sorted(values) == ['ApiKey realm="meshgate"', 'Bearer realm="meshgate"'], values


def test_any_of_api_key_query_parameter_removed_even_when_the_jwt_admits(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """`query:` documents that the parameter is ALWAYS removed before the
    request goes upstream; with a route `[idp, keys_q]` and a valid token the
    API key authenticator never runs, and the key would leak upstream."""
    resp = fetch(proxy.url(f"/any-query/x?a=1&api_key={KEY_ALICE}&b=2"), *bearer(rs256()))
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.target == "/any-query/x?a=1&b=2", rec.target


# ---------------------------------------------------------------------------
# the CLI: check and hash-key


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("upstreams:\n  a:\n    endpoints: [127.0.0.1:1]\nroutes:\n- path: /x/**\n"
         "  upstream: a\n  auth: nope\n", 7),
        ("upstreams:\n  a:\n    endpoints: [127.0.0.1:1]\nauth:\n  keys:\n    type: api_key\n"
         "routes:\n- path: /x/**\n  upstream: a\n  auth: [keys, nope]\n", 10),
        ("upstreams:\n  a:\n    endpoints: [127.0.0.1:1]\nauth:\n  keys:\n    type: api_key\n"
         "routes:\n- path: /x/**\n  upstream: a\n  auth:\n    use: [nope]\n"
         "    scopes: [s]\n", 11),
    ],
    ids=["name", "list", "mapping"],
)  # fmt: skip
def test_check_route_naming_an_undefined_auth_entry(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    proc = run_meshgate("check", "-c", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"{path}:{line}" in out, out
    assert "routes[0].auth" in out, out
    assert "nope" in out, out


def _hash_key(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshgate_cmd("hash-key", *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_hash_key_reads_the_key_on_stdin() -> None:
    proc = _hash_key(stdin="k")  # echo -n k | meshgate hash-key
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "sha256:" + hashlib.sha256(b"k").hexdigest()
    assert proc.stdout.strip() == digest("k")


def test_hash_key_generate_prints_a_key_and_its_digest() -> None:
    seen = set()
    for _ in range(2):
        proc = _hash_key("--generate")
        assert proc.returncode == 0, proc.stderr
        key = re.search(r"(?m)^key:\s*(\S+)\s*$", proc.stdout)
        dig = re.search(r"(?m)^digest:\s*(sha256:[0-9a-f]{64})\s*$", proc.stdout)
        assert key and dig, proc.stdout
        assert len(key[1]) >= 32, key[1]
        assert dig[1] == digest(key[1])
        again = _hash_key(stdin=key[1])
        assert again.stdout.strip() == dig[1], again.stdout
        seen.add(key[1])
    assert len(seen) == 2


def test_hidden_credentials_leave_in_every_place_they_came(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """A key in X-API-Key admits; a second key in `Authorization: ApiKey` is
    not forwarded either (hide_credentials covers both places)."""
    resp = fetch(
        proxy.url("/keys/x"),
        "-H",
        f"X-API-Key: {KEY_ALICE}",
        "-H",
        f"Authorization: ApiKey {KEY_BOB}",
    )
    rec = assert_admitted(resp, up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.header("authorization") is None
    assert rec.header("x-api-key") is None


@pytest.mark.parametrize("name", ["X_Consumer", "x_consumer"])
def test_identity_header_spelled_with_underscores_is_removed(
    proxy: ProxyProcess, up: UpstreamServer, name: str
) -> None:
    """CGI-style servers read `X_Consumer` as X-Consumer: it is an identity
    header too."""
    rec = assert_admitted(fetch(proxy.url("/open/x"), "-H", f"{name}: admin"), up)
    assert rec.header_all(name) == []
    assert rec.header_all("x-consumer") == []


@pytest.mark.parametrize("junk", ["%FF=1", "q%E2%82%AC=1", "x=%E2%82%AC"])
def test_undecodable_query_parameters_are_no_server_error(
    proxy: ProxyProcess, up: UpstreamServer, junk: str
) -> None:
    """Query names and values are form-decoded to bytes: nothing a client
    writes there makes the gateway fail."""
    rec = assert_admitted(fetch(proxy.url(f"/keys-query/x?{junk}&api_key={KEY_ALICE}")), up)
    assert rec.header_all("x-consumer") == ["alice"]
    assert rec.target == f"/keys-query/x?{junk}"


def test_hidden_key_header_is_removed_when_the_jwt_admits(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    resp = fetch(proxy.url("/any-query/x"), *bearer(rs256()), "-H", f"X-API-Key: {KEY_BOB}")
    rec = assert_admitted(resp, up)
    assert rec.header("x-api-key") is None


@pytest.mark.parametrize("name", ["x-user_email", "x_user-email", "X_USER_EMAIL"])
def test_identity_headers_with_mixed_underscores_are_removed(
    proxy: ProxyProcess, up: UpstreamServer, name: str
) -> None:
    rec = assert_admitted(fetch(proxy.url("/open/x"), "-H", f"{name}: mallory@example.com"), up)
    assert rec.header_all(name) == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{type: jwt, secret: '0123456789abcdef0123456789abcdef', "
            "forward_claims: {sub: Content-Length}}",
            "a header the gateway owns",
        ),
        ("{type: api_key, header: Transfer-Encoding}", "a header the gateway owns"),
        ("{type: jwt, jwks_url: 'ftp://u:hunter2@idp/keys'}", "ftp://<redacted>@idp/keys"),
        ("{type: jwt, jwks_url: 'https://idp/keys', issuer: []}", "empty list"),
    ],
)
def test_check_refuses_dangerous_auth_entries(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"auth:\n  a: {entry}\n"
        "upstreams:\n  u: {endpoints: [127.0.0.1:1]}\n"
        "routes:\n- {path: /x, upstream: u, auth: a}\n"
    )
    proc = run_meshgate("check", "-c", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert message in out, out
    assert "hunter2" not in out, out
