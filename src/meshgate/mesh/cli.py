"""The mesh's commands: `control`, `token`, `mesh status|explain`, `agent`.

`token` and `mesh status` open the control plane's store themselves (SQLite
in WAL mode takes a reader and a writer beside the running control plane),
so they work whether `meshgate control` runs or not.

`mesh explain SERVICE` prints the snapshot SERVICE's proxy gets; `mesh
explain --from A --to B METHOD PATH` says, from mesh.yaml alone, whether B's
inbound policy lets A make that request: A's identity, the policy, each rule
and the decision, by the same engine the sidecar enforces with (exit 0
allowed, 1 denied, 2 for a usage error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from meshgate.config.authz import PLAINTEXT
from meshgate.config.loader import ConfigError
from meshgate.config.mesh import MeshConfig
from meshgate.config.schema import Address, parse_duration, redact_url
from meshgate.engine.load import load_mesh

__all__ = ["is_mesh_file", "register"]


def is_mesh_file(path: str) -> bool:
    """Whether a config file is a mesh.yaml (it has a `services:` or
    `trust_domain:` at the top, and no gateway `routes:`)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and (
        ("services" in doc or "trust_domain" in doc or "control" in doc) and "routes" not in doc
    )


def _mesh(path: str) -> MeshConfig | None:
    try:
        return load_mesh(path)
    except ConfigError as exc:
        print(f"{path}: invalid mesh config\n{exc}", file=sys.stderr)
        return None


def _store(path: str, mesh: MeshConfig, state_dir: str | None = None) -> Any:
    from meshgate.mesh.control.store import SqliteStore

    state = (Path(path).resolve().parent / (state_dir or mesh.control.state_dir)).resolve()
    if mesh.control.store != "sqlite":
        from meshgate.mesh.control.store_redis import RedisStore

        return RedisStore(mesh.control.store)
    return SqliteStore(state / "store.db")


def check_mesh(path: str) -> int:
    mesh = _mesh(path)
    if mesh is None:
        return 1
    print(
        f"{path}: OK: mesh {mesh.trust_domain}, {len(mesh.services)} services, mtls "
        f"{mesh.mtls}, control on {mesh.control.listen}, store {mesh.control.store}"
    )
    for name, svc in mesh.services.items():
        print(f"  note: {name}: {mesh.identity(name)}, calls {', '.join(mesh.callees(name))}")
        if svc.authz.default == "deny" and not svc.authz.rules:
            print(f"  warning: {name}: authz default deny and no rule: nothing may call it")
        elif (
            svc.authz.default == "allow"
            and svc.authz.rules
            and all(r.action == "allow" for r in svc.authz.rules)
        ):
            print(
                f"  warning: {name}: authz default allow with only allow rules: the rules "
                "change nothing (default: deny makes them the only way in)"
            )
    return 0


# -- meshgate control -----------------------------------------------------------------


def cmd_control(args: argparse.Namespace) -> int:
    mesh = _mesh(args.config)
    if mesh is None:
        return 1
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    overrides: dict[str, Any] = {}
    if args.state_dir:
        overrides["state_dir"] = str(Path(args.state_dir).resolve())
    if args.listen:
        overrides["listen"] = Address.model_validate(Address.parse(args.listen))
    return int(runner(_control(args.config, mesh, overrides)))


