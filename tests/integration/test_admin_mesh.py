"""The admin API of mesh proxies: `/identity` of a gateway in the mesh and of a
sidecar (certificate, expiry, trust bundle; never the key), the sidecar's
admin token, and its refusal to roll back a pushed snapshot."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from support.client import fetch, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.proxy import Stack
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh

GATEWAY = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"
SERVICES = {"payments": {}, "gateway": {"namespace": "edge"}}


def _roots(cp: ControlProcess) -> list[tuple[str, str]]:
    return sorted(
        (c.subject.rfc4514_string(), hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest())
        for c in x509.load_pem_x509_certificates(cp.bundle)
    )


def test_identity_of_a_gateway_and_a_sidecar_in_the_mesh(stack: Stack, tmp_path: Path) -> None:
    cp = ControlProcess(tmp_path / "cp", services=SERVICES).start()
    app = UpstreamServer("payments").start()
    token = "mg_" + secrets.token_urlsafe(24)
    digest_file = tmp_path / "admin.digest"
    digest_file.write_text("sha256:" + hashlib.sha256(token.encode()).hexdigest() + "\n")
    sidecar = SidecarProcess(
        cp,
        "payments",
        app.port,
        tmp_path / "payments",
        admin=True,
        extra=("--admin-token-file", str(digest_file)),
    )
    try:
        sidecar.start()
        gw_token = tmp_path / "gateway.token"
        gw_token.write_text(cp.token("gateway"))
        gateway = stack.proxy(
            {
                "mesh": {
                    "control": f"127.0.0.1:{cp.port}",
                    "trust_domain": TRUST_DOMAIN,
                    "token_file": str(gw_token),
                    "trust_bundle": str(cp.state / "ca" / "bundle.pem"),
                    "state_dir": str(tmp_path / "gateway-state"),
                },
                "routes": [{"path": "/pay/**", "upstream": "payments", "strip_prefix": True}],
                "upstreams": {"payments": {"service": "payments"}},
            }
        )
        doc = fetch(gateway.admin_url("/identity")).json()
        assert doc["identity"] == GATEWAY, doc
        leaf = x509.load_pem_x509_certificate(
            (tmp_path / "gateway-state" / "worker-0" / "cert.pem").read_bytes()
        )
        cert = doc["certificate"]
        assert cert["serial"] == format(leaf.serial_number, "x"), doc
        assert cert["not_after"] == leaf.not_valid_after_utc.timestamp()
        assert 0 < cert["seconds_left"] <= cert["not_after"] - time.time() + 5
        assert GATEWAY in cert["names"]
        assert [(r["subject"], r["sha256"]) for r in doc["trust_bundle"]] == _roots(cp)
        text = fetch(gateway.admin_url("/identity")).body
        assert b"PRIVATE KEY" not in text
        wait_until(
            lambda: fetch(gateway.url("/pay/ping")).status == 200,
            timeout=15,
            what="the gateway reaches payments",
        )

        admin = f"http://127.0.0.1:{sidecar.admin_port}"
        auth = ("-H", f"Authorization: Bearer {token}")
        r = fetch(f"{admin}/identity")
        assert r.status == 401 and r.header("www-authenticate"), r.describe()
        assert fetch(f"{admin}/healthz").status == 200
        doc = fetch(f"{admin}/identity", *auth).json()
        assert doc["identity"] == sidecar.identity
        assert doc["certificate"]["seconds_left"] > 0
        assert [(r["subject"], r["sha256"]) for r in doc["trust_bundle"]] == _roots(cp)
        r = fetch(f"{admin}/config/rollback", "-X", "POST", *auth)
        assert r.status == 409 and "control plane" in r.json()["error"], r.describe()
        doc = fetch(f"{admin}/config", *auth).json()
        assert isinstance(doc["generation"], int) and doc["generation"] >= 1, doc
        assert token not in sidecar.log_text()
    finally:
        sidecar.stop()
        app.stop()
        cp.stop()


def test_a_sidecar_refuses_an_open_admin_or_a_raw_token(tmp_path: Path) -> None:
    from support.proxy import run_meshgate

    base = ("sidecar", "--service", "s", "--app", "127.0.0.1:1", "--control", "127.0.0.1:1")
    out = run_meshgate(*base, "--admin", "0.0.0.0:0")
    assert out.returncode == 2 and "--admin-token-file" in out.stderr, out
    raw = tmp_path / "raw.token"
    raw.write_text("not-a-digest\n")
    out = run_meshgate(*base, "--admin", "127.0.0.1:0", "--admin-token-file", str(raw))
    assert out.returncode == 2 and "digest" in out.stderr and "not-a-digest" not in out.stderr
