"""The mesh CA checked by a second implementation: `meshgate ca` makes the
root and intermediate, openssl makes the key and CSR, the CA signs, and
`openssl verify` / `openssl x509` judge the result."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import meshgate
from meshgate.mesh.ca import CLOCK_SKEW, CertificateAuthority, CsrRefused
from meshgate.mesh.identity import SpiffeId

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed")

TD = "td.test"
ORDERS = SpiffeId(TD, "default", "orders")
SRC = Path(meshgate.__file__).resolve().parents[1]

# `meshgate ca ...` through ca_cli alone: the parser cli.py builds, reduced to it.
_RUNNER = """
import argparse, sys
from meshgate.mesh import ca_cli
parser = argparse.ArgumentParser(prog="meshgate")
ca_cli.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def _run_ca(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, "ca", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )


def _openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    result = subprocess.run([OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        pytest.fail(f"openssl {' '.join(map(str, args))}: {result.stderr}")
    return result


def _openssl_csr(tmp: Path, san: str) -> bytes:
    key, csr = tmp / "leaf.key", tmp / "leaf.csr"
    _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key)
    _openssl(
        "req", "-new", "-key", key, "-subj", "/O=test", "-addext", f"subjectAltName={san}",
        "-out", csr,
    )  # fmt: skip
    return csr.read_bytes()


def _make_ca(tmp: Path, name: str = "east") -> Path:
    """root/ and ca/ under `tmp`, made by the CLI; the CA directory."""
    done = _run_ca("init", "--dir", tmp / "root", "--trust-domain", TD)
    assert done.returncode == 0, done.stderr
    done = _run_ca(
        "issue-intermediate", "--root", tmp / "root", "--out", tmp / "ca", "--name", name,
        "--lifetime", "720h",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tmp / "ca"


def _openssl_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text.strip(), "%b %d %H:%M:%S %Y GMT").replace(tzinfo=dt.UTC)


def test_cli_ca_and_openssl_agree(tmp_path: Path) -> None:
    done = _run_ca("init", "--dir", tmp_path / "root", "--trust-domain", TD)
    assert done.returncode == 0, done.stderr
    root_pem = tmp_path / "root" / "root.pem"
    assert str(root_pem) in done.stdout
    fp = _openssl("x509", "-in", root_pem, "-noout", "-fingerprint", "-sha256").stdout
    assert fp.strip().partition("=")[2] in done.stdout  # what an operator compares

    done = _run_ca(
        "issue-intermediate", "--root", tmp_path / "root", "--out", tmp_path / "ca",
        "--name", "east", "--lifetime", "720h",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ca_dir = tmp_path / "ca"
    inter_dates = _openssl("x509", "-in", ca_dir / "intermediate.pem", "-noout", "-dates").stdout
    inter = dict(line.split("=", 1) for line in inter_dates.splitlines())
    inter_span = _openssl_time(inter["notAfter"]) - _openssl_time(inter["notBefore"])
    assert inter_span == dt.timedelta(hours=720, seconds=CLOCK_SKEW)
    _openssl("verify", "-CAfile", ca_dir / "bundle.pem", ca_dir / "intermediate.pem")

    csr = _openssl_csr(tmp_path, f"URI:{ORDERS.uri}")
    ca = CertificateAuthority.load(ca_dir)
    lifetime = 90 * 60
    issued = ca.sign_workload(csr, ORDERS, lifetime=lifetime)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(issued.cert_pem)

    for purpose in ("sslclient", "sslserver"):
        ok = _openssl(
            "verify", "-CAfile", ca_dir / "bundle.pem", "-untrusted", ca_dir / "chain.pem",
            "-purpose", purpose, leaf,
        )  # fmt: skip
        assert ok.stdout.strip() == f"{leaf}: OK"

    text = _openssl("x509", "-in", leaf, "-text", "-noout").stdout
    assert f"URI:{ORDERS.uri}" in text
    assert "ASN1 OID: prime256v1" in text or "NIST CURVE: P-256" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert "CA:FALSE" in text
    assert "DNS:" not in text and "O=test" not in text  # nothing of the CSR's own

    dates = _openssl("x509", "-in", leaf, "-noout", "-dates").stdout
    fields = dict(line.split("=", 1) for line in dates.splitlines())
    not_before, not_after = _openssl_time(fields["notBefore"]), _openssl_time(fields["notAfter"])
    assert (not_before, not_after) == (issued.not_before, issued.not_after)
    # The lifetime asked runs from issuance; validity starts CLOCK_SKEW earlier.
    assert not_after - not_before == dt.timedelta(seconds=lifetime + CLOCK_SKEW)


def test_a_leaf_of_another_ca_fails_openssl_verify(tmp_path: Path) -> None:
    ours = _make_ca(tmp_path / "ours")
    theirs = _make_ca(tmp_path / "theirs", name="west")
    csr = _openssl_csr(tmp_path, f"URI:{ORDERS.uri}")
    foreign = CertificateAuthority.load(theirs).sign_workload(csr, ORDERS, lifetime=600)
    leaf = tmp_path / "foreign.pem"
    leaf.write_bytes(foreign.cert_pem)

    refused = _openssl(
        "verify", "-CAfile", ours / "bundle.pem", "-untrusted", theirs / "chain.pem", leaf,
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    # The same leaf against its own bundle is fine: the refusal is about trust.
    _openssl("verify", "-CAfile", theirs / "bundle.pem", "-untrusted", theirs / "chain.pem", leaf)
    with pytest.raises(ValueError, match="does not verify against the bundle"):
        CertificateAuthority.load(ours).verify_leaf(foreign.cert_pem + foreign.chain_pem)


def test_an_openssl_csr_with_a_dns_san_is_refused(tmp_path: Path) -> None:
    ca_dir = _make_ca(tmp_path)
    csr = _openssl_csr(tmp_path, f"URI:{ORDERS.uri},DNS:orders.local")
    with pytest.raises(CsrRefused, match=r"a DNS SAN \('orders.local'\) was not earned"):
        CertificateAuthority.load(ca_dir).sign_workload(csr, ORDERS, lifetime=600)


def test_cli_exit_codes(tmp_path: Path) -> None:
    assert _run_ca("init", "--dir", tmp_path / "r", "--trust-domain", TD).returncode == 0
    again = _run_ca("init", "--dir", tmp_path / "r", "--trust-domain", TD)
    assert again.returncode == 1
    assert "never overwritten" in again.stderr
    missing = _run_ca(
        "issue-intermediate", "--root", tmp_path / "nothing", "--out", tmp_path / "o",
        "--name", "x",
    )  # fmt: skip
    assert missing.returncode == 1
    assert "root.pem" in missing.stderr
    for bad in (
        ("init", "--dir", tmp_path / "x", "--trust-domain", "Bad!"),
        ("init", "--dir", tmp_path / "x", "--trust-domain", TD, "--lifetime", "10 years"),
        ("init", "--dir", tmp_path / "x", "--trust-domain", TD, "--lifetime", "0h"),
        ("issue-intermediate", "--root", tmp_path / "r", "--out", tmp_path / "o", "--name", "a b"),
        ("init", "--dir", tmp_path / "x"),
        ("rotate",),
    ):
        done = _run_ca(*bad)
        assert done.returncode == 2, (bad, done.stderr)
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "o").exists()
