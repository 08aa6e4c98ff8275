"""The mesh CA: what a workload CSR may ask for, what the leaf says, the
files on disk, and trust bundle rotation with overlap."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from meshgate.mesh.ca import (
    CLOCK_SKEW,
    CertificateAuthority,
    CsrRefused,
    LeafRefused,
    fingerprint,
    init_root,
    issue_intermediate,
)
from meshgate.mesh.identity import SpiffeId

TD = "td.test"
ORDERS = SpiffeId(TD, "default", "orders")
PEM = serialization.Encoding.PEM

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: Key | None = None,
    names: Sequence[x509.GeneralName] | None = (x509.UniformResourceIdentifier(ORDERS.uri),),
    *,
    extensions: Sequence[x509.ExtensionType] = (),
    subject: x509.Name | None = None,
) -> bytes:
    key = key or p256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(PEM)


def load_leaf(issued_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued_pem)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def ca(ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.create_embedded(ca_dir, TD)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Modes must come from the code, not from a protective umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- a good CSR -----------------------------------------------------------------------


def test_good_csr_gives_exactly_the_identity(ca: CertificateAuthority) -> None:
    key = p256()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil"),
        ]
    )
    issued = ca.sign_workload(make_csr(key, subject=subject), ORDERS, lifetime=3600)
    leaf = load_leaf(issued.cert_pem)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ORDERS.uri)]
    assert leaf.subject == x509.Name([])  # the CSR's subject is not copied
    assert leaf.issuer == ca.intermediate.subject

    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert public.public_numbers() == key.public_key().public_numbers()

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)

    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    int_ski = ca.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == int_ski.value.digest

    leaf.verify_directly_issued_by(ca.intermediate)
    assert 0 < issued.serial == leaf.serial_number
    assert issued.serial.bit_length() <= 159
    assert issued.spiffe_id == ORDERS
    assert issued.chain_pem == ca.chain_pem
    assert issued.chain_pem == ca.intermediate.public_bytes(PEM) + ca.roots[0].public_bytes(PEM)
    assert issued.not_before == leaf.not_valid_before_utc
    assert issued.not_after == leaf.not_valid_after_utc
    assert ca.verify_leaf(issued.cert_pem) == ORDERS


def test_serials_differ(ca: CertificateAuthority) -> None:
    serials = {ca.sign_workload(make_csr(), ORDERS, lifetime=60).serial for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize("lifetime", [60.0, 300.0, 90 * 60.0, 86400.0, 30 * 86400.0])
def test_lifetime_as_asked(ca: CertificateAuthority, lifetime: float) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued = ca.sign_workload(make_csr(), ORDERS, lifetime=lifetime, now=now)
    assert issued.not_before == now - dt.timedelta(seconds=CLOCK_SKEW)
    assert issued.not_after == now + dt.timedelta(seconds=lifetime)


@pytest.mark.parametrize("lifetime", [0.0, 59.0, -60.0, 30 * 86400.0 + 1, float("nan")])
def test_lifetime_out_of_bounds(ca: CertificateAuthority, lifetime: float) -> None:
    with pytest.raises(ValueError, match="between 60 seconds and 30 days") as info:
        ca.sign_workload(make_csr(), ORDERS, lifetime=lifetime)
    assert not isinstance(info.value, CsrRefused)  # the caller's setting, not the CSR


def test_leaf_never_outlives_the_intermediate(tmp_path: Path) -> None:
    init_root(tmp_path / "root", TD)
    paths = issue_intermediate(tmp_path / "root", tmp_path / "ca", name="short", lifetime=3600)
    ca = CertificateAuthority.load(tmp_path / "ca")
    issued = ca.sign_workload(make_csr(), ORDERS, lifetime=30 * 86400)
    assert issued.not_after == ca.intermediate.not_valid_after_utc == paths.not_after
    assert ca.verify_leaf(issued.cert_pem) == ORDERS


def test_intermediate_never_outlives_the_root(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", TD, lifetime=7200)
    paths = issue_intermediate(tmp_path / "root", tmp_path / "ca", name="x")
    root_cert = x509.load_pem_x509_certificate(root.cert.read_bytes())
    assert paths.not_after == root_cert.not_valid_after_utc


# -- refusals -------------------------------------------------------------------------


def _flip_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature BIT STRING
    body = base64.encodebytes(bytes(der)).decode()
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode()
    )


def _uri(u: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(u)


OTHER = "spiffe://td.test/ns/default/sa/payments"
REFUSALS: list[tuple[str, bytes, str]] = [
    ("garbage", b"hello", r"^not a PEM certificate signing request$"),
    ("empty", b"", r"^not a PEM certificate signing request$"),
    (
        "bad base64",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        r"^not a PEM certificate signing request$",
    ),
    ("oversized", b"x" * (65 * 1024), r"larger than 64 KiB"),
    (
        "wrong URI SAN",
        make_csr(names=[_uri(OTHER)]),
        r"^the URI SAN 'spiffe://td.test/ns/default/sa/payments' is not "
        r"spiffe://td.test/ns/default/sa/orders, the identity this caller proved$",
    ),
    (
        "second URI SAN",
        make_csr(names=[_uri(ORDERS.uri), _uri(OTHER)]),
        r"^the CSR has 2 URI SANs: exactly one, spiffe://td.test/ns/default/sa/orders, is issued",
    ),
    (
        "DNS SAN",
        make_csr(names=[_uri(ORDERS.uri), x509.DNSName("orders.example.com")]),
        r"^a DNS SAN \('orders.example.com'\) was not earned: only the URI SAN "
        r"spiffe://td.test/ns/default/sa/orders is issued$",
    ),
    (
        "IP SAN",
        make_csr(names=[_uri(ORDERS.uri), x509.IPAddress(ipaddress.ip_address("10.0.0.7"))]),
        r"^an IP SAN \(10.0.0.7\) was not earned",
    ),
    (
        "e-mail SAN",
        make_csr(names=[x509.RFC822Name("ops@example.com"), _uri(ORDERS.uri)]),
        r"^an e-mail SAN \('ops@example.com'\) was not earned",
    ),
    (
        "other-name SAN",
        make_csr(
            names=[
                _uri(ORDERS.uri),
                x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x01a"),
            ]
        ),
        r"^an other-name SAN \(1.3.6.1.4.1.311.20.2.3\) was not earned",
    ),
    (
        "directory-name SAN",
        make_csr(
            names=[
                _uri(ORDERS.uri),
                x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])),
            ]
        ),
        r"^a directory-name SAN \('CN=root'\) was not earned",
    ),
    (
        "registered-id SAN",
        make_csr(names=[_uri(ORDERS.uri), x509.RegisteredID(ObjectIdentifier("1.2.3.4"))]),
        r"^a registered-ID SAN \(1.2.3.4\) was not earned",
    ),
    ("no SAN", make_csr(names=None), r"^the CSR has no subjectAltName: it must carry spiffe://"),
    (
        "RSA-1024",
        make_csr(rsa.generate_private_key(65537, 1024)),
        r"^key type RSA is not accepted: use ECDSA P-256 \(and 1024 bits is weak for RSA anyway\)$",
    ),
    (
        "RSA-2048",
        make_csr(rsa.generate_private_key(65537, 2048)),
        r"^key type RSA is not accepted: use ECDSA P-256$",
    ),
    (
        "P-384",
        make_csr(ec.generate_private_key(ec.SECP384R1())),
        r"^curve secp384r1 \(P-384\) is not accepted: use ECDSA P-256 \(secp256r1\)$",
    ),
    (
        "secp256k1",
        make_csr(ec.generate_private_key(ec.SECP256K1())),
        r"^curve secp256k1 is not accepted",
    ),
    ("Ed25519", make_csr(ed25519.Ed25519PrivateKey.generate()), r"^key type Ed25519 is not"),
    ("broken signature", _flip_signature(make_csr()), r"^the CSR's signature is invalid"),
    (
        "CA=True",
        make_csr(extensions=[x509.BasicConstraints(ca=True, path_length=None)]),
        r"^the CSR asks for CA powers \(basicConstraints CA:TRUE\)",
    ),
    (
        "keyCertSign",
        make_csr(
            extensions=[
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                )
            ]
        ),
        r"^the CSR asks for CA powers \(keyUsage",
    ),
]


@pytest.mark.parametrize(
    ("csr_pem", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_say_why(ca: CertificateAuthority, csr_pem: bytes, reason: str) -> None:
    with pytest.raises(CsrRefused, match=reason) as info:
        ca.sign_workload(csr_pem, ORDERS, lifetime=3600)
    assert isinstance(info.value, ValueError)
    assert info.value.reason == str(info.value)


def test_p192_refused_when_the_library_can_make_one(ca: CertificateAuthority) -> None:
    try:
        key = ec.generate_private_key(ec.SECP192R1())
    except Exception:  # pragma: no cover - builds without P-192
        pytest.skip("this OpenSSL build cannot make P-192 keys")
    with pytest.raises(CsrRefused, match=r"^curve secp192r1 \(P-192\) is not accepted"):
        ca.sign_workload(make_csr(key), ORDERS, lifetime=3600)


def test_a_ca_false_csr_extension_is_fine(ca: CertificateAuthority) -> None:
    csr = make_csr(extensions=[x509.BasicConstraints(ca=False, path_length=None)])
    assert ca.sign_workload(csr, ORDERS, lifetime=60).spiffe_id == ORDERS


def test_identity_outside_the_trust_domain(ca: CertificateAuthority) -> None:
    other = SpiffeId("elsewhere", "default", "orders")
    with pytest.raises(CsrRefused, match=re.escape("outside this CA's trust domain td.test")):
        ca.sign_workload(make_csr(names=[_uri(other.uri)]), other, lifetime=60)


def test_a_certificate_is_not_a_csr(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrRefused, match="not a PEM certificate signing request"):
        ca.sign_workload(ca.chain_pem, ORDERS, lifetime=60)


# -- files on disk --------------------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_modes_of_an_embedded_ca(ca_dir: Path) -> None:
    CertificateAuthority.create_embedded(ca_dir, TD)
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root") == 0o700
    assert mode(ca_dir / "intermediate.key") == 0o600
    assert mode(ca_dir / "root" / "root.key") == 0o600
    for public in ("intermediate.pem", "chain.pem", "bundle.pem", "root/root.pem"):
        assert mode(ca_dir / public) == 0o644


@pytest.mark.usefixtures("umask_zero")
def test_modes_of_init_and_issue(tmp_path: Path) -> None:
    root = init_root(tmp_path / "offline" / "root", TD)
    inter = issue_intermediate(root.directory, tmp_path / "online", name="a")
    assert mode(root.directory) == mode(inter.directory) == 0o700
    assert mode(root.key) == mode(inter.key) == 0o600
    assert b"BEGIN PRIVATE KEY" in root.key.read_bytes()  # PKCS8, unencrypted


def test_root_and_intermediate_shape(tmp_path: Path) -> None:
    root_paths = init_root(tmp_path / "root", TD)
    inter_paths = issue_intermediate(tmp_path / "root", tmp_path / "ca", name="east")
    root = x509.load_pem_x509_certificate(root_paths.cert.read_bytes())
    inter = x509.load_pem_x509_certificate(inter_paths.cert.read_bytes())
    assert root_paths.fingerprint == fingerprint(root) == root.fingerprint(hashes.SHA256()).hex()
    assert root.subject.rfc4514_string() == "CN=meshgate root td.test,O=meshgate"
    assert inter.subject.rfc4514_string() == "CN=meshgate intermediate east,O=meshgate"
    for cert, path_length in ((root, 1), (inter, 0)):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://td.test"]
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    root.verify_directly_issued_by(root)
    inter.verify_directly_issued_by(root)
    aki = inter.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert inter_paths.chain.read_bytes() == inter.public_bytes(PEM) + root.public_bytes(PEM)
    assert inter_paths.bundle.read_bytes() == root_paths.cert.read_bytes()


def test_never_overwrites(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", TD)
    before = root.key.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        init_root(tmp_path / "root", TD)
    assert root.key.read_bytes() == before
    issue_intermediate(root.directory, tmp_path / "ca", name="a")
    key_before = (tmp_path / "ca" / "intermediate.key").read_bytes()
    with pytest.raises(FileExistsError, match=re.escape("intermediate.pem")):
        issue_intermediate(root.directory, tmp_path / "ca", name="b")
    assert (tmp_path / "ca" / "intermediate.key").read_bytes() == key_before


def test_bad_trust_domain_and_lifetime(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a trust domain"):
        init_root(tmp_path / "r", "Not_OK!")
    with pytest.raises(ValueError, match="lifetime"):
        init_root(tmp_path / "r", TD, lifetime=10)
    with pytest.raises(ValueError, match="lifetime"):
        init_root(tmp_path / "r", TD, lifetime=1e20)
    assert not (tmp_path / "r" / "root.key").exists()


def test_create_embedded_twice_keeps_everything(ca_dir: Path) -> None:
    first = CertificateAuthority.create_embedded(ca_dir, TD)
    files = {p: p.read_bytes() for p in ca_dir.rglob("*") if p.is_file()}
    second = CertificateAuthority.create_embedded(ca_dir, TD)
    assert fingerprint(second.intermediate) == fingerprint(first.intermediate)
    assert [fingerprint(r) for r in second.roots] == [fingerprint(r) for r in first.roots]
    assert second.bundle_pem == first.bundle_pem
    assert second.trust_domain == TD
    assert {p: p.read_bytes() for p in ca_dir.rglob("*") if p.is_file()} == files
    assert (ca_dir / "root" / "root.key").exists()


def test_create_embedded_for_another_trust_domain(ca_dir: Path) -> None:
    CertificateAuthority.create_embedded(ca_dir, TD)
    with pytest.raises(ValueError, match=re.escape("for trust domain 'td.test', not 'other.test'")):
        CertificateAuthority.create_embedded(ca_dir, "other.test")


def test_create_embedded_finishes_a_half_made_ca(ca_dir: Path) -> None:
    root = init_root(ca_dir / "root", TD)  # a first run that stopped after the root
    ca = CertificateAuthority.create_embedded(ca_dir, TD)
    assert fingerprint(ca.roots[0]) == root.fingerprint


def test_load_refusals(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CA here"):
        CertificateAuthority.load(tmp_path / "nothing")
    CertificateAuthority.create_embedded(ca_dir, TD)
    other = CertificateAuthority.create_embedded(tmp_path / "other", TD)
    (ca_dir / "bundle-state.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape("bundle-state.json: unreadable")):
        CertificateAuthority.load(ca_dir)
    (ca_dir / "bundle-state.json").unlink()
    (ca_dir / "bundle.pem").write_bytes(other.bundle_pem)
    with pytest.raises(ValueError, match="not issued by a root of the trust bundle"):
        CertificateAuthority.load(ca_dir)
    (ca_dir / "bundle.pem").write_bytes((ca_dir / "root" / "root.pem").read_bytes())
    (ca_dir / "intermediate.key").write_bytes(
        (tmp_path / "other" / "intermediate.key").read_bytes()
    )
    with pytest.raises(ValueError, match="is not the key of"):
        CertificateAuthority.load(ca_dir)


# -- verify_leaf ----------------------------------------------------------------------


def test_verify_leaf_refusals(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create_embedded(tmp_path / "other", TD)
    foreign = other.sign_workload(make_csr(), ORDERS, lifetime=60)
    with pytest.raises(LeafRefused, match="does not verify against the bundle"):
        ca.verify_leaf(foreign.cert_pem)
    with pytest.raises(LeafRefused, match="does not verify against the bundle"):
        ca.verify_leaf(foreign.cert_pem + foreign.chain_pem)  # a chain to a foreign root
    with pytest.raises(LeafRefused, match="not a PEM certificate"):
        ca.verify_leaf(b"nope")
    with pytest.raises(LeafRefused, match="does not verify"):
        ca.verify_leaf(ca.intermediate.public_bytes(PEM))  # a CA is not a leaf
    issued = ca.sign_workload(make_csr(), ORDERS, lifetime=60)
    assert ca.verify_leaf(issued.cert_pem, now=issued.not_after - dt.timedelta(seconds=1))
    with pytest.raises(LeafRefused, match="not valid at validation time"):
        ca.verify_leaf(issued.cert_pem, now=issued.not_after + dt.timedelta(seconds=1))


# -- rotation -------------------------------------------------------------------------


def test_rotation_with_overlap(tmp_path: Path, ca_dir: Path) -> None:
    ca = CertificateAuthority.create_embedded(ca_dir, TD)
    old_root = fingerprint(ca.roots[0])
    old_leaf = ca.sign_workload(make_csr(), ORDERS, lifetime=120)

    new_root = init_root(tmp_path / "root2", TD)
    issue_intermediate(new_root.directory, tmp_path / "int2", name="next")
    with pytest.raises(ValueError, match="not issued by a root of the trust bundle"):
        ca.rotate_intermediate_from(tmp_path / "int2")  # the root must reach proxies first

    assert ca.add_root(new_root.cert.read_bytes()) == new_root.fingerprint
    assert ca.add_root(new_root.cert.read_bytes()) == new_root.fingerprint  # idempotent
    assert [fingerprint(r) for r in ca.roots] == [old_root, new_root.fingerprint]
    assert (ca_dir / "bundle.pem").read_bytes() == ca.bundle_pem

    ca.rotate_intermediate_from(tmp_path / "int2")
    assert ca.chain_pem == (tmp_path / "int2" / "chain.pem").read_bytes()
    new_leaf = ca.sign_workload(make_csr(), ORDERS, lifetime=60)
    assert x509.load_pem_x509_certificate(new_leaf.chain_pem).subject.rfc4514_string() == (
        "CN=meshgate intermediate next,O=meshgate"
    )

    # Both verify while both roots are in the bundle, with or without their chains,
    # also after a restart.
    for each in (ca, CertificateAuthority.load(ca_dir)):
        for leaf in (old_leaf, new_leaf):
            assert each.verify_leaf(leaf.cert_pem) == ORDERS
            assert each.verify_leaf(leaf.cert_pem + leaf.chain_pem) == ORDERS

    # The old root stays until its last leaf has expired, then goes.
    assert ca.retire_roots(old_leaf.not_after - dt.timedelta(seconds=1)) == []
    assert len(ca.roots) == 2
    assert ca.retire_roots(old_leaf.not_after) == [old_root]
    assert [fingerprint(r) for r in ca.roots] == [new_root.fingerprint]
    reloaded = CertificateAuthority.load(ca_dir)
    assert reloaded.bundle_pem == ca.bundle_pem == new_root.cert.read_bytes()
    state = json.loads((ca_dir / "bundle-state.json").read_text())
    assert old_root not in state["roots"]
    assert state["previous_intermediates"] == []
    before_expiry = old_leaf.not_after - dt.timedelta(seconds=30)
    with pytest.raises(LeafRefused):
        reloaded.verify_leaf(old_leaf.cert_pem + old_leaf.chain_pem, now=before_expiry)
    assert reloaded.verify_leaf(new_leaf.cert_pem) == ORDERS


def test_retire_tracks_the_latest_leaf(tmp_path: Path, ca_dir: Path) -> None:
    ca = CertificateAuthority.create_embedded(ca_dir, TD)
    old_root = fingerprint(ca.roots[0])
    short = ca.sign_workload(make_csr(), ORDERS, lifetime=60)
    long = ca.sign_workload(make_csr(), ORDERS, lifetime=600)
    ca.sign_workload(make_csr(), ORDERS, lifetime=120)  # does not move the expiry back
    new_root = init_root(tmp_path / "root2", TD)
    issue_intermediate(new_root.directory, tmp_path / "int2", name="next")
    ca.add_root(new_root.cert.read_bytes())
    ca.rotate_intermediate_from(tmp_path / "int2")

    reloaded = CertificateAuthority.load(ca_dir)  # the expiry is persisted
    assert reloaded.retire_roots(short.not_after + dt.timedelta(seconds=1)) == []
    assert reloaded.retire_roots(long.not_after - dt.timedelta(seconds=1)) == []
    assert reloaded.retire_roots(long.not_after + dt.timedelta(seconds=1)) == [old_root]


def test_retire_never_drops_the_current_or_a_waiting_root(tmp_path: Path) -> None:
    ca = CertificateAuthority.create_embedded(tmp_path / "ca", TD)
    ca.sign_workload(make_csr(), ORDERS, lifetime=60)
    waiting = init_root(tmp_path / "root2", TD)
    ca.add_root(waiting.cert.read_bytes())  # added for a rotation not yet done
    far = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)
    assert ca.retire_roots(far) == []
    assert len(ca.roots) == 2


def test_add_root_refusals(tmp_path: Path, ca: CertificateAuthority) -> None:
    foreign = init_root(tmp_path / "foreign", "other.test")
    with pytest.raises(ValueError, match=re.escape("a root of 'other.test', not of 'td.test'")):
        ca.add_root(foreign.cert.read_bytes())
    with pytest.raises(ValueError, match="not a self-signed CA"):
        ca.add_root(ca.intermediate.public_bytes(PEM))
    with pytest.raises(ValueError, match="not a PEM certificate"):
        ca.add_root(b"junk")
    assert len(ca.roots) == 1


def test_rotate_refusals(tmp_path: Path, ca: CertificateAuthority) -> None:
    init_root(tmp_path / "r2", TD)
    issue_intermediate(tmp_path / "r2", tmp_path / "i2", name="x")
    cert = (tmp_path / "i2" / "intermediate.pem").read_bytes()
    wrong_key = p256().private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca.add_root((tmp_path / "r2" / "root.pem").read_bytes())
    with pytest.raises(ValueError, match="key does not match"):
        ca.rotate_intermediate(cert, wrong_key)
    leaf_key = p256()
    leaf = ca.sign_workload(make_csr(leaf_key), ORDERS, lifetime=60)
    leaf_key_pem = leaf_key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="not a CA certificate"):
        ca.rotate_intermediate(leaf.cert_pem, leaf_key_pem)
    before = ca.chain_pem
    assert ca.chain_pem == before  # nothing changed after the refusals


# -- the CLI's helpers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("30m", 1800.0), ("24h", 86400.0), ("7d", 604800.0), ("1.5h", 5400.0)],
)
def test_cli_durations(text: str, seconds: float) -> None:
    from meshgate.mesh.ca_cli import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "1w", "-1h", "0s", "h", "1 year", "1e3s"])
def test_cli_bad_durations(text: str) -> None:
    import argparse

    from meshgate.mesh.ca_cli import parse_duration

    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_cli_fingerprint_format() -> None:
    from meshgate.mesh.ca_cli import format_fingerprint

    assert format_fingerprint("0aff12") == "0A:FF:12"
