"""A mesh CA on disk: making a root and intermediates, and the conventions
every CA file follows.

A directory holding CA material is 0700; a private key is created 0600 by
the `open` that makes it (never chmod-ed afterwards, so it is not readable
by others even for an instant) and is PEM PKCS8, unencrypted: the directory
is what protects it. Certificates are written once (`create_file` refuses
to overwrite) or replaced atomically (`replace_file`), so a reader never
sees half a bundle.

A root (`init_root`) is self-signed, path length 1; an intermediate
(`issue_intermediate`) is signed by it, path length 0, and never outlives
it. Both carry the trust domain as a `spiffe://<trust domain>` URI SAN, as
SPIFFE does for CAs, so a bundle says which mesh it is for. ECDSA P-256 and
SHA-256 throughout.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate.mesh.identity import TRUST_DOMAIN_RE

__all__ = [
    "BUNDLE",
    "BUNDLE_STATE",
    "CHAIN",
    "CLOCK_SKEW",
    "INTERMEDIATE_CERT",
    "INTERMEDIATE_KEY",
    "INTERMEDIATE_LIFETIME",
    "ROOT_CERT",
    "ROOT_KEY",
    "ROOT_LIFETIME",
    "IntermediatePaths",
    "RootPaths",
    "fingerprint",
    "init_root",
    "issue_intermediate",
]

DAY = 86400.0
ROOT_LIFETIME = 10 * 365 * DAY
INTERMEDIATE_LIFETIME = 365 * DAY
MAX_CA_LIFETIME = 100 * 365 * DAY
CLOCK_SKEW = 60.0  # not_before is this far back, for peers whose clocks run late

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
CHAIN = "chain.pem"
BUNDLE = "bundle.pem"
BUNDLE_STATE = "bundle-state.json"


@dataclass(frozen=True, slots=True)
class RootPaths:
    """What `init_root` wrote."""

    directory: Path
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the DER, lowercase hex


@dataclass(frozen=True, slots=True)
class IntermediatePaths:
    """What `issue_intermediate` wrote: a directory a CA can be loaded from."""

    directory: Path
    cert: Path
    key: Path
    chain: Path
    bundle: Path
    fingerprint: str
    not_after: dt.datetime


# -- files and keys -------------------------------------------------------------------


def now_utc() -> dt.datetime:
    # Whole seconds: certificate times have no fraction, and a span computed
    # here must be the span the certificate states.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def mkdir_private(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def _write_fd(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def create_file(path: Path, data: bytes, mode: int) -> None:
    """A new file with `mode` from its first byte; an existing one is an error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: a CA file is never overwritten") from None
    try:
        _write_fd(fd, data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """`path` now holds `data`, atomically: readers see the old or the new."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_fd(fd, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
            "a CA is never overwritten; pick another directory"
        )


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (the bundle state's key)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def parse_key(data: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{where}: a CA key must be ECDSA P-256")
    return key


def parse_cert(data: bytes, where: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{where}: not a PEM certificate") from None


def parse_certs(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{where}: not PEM certificates") from None
    return certs


def same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    def spki(k: Any) -> bytes:
        return bytes(
            k.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    return spki(cert.public_key()) == spki(key.public_key())


def trust_domain_of(cert: x509.Certificate, where: str) -> str:
    """A CA's trust domain, from its one `spiffe://<td>` URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError(f"{where}: a mesh CA carries a spiffe://<trust domain> URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise ValueError(f"{where}: a mesh CA carries one spiffe://<trust domain> URI SAN")
    td = uris[0][len("spiffe://") :]
    if not TRUST_DOMAIN_RE.fullmatch(td):
        raise ValueError(f"{where}: {uris[0]!r} does not name a trust domain")
    return td


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_trust_domain(trust_domain: str) -> None:
    if not TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise ValueError(
            f"{trust_domain!r} is not a trust domain (lowercase letters, digits, '.', '-', '_')"
        )


def _ca_certificate(
    *,
    common_name: str,
    trust_domain: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signing_key: ec.EllipticCurvePrivateKey,
    path_length: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A root (`issuer` None: self-signed) or an intermediate under `issuer`."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),  # the X.520 bound
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(aki(issuer), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_ca_lifetime(lifetime: float) -> None:
    if not CLOCK_SKEW < lifetime <= MAX_CA_LIFETIME:  # NaN included
        raise ValueError("a CA's lifetime is more than a minute and at most 100 years")


# -- creating a CA --------------------------------------------------------------------


def init_root(directory: Path, trust_domain: str, *, lifetime: float = ROOT_LIFETIME) -> RootPaths:
    """A new self-signed root in `directory` (`root.pem`, `root.key`)."""
    check_trust_domain(trust_domain)
    _check_ca_lifetime(lifetime)
    cert_path, key_path = directory / ROOT_CERT, directory / ROOT_KEY
    _refuse_existing(cert_path, key_path)
    mkdir_private(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = now_utc()
    cert = _ca_certificate(
        common_name=f"meshgate root {trust_domain}",
        trust_domain=trust_domain,
        public_key=key.public_key(),
        issuer=None,
        signing_key=key,
        path_length=1,
        not_before=now - dt.timedelta(seconds=CLOCK_SKEW),
        not_after=now + dt.timedelta(seconds=lifetime),
    )
    create_file(key_path, key_to_pem(key), 0o600)
    create_file(cert_path, cert_to_pem(cert), 0o644)
    return RootPaths(directory, cert_path, key_path, fingerprint(cert))


def issue_intermediate(
    root_dir: Path, out_dir: Path, *, name: str, lifetime: float = INTERMEDIATE_LIFETIME
) -> IntermediatePaths:
    """A new intermediate signed by the root in `root_dir`, written to
    `out_dir` with its chain and the trust bundle (the root): a directory
    `CertificateAuthority.load` can serve from. It never outlives the root."""
    if not name:
        raise ValueError("an intermediate needs a name")
    _check_ca_lifetime(lifetime)
    root_where = str(root_dir / ROOT_CERT)
    root = parse_cert((root_dir / ROOT_CERT).read_bytes(), root_where)
    root_key = parse_key((root_dir / ROOT_KEY).read_bytes(), str(root_dir / ROOT_KEY))
    if not same_key(root, root_key):
        raise ValueError(f"{root_dir / ROOT_KEY} is not the key of {root_where}")
    if not is_ca(root):
        raise ValueError(f"{root_where} is not a CA certificate")
    trust_domain = trust_domain_of(root, root_where)
    now = now_utc()
    root_end = root.not_valid_after_utc
    if root_end <= now + dt.timedelta(seconds=CLOCK_SKEW):
        raise ValueError(f"{root_where} has expired (or expires within a minute): make a new root")
    cert_path, key_path = out_dir / INTERMEDIATE_CERT, out_dir / INTERMEDIATE_KEY
    chain_path, bundle_path = out_dir / CHAIN, out_dir / BUNDLE
    _refuse_existing(cert_path, key_path, chain_path, bundle_path)
    mkdir_private(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca_certificate(
        common_name=f"meshgate intermediate {name}",
        trust_domain=trust_domain,
        public_key=key.public_key(),
        issuer=root,
        signing_key=root_key,
        path_length=0,
        not_before=now - dt.timedelta(seconds=CLOCK_SKEW),
        not_after=min(now + dt.timedelta(seconds=lifetime), root_end),
    )
    create_file(key_path, key_to_pem(key), 0o600)
    create_file(cert_path, cert_to_pem(cert), 0o644)
    create_file(chain_path, cert_to_pem(cert) + cert_to_pem(root), 0o644)
    create_file(bundle_path, cert_to_pem(root), 0o644)
    return IntermediatePaths(
        directory=out_dir,
        cert=cert_path,
        key=key_path,
        chain=chain_path,
        bundle=bundle_path,
        fingerprint=fingerprint(cert),
        not_after=cert.not_valid_after_utc,
    )


def check_root(root: x509.Certificate, trust_domain: str, where: str) -> None:
    """`root` is a self-signed CA of `trust_domain`, or ValueError."""
    if not is_ca(root) or not issued_by(root, root):
        raise ValueError(f"{where}: {root.subject.rfc4514_string()} is not a self-signed CA")
    td = trust_domain_of(root, where)
    if td != trust_domain:
        raise ValueError(f"{where}: a root of {td!r}, not of {trust_domain!r}")
