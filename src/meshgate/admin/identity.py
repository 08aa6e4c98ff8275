"""`/identity`: a mesh proxy's certificate and trust bundle, read from their PEMs."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshgate.admin.hooks import IdentitySource

__all__ = ["describe_identity"]


def _names(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    out = [str(u) for u in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [str(d) for d in ext.value.get_values_for_type(x509.DNSName)]
    return out


def _cert(cert: x509.Certificate, now: float) -> dict[str, Any]:
    not_after = cert.not_valid_after_utc.timestamp()
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": not_after,
        "seconds_left": round(not_after - now, 3),
    }


def _load_all(pem: bytes) -> list[x509.Certificate]:
    if not pem.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def describe_identity(source: IdentitySource, now: float | None = None) -> dict[str, Any]:
    """The identity, its certificate (leaf) and chain, and the trust bundle's
    roots: subjects, serials, SHA-256 fingerprints, validity. No key."""
    now = time.time() if now is None else now
    chain = _load_all(source.chain_pem)
    doc: dict[str, Any] = {"identity": source.identity, "certificate": None, "chain": []}
    if chain:
        leaf = chain[0]
        doc["certificate"] = {**_cert(leaf, now), "names": _names(leaf)}
        doc["chain"] = [_cert(c, now) for c in chain[1:]]
    doc["trust_bundle"] = [_cert(c, now) for c in _load_all(source.bundle_pem)]
    return doc
