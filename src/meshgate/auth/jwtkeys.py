"""The keys a `JwtVerifier` checks signatures with, and the algorithms each
one accepts: an HMAC secret, a PEM public key or certificate (inline or a
file), or a public key from a JWKS (parsed by `auth.jwks`).

A public key is used only with the algorithms that fit it (RSA: RS*/PS*; EC
P-256, P-384, P-521: ES256, ES384, ES512; Ed25519/Ed448: EdDSA), narrowed to
the configured `algorithms:`; an RSA key shorter than 2048 bits is refused,
and so is a PEM that holds a private key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import PyJWTError

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "EC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "MAX_CANDIDATES",
    "MIN_RSA_BITS",
    "RSA_ALGORITHMS",
]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS = (*RSA_ALGORITHMS, "ES256", "ES384", "ES512", "EdDSA")

# One shared, stateless instance per algorithm name; "none" is left out.
_ALGORITHMS: dict[str, Algorithm] = {
    name: algorithm
    for name, algorithm in get_default_algorithms().items()
    if name in HMAC_ALGORITHMS or name in ASYMMETRIC_ALGORITHMS
}

MIN_RSA_BITS = 2048
MAX_CANDIDATES = 8
"""Keys tried for a token without `kid` (they all accept its algorithm)."""


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: Any
    """bytes (HMAC) or a cryptography public key."""
    algorithms: frozenset[str]
    label: str
    fingerprint: bytes


# ---------------------------------------------------------------------------
# keys


def _describe(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA {key.key_size}-bit key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey):
        return "an Ed448 key"
    return f"a {type(key).__name__}"


def _public(key: Any) -> Any:
    """The public half of a key (a JWKS may, wrongly, publish private keys)."""
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        return key.public_key()
    return key


def _compatible(key: Any) -> tuple[str, ...]:
    """Every supported algorithm that can verify with `key`."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def _public_key_algorithms(key: Any, accepted: frozenset[str] | None) -> frozenset[str]:
    """The algorithms `key` is used with; ValueError when it cannot be used."""
    compatible = _compatible(key)
    if not compatible:
        raise ValueError(f"{_describe(key)} cannot verify any supported JWT algorithm")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{_describe(key)} is too short (at least {MIN_RSA_BITS} bits)")
    algorithms = frozenset(compatible if accepted is None else accepted.intersection(compatible))
    if not algorithms:
        raise ValueError(
            f"{_describe(key)} fits none of the accepted algorithms "
            f"({', '.join(sorted(accepted or ()))}); it needs one of {', '.join(compatible)}"
        )
    for name in algorithms:  # PyJWT's own type and curve checks
        try:
            _ALGORITHMS[name].prepare_key(key)
        except (PyJWTError, TypeError, ValueError) as exc:
            raise ValueError(f"{_describe(key)} cannot be used with {name}: {exc}") from None
    return algorithms


def _der(key: Any) -> bytes:
    der: bytes = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der


def _load_pem(data: bytes, what: str) -> Any:
    if b"PRIVATE KEY-----" in data:
        raise ValueError(
            f"{what} holds a private key; give the gateway the public key only "
            "(openssl pkey -in key.pem -pubout)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"{what} is not a PEM public key (-----BEGIN PUBLIC KEY-----) or certificate"
        ) from None


def _read(path_text: str, base_dir: Path | None, what: str) -> bytes:
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
