"""The mesh's certificate authority: the signing intermediate, the trust
bundle, and the workload certificates it issues from CSRs.

A CA directory (see `ca_files` for how its files are written) holds
`intermediate.pem` and `intermediate.key`, the signing CA, with `chain.pem`;
`bundle.pem`, every root a proxy trusts; and `bundle-state.json`, what
rotation needs to remember: per root fingerprint, whether it has signed and
when its last leaf expires, and the previous intermediates, whose leaves
still verify until they expire. `create_embedded` also keeps the root in
`root/` for a one-command control plane; its key is only needed to make the
next intermediate and belongs offline once the mesh matters.

A workload certificate carries exactly one name, the URI SAN of the SPIFFE
ID the caller proved (`csr.check_csr` judges the request), and serves both
sides of mutual TLS. Rotation keeps an overlap: a new root joins the bundle
first (`add_root`), the signing intermediate switches once the bundle has
reached the proxies (`rotate_intermediate`), and the old root leaves only
when no leaf under it can still be valid (`retire_roots`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshgate.mesh.ca_files import (
    BUNDLE,
    BUNDLE_STATE,
    CHAIN,
    CLOCK_SKEW,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    INTERMEDIATE_LIFETIME,
    ROOT_CERT,
    ROOT_KEY,
    ROOT_LIFETIME,
    IntermediatePaths,
    RootPaths,
    aki,
    cert_to_pem,
    check_root,
    check_trust_domain,
    fingerprint,
    init_root,
    is_ca,
    issue_intermediate,
    issued_by,
    key_to_pem,
    mkdir_private,
    now_utc,
    parse_cert,
    parse_certs,
    parse_key,
    replace_file,
    same_key,
    trust_domain_of,
)
from meshgate.mesh.csr import CsrRefused, check_csr
from meshgate.mesh.identity import SpiffeId

__all__ = [
    "BUNDLE",
    "BUNDLE_STATE",
    "CHAIN",
    "CLOCK_SKEW",
    "INTERMEDIATE_CERT",
    "INTERMEDIATE_KEY",
    "INTERMEDIATE_LIFETIME",
    "MAX_LEAF_LIFETIME",
    "MIN_LEAF_LIFETIME",
    "ROOT_CERT",
    "ROOT_KEY",
    "ROOT_LIFETIME",
    "CertificateAuthority",
    "CsrRefused",
    "IntermediatePaths",
    "IssuedCertificate",
    "LeafRefused",
    "RootPaths",
    "fingerprint",
    "init_root",
    "issue_intermediate",
]

MIN_LEAF_LIFETIME = 60.0
MAX_LEAF_LIFETIME = 30 * 86400.0


class LeafRefused(ValueError):
    """A presented certificate that does not prove an identity of this mesh."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _RootRecord:
    """What `retire_roots` needs to know of a root of the bundle."""

    signed: bool = False  # an intermediate under it has been the signing one
    last_leaf_expiry: float | None = None  # POSIX time; None: no leaf yet


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    cert_pem: bytes
    chain_pem: bytes  # the leaf's issuers, intermediate first; not the leaf
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    spiffe_id: SpiffeId


# -- the signing CA -------------------------------------------------------------------


