"""JwtVerifier: algorithm pinning, key selection, compact-JWS parsing, claim
checks, the verified-token cache, key loading errors and check_claims."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from meshgate.auth.jwt import AuthError, JwtVerifier, UnknownKeyId
from meshgate.config.schema import JwtAuthConfig

NOW = 1_700_000_000.0
SECRET = "s3cret-" * 11  # 66 bytes: long enough for HS512
ALGS = get_default_algorithms()

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
P521_KEY = ec.generate_private_key(ec.SECP521R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
ED448_KEY = ed448.Ed448PrivateKey.generate()


# ---------------------------------------------------------------------------
# helpers


def cfg(**kw: Any) -> JwtAuthConfig:
    return JwtAuthConfig(type="jwt", **kw)


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def verifier(**kw: Any) -> JwtVerifier:
    return JwtVerifier("test", cfg(**kw))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iat": int(NOW) - 10, "exp": int(NOW) + 300}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any, alg: str, payload: dict[str, Any] | None = None, **headers: Any) -> str:
    return jwt.encode(
        payload if payload is not None else claims(), key, algorithm=alg, headers=headers or None
    )


def raw_token(header: Any, payload: Any, key: Any = None, alg: str | None = None) -> str:
    """A token built by hand; signed with `key` using PyJWT's `alg` object."""
    h = b64(orjson.dumps(header))
    p = b64(orjson.dumps(payload))
    sig = b""
    if key is not None:
        assert alg is not None
        sig = ALGS[alg].sign(f"{h}.{p}".encode(), key)
    return f"{h}.{p}.{b64(sig)}"


def hs256(secret: bytes, header: Any, payload: Any) -> str:
    h = b64(orjson.dumps(header))
    p = b64(orjson.dumps(payload))
    sig = hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


def jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        d = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        d = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        d["kid"] = kid
    d.update(extra)
    return dict(d)


def jwks_verifier(*keys: dict[str, Any], **kw: Any) -> JwtVerifier:
    v = verifier(jwks_url="http://127.0.0.1:9/jwks.json", **kw)
    v._apply_jwks(orjson.dumps({"keys": list(keys)}))
    return v