async def _control(path: str, mesh: MeshConfig, overrides: dict[str, Any]) -> int:
    from meshgate.mesh.control.server import ControlPlane

    store = _store(path, mesh, overrides.get("state_dir"))
    cp = ControlPlane(path, mesh, store=store, overrides=overrides)
    await cp.start()
    print(f"meshgate control listening on {mesh.control.listen.host}:{cp.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await cp.close()
    return 0


# -- meshgate token -----------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    mesh = _mesh(args.config)
    if mesh is None:
        return 1
    store = _store(args.config, mesh)
    try:
        if args.action == "create":
            if args.service is None:
                print("token create needs --service", file=sys.stderr)
                return 2
            ttl = parse_duration(args.ttl) if args.ttl else None
            print(store.create_token(args.service, ttl=ttl, single_use=args.single_use))
        elif args.action == "revoke":
            if not args.id or not store.revoke_token(args.id):
                print(f"no token {args.id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
        else:
            for t in store.tokens():
                state = "revoked" if t.revoked else "used" if t.used else "active"
                expires = (
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.expires))
                    if t.expires
                    else "never"
                )
                print(f"{t.token_id}  {t.service:20} {state:8} expires {expires}")
    finally:
        store.close()
    return 0


# -- meshgate mesh status | explain ------------------------------------------------------------


def cmd_mesh(args: argparse.Namespace) -> int:
    mesh = _mesh(args.config)
    if mesh is None:
        return 2 if args.action == "explain" and args.target else 1
    if args.action == "explain" and (args.source or args.target):
        return _explain_request(mesh, args)
    args.service = args.words[0] if len(args.words) == 1 else None
    store = _store(args.config, mesh)
    try:
        if args.action == "explain":
            from meshgate.mesh.control.snapshot import build_sections

            if not args.service:
                print(
                    "mesh explain needs a SERVICE, or --from SERVICE --to SERVICE METHOD PATH",
                    file=sys.stderr,
                )
                return 2
            generation = (store.generations(1) or [{"generation": 0}])[0]["generation"]
            sections = build_sections(
                mesh, generation, args.service, store.instances(), time.time()
            )
            print(json.dumps(_redacted(sections), indent=2, sort_keys=True))
            return 0
        status = _status(mesh, store)
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        else:
            _print_status(status)
    finally:
        store.close()
    return 0


def _redacted(doc: Any) -> Any:
    """`doc` with the credentials of its URLs hidden (a Redis URL's password)."""
    if isinstance(doc, dict):
        return {
            k: redact_url(v) if k.endswith("url") and isinstance(v, str) else _redacted(v)
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_redacted(v) for v in doc]
    return doc


def _explain_request(mesh: MeshConfig, args: argparse.Namespace) -> int:
    from meshgate.mesh.explain import ExplainError, explain_request

    if not args.source or not args.target or len(args.words) != 2:
        print("mesh explain --from SERVICE --to SERVICE METHOD PATH", file=sys.stderr)
        return 2
    to = args.target
    method, raw_path = args.words
    try:
        doc = explain_request(mesh, args.source, to, method, raw_path, args.header)
    except ExplainError as exc:
        print(exc, file=sys.stderr)
        return 2
    allowed = bool(doc["allowed"])
    who = doc.pop("who")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0 if allowed else 1
    authz = mesh.services[to].authz
    print(f"caller:   {who}")
    print(
        f"policy:   {to}: default {authz.default}, mode {authz.mode}, "
        f"{len(authz.rules)} rule{'' if len(authz.rules) == 1 else 's'}"
    )
    print(f"request:  {doc['request']['method']} {doc['request']['path']}")
    for t in doc["rules"]:
        state = "matches" if t["matches"] else f"does not match: {t['why']}"
        print(f"  {t['action']:5} rule {t['name']}: {state}")
    for text in doc["rate_limits"]:
        print(f"limit:    {text}")
    for note in doc["notes"]:
        print(f"note:     {note}")
    verdict = {
        "allow": f"{to} allows this request",
        "deny": f"{to} denies this request",
        "audit_deny": f"{to} would deny this request, and lets it through (audit mode)",
    }[doc["decision"]]
    rule = f"rule {doc['rule']} decides" if doc["rule"] else "the default decides"
    print(f"decision: {'ALLOWED' if allowed else 'DENIED'}: {verdict} ({rule})")
    print(f"          {doc['reason']}")
    return 0 if allowed else 1


