"""`meshgate`: run, check, routes, explain, hash-key, demo; stats and top
(`meshgate.observability.stats_cli`); and the mesh's control, token, mesh,
agent and ca (`meshgate.mesh.cli`, `meshgate.mesh.ca_cli`).

Exit codes: 0 success, 1 a config that cannot be used, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshgate import __version__
from meshgate.config.loader import ConfigError
from meshgate.config.schema import Config
from meshgate.engine.load import load_config

if TYPE_CHECKING:
    from meshgate.http.router import Router

log = logging.getLogger("meshgate")


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s meshgate[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(path: str) -> Config | None:
    """The config, or None after printing why it cannot be used."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid config\n{exc}", file=sys.stderr)
        return None


def _load_router(path: str) -> tuple[Config, Router[str]] | None:
    """The config and its route table (targets are upstream names)."""
    from meshgate.http.router import Router

    config = _load(path)
    if config is None:
        return None
    return config, Router([(r, r.target_label()) for r in config.routes])


def cmd_check(args: argparse.Namespace) -> int:
    from meshgate.config.describe import describe
    from meshgate.mesh.cli import check_mesh, is_mesh_file

    if is_mesh_file(args.config):
        return check_mesh(args.config)
    loaded = _load_router(args.config)
    if loaded is None:
        return 1
    config, router = loaded
    problem = _check_keys(config, args.config)
    if problem:
        print(f"{args.config}: invalid config\n{problem}", file=sys.stderr)
        return 1
    lines = describe(config)
    print(f"{args.config}: OK: {lines[0]}")
    for line in lines[1:]:
        print(f"  note: {line}")
    for warning in router.warnings():
        print(f"  warning: {warning}")
    return 0


def _check_keys(config: Config, path: str) -> str | None:
    from meshgate.filters.build import compile_check

    return compile_check(config, path)


