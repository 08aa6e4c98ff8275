"""`meshgate explain --admin URL METHOD PATH`: ask a running meshgate which
route a request takes in the config it serves now (`GET /explain`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["explain_remote", "format_explain"]

TIMEOUT = 10.0


def _url(base: str, args: argparse.Namespace) -> str:
    query: list[tuple[str, str]] = [("method", args.method.upper()), ("path", args.target)]
    if args.host:
        query.append(("host", args.host))
    query += [("header", h) for h in args.header]
    if "://" not in base:
        base = "http://" + base
    return base.rstrip("/") + "/explain?" + urllib.parse.urlencode(query)


def explain_remote(args: argparse.Namespace) -> int:
    """Exit codes as the offline explain: 0 a route matches, 1 none (or the
    admin API refused), 2 bad arguments or no answer."""
    for h in args.header:
        if ":" not in h:
            print(f"-H {h!r}: expected 'name: value'", file=sys.stderr)
            return 2
    request = urllib.request.Request(_url(args.admin, args))
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            print(f"explain: --token-file: {exc}", file=sys.stderr)
            return 2
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            doc = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        print(f"explain: {args.admin} answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"explain: no answer from {args.admin}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(format_explain(doc, args.admin))
    return 0 if doc.get("match") else 1


def _rate(limit: dict[str, Any]) -> str:
    every = f"{limit['limit']} per {limit['period_s']:g}s"
    return f"{limit['name']}: {every} by {limit['key']} ({limit['policy']})"


def format_explain(doc: dict[str, Any], where: str) -> str:
    req = doc["request"]
    host = f" (host {req['host']})" if req.get("host") else ""
    lines = [
        f"{req['method']} {req['path']}{host}, asked of {where} "
        f"(generation {doc.get('generation')}, worker {doc.get('worker')}):"
    ]
    winner = doc.get("match")
    for row in doc.get("routes", []):
        mark = "=>" if winner is not None and row["index"] == winner["index"] else "  "
        lines.append(f"{mark} routes[{row['index']}] {row['path']}: {row['reason']}")
    if winner is None:
        lines.append("no route matches: meshgate answers 404")
        return "\n".join(lines) + "\n"
    label = winner["route"]
    lines.append(f"route {label} ({winner['path']})")
    if winner.get("aggregate"):
        lines.append("  answered by an aggregation of:")
        for b in winner["aggregate"]:
            lines.append(
                f"    {b['group'] or '(merged)'}: {b['method']} {b['path']} on {b['upstream']}"
            )
    else:
        lines.append(
            f"  sent to upstream {winner['target']} as {req['method']} {winner['sent_as']}"
        )
    for b in winner.get("split") or ():
        lines.append(f"  split: {b['upstream']} weight {b['weight']}")
    auth = winner.get("auth")
    if auth:
        names = ", ".join(f"{a['name']} ({a['type']})" for a in auth["use"])
        lines.append(f"  auth: any of {names}")
        if auth.get("scopes"):
            lines.append(f"    scopes: {' '.join(auth['scopes'])}")
    else:
        lines.append("  auth: none")
    for limit in winner.get("rate_limits") or ():
        lines.append(f"  rate limit {_rate(limit)}")
    authz = winner.get("authz")
    if authz:
        lines.append(f"  authz: {json.dumps(authz, sort_keys=True)}")
    return "\n".join(lines) + "\n"