def _status(mesh: MeshConfig, store: Any) -> dict[str, Any]:
    now = time.time()
    instances = store.instances()
    proxies = store.proxies()
    services: dict[str, Any] = {}
    for name in sorted(set(mesh.services) | {i.service for i in instances}):
        svc = mesh.services.get(name)
        services[name] = {
            "identity": mesh.identity(name),
            "instances": [
                {
                    **i.to_json(),
                    "health": "healthy" if i.lease_expires > now else "unhealthy",
                }
                for i in instances
                if i.service == name
            ],
            "static": [f"{e.host}:{e.port}" for e in (svc.instances if svc else [])],
        }
    gens = store.generations(1)
    return {
        "trust_domain": mesh.trust_domain,
        "generation": gens[0]["generation"] if gens else 0,
        "services": services,
        "proxies": proxies,
    }


def _print_status(status: dict[str, Any]) -> None:
    print(f"mesh {status['trust_domain']}, generation {status['generation']}")
    for name, svc in status["services"].items():
        print(f"service {name} ({svc['identity']})")
        for inst in svc["instances"]:
            print(
                f"  {inst['address']}:{inst['port']}  {inst['health']:9} version "
                f"{inst['version'] or '-'} zone {inst['zone'] or '-'}"
            )
        for addr in svc["static"]:
            print(f"  {addr}  static")
    print("proxies")
    for proxy_id, p in status["proxies"].items():
        cert = p.get("cert") or {}
        expiry = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert["not_after"]))
            if cert.get("not_after")
            else "-"
        )
        nack = p.get("nack")
        print(
            f"  {proxy_id[:12]}  {p['identity']}  {'connected' if p['connected'] else 'gone':9}"
            f" acked v{p['acked_version']}  cert {cert.get('serial', '-')} until {expiry}"
            + (f"  NACK v{nack['version']}: {nack['reason']}" if nack else "")
        )


# -- meshgate trust ------------------------------------------------------------------------


