"""What a workload CSR may ask for: one URI SAN, the SPIFFE ID the caller
proved, on an ECDSA P-256 key, and nothing else.

Everything else a CSR can carry is refused with the reason (`CsrRefused`)
rather than dropped, so a misconfigured agent learns what it did wrong and
the audit log says what was asked. Only the CSR's public key reaches the
certificate: its subject and extensions are read to be judged, never copied.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from meshgate.mesh.identity import SpiffeId

__all__ = ["MAX_CSR_BYTES", "CsrRefused", "check_csr"]

MAX_CSR_BYTES = 64 * 1024
_CURVE_NAMES = {
    "secp192r1": "P-192",
    "secp224r1": "P-224",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}


class CsrRefused(ValueError):
    """A CSR this CA will not sign; `reason` says what was wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _show(value: str) -> str:
    """A caller's value quoted for a reason: bounded, control characters escaped."""
    return repr(value if len(value) <= 100 else value[:100] + "...")


def _check_key(key: Any) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            name = key.curve.name
            nist = _CURVE_NAMES.get(name)
            shown = f"{name} ({nist})" if nist else name
            raise CsrRefused(f"curve {shown} is not accepted: use ECDSA P-256 (secp256r1)")
        return
    if isinstance(key, rsa.RSAPublicKey):
        weak = f" (and {key.key_size} bits is weak for RSA anyway)" if key.key_size < 2048 else ""
        raise CsrRefused(f"key type RSA is not accepted: use ECDSA P-256{weak}")
    kinds: list[tuple[type[Any], str]] = [
        (ed25519.Ed25519PublicKey, "Ed25519"),
        (ed448.Ed448PublicKey, "Ed448"),
        (dsa.DSAPublicKey, "DSA"),
    ]
    kind = next((label for cls, label in kinds if isinstance(key, cls)), type(key).__name__)
    raise CsrRefused(f"key type {kind} is not accepted: use ECDSA P-256")


def _check_extensions(csr: x509.CertificateSigningRequest) -> x509.Extensions:
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise CsrRefused(f"the CSR's extensions cannot be read ({exc})") from None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CsrRefused(
                "the CSR asks for CA powers (basicConstraints CA:TRUE): "
                "a workload certificate is never a CA"
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CsrRefused(
                "the CSR asks for CA powers (keyUsage keyCertSign or cRLSign): "
                "a workload certificate is never a CA"
            )
        if isinstance(value, x509.NameConstraints):
            raise CsrRefused("the CSR asks for CA powers (nameConstraints)")
    return extensions


def _check_san(extensions: x509.Extensions, expected: SpiffeId) -> None:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRefused(
            f"the CSR has no subjectAltName: it must carry {expected} as its one URI SAN"
        ) from None
    uris: list[str] = []
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
            continue
        if isinstance(name, x509.DNSName):
            what = f"a DNS SAN ({_show(name.value)})"
        elif isinstance(name, x509.IPAddress):
            what = f"an IP SAN ({name.value})"
        elif isinstance(name, x509.RFC822Name):
            what = f"an e-mail SAN ({_show(name.value)})"
        elif isinstance(name, x509.OtherName):
            what = f"an other-name SAN ({name.type_id.dotted_string})"
        elif isinstance(name, x509.DirectoryName):
            what = f"a directory-name SAN ({_show(name.value.rfc4514_string())})"
        elif isinstance(name, x509.RegisteredID):
            what = f"a registered-ID SAN ({name.value.dotted_string})"
        else:  # pragma: no cover - every GeneralName type is listed above
            what = f"a {type(name).__name__} SAN"
        raise CsrRefused(f"{what} was not earned: only the URI SAN {expected} is issued")
    if not uris:
        raise CsrRefused(f"the CSR has no URI SAN: it must carry {expected}")
    if len(uris) > 1:
        raise CsrRefused(f"the CSR has {len(uris)} URI SANs: exactly one, {expected}, is issued")
    if uris[0] != expected.uri:
        raise CsrRefused(
            f"the URI SAN {_show(uris[0])} is not {expected}, the identity this caller proved"
        )


def check_csr(csr_pem: bytes, expected: SpiffeId) -> x509.CertificateSigningRequest:
    """The parsed CSR if this CA would sign it for `expected`; CsrRefused otherwise."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrRefused(f"the CSR is larger than {MAX_CSR_BYTES // 1024} KiB")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrRefused("not a PEM certificate signing request") from None
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrRefused("the CSR's public key cannot be read") from None
    _check_key(key)
    try:
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        signed = False
    if not signed:
        raise CsrRefused("the CSR's signature is invalid: it was not signed by its own key")
    _check_san(_check_extensions(csr), expected)
    return csr
