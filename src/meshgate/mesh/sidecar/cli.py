"""`meshgate sidecar --service orders --app 127.0.0.1:9001 --control host:15012`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshgate.config.schema import Address, is_loopback, parse_duration

if TYPE_CHECKING:
    from meshgate.mesh.sidecar.proxy import SidecarOptions

__all__ = ["register"]


def _address(text: str, default_host: str = "127.0.0.1") -> Address:
    text = text.removeprefix("https://").removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, found {text!r}")
    return Address(host=(host or default_host).strip("[]"), port=int(port))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _endpoint(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, found {text!r}")
    return text


def _upstream(text: str) -> tuple[str, Address]:
    name, sep, where = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PORT or NAME=HOST:PORT, found {text!r}")
    return name, _address(where if ":" in where else f"127.0.0.1:{where}")


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, found {text!r}")
    return value


def cmd_sidecar(args: argparse.Namespace) -> int:
    from meshgate.mesh.sidecar.proxy import SidecarOptions, bind_all
    from meshgate.mesh.wire import control_addresses

    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if token is None and args.attest_socket is None:
        token = os.environ.get("MESHGATE_TOKEN")
    admin_token = None
    if args.admin_token_file:
        try:
            admin_token = Path(args.admin_token_file).read_text().strip().lower()
        except OSError as exc:
            print(f"meshgate sidecar: --admin-token-file: {exc}", file=sys.stderr)
            return 2
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", admin_token):
            print(
                "meshgate sidecar: --admin-token-file holds the token's digest, "
                "sha256:<64 hex digits> (`meshgate hash-key --generate`), not the token",
                file=sys.stderr,
            )
            return 2
    if args.admin is not None and admin_token is None and not is_loopback(args.admin.host):
        print(
            f"meshgate sidecar: --admin {args.admin} is reachable from other hosts: "
            "give --admin-token-file, or listen on loopback",
            file=sys.stderr,
        )
        return 2
    state_dir = Path(args.state_dir or f".meshgate/sidecar-{args.service}")
    try:
        controls = control_addresses(args.control)
    except ValueError as exc:
        print(f"meshgate sidecar: --control: {exc}", file=sys.stderr)
        return 2
    opts = SidecarOptions(
        service=args.service,
        app=args.app,
        controls=controls,
        state_dir=state_dir,
        trust_domain=args.trust_domain,
        namespace=args.namespace,
        token=token,
        attest_socket=args.attest_socket,
        bundle_pem=Path(args.trust_bundle).read_bytes() if args.trust_bundle else None,
        inbound=args.inbound,
        advertise=args.advertise,
        outbound=None if args.no_outbound else args.outbound,
        upstream_ports=dict(args.upstream),
        admin=args.admin,
        admin_token=admin_token,
        capture=args.capture,
        capture_exclude=tuple(args.capture_exclude),
        version=args.version,
        zone=args.zone,
        workers=max(1, args.workers),
        access_log=args.access_log,
        access_log_sample_2xx=args.access_log_sample_2xx,
        metrics_idle_expiry=args.metrics_idle_expiry,
        tracing_endpoint=args.tracing_endpoint,
        tracing_sample_ratio=args.tracing_sample_ratio,
        tracing_batch_delay=args.tracing_batch_delay,
    )
    if args.access_log is not None:
        from meshgate.observability.accesslog import open_target

        try:
            fd = open_target(args.access_log)
        except OSError as exc:
            print(f"meshgate sidecar: --access-log: {exc}", file=sys.stderr)
            return 2
        if fd > 2:
            os.close(fd)
    try:
        socks = bind_all(opts)
    except OSError as exc:
        print(f"meshgate sidecar: {exc}", file=sys.stderr)
        return 1
    if opts.workers > 1:
        # Private (0700): each worker's metrics socket.
        opts = dataclasses.replace(opts, run_dir=tempfile.mkdtemp(prefix="meshgate-sidecar-"))
    children: list[int] = []
    for worker_id in range(1, max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            os._exit(_serve(dataclasses.replace(opts, worker_id=worker_id), socks))
        children.append(pid)
    try:
        return _serve(opts, socks)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if opts.run_dir is not None:
            shutil.rmtree(opts.run_dir, ignore_errors=True)


def _serve(opts: SidecarOptions, socks: dict[str, socket.socket]) -> int:
    from meshgate.mesh.sidecar.proxy import run_sidecar

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return int(runner(run_sidecar(opts, socks)))
    except (RuntimeError, OSError, ConnectionError) as exc:
        print(f"meshgate sidecar: {exc}", file=sys.stderr)
        return 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sidecar",
        help="run the mesh's proxy next to one service instance",
        description="Joins the mesh (a join token or the node's attestation socket), "
        "serves the app's inbound traffic over mutual TLS, and its outbound calls: "
        "on a port per service (--upstream), on one port where Host names the "
        "service (--outbound), or captured by iptables (--capture).",
    )
    p.add_argument("--service", required=True)
    p.add_argument("--app", required=True, type=_address, help="the app's host:port")
    p.add_argument("--control", required=True, help="host:port[,host:port...] (https://...)")
    p.add_argument("--trust-domain", default="mesh.local")
    p.add_argument("--namespace", default="default")
    p.add_argument("--token", help="a join token (or MESHGATE_TOKEN, or --token-file)")
    p.add_argument("--token-file")
    p.add_argument("--attest-socket", help="the node's attestation socket, instead of a token")
    p.add_argument("--trust-bundle", help="the mesh's root(s), to trust the first time")
    p.add_argument("--state-dir", help="default: .meshgate/sidecar-SERVICE")
    p.add_argument(
        "--inbound",
        type=_address,
        default=Address(host="0.0.0.0", port=15006),
        help="0.0.0.0:15006",
    )
    p.add_argument("--advertise", help="the address other sidecars reach this one at")
    p.add_argument(
        "--outbound",
        type=_address,
        default=Address(host="127.0.0.1", port=15001),
        help="where the app's calls arrive, Host naming the service (127.0.0.1:15001)",
    )
    p.add_argument("--no-outbound", action="store_true", help="no shared outbound port")
    p.add_argument(
        "--upstream",
        type=_upstream,
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="a local port for one service, as Consul's upstreams (repeatable)",
    )
    p.add_argument("--admin", type=_address, help="the admin API (/metrics), e.g. 127.0.0.1:15000")
    p.add_argument(
        "--admin-token-file",
        help="a file holding the sha256: digest of the admin API's bearer token "
        "(`meshgate hash-key --generate`); required when --admin is not on loopback",
    )
    p.add_argument(
        "--capture",
        action="store_true",
        help="redirect the network namespace's TCP through the sidecar (iptables), "
        "and remove the rules on exit; run the sidecar under a uid of its own",
    )
    p.add_argument(
        "--capture-exclude",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="a destination port never captured (repeatable)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the same ports (each with its own key; the join token "
        "must be reusable)",
    )
    p.add_argument(
        "--access-log",
        metavar="PATH|-",
        help="one JSON line per request: - (stdout), stderr, or a file (reopened on SIGHUP)",
    )
    p.add_argument(
        "--access-log-sample-2xx",
        type=_share,
        default=1.0,
        metavar="SHARE",
        help="the share of 2xx answers logged, 0 to 1 (every other status is logged)",
    )
    p.add_argument(
        "--metrics-idle-expiry",
        type=_duration,
        default=600.0,
        metavar="DURATION",
        help="drop a request series from /metrics once it is idle this long (10m)",
    )
    p.add_argument(
        "--tracing-endpoint",
        type=_endpoint,
        metavar="URL",
        help="send spans to this OTLP/HTTP collector URL (.../v1/traces); off when absent",
    )
    p.add_argument(
        "--tracing-sample-ratio",
        type=_share,
        default=1.0,
        metavar="R",
        help="the share of new traces sampled, 0 to 1 (a caller's decision is followed)",
    )
    p.add_argument(
        "--tracing-batch-delay",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="the longest a finished span waits for its batch (5s)",
    )
    p.add_argument(
        "--version",
        default="",
        help="the instance's version (e.g. v2), shown by the control plane's dashboard",
    )
    p.add_argument(
        "--zone", default="local", help="where the instance runs (its zone; default local)"
    )
    p.set_defaults(func=cmd_sidecar)
