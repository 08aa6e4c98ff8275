"""`meshgate mesh explain --from A --to B METHOD PATH`, as a subprocess: the
caller's identity, the policy, the rule and the decision, from mesh.yaml
alone (exit 0 allowed, 1 denied, 2 for a usage error)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MESH = """\
trust_domain: mesh.local
mtls: permissive
services:
  orders:
    calls: [payments]
  reports:
    calls: [orders]
  old-orders:
    namespace: legacy
  payments:
    authz:
      default: deny
      rules:
      - {name: no-legacy, action: deny, from: ["spiffe://mesh.local/ns/legacy/*"]}
      - name: orders-charge
        action: allow
        from: ["spiffe://mesh.local/ns/default/sa/orders"]
        methods: [GET, POST]
        paths: [/charge, /charge/**]
      - {name: probes, action: allow, from: [plaintext], paths: [/healthz]}
    rate_limit:
      per_source: 100/s
"""


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(MESH))
    return path


def explain(mesh_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgate", "mesh", "explain", "-c", str(mesh_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_allowed_call_names_identity_policy_and_rule(mesh_file: Path) -> None:
    proc = explain(mesh_file, "--from", "orders", "--to", "payments", "GET", "/charge")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "orders (spiffe://mesh.local/ns/default/sa/orders)" in out
    assert "payments: default deny, mode enforce, 3 rules" in out
    assert "GET /charge" in out
    assert "rule orders-charge: matches" in out
    assert "ALLOWED" in out and "rule orders-charge decides" in out
    assert "100/s per source" in out


def test_a_denied_call_exits_1_and_says_why(mesh_file: Path) -> None:
    proc = explain(mesh_file, "--from", "old-orders", "--to", "payments", "GET", "/charge")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "spiffe://mesh.local/ns/legacy/sa/old-orders" in proc.stdout
    assert "DENIED" in proc.stdout and "rule no-legacy decides" in proc.stdout
    # A method the allow rule does not list: the default decides.
    proc = explain(mesh_file, "--from", "orders", "--to", "payments", "DELETE", "/charge/7")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "method DELETE is not in [GET, POST]" in proc.stdout
    assert "the default decides" in proc.stdout and "default is deny" in proc.stdout
    # A caller whose calls: does not list the callee is told so.
    proc = explain(mesh_file, "--from", "reports", "--to", "payments", "GET", "/charge")
    assert proc.returncode == 1
    assert "the calls: of reports do not list payments" in proc.stdout


def test_plaintext_and_json(mesh_file: Path) -> None:
    proc = explain(
        mesh_file, "--from", "plaintext", "--to", "payments", "GET", "/healthz", "--json"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["identity"], doc["policy"], doc["rule"], doc["decision"]) == (
        None,
        "payments",
        "probes",
        "allow",
    )
    assert [r["name"] for r in doc["rules"]] == ["no-legacy", "orders-charge", "probes"]
    # Under strict mTLS a caller without a certificate never reaches the policy.
    strict = mesh_file.read_text().replace("mtls: permissive", "mtls: strict")
    mesh_file.write_text(strict)
    proc = explain(mesh_file, "--from", "plaintext", "--to", "payments", "GET", "/healthz")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mtls is strict" in proc.stdout


def test_usage_errors_exit_2(mesh_file: Path) -> None:
    for args, message in (
        (("--from", "nobody", "--to", "payments", "GET", "/x"), "'nobody' is not a service"),
        (("--from", "orders", "--to", "nobody", "GET", "/x"), "'nobody' is not a service"),
        (("--from", "orders", "--to", "payments", "GET"), "METHOD PATH"),
        (("--from", "orders", "--to", "payments", "GET", "/../x"), "not a valid request path"),
    ):
        proc = explain(mesh_file, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
