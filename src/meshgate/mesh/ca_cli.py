"""`meshgate ca`: make a mesh CA by hand, for a root kept offline.

- `meshgate ca init --dir DIR --trust-domain TD [--lifetime 87600h]`: a new
  root; prints its files and its SHA-256 fingerprint (what a proxy's
  operator compares before trusting a bundle).
- `meshgate ca issue-intermediate --root DIR --out DIR --name NAME
  [--lifetime 8760h]`: an intermediate signed by that root, in a directory
  a control plane can serve from (`CertificateAuthority.load`).

Exit codes: 0 success, 1 refused (the reason on stderr: a file that would be
overwritten, an unreadable root), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from meshgate.mesh.ca_files import (
    INTERMEDIATE_LIFETIME,
    ROOT_LIFETIME,
    init_root,
    issue_intermediate,
)
from meshgate.mesh.identity import TRUST_DOMAIN_RE

__all__ = ["cmd_ca_init", "cmd_ca_issue_intermediate", "format_fingerprint", "register"]

# Days are allowed here (unlike in config durations): CA lifetimes are long.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d` -> seconds (an argparse `type`)."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 30m, 24h or 7d: {text!r}"
        )
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a lifetime must be greater than zero")
    return seconds


def _trust_domain(text: str) -> str:
    if not TRUST_DOMAIN_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a trust domain (lowercase letters, digits, '.', '-', '_')"
        )
    return text


def _name(text: str) -> str:
    if not _NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a name is 1 to 40 of [A-Za-z0-9._-]")
    return text


def format_fingerprint(hex_digest: str) -> str:
    """`AB:CD:...`, the way `openssl x509 -fingerprint -sha256` prints it."""
    upper = hex_digest.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def cmd_ca_init(args: argparse.Namespace) -> int:
    try:
        paths = init_root(Path(args.dir), args.trust_domain, lifetime=args.lifetime)
    except (OSError, ValueError) as exc:
        print(f"ca init: {exc}", file=sys.stderr)
        return 1
    print(f"root certificate: {paths.cert}")
    print(f"root key:         {paths.key} (keep it offline: it only signs intermediates)")
    print(f"root SHA-256 fingerprint: {format_fingerprint(paths.fingerprint)}")
    return 0


def cmd_ca_issue_intermediate(args: argparse.Namespace) -> int:
    try:
        paths = issue_intermediate(
            Path(args.root), Path(args.out), name=args.name, lifetime=args.lifetime
        )
    except (OSError, ValueError) as exc:
        print(f"ca issue-intermediate: {exc}", file=sys.stderr)
        return 1
    print(f"intermediate certificate: {paths.cert}")
    print(f"intermediate key:         {paths.key}")
    print(f"chain:                    {paths.chain}")
    print(f"trust bundle:             {paths.bundle}")
    print(f"expires: {paths.not_after.isoformat()}")
    print(f"intermediate SHA-256 fingerprint: {format_fingerprint(paths.fingerprint)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ca` and its subcommands to the `meshgate` parser."""
    ca = sub.add_parser("ca", help="make a mesh CA: an offline root and intermediates")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)

    p = ca_sub.add_parser("init", help="make a new root CA")
    p.add_argument("--dir", required=True, help="where root.pem and root.key go (made 0700)")
    p.add_argument("--trust-domain", required=True, type=_trust_domain)
    p.add_argument(
        "--lifetime",
        type=parse_duration,
        default=ROOT_LIFETIME,
        help="e.g. 87600h (the default, ten years)",
    )
    p.set_defaults(func=cmd_ca_init)

    p = ca_sub.add_parser("issue-intermediate", help="make an intermediate signed by a root")
    p.add_argument("--root", required=True, help="the directory of root.pem and root.key")
    p.add_argument("--out", required=True, help="where the intermediate and bundle go")
    p.add_argument("--name", required=True, type=_name, help="its name, in its common name")
    p.add_argument(
        "--lifetime",
        type=parse_duration,
        default=INTERMEDIATE_LIFETIME,
        help="e.g. 8760h (the default, a year); never past the root's",
    )
    p.set_defaults(func=cmd_ca_issue_intermediate)