def refused(v: JwtVerifier, tok: str, *, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        v.verify(tok, now=now)
    return info.value


def assert_invalid(v: JwtVerifier, tok: str, description: str, *, now: float = NOW) -> None:
    err = refused(v, tok, now=now)
    assert (err.status, err.error, err.description) == (401, "invalid_token", description)
    assert type(err) is AuthError


MALFORMED = "the token is malformed"
BAD_ALG = "the token's algorithm is not accepted"
BAD_SIG = "the token's signature is not valid"


# ---------------------------------------------------------------------------
# every algorithm family verifies


@pytest.mark.parametrize(
    ("private", "alg"),
    [
        (RSA_KEY, "RS256"),
        (RSA_KEY, "RS384"),
        (RSA_KEY, "RS512"),
        (RSA_KEY, "PS256"),
        (RSA_KEY, "PS384"),
        (RSA_KEY, "PS512"),
        (P256_KEY, "ES256"),
        (P384_KEY, "ES384"),
        (P521_KEY, "ES512"),
        (ED25519_KEY, "EdDSA"),
        (ED448_KEY, "EdDSA"),
    ],
)
def test_public_key_algorithms_verify(private: Any, alg: str) -> None:
    v = verifier(public_key=pem(private))
    got = v.verify(token(private, alg), now=NOW)
    assert got["sub"] == "alice"
    # the same key published in a JWKS, selected by kid
    j = jwks_verifier(jwk(private, "k1"))
    assert j.verify(token(private, alg, kid="k1"), now=NOW)["sub"] == "alice"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms_verify(alg: str) -> None:
    v = verifier(secret=SECRET)
    assert v.verify(token(SECRET, alg), now=NOW)["sub"] == "alice"


def test_wrong_hmac_secret_is_a_bad_signature() -> None:
    v = verifier(secret=SECRET)
    assert_invalid(v, token(SECRET + "x", "HS256"), BAD_SIG)


def test_wrong_public_key_is_a_bad_signature() -> None:
    v = verifier(public_key=pem(RSA_KEY))
    assert_invalid(v, token(RSA_KEY_2, "RS256"), BAD_SIG)
    v = verifier(public_key=pem(ED25519_KEY))
    assert_invalid(v, token(ed25519.Ed25519PrivateKey.generate(), "EdDSA"), BAD_SIG)


def test_verify_uses_the_clock_by_default() -> None:
    v = verifier(secret=SECRET)
    now = time.time()
    tok = token(SECRET, "HS256", {"sub": "bob", "exp": now + 60, "iat": now})
    assert v.verify(tok)["sub"] == "bob"


def test_needs_async_only_with_jwks() -> None:
    assert not verifier(secret=SECRET).needs_async
    assert not verifier(public_key=pem(RSA_KEY)).needs_async
    assert jwks_verifier(jwk(RSA_KEY, "a")).needs_async


async def test_verify_async_without_jwks_is_verify() -> None:
    v = verifier(secret=SECRET)
    now = time.time()
    payload = {"sub": "alice", "exp": now + 60}
    assert (await v.verify_async(token(SECRET, "HS256", payload)))["sub"] == "alice"
    with pytest.raises(AuthError):
        await v.verify_async(token(SECRET + "x", "HS256"))


# ---------------------------------------------------------------------------
# the algorithm comes from the config


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(alg: str) -> None:
    for v in (verifier(secret=SECRET), verifier(public_key=pem(RSA_KEY))):
        unsigned = raw_token({"alg": alg, "typ": "JWT"}, claims())
        assert_invalid(v, unsigned, BAD_ALG)
        # and with some signature bytes attached
        assert_invalid(v, unsigned + "c2ln", BAD_ALG)


def test_missing_or_non_string_alg_is_refused() -> None:
    v = verifier(secret=SECRET)
    assert_invalid(v, hs256(SECRET.encode(), {"typ": "JWT"}, claims()), BAD_ALG)
    assert_invalid(v, hs256(SECRET.encode(), {"alg": ["HS256"]}, claims()), BAD_ALG)
    assert_invalid(v, hs256(SECRET.encode(), {"alg": None}, claims()), BAD_ALG)


def test_key_confusion_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    public_pem = pem(RSA_KEY)
    forged = hs256(public_pem.encode(), {"alg": "HS256", "typ": "JWT"}, claims())
    assert_invalid(verifier(public_key=public_pem), forged, BAD_ALG)
    # the same attack against a JWKS key named by kid
    public_pem_j = pem(RSA_KEY)
    forged = hs256(public_pem_j.encode(), {"alg": "HS256", "kid": "rsa"}, claims())
    assert_invalid(jwks_verifier(jwk(RSA_KEY, "rsa")), forged, BAD_ALG)


def test_alg_outside_configured_algorithms_is_refused() -> None:
    v = verifier(public_key=pem(RSA_KEY), algorithms=["RS256"])
    assert v.verify(token(RSA_KEY, "RS256"), now=NOW)
    assert_invalid(v, token(RSA_KEY, "PS256"), BAD_ALG)
    assert_invalid(v, token(RSA_KEY, "RS512"), BAD_ALG)
    h = verifier(secret=SECRET, algorithms=["HS512"])
    assert_invalid(h, token(SECRET, "HS256"), BAD_ALG)


def test_alg_incompatible_with_the_key_is_refused() -> None:
    # a P-256 key accepts ES256 only
    v = verifier(public_key=pem(P256_KEY))
    assert_invalid(v, raw_token({"alg": "ES384"}, claims(), P384_KEY, "ES384"), BAD_ALG)
    assert_invalid(v, token(RSA_KEY, "RS256"), BAD_ALG)
    # a JWKS EC key named by kid, with an RSA algorithm in the header
    j = jwks_verifier(jwk(P256_KEY, "ec"), jwk(RSA_KEY, "rsa"))
    assert_invalid(j, token(RSA_KEY, "RS256", kid="ec"), BAD_ALG)
    assert_invalid(j, token(P256_KEY, "ES256", kid="rsa"), BAD_ALG)
    # an Ed25519 key never verifies ES256
    e = verifier(public_key=pem(ED25519_KEY))
    assert_invalid(e, token(P256_KEY, "ES256"), BAD_ALG)


def test_jwk_alg_member_pins_the_algorithm() -> None:
    j = jwks_verifier(jwk(RSA_KEY, "rsa", alg="RS256"))
    assert j.verify(token(RSA_KEY, "RS256", kid="rsa"), now=NOW)
    assert_invalid(j, token(RSA_KEY, "PS256", kid="rsa"), BAD_ALG)
    assert_invalid(j, token(RSA_KEY, "RS512", kid="rsa"), BAD_ALG)


def test_jwk_with_alg_unfit_for_its_key_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    j = jwks_verifier(
        jwk(RSA_KEY, "hs", alg="HS256"),  # key confusion via the JWKS
        jwk(P256_KEY, "ec384", alg="ES384"),  # wrong curve for the alg
        jwk(RSA_KEY_2, "good"),
    )
    forged = hs256(pem(RSA_KEY).encode(), {"alg": "HS256", "kid": "hs"}, claims())
    assert_invalid(j, forged, BAD_ALG)
    with pytest.raises(UnknownKeyId):
        j.verify(token(P256_KEY, "ES256", kid="ec384"), now=NOW)
    assert "'hs'" in caplog.text and "'ec384'" in caplog.text


def test_jwks_keys_not_for_signatures_are_ignored() -> None:
    j = jwks_verifier(
        jwk(RSA_KEY, "enc", use="enc"),
        jwk(RSA_KEY, "wrap", key_ops=["wrapKey"]),
        jwk(RSA_KEY_2, "sig", use="sig", key_ops=["verify"]),
    )
    assert j.verify(token(RSA_KEY_2, "RS256", kid="sig"), now=NOW)
    for kid in ("enc", "wrap"):
        err = refused(j, token(RSA_KEY, "RS256", kid=kid))
        assert err.description == "the token's key id is unknown"


def test_symmetric_jwks_keys_are_refused() -> None:
    oct_key = {"kty": "oct", "kid": "oct", "k": b64(SECRET.encode())}
    j = jwks_verifier(oct_key, jwk(RSA_KEY, "rsa"))
    forged = hs256(SECRET.encode(), {"alg": "HS256", "kid": "oct"}, claims())
    assert_invalid(j, forged, BAD_ALG)


def test_header_key_references_are_ignored() -> None:
    """An attacker's own key in `jwk` / `jku` / `x5u` never verifies anything."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = {
        "alg": "RS256",
        "jwk": jwk(attacker, None),
        "jku": "http://evil.example/jwks",
        "x5u": "http://evil.example/cert",
    }
    forged = raw_token(header, claims(), attacker, "RS256")
    assert_invalid(verifier(public_key=pem(RSA_KEY)), forged, BAD_SIG)


# ---------------------------------------------------------------------------
# parsing


def test_tampered_payload_is_a_bad_signature() -> None:
    v = verifier(public_key=pem(RSA_KEY))
    h, _, s = token(RSA_KEY, "RS256").split(".")
    forged = ".".join([h, b64(orjson.dumps(claims(sub="admin"))), s])
    assert_invalid(v, forged, BAD_SIG)
    hv = verifier(secret=SECRET)
    h, _, s = token(SECRET, "HS256").split(".")
    assert_invalid(hv, ".".join([h, b64(orjson.dumps(claims(sub="admin"))), s]), BAD_SIG)


def test_stripped_or_truncated_signature_is_refused() -> None:
    for v, tok in (
        (verifier(public_key=pem(RSA_KEY)), token(RSA_KEY, "RS256")),
        (verifier(public_key=pem(P256_KEY)), token(P256_KEY, "ES256")),
        (verifier(public_key=pem(ED25519_KEY)), token(ED25519_KEY, "EdDSA")),
        (verifier(secret=SECRET), token(SECRET, "HS256")),
    ):
        h, p, s = tok.split(".")
        assert_invalid(v, f"{h}.{p}.", BAD_SIG)
        assert_invalid(v, f"{h}.{p}.{s[:-4]}", BAD_SIG)
        assert_invalid(v, f"{h}.{p}", MALFORMED)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h, p, s: f"{h}.{p}.{s}.",  # four segments
        lambda h, p, s: f"{h}.{p}.{s}.x",
        lambda h, p, s: f"{h}",
        lambda h, p, s: "",
        lambda h, p, s: f".{p}.{s}",  # empty header
        lambda h, p, s: f"{h}..{s}",  # empty payload
        lambda h, p, s: f"{h}=.{p}.{s}",  # padding
        lambda h, p, s: f"{h}.{p}.{s}==",
        lambda h, p, s: f"{h}+.{p}.{s}",  # standard alphabet
        lambda h, p, s: f"{h}.{p}/.{s}",
        lambda h, p, s: f"{h} .{p}.{s}",
        lambda h, p, s: f"{h}.{p}.{s}\n",
        lambda h, p, s: f"{h}é.{p}.{s}",
        lambda h, p, s: f"{h}A.{p}.{s}",  # length 4n+1: not base64
    ],
)
def test_bad_compact_serialization_is_malformed(mangle: Any) -> None:
    v = verifier(secret=SECRET)
    h, p, s = token(SECRET, "HS256").split(".")
    assert_invalid(v, mangle(h, p, s), MALFORMED)


@pytest.mark.parametrize(
    "header", [b"[]", b'"HS256"', b"42", b"null", b"{not json", b'{"alg":"HS256"', b"\xff\xfe"]
)
def test_non_object_header_is_malformed(header: bytes) -> None:
    v = verifier(secret=SECRET)
    h = b64(header)
    p = b64(orjson.dumps(claims()))
    sig = hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    assert_invalid(v, f"{h}.{p}.{b64(sig)}", MALFORMED)


@pytest.mark.parametrize("payload", [b"[]", b'"x"', b"1", b"{broken", b"\xff"])
def test_non_object_payload_is_malformed_even_when_signed(payload: bytes) -> None:
    v = verifier(secret=SECRET)
    h = b64(b'{"alg":"HS256"}')
    p = b64(payload)
    sig = hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    assert_invalid(v, f"{h}.{p}.{b64(sig)}", MALFORMED)


def test_crit_header_is_refused_even_when_signed() -> None:
    v = verifier(secret=SECRET)
    for crit in (["exp"], [], ["b64"]):
        tok = hs256(SECRET.encode(), {"alg": "HS256", "crit": crit, "exp": 1}, claims())
        assert_invalid(v, tok, "the token's critical header parameters are not supported")


def test_non_string_kid_is_malformed() -> None:
    v = jwks_verifier(jwk(RSA_KEY, "1"))
    assert_invalid(v, raw_token({"alg": "RS256", "kid": 1}, claims(), RSA_KEY, "RS256"), MALFORMED)


def test_oversize_token_is_refused_before_parsing() -> None:
    v = verifier(secret=SECRET, max_token_size=300)
    small = token(SECRET, "HS256")
    assert len(small) <= 300
    assert v.verify(small, now=NOW)
    big = token(SECRET, "HS256", claims(pad="x" * 400))
    assert_invalid(v, big, "the token is too large")
    assert_invalid(v, "A" * 100_000, "the token is too large")


# ---------------------------------------------------------------------------
# key selection


def test_kid_selects_the_key_and_a_mismatch_fails() -> None:
    j = jwks_verifier(jwk(RSA_KEY, "a"), jwk(RSA_KEY_2, "b"))
    assert j.verify(token(RSA_KEY, "RS256", kid="a"), now=NOW)
    assert j.verify(token(RSA_KEY_2, "RS256", kid="b"), now=NOW)
    # signed by a, labelled b
    assert_invalid(j, token(RSA_KEY, "RS256", kid="b"), BAD_SIG)


def test_unknown_kid_asks_for_a_refetch_only_when_allowed() -> None:
    j = jwks_verifier(jwk(RSA_KEY, "a"))
    tok = token(RSA_KEY_2, "RS256", kid="new")
    with pytest.raises(UnknownKeyId) as info:
        j.verify(tok, now=NOW)
    assert (info.value.status, info.value.error) == (401, "invalid_token")
    assert info.value.description == "the token's key id is unknown"
    j._refetch_at = time.monotonic() + 60  # a refetch just happened
    assert_invalid(j, tok, "the token's key id is unknown")


def test_token_without_kid_tries_the_compatible_keys() -> None:
    j = jwks_verifier(jwk(RSA_KEY, "a"), jwk(P256_KEY, "ec"), jwk(RSA_KEY_2, "b"))
    assert j.verify(token(RSA_KEY_2, "RS256"), now=NOW)
    assert j.verify(token(P256_KEY, "ES256"), now=NOW)
    with pytest.raises(UnknownKeyId):
        j.verify(token(rsa.generate_private_key(65537, 2048), "RS256"), now=NOW)


def test_static_key_accepts_any_kid() -> None:
    v = verifier(public_key=pem(RSA_KEY))
    assert v.verify(token(RSA_KEY, "RS256", kid="whatever"), now=NOW)
    assert_invalid(v, token(RSA_KEY_2, "RS256", kid="whatever"), BAD_SIG)


def test_empty_key_set_reports_keys_not_available() -> None:
    v = verifier(jwks_url="http://127.0.0.1:9/jwks")
    v._refetch_at = time.monotonic() + 60
    assert_invalid(v, token(RSA_KEY, "RS256", kid="a"), "the signing keys are not available")
    assert_invalid(v, token(RSA_KEY, "RS256"), "the signing keys are not available")


# ---------------------------------------------------------------------------
# time claims


def test_expired_and_leeway() -> None:
    v = verifier(secret=SECRET, leeway=30)
    tok = token(SECRET, "HS256", claims(exp=int(NOW) - 20))
    assert v.verify(tok, now=NOW)  # within leeway
    assert_invalid(v, tok, "the token has expired", now=NOW + 10)
    strict = verifier(secret=SECRET, leeway=0)
    tok = token(SECRET, "HS256", claims(exp=int(NOW)))
    assert_invalid(strict, tok, "the token has expired")
    assert strict.verify(tok, now=NOW - 0.001)


def test_not_valid_yet_and_leeway() -> None:
    v = verifier(secret=SECRET, leeway=30)
    tok = token(SECRET, "HS256", claims(nbf=int(NOW) + 60))
    assert_invalid(v, tok, "the token is not valid yet")
    assert v.verify(tok, now=NOW + 31)
    near = token(SECRET, "HS256", claims(nbf=int(NOW) + 20))
    assert v.verify(near, now=NOW)


def test_issued_in_the_future() -> None:
    v = verifier(secret=SECRET, leeway=5)
    tok = token(SECRET, "HS256", claims(iat=int(NOW) + 60))
    assert_invalid(v, tok, "the token was issued in the future")
    assert v.verify(token(SECRET, "HS256", claims(iat=int(NOW) + 4)), now=NOW)


def test_exp_is_not_required_unless_configured() -> None:
    v = verifier(secret=SECRET)
    tok = token(SECRET, "HS256", {"sub": "alice"})
    assert v.verify(tok, now=NOW) == {"sub": "alice"}
    with pytest.raises(AuthError) as info:
        JwtVerifier.check_claims(v.verify(tok, now=NOW), [], ["exp"])
    assert info.value.status == 403 and "exp" in info.value.description


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1700000000", True, None, [1], {"a": 1}])
def test_time_claims_must_be_numbers(claim: str, value: Any) -> None:
    v = verifier(secret=SECRET)
    payload = claims()
    payload[claim] = value
    tok = token(SECRET, "HS256", payload)
    assert_invalid(v, tok, f"the token's {claim} claim is not a number")


def test_float_time_claims_are_fine() -> None:
    v = verifier(secret=SECRET, leeway=0)
    tok = token(SECRET, "HS256", claims(exp=NOW + 0.5, nbf=NOW - 0.5, iat=NOW - 0.5))
    assert v.verify(tok, now=NOW)
    assert_invalid(v, tok, "the token has expired", now=NOW + 0.5)


# ---------------------------------------------------------------------------
# issuer and audience


def test_issuer() -> None:
    v = verifier(secret=SECRET, issuer="https://idp.example")
    assert v.verify(token(SECRET, "HS256", claims(iss="https://idp.example")), now=NOW)
    bad = "the token's issuer is not accepted"
    assert_invalid(v, token(SECRET, "HS256", claims(iss="https://evil.example")), bad)
    assert_invalid(v, token(SECRET, "HS256", claims()), bad)
    listed = hs256(SECRET.encode(), {"alg": "HS256"}, claims(iss=["https://idp.example"]))
    assert_invalid(v, listed, bad)
    many = verifier(secret=SECRET, issuer=["https://a", "https://b"])
    assert many.verify(token(SECRET, "HS256", claims(iss="https://b")), now=NOW)
    # no issuer configured: any (or none) is fine
    assert verifier(secret=SECRET).verify(token(SECRET, "HS256", claims(iss="x")), now=NOW)


def test_audience() -> None:
    v = verifier(secret=SECRET, audience=["api", "admin"])
    bad = "the token's audience is not accepted"
    assert v.verify(token(SECRET, "HS256", claims(aud="api")), now=NOW)
    assert v.verify(token(SECRET, "HS256", claims(aud=["other", "admin"])), now=NOW)
    assert_invalid(v, token(SECRET, "HS256", claims(aud="other")), bad)
    assert_invalid(v, token(SECRET, "HS256", claims(aud=["x", "y"])), bad)
    assert_invalid(v, token(SECRET, "HS256", claims(aud=[])), bad)
    assert_invalid(v, token(SECRET, "HS256", claims()), bad)
    assert_invalid(v, token(SECRET, "HS256", claims(aud=1)), bad)
    one = verifier(secret=SECRET, audience="api")
    assert one.verify(token(SECRET, "HS256", claims(aud=["api"])), now=NOW)


# ---------------------------------------------------------------------------
# the cache


def test_cache_rechecks_time_on_every_hit() -> None:
    v = verifier(public_key=pem(RSA_KEY), leeway=0)
    tok = token(RSA_KEY, "RS256", claims(exp=int(NOW) + 10, nbf=int(NOW) - 10))
    assert v.verify(tok, now=NOW)
    assert tok in v.cache
    assert v.verify(tok, now=NOW + 5)
    assert_invalid(v, tok, "the token is not valid yet", now=NOW - 20)
    assert_invalid(v, tok, "the token has expired", now=NOW + 10)
    assert tok not in v.cache


def test_cache_returns_copies() -> None:
    v = verifier(secret=SECRET)
    tok = token(SECRET, "HS256")
    first = v.verify(tok, now=NOW)
    first["sub"] = "mallory"
    assert v.verify(tok, now=NOW)["sub"] == "alice"


def test_cache_is_bounded_least_recently_used_first_out() -> None:
    v = verifier(secret=SECRET, cache_size=8)
    tokens = [token(SECRET, "HS256", claims(n=i)) for i in range(20)]
    for t in tokens[:8]:
        v.verify(t, now=NOW)
    v.verify(tokens[0], now=NOW)  # used again: the last to go
    for t in tokens[8:]:
        v.verify(t, now=NOW)
    assert len(v.cache) == 8
    assert tokens[-1] in v.cache and tokens[1] not in v.cache
    assert tokens[0] not in v.cache  # 12 newer ones pushed it out too
    v2 = verifier(secret=SECRET, cache_size=2)
    a, b, c = tokens[:3]
    for t in (a, b, a, c):
        v2.verify(t, now=NOW)
    assert a in v2.cache and c in v2.cache and b not in v2.cache


def test_cache_size_zero_verifies_every_time() -> None:
    v = verifier(public_key=pem(RSA_KEY), cache_size=0)
    tok = token(RSA_KEY, "RS256")
    assert v.verify(tok, now=NOW) == v.verify(tok, now=NOW)
    assert len(v.cache) == 0 and v.cache.hits == 0


def test_cache_hits_skip_the_signature_check(monkeypatch: pytest.MonkeyPatch) -> None:
    v = verifier(public_key=pem(RSA_KEY))
    tok = token(RSA_KEY, "RS256")
    calls = []
    real = JwtVerifier._signed_by
    monkeypatch.setattr(
        JwtVerifier, "_signed_by", staticmethod(lambda *a: calls.append(1) or real(*a))
    )
    for _ in range(5):
        assert v.verify(tok, now=NOW)["sub"] == "alice"
    assert len(calls) == 1
    assert (v.cache.hits, v.cache.misses) == (4, 1)


def test_cache_entry_ends_at_exp() -> None:
    v = verifier(secret=SECRET, leeway=5)
    tok = token(SECRET, "HS256", claims(exp=int(NOW) + 60))
    assert v.verify(tok, now=NOW)
    assert v.cache.get(tok, NOW + 64.9) is not None
    assert v.cache.get(tok, NOW + 65) is None  # exp + leeway: gone
    assert tok not in v.cache
    assert_invalid(v, tok, "the token has expired", now=NOW + 65)
    assert tok not in v.cache


def test_cache_entry_ends_after_max_age_without_exp() -> None:
    v = verifier(public_key=pem(RSA_KEY))
    tok = token(RSA_KEY, "RS256", claims(exp=None, iat=None))
    assert v.verify(tok, now=NOW)
    assert v.verify(tok, now=NOW + 299)
    assert v.cache.hits == 1
    assert v.verify(tok, now=NOW + 300)  # verified again, then cached again
    assert (v.cache.hits, v.cache.misses) == (1, 2)
    assert v.cache.get(tok, NOW + 599) is not None


def test_a_token_not_valid_yet_is_never_cached() -> None:
    v = verifier(secret=SECRET, leeway=0)
    tok = token(SECRET, "HS256", claims(nbf=int(NOW) + 60, exp=int(NOW) + 600))
    assert_invalid(v, tok, "the token is not valid yet")
    assert tok not in v.cache
    # Once it is valid, it is verified (and cached) as any other.
    assert v.verify(tok, now=NOW + 60)
    assert tok in v.cache
    # A clock that goes back is still held to nbf on a hit.
    assert_invalid(v, tok, "the token is not valid yet", now=NOW + 30)
    assert tok not in v.cache


def test_cache_key_is_the_whole_token() -> None:
    v = verifier(public_key=pem(RSA_KEY))
    tok = token(RSA_KEY, "RS256")
    assert v.verify(tok, now=NOW)
    head, payload, sig = tok.split(".")
    forged = f"{head}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BA'}"
    assert_invalid(v, forged, BAD_SIG)
    assert forged not in v.cache


def test_route_scopes_are_checked_on_cached_claims() -> None:
    v = verifier(secret=SECRET)
    tok = token(SECRET, "HS256", claims(scope="orders:read"))
    JwtVerifier.check_claims(v.verify(tok, now=NOW), ["orders:read"], [])
    cached = v.verify(tok, now=NOW)
    assert v.cache.hits == 1
    with pytest.raises(AuthError) as info:
        JwtVerifier.check_claims(cached, ["orders:write"], [])
    assert (info.value.status, info.value.error) == (403, "insufficient_scope")


def test_cache_is_dropped_when_the_key_set_changes() -> None:
    j = jwks_verifier(jwk(RSA_KEY, "a"), jwk(RSA_KEY_2, "b"))
    tok = token(RSA_KEY, "RS256", kid="a")
    assert j.verify(tok, now=NOW)
    assert tok in j.cache
    # the same set again: the cache stays
    j._apply_jwks(orjson.dumps({"keys": [jwk(RSA_KEY_2, "b"), jwk(RSA_KEY, "a")]}))
    assert tok in j.cache
    # key a is withdrawn: its tokens stop verifying at once
    j._apply_jwks(orjson.dumps({"keys": [jwk(RSA_KEY_2, "b")]}))
    assert not j.cache
    j._refetch_at = time.monotonic() + 60
    assert_invalid(j, tok, "the token's key id is unknown")


def test_bad_tokens_are_not_cached() -> None:
    v = verifier(secret=SECRET, issuer="i")
    tok = token(SECRET, "HS256", claims(iss="j"))
    refused(v, tok)
    assert not v.cache


# ---------------------------------------------------------------------------
# JWKS documents (parsing; fetching is in tests/integration/test_auth_jwks.py)


def test_invalid_jwks_keeps_the_last_good_set(caplog: pytest.LogCaptureFixture) -> None:
    j = jwks_verifier(jwk(RSA_KEY, "a"))
    tok = token(RSA_KEY, "RS256", kid="a")
    for doc in (b"[]", b"{}", b'{"keys": {}}', b'{"keys": []}', b"not json", b'{"keys": [1]}'):
        with pytest.raises(ValueError):
            j._apply_jwks(doc)
        assert j.verify(tok, now=NOW)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_invalid_keys_are_skipped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    j = jwks_verifier(
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        {"kty": "EC", "kid": "k256", "crv": "secp256k1", "x": "AA", "y": "AA"},
        {"kty": "XYZ", "kid": "odd"},
        {"kid": "nokty"},
        "not an object",
        jwk(small, "small"),
        jwk(RSA_KEY, "good"),
    )
    assert j.verify(token(RSA_KEY, "RS256", kid="good"), now=NOW)
    for kid in ("broken", "k256", "odd", "nokty", "small"):
        assert f"'{kid}'" in caplog.text
    assert "#4" in caplog.text
    with pytest.raises(UnknownKeyId):
        j.verify(token(small, "RS256", kid="small"), now=NOW)


def test_private_jwks_entries_are_used_as_public_keys() -> None:
    private_jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY))
    private_jwk["kid"] = "p"
    del private_jwk["key_ops"]  # PyJWT marks it ["sign"], which would be ignored
    j = jwks_verifier(private_jwk)
    assert j.verify(token(RSA_KEY, "RS256", kid="p"), now=NOW)


# ---------------------------------------------------------------------------
# loading keys from the config


def test_secret_and_public_key_files(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "key.pem").write_text(pem(P256_KEY))
    v = JwtVerifier("t", cfg(secret_file="secret"), base_dir=tmp_path)
    assert v.verify(token(SECRET, "HS256"), now=NOW)
    k = JwtVerifier("t", cfg(public_key_file=str(tmp_path / "key.pem")))
    assert k.verify(token(P256_KEY, "ES256"), now=NOW)


def test_certificate_as_public_key() -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(RSA_KEY, hashes.SHA256())
    )
    v = verifier(public_key=cert.public_bytes(serialization.Encoding.PEM).decode())
    assert v.verify(token(RSA_KEY, "RS256"), now=NOW)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"public_key": "not a key"}, "not a PEM public key"),
        (
            {
                "public_key": RSA_KEY.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
            },
            "private key",
        ),
        (
            {"public_key": pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))},
            "too short",
        ),
        ({"public_key": pem(RSA_KEY), "algorithms": ["ES256"]}, "fits none"),
        ({"public_key": pem(P256_KEY), "algorithms": ["ES384"]}, "fits none"),
        (
            {"public_key": pem(ec.generate_private_key(ec.SECP256K1()))},
            "cannot verify any supported",
        ),
        ({"secret": pem(RSA_KEY)}, "not an HMAC secret"),
        ({"secret": ""}, "empty"),
        ({"secret_file": "/nonexistent/secret"}, "cannot read secret_file"),
        ({"public_key_file": "/nonexistent/key.pem"}, "cannot read public_key_file"),
    ],
)
def test_bad_keys_raise_value_error(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        verifier(**kw)
    for field in ("public_key", "secret"):  # no key material in the message
        value = kw.get(field)
        if isinstance(value, str) and len(value) > 20:
            for line in value.splitlines()[1:-1]:
                assert line not in str(info.value)


def test_short_secret_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshgate.auth")
    verifier(secret="tiny-secret")
    assert "32" in caplog.text and "tiny-secret" not in caplog.text


# ---------------------------------------------------------------------------
# check_claims


def test_scopes_from_scope_string_and_scp() -> None:
    check = JwtVerifier.check_claims
    check({"scope": "read write"}, ["read"], [])
    check({"scope": "read write"}, ["read", "write"], [])
    check({"scp": ["read", "write"]}, ["write"], [])
    check({"scp": "read write"}, ["write"], [])
    check({"scope": "read", "scp": ["write"]}, ["read", "write"], [])
    check({}, [], [])
    with pytest.raises(AuthError) as info:
        check({"scope": "read"}, ["read", "write", "admin"], [])
    err = info.value
    assert (err.status, err.error) == (403, "insufficient_scope")
    assert "write" in err.description and "admin" in err.description
    assert "read" not in err.description.replace("required", "")
    with pytest.raises(AuthError):
        check({"scope": "readwrite"}, ["read"], [])
    with pytest.raises(AuthError):
        check({"scp": [["read"]]}, ["read"], [])
    with pytest.raises(AuthError):
        check({}, ["read"], [])


def test_required_claims_list() -> None:
    check = JwtVerifier.check_claims
    check({"sub": "a", "email": "a@x"}, [], ["sub", "email"])
    with pytest.raises(AuthError) as info:
        check({"sub": "a", "tenant": None}, [], ["sub", "email", "tenant"])
    assert info.value.status == 403 and info.value.error == "insufficient_scope"
    assert "email" in info.value.description and "tenant" in info.value.description


def test_required_claims_dict_exact_values() -> None:
    check = JwtVerifier.check_claims
    check({"tenant": "acme", "admin": True, "level": 3}, [], {"tenant": "acme", "admin": True})
    check({"level": 3}, [], {"level": 3})
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"tenant": "other"}, {"tenant": "acme"}),
        ({}, {"tenant": "acme"}),
        ({"admin": 1}, {"admin": True}),  # 1 is not true
        ({"level": True}, {"level": 1}),
        ({"level": "3"}, {"level": 3}),
        ({"tenant": ["acme"]}, {"tenant": "acme"}),
    ]
    for got, required in cases:
        with pytest.raises(AuthError) as info:
            check(got, [], required)
        assert info.value.status == 403
        assert next(iter(required)) in info.value.description


# ---------------------------------------------------------------------------
# fetching helpers


def test_jwks_redirects_never_downgrade_to_http() -> None:
    import io
    import urllib.error
    import urllib.request
    from email.message import Message

    from meshgate.auth.jwt import _NoDowngrade

    handler = _NoDowngrade()
    https = urllib.request.Request("https://idp.example/jwks")
    with pytest.raises(urllib.error.HTTPError, match="https to http"):
        handler.redirect_request(https, io.BytesIO(), 302, "Found", Message(), "http://x/jwks")
    ok = handler.redirect_request(https, io.BytesIO(), 302, "Found", Message(), "https://x/k")
    assert ok is not None and ok.full_url == "https://x/k"
    plain = urllib.request.Request("http://idp.example/jwks")
    assert handler.redirect_request(plain, io.BytesIO(), 301, "Moved", Message(), "http://y/")


def test_jwks_url_is_logged_without_credentials() -> None:
    from meshgate.auth.jwt import _loggable

    assert _loggable("https://user:pw@idp.example:8443/jwks?token=abc") == (
        "https://idp.example:8443/jwks"
    )
    assert _loggable("http://[::1]:80/k") == "http://[::1]:80/k"