class CertificateAuthority:
    """The signing intermediate, the trust bundle and the rotation state of a
    CA directory. Built by `load` or `create_embedded`; every change is
    written to the directory before the call returns."""

    def __init__(
        self,
        directory: Path,
        intermediate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        roots: list[x509.Certificate],
        records: dict[str, _RootRecord],
        previous: list[x509.Certificate],
    ) -> None:
        self.directory = directory
        self._intermediate = intermediate
        self._key = key
        self._roots = roots
        self._trust_domain = trust_domain_of(intermediate, str(directory / INTERMEDIATE_CERT))
        self._issuer = self._issuer_of(intermediate, str(directory / INTERMEDIATE_CERT))
        self._records = records  # by root fingerprint
        self._previous = previous  # intermediates that signed before this one
        # A bundle made without this module (no state file) is handled
        # conservatively: only the current issuer is known to have signed,
        # so no other root is ever retired on a guess.
        self._record(self._issuer).signed = True

    # -- construction -------------------------------------------------------------

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """The CA in `directory`: `intermediate.pem`, `intermediate.key`,
        `bundle.pem` (one or more roots), and `bundle-state.json` if any."""
        names = (INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE)
        missing = [n for n in names if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"{directory}: no CA here ({', '.join(missing)} missing)")
        cert_where = str(directory / INTERMEDIATE_CERT)
        intermediate = parse_cert((directory / INTERMEDIATE_CERT).read_bytes(), cert_where)
        key = parse_key(
            (directory / INTERMEDIATE_KEY).read_bytes(), str(directory / INTERMEDIATE_KEY)
        )
        if not same_key(intermediate, key):
            raise ValueError(f"{directory / INTERMEDIATE_KEY} is not the key of {cert_where}")
        if not is_ca(intermediate):
            raise ValueError(f"{cert_where} is not a CA certificate")
        td = trust_domain_of(intermediate, cert_where)
        roots = parse_certs((directory / BUNDLE).read_bytes(), str(directory / BUNDLE))
        for root in roots:
            check_root(root, td, str(directory / BUNDLE))
        records, previous = _load_state(directory / BUNDLE_STATE)
        return cls(directory, intermediate, key, roots, records, previous)

    @classmethod
    def create_embedded(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        """The CA in `directory`, made on first use: a root in `directory/root`
        (its key should then be moved offline: it is only needed to make the
        next intermediate) and an intermediate signed by it. Later calls load
        what is there; a restart never regenerates anything."""
        check_trust_domain(trust_domain)
        names = (INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE)
        if not any((directory / n).exists() for n in names):
            mkdir_private(directory)
            root_dir = directory / "root"
            if not (root_dir / ROOT_CERT).exists():  # else a first run stopped halfway
                init_root(root_dir, trust_domain)
            issue_intermediate(root_dir, directory, name="embedded")
        ca = cls.load(directory)
        if ca.trust_domain != trust_domain:
            raise ValueError(
                f"{directory}: the CA there is for trust domain {ca.trust_domain!r}, "
                f"not {trust_domain!r}"
            )
        return ca

    # -- what it serves -----------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def bundle_pem(self) -> bytes:
        """Every trusted root, PEM concatenated."""
        return b"".join(cert_to_pem(r) for r in self._roots)

    @property
    def chain_pem(self) -> bytes:
        """The signing intermediate and its root: what a leaf is served with."""
        return cert_to_pem(self._intermediate) + cert_to_pem(self._issuer)

    @property
    def intermediate(self) -> x509.Certificate:
        return self._intermediate

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return tuple(self._roots)

    # -- issuing and verifying ----------------------------------------------------

    def sign_workload(
        self,
        csr_pem: bytes,
        expected: SpiffeId,
        *,
        lifetime: float,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A certificate for `expected` and the CSR's key, valid for
        `lifetime` seconds from now (and CLOCK_SKEW before), never past the
        intermediate. The CSR must ask for exactly that identity and nothing
        more (`check_csr`); its subject is ignored."""
        if not MIN_LEAF_LIFETIME <= lifetime <= MAX_LEAF_LIFETIME:
            raise ValueError("a workload certificate lives between 60 seconds and 30 days")
        if expected.trust_domain != self._trust_domain:
            raise CsrRefused(f"{expected} is outside this CA's trust domain {self._trust_domain}")
        csr = check_csr(csr_pem, expected)
        now = now_utc() if now is None else now.astimezone(dt.UTC).replace(microsecond=0)
        not_before = max(
            now - dt.timedelta(seconds=CLOCK_SKEW), self._intermediate.not_valid_before_utc
        )
        not_after = min(
            now + dt.timedelta(seconds=lifetime), self._intermediate.not_valid_after_utc
        )
        not_after = not_after.replace(microsecond=0)
        if not_after <= now:
            raise ValueError(f"the signing intermediate expired at {not_after}: rotate it")
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # check_csr's promise
        cert = (
            x509.CertificateBuilder()
            # An empty subject: the SAN is the name, and is critical (RFC 5280
            # 4.2.1.6), which is also what the webpki verifier requires of it.
            .subject_name(x509.Name([]))
            .issuer_name(self._intermediate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(expected.uri)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki(self._intermediate), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        record = self._record(self._issuer)
        expiry = cert.not_valid_after_utc.timestamp()
        if record.last_leaf_expiry is None or record.last_leaf_expiry < expiry:
            record.last_leaf_expiry = expiry
            self._save_state()
        return IssuedCertificate(
            cert_pem=cert_to_pem(cert),
            chain_pem=self.chain_pem,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            spiffe_id=expected,
        )

    def verify_leaf(self, cert_pem: bytes, *, now: dt.datetime | None = None) -> SpiffeId:
        """The identity a presented certificate proves: it chains to a root
        of the bundle through this CA's intermediates (or ones presented
        after it in `cert_pem`), is valid at `now`, is a client certificate
        and names one SPIFFE ID of this trust domain. LeafRefused otherwise."""
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            raise LeafRefused("not a PEM certificate") from None
        leaf = certs[0]
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(self._roots))
            .time(dt.datetime.now(dt.UTC) if now is None else now.astimezone(dt.UTC))
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, [*certs[1:], self._intermediate, *self._previous])
        except verification.VerificationError as exc:
            why = str(exc).removeprefix("validation failed: ").split(" (encountered", 1)[0]
            raise LeafRefused(
                f"the certificate does not verify against the bundle: {why}"
            ) from None
        uris = [
            n.value
            for n in verified.subjects or ()
            if isinstance(n, x509.UniformResourceIdentifier)
        ]
        if len(uris) != 1:
            raise LeafRefused(f"the certificate has {len(uris)} URI SANs, not one SPIFFE ID")
        try:
            identity = SpiffeId.parse(uris[0])
        except ValueError as exc:
            raise LeafRefused(f"its URI SAN is not a workload SPIFFE ID: {exc}") from None
        if identity.trust_domain != self._trust_domain:
            raise LeafRefused(f"{identity} is outside trust domain {self._trust_domain}")
        return identity

    # -- rotation -----------------------------------------------------------------

    def add_root(self, root_pem: bytes) -> str:
        """Trust another root of this trust domain (before an intermediate it
        signed takes over, so that proxies have it first). Its fingerprint."""
        root = parse_cert(root_pem, "the new root")
        check_root(root, self._trust_domain, "the new root")
        fp = fingerprint(root)
        if all(fingerprint(r) != fp for r in self._roots):
            self._roots.append(root)
            replace_file(self.directory / BUNDLE, self.bundle_pem, 0o644)
        return fp

    def rotate_intermediate(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Sign with another intermediate from now on. Its root must already be
        in the bundle; leaves of the previous one keep verifying."""
        cert = parse_cert(cert_pem, "the new intermediate")
        key = parse_key(key_pem, "the new intermediate's key")
        if not same_key(cert, key):
            raise ValueError("the new intermediate's key does not match its certificate")
        if not is_ca(cert):
            raise ValueError("the new intermediate is not a CA certificate")
        td = trust_domain_of(cert, "the new intermediate")
        if td != self._trust_domain:
            raise ValueError(f"the new intermediate is for {td!r}, not {self._trust_domain!r}")
        issuer = self._issuer_of(cert, "the new intermediate")
        now = now_utc()
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise ValueError("the new intermediate is not valid now")
        if fingerprint(cert) == fingerprint(self._intermediate):
            return
        replace_file(self.directory / INTERMEDIATE_KEY, key_to_pem(key), 0o600)
        replace_file(self.directory / INTERMEDIATE_CERT, cert_to_pem(cert), 0o644)
        replace_file(self.directory / CHAIN, cert_to_pem(cert) + cert_to_pem(issuer), 0o644)
        new = fingerprint(cert)
        self._previous = [c for c in self._previous if fingerprint(c) != new]
        self._previous.append(self._intermediate)
        self._intermediate, self._key, self._issuer = cert, key, issuer
        self._record(issuer).signed = True
        self._save_state()

    def rotate_intermediate_from(self, directory: Path) -> None:
        """`rotate_intermediate` with the files `issue_intermediate` wrote."""
        self.rotate_intermediate(
            (directory / INTERMEDIATE_CERT).read_bytes(),
            (directory / INTERMEDIATE_KEY).read_bytes(),
        )

    def retire_roots(self, now: dt.datetime | None = None) -> list[str]:
        """Drop from the bundle the roots no leaf can need any more: each has
        signed (through an intermediate), is not the current intermediate's
        issuer, and its last leaf has expired at `now`. A root only added
        (waiting for its intermediate) stays. The fingerprints dropped."""
        at = dt.datetime.now(dt.UTC) if now is None else now.astimezone(dt.UTC)
        current = fingerprint(self._issuer)
        dropped: list[str] = []
        for root in self._roots:
            fp = fingerprint(root)
            record = self._records.get(fp, _RootRecord())
            last = record.last_leaf_expiry
            if fp != current and record.signed and (last is None or last <= at.timestamp()):
                dropped.append(fp)
        # A previous intermediate goes with its root, or once it has expired:
        # it can vouch for no leaf after that.
        previous = [
            c
            for c in self._previous
            if c.not_valid_after_utc > at
            and any(issued_by(c, r) for r in self._roots if fingerprint(r) not in dropped)
        ]
        if not dropped and len(previous) == len(self._previous):
            return []
        self._previous = previous
        if dropped:
            self._roots = [r for r in self._roots if fingerprint(r) not in dropped]
            for fp in dropped:
                self._records.pop(fp, None)
            replace_file(self.directory / BUNDLE, self.bundle_pem, 0o644)
        self._save_state()
        return dropped

    # -- state ----------------------------------------------------------------------

    def _issuer_of(self, cert: x509.Certificate, where: str) -> x509.Certificate:
        for root in self._roots:
            if issued_by(cert, root):
                return root
        raise ValueError(f"{where} is not issued by a root of the trust bundle")

    def _record(self, root: x509.Certificate) -> _RootRecord:
        return self._records.setdefault(fingerprint(root), _RootRecord())

    def _save_state(self) -> None:
        doc = {
            "version": 1,
            "roots": {
                fp: {"signed": r.signed, "last_leaf_expiry": r.last_leaf_expiry}
                for fp, r in self._records.items()
            },
            "previous_intermediates": [cert_to_pem(c).decode() for c in self._previous],
        }
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        replace_file(self.directory / BUNDLE_STATE, data, 0o644)


def _load_state(path: Path) -> tuple[dict[str, _RootRecord], list[x509.Certificate]]:
    """`bundle-state.json`, checked: a state file that cannot be read stops
    the CA rather than letting it forget which roots are still needed."""
    if not path.exists():
        return {}, []
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("expected an object with version 1")
        records: dict[str, _RootRecord] = {}
        roots = doc.get("roots", {})
        if not isinstance(roots, dict):
            raise ValueError("roots is not an object")
        for fp, raw in roots.items():
            if not isinstance(raw, dict):
                raise ValueError(f"roots.{fp} is not an object")
            signed, last = raw.get("signed", False), raw.get("last_leaf_expiry")
            if not isinstance(signed, bool):
                raise ValueError(f"roots.{fp}.signed is not a boolean")
            if last is not None and (isinstance(last, bool) or not isinstance(last, int | float)):
                raise ValueError(f"roots.{fp}.last_leaf_expiry is not a number")
            records[fp] = _RootRecord(signed, None if last is None else float(last))
        pems = doc.get("previous_intermediates", [])
        if not isinstance(pems, list) or not all(isinstance(p, str) for p in pems):
            raise ValueError("previous_intermediates is not a list of PEM strings")
        previous = [parse_cert(p.encode(), "previous_intermediates") for p in pems]
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    return records, previous
