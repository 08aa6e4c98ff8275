"""The sidecar: one proxy next to one service instance.

It is the gateway's engine in two roles. `MeshAgent` keeps its identity
(key made here, 0600; certificate renewed at about 70% of its life) and its
snapshot; each snapshot is translated into the configs of its listeners
(`translate.py`), compiled by `Runtime.build`, and swapped in at once, or
NACKed whole when any of them fails. Listeners:

- inbound (`sidecar-inbound`): TLS 1.3 with the proxy's certificate. Strict
  mTLS requires a client certificate that chains to the trust bundle;
  permissive also takes plaintext on the same port, labelled as such (no
  peer, no XFCC). Requests go to the local app;
- outbound (`sidecar-outbound`), on loopback: the port where Host names the
  service (or `HTTP_PROXY` does), one port per service given with
  `--upstream name=port`, and, with `--capture`, connections that iptables
  redirected, routed by their original destination;
- admin: `/metrics`, `/ready` and the rest of the admin API, of the inbound
  listener.

Each sidecar has its own `MetricsHub` (several may share a process: the
demo's), which its listeners, access log and tracing count into, its admin
listener shows, and its agent reports to the control plane
(`mesh.report`), with its authz filters' denials.

Rotation: a new certificate goes into `IdentityContexts`; new handshakes,
inbound and outbound, use it, and open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshgate.admin.hooks import HOOKS
from meshgate.admin.samples import listener_samples
from meshgate.admin.server import AdminProtocol
from meshgate.config.schema import AccessLogConfig, Address, Config
from meshgate.engine.listener import ListenerSpec, Serving, bind_socket, start_listener
from meshgate.engine.runtime import Runtime
from meshgate.filters.build import FilterServices
from meshgate.mesh.agent import MeshAgent
from meshgate.mesh.report import Reporter, proxy_info
from meshgate.mesh.sidecar.capture import Capture, destinations, original_destination
from meshgate.mesh.translate import inbound_config, outbound_config
from meshgate.observability import peers
from meshgate.observability.accesslog import AccessLog
from meshgate.observability.hub import MetricsHub
from meshgate.observability.tracing import Tracing
from meshgate.protocol.h1 import ServerProtocol, ServerState
from meshgate.stream.stream import ProxyStream
from meshgate.tls.holder import IdentityContexts
from meshgate.upstream.cluster import PoolRegistry

__all__ = ["Sidecar", "SidecarOptions", "bind_all", "run_sidecar"]

log = logging.getLogger("meshgate.sidecar")

FIRST_SNAPSHOT_TIMEOUT = 30.0


@dataclass
class SidecarOptions:
    service: str
    app: Address
    controls: list[tuple[str, int]]
    state_dir: Path
    trust_domain: str = "mesh.local"
    namespace: str = "default"
    token: str | None = None
    attest_socket: str | None = None
    bundle_pem: bytes | None = None
    inbound: Address = field(default_factory=lambda: Address(host="0.0.0.0", port=15006))
    advertise: str | None = None
    """The address other sidecars reach the inbound listener at (default:
    the inbound host, or this host's first address when that is 0.0.0.0)."""
    outbound: Address | None = field(default_factory=lambda: Address(host="127.0.0.1", port=15001))
    upstream_ports: dict[str, Address] = field(default_factory=dict)
    admin: Address | None = None
    admin_token: str | None = None
    """The digest (`sha256:<hex>`) of the token the admin API asks for."""
    capture: bool = False
    capture_exclude: tuple[int, ...] = ()
    version: str = ""
    """The instance's version (registered: the control plane shows it)."""
    zone: str = "local"
    """Where the instance runs (registered, as `version`)."""
    workers: int = 1
    """Processes serving the same listeners (SO_REUSEPORT is not needed:
    they share the sockets bound before the fork). Each has its own key, in
    `state_dir/worker-N`; worker 0 registers the instance and writes the
    capture rules."""
    worker_id: int = 0
    access_log: str | None = None
    """`-` (stdout), `stderr` or a file: one JSON line per request; None: off."""
    access_log_sample_2xx: float = 1.0
    metrics_idle_expiry: float = 600.0
    run_dir: str | None = None
    """With several workers: the private directory of their metrics
    sockets, so that one scrape of the shared admin port answers for all
    (`observability.peers`)."""
    """Seconds a request series may stay untouched before /metrics drops it."""
    tracing_endpoint: str | None = None
    """Spans to this OTLP/HTTP collector URL, with `service.name` the service's."""
    tracing_sample_ratio: float = 1.0
    tracing_batch_delay: float = 5.0


def bind_all(opts: SidecarOptions) -> dict[str, socket.socket]:
    """Every listening socket of a sidecar, bound before any worker starts."""
    socks = {"inbound": bind_socket(opts.inbound, reuse_port=False)}
    if opts.outbound is not None:
        socks["outbound"] = bind_socket(opts.outbound, reuse_port=False)
    for name, address in opts.upstream_ports.items():
        socks[f"port:{name}"] = bind_socket(address, reuse_port=False)
    if opts.admin is not None:
        socks["admin"] = bind_socket(opts.admin, reuse_port=False)
    return socks


def _advertised(opts: SidecarOptions) -> str:
    if opts.advertise:
        return opts.advertise
    host = opts.inbound.host
    if host not in ("", "0.0.0.0", "::"):
        return host
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            address = str(info[4][0])
            if not address.startswith("127."):
                return address
    return "127.0.0.1"


class Sidecar:
    """The running sidecar (one event loop, one process)."""

    def __init__(self, opts: SidecarOptions, socks: dict[str, socket.socket] | None = None) -> None:
        self.opts = opts
        self.identity = f"spiffe://{opts.trust_domain}/ns/{opts.namespace}/sa/{opts.service}"
        self.loop = asyncio.get_running_loop()
        self.tls = IdentityContexts(self.identity)
        self.hub = MetricsHub()
        self.sample_server: asyncio.AbstractServer | None = None
        """This sidecar's metrics (its own, should the process run others)."""
        self.hub.configure(opts.metrics_idle_expiry, self.hub.max_identities)
        self.hub.identity(self.identity, lambda: self.tls.not_after)
        HOOKS.identity = self.tls
        self.hub.register("listeners", lambda: listener_samples(self.states.values()))
        self.registry = PoolRegistry(self.loop, tls=self.tls)
        self.services = FilterServices()
        self.states: dict[str, ServerState] = {}
        self.servers: list[tuple[ListenerSpec, Serving]] = []
        self.ports: dict[str, int] = {}
        self.dests: dict[tuple[str, int], bytes] = {}
        self.mtls = "strict"
        self.first = asyncio.Event()
        self._pending: dict[str, Runtime] = {}
        """The runtimes of the first snapshot, until the listeners start."""
        self.capture: Capture | None = None
        self.tracing: Tracing | None = None
        self.stopping = asyncio.Event()
        self.access = AccessLog(time.monotonic, self.hub)
        self.socks = socks if socks is not None else bind_all(opts)
        self.ports = {k: int(s.getsockname()[1]) for k, s in self.socks.items()}
        self.agent = MeshAgent(
            identity=self.identity,
            controls=opts.controls,
            state_dir=opts.state_dir
            if opts.workers == 1
            else opts.state_dir / f"worker-{opts.worker_id}",
            token=opts.token,
            attest_socket=opts.attest_socket,
            bundle_pem=opts.bundle_pem,
            # One instance, whatever the number of workers serving it.
            instance={
                "address": _advertised(opts),
                "port": self.ports["inbound"],
                "version": opts.version,
                "zone": opts.zone,
                "metadata": {"app_port": str(opts.app.port)},
            }
            if opts.worker_id == 0
            else None,
            on_snapshot=self.apply,
            on_certificate=self._certificate,
            reporter=Reporter(self.hub, self.services.denials, opts.service),
        )
        proxy_info(self.hub, self.agent.state.proxy_id)
        HOOKS.snapshot = self._snapshot_version

    # -- identity and config --------------------------------------------------------

    def _snapshot_version(self) -> int:
        return self.agent.version

    def _certificate(self) -> None:
        creds = self.agent.credentials()
        if creds is not None:
            self.tls.update(*creds)

    def _configs(self, sections: dict[str, Any]) -> dict[str, Config]:
        configs = {"inbound": inbound_config(sections, self.opts.app)}
        if self.opts.outbound is not None:
            configs["outbound"] = outbound_config(sections)
        for name in self.opts.upstream_ports:
            configs[f"port:{name}"] = outbound_config(sections, only=name)
        return configs

    def apply(self, sections: dict[str, Any]) -> None:
        """A snapshot: compile every listener's runtime, then swap them all
        in; a ValueError (the agent NACKs it) leaves the running ones."""
        configs = self._configs(sections)
        runtimes = {
            name: Runtime.build(cfg, self.registry, source="", services=self.services)
            for name, cfg in configs.items()
        }
        inbound = sections.get("inbound") or {}
        mtls = str(inbound.get("mtls") or "strict")
        if not self.first.is_set():
            self.mtls = mtls
            if mtls == "permissive":
                self.tls.client_cert = "optional"
                # Contexts made before the first snapshot (a join) require a
                # client certificate: make them again, as no listener serves yet.
                self.tls.listener_context = None
                self._certificate()
        elif mtls != self.mtls:
            log.warning("mtls %s -> %s takes effect when the sidecar restarts", self.mtls, mtls)
        self.dests = destinations(sections)
        for name, state in self.states.items():
            shared = name == "inbound-plaintext"  # the inbound runtime, twice
            runtime = runtimes["inbound" if shared else name]
            old = state.runtime
            state.runtime = runtime
            if not shared:
                old.stop_health()
                runtime.start_health(old)
        if self.states:
            keep: set[int] = set()
            for state in self.states.values():
                keep |= state.runtime.pool_ids()
            self.registry.retain_only(keep)
        self._pending = runtimes
        self.first.set()
        log.info(
            "snapshot applied: %s",
            ", ".join(
                f"{k[len('service/') :]} {len(v.get('endpoints') or ())} endpoint(s)"
                for k, v in sorted(sections.items())
                if k.startswith("service/")
            )
            or "no services to call",
        )

    def _route_host(self, transport: asyncio.BaseTransport) -> bytes | None:
        dst = original_destination(transport)
        if dst is None:
            return None
        return self.dests.get(dst)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.agent.start()
        self._certificate()
        if not self.tls.ready:
            raise RuntimeError("no certificate: the sidecar cannot serve")
        try:
            await asyncio.wait_for(self.first.wait(), FIRST_SNAPSHOT_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                "no snapshot from the control plane, and none in the state directory"
            ) from None
        runtimes: dict[str, Runtime] = self._pending
        loop = self.loop
        if self.opts.access_log is not None:
            self.access.apply(
                AccessLogConfig(
                    path=self.opts.access_log, sample_2xx=self.opts.access_log_sample_2xx
                )
            )
            # SIGHUP: the file was rotated.
            loop.add_signal_handler(signal.SIGHUP, self.access.reopen)
        registry = self.registry
        for name, runtime in runtimes.items():
            if name == "inbound":
                self.states[name] = ServerState(
                    runtime,
                    registry,
                    loop=loop,
                    streams=ProxyStream,
                    scheme=b"https",
                    role="sidecar-inbound",
                    require_peer=self.mtls == "strict",
                    hub=self.hub,
                )
            else:
                self.states[name] = ServerState(
                    runtime,
                    registry,
                    loop=loop,
                    streams=ProxyStream,
                    role="sidecar-outbound",
                    route_host=self._route_host
                    if name == "outbound" and self.opts.capture
                    else None,
                    hub=self.hub,
                )
        for runtime in runtimes.values():
            runtime.start_health()
        if self.opts.tracing_endpoint:
            self.tracing = Tracing(
                endpoint=self.opts.tracing_endpoint,
                service_name=self.opts.service,
                namespace=self.opts.namespace,
                sample_ratio=self.opts.tracing_sample_ratio,
                schedule_delay=self.opts.tracing_batch_delay,
                hub=self.hub,
            )
        inbound = self.states["inbound"]
        plain = ServerState(
            inbound.runtime,
            registry,
            loop=loop,
            streams=ProxyStream,
            scheme=b"http",
            role="sidecar-inbound",
            hub=self.hub,
        )
        self.states["inbound-plaintext"] = plain
        for state in self.states.values():
            state.tracing = self.tracing
        specs: list[tuple[ListenerSpec, Any]] = [
            (
                ListenerSpec(
                    "sidecar-inbound",
                    "inbound",
                    self.opts.inbound,
                    lambda: ServerProtocol(inbound),
                    tls=self.tls.server,
                    plaintext_too=self.mtls == "permissive",
                    sock=self.socks["inbound"],
                    hub=self.hub,
                ),
                lambda: ServerProtocol(plain),
            )
        ]
        for name in self.socks:
            if name in ("inbound", "admin"):
                continue
            state = self.states[name]
            address = (
                self.opts.outbound if name == "outbound" else self.opts.upstream_ports[name[5:]]
            )
            assert address is not None
            specs.append(
                (
                    ListenerSpec(
                        "sidecar-outbound",
                        name,
                        address,
                        _protocol(state),
                        sock=self.socks[name],
                        hub=self.hub,
                    ),
                    None,
                )
            )
        if self.opts.admin is not None:
            specs.append(
                (
                    ListenerSpec(
                        "admin",
                        "admin",
                        self.opts.admin,
                        lambda: AdminProtocol(inbound, token=lambda: self.opts.admin_token),
                        sock=self.socks["admin"],
                        hub=self.hub,
                    ),
                    None,
                )
            )
        for spec, plain_factory in specs:
            server, _ = await start_listener(spec, loop, plain_factory=plain_factory)
            self.servers.append((spec, server))
        if self.opts.run_dir is not None:
            me = self.opts.worker_id
            paths = [
                os.path.join(self.opts.run_dir, f"metrics-{i}.sock")
                for i in range(self.opts.workers)
            ]
            self.hub.peers = [p for i, p in enumerate(paths) if i != me]
            self.sample_server = await peers.serve(paths[me], self.hub)
        if self.opts.capture and self.opts.worker_id == 0:
            self.capture = Capture(
                self.opts.service,
                outbound_port=self.ports["outbound"],
                inbound_port=self.ports["inbound"],
                app_port=self.opts.app.port,
                uid=os.getuid(),
                exclude_ports=self.opts.capture_exclude,
            )
            await loop.run_in_executor(None, self.capture.install)
        loop.call_later(0.5, self._tick)

    def _tick(self) -> None:
        for state in self.states.values():
            try:
                state.check_timeouts()
            except Exception:
                log.exception("timeout sweep failed")
        self.registry.sweep(self.loop.time())
        if not self.stopping.is_set():
            tick = min(s.runtime.tick for s in self.states.values())
            self.loop.call_later(tick, self._tick)

    def describe(self) -> str:
        parts = [f"inbound :{self.ports['inbound']} ({self.mtls} mTLS)"]
        if "outbound" in self.ports:
            parts.append(f"outbound :{self.ports['outbound']}")
        for name, port in self.ports.items():
            if name.startswith("port:"):
                parts.append(f"{name[5:]} :{port}")
        if "admin" in self.ports:
            parts.append(f"admin :{self.ports['admin']}")
        if self.capture is not None:
            parts.append("capture on")
        return ", ".join(parts)

    async def stop(self) -> None:
        self.stopping.set()
        for _spec, server in self.servers:
            server.close()
        if self.capture is not None:
            await self.loop.run_in_executor(None, self.capture.remove)
        for state in self.states.values():
            state.drain()
        deadline = self.loop.time() + 5.0
        while any(s.connections for s in self.states.values()) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for state in self.states.values():
            for conn in list(state.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            await state.runtime.close_health()
        self.registry.close_idle()
        await self.agent.close()
        await self.services.close()
        self.access.stop()
        if self.sample_server is not None:
            self.sample_server.close()
        if self.tracing is not None:
            await self.loop.run_in_executor(None, self.tracing.close)


def _protocol(state: ServerState) -> Callable[[], asyncio.Protocol]:
    return lambda: ServerProtocol(state)


async def run_sidecar(opts: SidecarOptions, socks: dict[str, socket.socket] | None = None) -> int:
    sidecar = Sidecar(opts, socks)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sidecar.start()
    except BaseException:
        if sidecar.capture is not None:
            sidecar.capture.remove()
        raise
    if opts.worker_id == 0:
        print(f"meshgate sidecar {sidecar.identity} ready: {sidecar.describe()}", flush=True)
    else:
        log.info("worker %d serving", opts.worker_id)
    await stop.wait()
    log.info("sidecar stopping")
    await sidecar.stop()
    return 0