def cmd_hash_key(args: argparse.Namespace) -> int:
    """Print the digest a consumer's `api_keys:` stores for a key."""
    import hashlib
    import secrets

    if args.generate:
        key = "mg_" + secrets.token_urlsafe(32)
        print(f"key:    {key}")
        print(f"digest: sha256:{hashlib.sha256(key.encode()).hexdigest()}")
        return 0
    if args.key is not None:
        key = args.key
    else:
        if sys.stdin.isatty():
            print("API key (not echoed): ", end="", file=sys.stderr, flush=True)
            import getpass

            key = getpass.getpass(prompt="")
        else:
            key = sys.stdin.readline()
        key = key.rstrip("\r\n")
    if not key.strip():
        print("hash-key: the key is empty", file=sys.stderr)
        return 2
    print(f"sha256:{hashlib.sha256(key.strip().encode()).hexdigest()}")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    loaded = _load_router(args.config)
    if loaded is None:
        return 1
    router = loaded[1]
    sys.stdout.write(router.format_table())
    warnings = router.warnings()
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from meshgate.http.paths import normalize_path

    if args.admin is not None:
        from meshgate.admin.client import explain_remote

        return explain_remote(args)
    if args.config is None:
        print("explain: give -c CONFIG, or --admin URL of a running meshgate", file=sys.stderr)
        return 2
    loaded = _load_router(args.config)
    if loaded is None:
        return 1
    router = loaded[1]
    target: str = args.target
    headers: list[tuple[bytes, bytes]] = []
    host = ""
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            print(f"-H {h!r}: expected 'name: value'", file=sys.stderr)
            return 2
        name_b = name.strip().lower().encode()
        headers.append((name_b, value.strip().encode()))
        if name_b == b"host":
            host = value.strip().lower().partition(":")[0]
    raw_path, _, query = target.partition("?")
    path = normalize_path(raw_path)
    if path is None:
        print(f"{raw_path!r} is not a valid request path: meshgate answers 400", file=sys.stderr)
        return 1
    method = args.method.upper()
    print(f"{method} {path}" + (f" (host {host})" if host else "") + ":")
    winner = None
    for route, matched, reason in router.explain(method, host, path, headers):
        mark = "=>" if matched and winner is None else "  "
        if matched and winner is None:
            winner = route
        print(
            f"{mark} routes[{route.index}] {route.config.path} -> "
            f"{route.config.target_label()}: {reason}"
        )
    if winner is None:
        print("no route matches: meshgate answers 404")
        return 1
    m = router.match(method, host, path, headers)
    assert m is not None
    agg = winner.config.aggregate
    if agg is not None:
        print(f"answered by an aggregation (within {agg.timeout:g}s) of:")
        for b in agg.backends:
            sent = b.path
            for name, value in m.params.items():
                sent = sent.replace("{" + name + "}", value).replace("{path." + name + "}", value)
            notes = "" if b.required else " (optional)"
            print(f"   {b.group or '(merged)'}: {b.method} {sent} on {b.upstream}{notes}")
        return 0
    sent = m.route.upstream_path(path, f"?{query}" if query else "", m.params, m.rest)
    print(f"sent to upstream {winner.config.target_label()} as {method} {sent}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from meshgate.config.generations import Generations
    from meshgate.config.loader import read_config_file
    from meshgate.engine.load import load_config_text
    from meshgate.server.supervisor import Supervisor
    from meshgate.server.worker import WorkerOptions, run_worker

    try:
        # Read once: generation 1 is this text, whatever the file says next.
        text = read_config_file(args.config)
        config = load_config_text(text, args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid config\n{exc}", file=sys.stderr)
        return 1
    from meshgate.config.describe import describe

    for line in describe(config)[1:]:
        log.info("config: %s", line)
    path = os.path.abspath(args.config)
    problem = _check_keys(config, path)
    if problem:
        print(f"{args.config}: invalid config\n{problem}", file=sys.stderr)
        return 1
    settings = config.access_log_config
    if settings is not None:
        from meshgate.observability.accesslog import open_target

        try:
            fd = open_target(settings.path, os.path.dirname(path))
        except OSError as exc:
            print(
                f"{args.config}: access_log.path: cannot open {settings.path}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        if fd > 2:
            os.close(fd)
    from meshgate.engine.listener import address_in_use

    for field, address in (("listen", config.listen), ("admin", config.admin)):
        if address is not None and address_in_use(address):
            # (Its workers would share it through SO_REUSEPORT: `address_in_use`.)
            print(
                f"{args.config}: {field}: {address.host or '*'}:{address.port} is in use "
                "(another meshgate, or another program, listens there)",
                file=sys.stderr,
            )
            return 1
    history = Generations()
    history.loaded(config, text, path)
    workers = args.workers or config.workers
    if workers == 1:
        return run_worker(config, WorkerOptions(config_path=path, history=history))
    return Supervisor(config, path, workers, history).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from meshgate.demo import run_demo

    return run_demo(port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshgate", description="An API gateway and a service mesh in one data plane."
    )
    parser.add_argument("--version", action="version", version=f"meshgate {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("MESHGATE_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="serve the config")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--workers", type=int, default=None, help="processes sharing the port")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a config without starting anything")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("routes", help="print the route table in precedence order")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_routes)

    p = sub.add_parser(
        "explain",
        help="say which route a request takes, and why",
        description="Reads the config file (-c), or asks a running meshgate what the "
        "config it serves now does (--admin URL of its admin API).",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("-c", "--config")
    source.add_argument("--admin", metavar="URL", help="e.g. http://127.0.0.1:9901")
    p.add_argument("method")
    p.add_argument("target", help="path and query, e.g. /api/orders/7?x=1")
    p.add_argument("-H", "--header", action="append", default=[], help="'name: value'")
    p.add_argument("--host", default="", help="the request's host (--admin)")
    p.add_argument("--token-file", help="a file holding the admin API's bearer token (--admin)")
    p.add_argument("--json", action="store_true", help="the admin API's answer as is (--admin)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "hash-key",
        help="print the sha256: digest of an API key, for a consumer's api_keys",
        description="Reads the key from stdin (or the prompt) unless it is given; "
        "--generate makes a new random key and prints it with its digest.",
    )
    p.add_argument("key", nargs="?", default=None, help="the key (prefer stdin: shell history)")
    p.add_argument("--generate", action="store_true", help="make a new random key")
    p.set_defaults(func=cmd_hash_key)

    p = sub.add_parser("demo", help="run sample services behind the gateway on :8080")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_demo)

    from meshgate.mesh import ca_cli
    from meshgate.mesh import cli as mesh_cli
    from meshgate.mesh.sidecar import cli as sidecar_cli
    from meshgate.observability import stats_cli

    stats_cli.register(sub)
    mesh_cli.register(sub)
    sidecar_cli.register(sub)
    ca_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