def cmd_trust(args: argparse.Namespace) -> int:
    """Rotate the trust bundle with overlap: `add-root` (proxies get it on
    their streams before anything it signs exists), then `use-intermediate`
    (new leaves come from the new root's intermediate); the control plane
    drops the old root by itself once nothing it signed is alive."""
    from meshgate.mesh.ca import CertificateAuthority, fingerprint

    mesh = _mesh(args.config)
    if mesh is None:
        return 1
    base = Path(args.config).resolve().parent
    ca_dir = (base / (args.state_dir or mesh.control.state_dir)).resolve() / "ca"
    try:
        ca = CertificateAuthority.load(ca_dir)
        if args.action == "add-root":
            if not args.path:
                print("trust add-root needs the new root's PEM file", file=sys.stderr)
                return 2
            fp = ca.add_root(Path(args.path).read_bytes())
            print(f"trusting root {fp}; the control plane pushes the bundle to every proxy")
        elif args.action == "use-intermediate":
            if not args.path:
                print(
                    "trust use-intermediate needs the directory of an intermediate", file=sys.stderr
                )
                return 2
            ca.rotate_intermediate_from(Path(args.path))
            print(f"signing with {ca.intermediate.subject.rfc4514_string()} from now on")
        else:
            for root in ca.roots:
                print(f"root {fingerprint(root)}  {root.subject.rfc4514_string()}")
            inter = ca.intermediate
            print(
                f"signing intermediate {fingerprint(inter)}  {inter.subject.rfc4514_string()} "
                f"until {inter.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
    except (OSError, ValueError) as exc:
        print(f"{ca_dir}: {exc}", file=sys.stderr)
        return 1
    return 0


# -- meshgate agent -----------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    text = text.removeprefix("https://").rstrip("/")
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return int(runner(_agent(args)))


async def _agent(args: argparse.Namespace) -> int:
    from meshgate.mesh.agent import MeshAgent
    from meshgate.mesh.wire import control_addresses

    bundle = Path(args.trust_bundle).read_bytes() if args.trust_bundle else None
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    identity = f"spiffe://{args.trust_domain}/ns/{args.namespace}/sa/{args.service}"
    instance = None
    if args.register:
        host, port = _address(args.register)
        instance = {"address": host, "port": port, "version": args.version, "zone": args.zone}
    agent = MeshAgent(
        identity=identity,
        controls=control_addresses(args.control),
        state_dir=Path(args.state_dir),
        token=token,
        attest_socket=args.attest_socket,
        bundle_pem=bundle,
        instance=instance,
    )
    await agent.start()
    print(f"meshgate agent {identity} started", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.close()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("control", help="run the mesh control plane (CA, registry, push)")
    p.add_argument("-c", "--config", required=True, help="mesh.yaml")
    p.add_argument("--state-dir", help="instead of control.state_dir (one per instance)")
    p.add_argument("--listen", help="instead of control.listen")
    p.set_defaults(func=cmd_control)

    p = sub.add_parser("token", help="create, revoke or list join tokens")
    p.add_argument("action", choices=["create", "revoke", "list"])
    p.add_argument("id", nargs="?", help="the token id to revoke")
    p.add_argument("-c", "--config", required=True, help="mesh.yaml")
    p.add_argument("--service")
    p.add_argument("--ttl", help="expiry, e.g. 1h (default: never)")
    p.add_argument(
        "--single-use", action="store_true", help="exchanged once for a certificate, then dead"
    )
    p.set_defaults(func=cmd_token)

    p = sub.add_parser(
        "mesh",
        help="the mesh as the control plane sees it",
        description="status: services, instances and proxies. explain SERVICE: the snapshot "
        "its proxy gets. explain --from A --to B METHOD PATH: whether B's policy lets A "
        "make that request, and why (exit 0 allowed, 1 denied).",
    )
    # One parser per action, so that `explain`'s METHOD PATH may follow its options.
    actions = p.add_subparsers(dest="action", required=True, metavar="{status,explain}")
    for action, text in (
        ("status", "services, instances and proxies"),
        ("explain", "a proxy's snapshot, or whether one service may call another"),
    ):
        q = actions.add_parser(action, help=text)
        q.add_argument(
            "words",
            nargs="*",
            metavar="SERVICE | METHOD PATH" if action == "explain" else "SERVICE",
        )
        q.add_argument("-c", "--config", required=True, help="mesh.yaml")
        q.add_argument("--json", action="store_true")
        if action == "explain":
            q.add_argument(
                "--from",
                dest="source",
                help=f"the calling service, a SPIFFE ID, or {PLAINTEXT} (no client certificate)",
            )
            q.add_argument("--to", dest="target", help="the service called")
            q.add_argument(
                "-H",
                "--header",
                action="append",
                default=[],
                help="a request header, 'Name: value' (repeatable)",
            )
        q.set_defaults(func=cmd_mesh, source=None, target=None, header=[])

    p = sub.add_parser("trust", help="show or rotate the mesh's trust bundle, with overlap")
    p.add_argument("action", choices=["show", "add-root", "use-intermediate"])
    p.add_argument("path", nargs="?", help="a root's PEM, or an intermediate's directory")
    p.add_argument("-c", "--config", required=True, help="mesh.yaml")
    p.add_argument("--state-dir", help="instead of control.state_dir")
    p.set_defaults(func=cmd_trust)

    p = sub.add_parser("agent", help="join the mesh and keep an identity and a snapshot")
    p.add_argument("--service", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--control", required=True, help="host:port[,host:port...]")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--token")
    p.add_argument("--token-file")
    p.add_argument("--attest-socket")
    p.add_argument("--trust-bundle", help="the bundle to trust the first time")
    p.add_argument("--register", help="host:port of the instance to register")
    p.add_argument("--version", default="")
    p.add_argument("--zone", default="")
    p.set_defaults(func=cmd_agent)
