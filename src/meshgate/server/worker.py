"""One worker process: its listeners, its event loop, reload and drain.

Every worker binds its own listening socket with SO_REUSEPORT, so the kernel
spreads new connections across workers and a crashed worker never takes the
port down with it.

Reload is atomic per worker: the new file is read and validated, a new
`Runtime` is built beside the old one, and only then is the reference
swapped. Connections and exchanges in flight keep the objects they started
with. A file that fails validation is refused with its file, line and field
in the log, and the old runtime keeps serving.

Drain (SIGTERM, SIGINT): readiness turns 503, the listener stops accepting,
idle keep-alive connections close, and busy ones close after their current
response, for at most `limits.drain_timeout`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pathlib
import signal
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from meshgate.admin.gateway_ui import DENIALS, GatewayDashboard
from meshgate.admin.hooks import HOOKS
from meshgate.admin.samples import listener_samples
from meshgate.admin.server import AdminProtocol
from meshgate.config.generations import Generation, Generations
from meshgate.config.loader import ConfigError, read_config_file
from meshgate.config.schema import Address, Config, admin_left_open
from meshgate.engine.listener import ListenerSpec, Serving, start_listener
from meshgate.engine.load import load_config_text
from meshgate.engine.runtime import Runtime
from meshgate.filters.build import FilterServices
from meshgate.mesh.member import MeshMember
from meshgate.observability import peers
from meshgate.observability.accesslog import AccessLog
from meshgate.observability.hub import HUB, MetricsHub
from meshgate.observability.tracing import Tracing
from meshgate.protocol.h1 import ServerProtocol, ServerState
from meshgate.ratelimit.local import SharedTable
from meshgate.server import orders
from meshgate.stream.stream import ProxyStream
from meshgate.upstream.cluster import PoolRegistry

log = logging.getLogger("meshgate.server")

SWEEP_INTERVAL = 5.0
WATCH_INTERVAL = 1.0
ROLLBACK_TIMEOUT = 15.0
"""How long a worker waits for the supervisor to roll every worker back."""


def _freeze_heap() -> None:
    """Move what start-up built out of the collector's way (once: a frozen
    object is never collected, so a reload's leftovers are not frozen).

    The config, the compiled runtime and the imported modules live as long
    as the worker; left in the collected generations, every full collection
    walks them all, a pause of milliseconds in the middle of requests."""
    gc.collect()
    gc.freeze()


def file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class WorkerOptions:
    config_path: str
    worker_id: int = 0
    watch: bool = True
    """Reload when the file changes (the supervisor watches instead when
    there are several workers)."""
    listen_port: int | None = None
    """Overrides the configured port (the supervisor resolves port 0)."""
    admin_port: int | None = None
    rate_table: SharedTable | None = None
    run_dir: str | None = None
    """The supervisor's private directory, where each worker's metrics
    socket is (`observability.peers`); None for a single process."""
    workers: int = 1
    history: Generations | None = None
    """The generations served so far (the supervisor's, for its workers);
    None: the given config is generation 1."""
    supervisor_pid: int | None = None
    """Set when a supervisor forked this worker: generations then come from
    its orders (`server.orders`), and a rollback is asked of it."""
    hub: MetricsHub | None = None
    """This gateway's metrics; None: the process's `HUB` (one worker per
    process). A process that runs other proxies too gives it its own."""


class Worker:
    def __init__(self, config: Config, opts: WorkerOptions) -> None:
        self.opts = opts
        self.config = config
        self.hub = hub = HUB if opts.hub is None else opts.hub
        # Before any listener takes its series from the hub.
        hub.configure(config.metrics.idle_expiry, config.metrics.max_identities)
        self.loop = asyncio.get_running_loop()
        self.member: MeshMember | None = None
        self.started = False
        self.services = FilterServices(opts.rate_table)
        if config.mesh is not None:
            base = pathlib.Path(opts.config_path).resolve().parent
            self.member = MeshMember(
                config.mesh,
                base,
                opts.worker_id,
                self._mesh_changed,
                hub=hub,
                denials=self.services.denials,
            )
        self.registry = PoolRegistry(
            self.loop, tls=self.member.tls if self.member is not None else None
        )
        runtime = self._build(config)
        self.state = ServerState(
            runtime, self.registry, loop=self.loop, streams=ProxyStream, hub=hub
        )
        self._count_requests(config)
        # Made in the worker (the exporter's thread does not survive a fork).
        self.state.tracing = Tracing.from_config(config.tracing, hub) if config.tracing else None
        hub.register("listeners", lambda: listener_samples([self.state]))
        self.bound_admin = config.admin
        if opts.history is not None:
            self.history = opts.history
        else:
            self.history = Generations()
            self.history.loaded(config, read_config_file(opts.config_path), opts.config_path)
        self.applied = self.history.number
        """The newest order applied (or refused) by this worker."""
        self.advanced = asyncio.Event()
        self.hub.generation = self.history.number
        HOOKS.generations = self.history
        HOOKS.rollback = self.rollback
        self.stopping = asyncio.Event()
        self.servers: list[tuple[ListenerSpec, Serving]] = []
        self.sample_server: asyncio.AbstractServer | None = None
        self.dashboard: GatewayDashboard | None = None
        self.stamp = file_stamp(opts.config_path)
        self.config_tracing = config.tracing
        """The `tracing:` in force (a reload that changes it makes a new pipeline)."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.reload_lock = asyncio.Lock()
        self.access = AccessLog(time.monotonic, hub)
        self.base_dir = os.path.dirname(os.path.abspath(opts.config_path))

    def _count_requests(self, config: Config) -> None:
        series = self.state.series
        self.state.observe = series.record if config.metrics.enabled else series.pass_on

    def _build(self, config: Config) -> Runtime:
        """The one compile step: the file's config, with the mesh's endpoints
        when this gateway is in the mesh."""
        if self.member is not None:
            config = self.member.compose(config)
        return Runtime.build(
            config, self.registry, source=self.opts.config_path, services=self.services
        )

    def _mesh_changed(self, sections: dict[str, Any]) -> None:
        """A snapshot: compiled now (a failure NACKs it), swapped in after."""
        if not self.started:
            return  # read from disk, or joined with, while starting: `start` builds it
        runtime = self._build(self.config)
        task = self.loop.create_task(self._swap_locked(self.config, runtime, "the mesh snapshot"))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _swap_locked(self, config: Config, runtime: Runtime, what: str) -> None:
        async with self.reload_lock:
            await self._swap(config, runtime, what)

    async def start(self) -> None:
        if self.member is not None:
            await self.member.start()
            # What the agent read from disk (or joined with) is in now.
            self.state.runtime = self._build(self.config)
        # JWKS are fetched before the first request is accepted.
        await self.services.activate(self.state.runtime.filters)
        self.state.runtime.start_health()
        cfg = self.config
        self.access.apply(cfg.access_log_config, self.base_dir)
        listen = cfg.listen
        if self.opts.listen_port is not None:
            listen = Address(host=listen.host, port=self.opts.listen_port)
        state = self.state
        specs = [
            ListenerSpec("gateway", "gateway", listen, lambda: ServerProtocol(state), hub=self.hub),
        ]
        if cfg.admin is not None:
            admin = cfg.admin
            if self.opts.admin_port is not None:
                admin = Address(host=admin.host, port=self.opts.admin_port)
            self._start_dashboard(admin.host)
            history = self.history
            specs.append(
                ListenerSpec(
                    "admin",
                    "admin",
                    admin,
                    lambda: AdminProtocol(state, token=lambda: history.admin_token),
                )
            )
        if self.opts.run_dir is not None:
            await self._serve_samples(self.opts.run_dir)
            if self.opts.supervisor_pid is not None:
                orders.mark_applied(self.opts.run_dir, self.opts.worker_id, self.applied)
        for spec in specs:
            server, port = await start_listener(spec, self.loop)
            self.servers.append((spec, server))
            if spec.role == "gateway":
                log.info("worker %d listening on %s:%d", self.opts.worker_id, listen.host, port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        self.loop.call_later(self.state.runtime.tick, self._tick)
        _freeze_heap()
        if self.opts.watch:
            self.loop.call_later(WATCH_INTERVAL, self._watch)
        self.started = True

    def _start_dashboard(self, bound: str) -> None:
        """The dashboard under the admin listener's `/ui`, and its sampler
        (`admin.gateway_ui`); this worker's denials for whichever worker
        answers it."""
        me = f"worker-{self.opts.worker_id}"

        def denials() -> list[dict[str, Any]]:
            return [{**d, "proxy": me} for d in self.services.denials.since(0)[0]]

        self.hub.extras[DENIALS] = denials
        service = self.config.mesh.service if self.config.mesh is not None else "gateway"
        self.dashboard = GatewayDashboard(
            self.hub, bound=bound, service=service, workers=self._workers_doc
        )
        HOOKS.dashboard = self.dashboard
        self.dashboard.start()

    def _workers_doc(self) -> list[dict[str, Any]]:
        """Each worker's generation, as the dashboard's `config.proxies`."""
        sent = self.history.number
        run_dir = self.opts.run_dir
        if run_dir is not None and self.opts.supervisor_pid is not None:
            applied = orders.applied(run_dir, self.opts.workers)
        else:
            applied = [self.applied]
        service = self.config.mesh.service if self.config.mesh is not None else "gateway"
        return [
            {
                "id": f"worker-{i}",
                "service": service,
                "connected": True,
                "acked": n or None,
                "sent": sent,
                "nack": None,
                "report_age": None,
            }
            for i, n in enumerate(applied)
        ]

    async def _serve_samples(self, run_dir: str) -> None:
        """This worker's metrics socket, and the other workers' (one scrape
        of the shared admin port answers for all)."""
        me = self.opts.worker_id
        paths = [os.path.join(run_dir, f"metrics-{i}.sock") for i in range(self.opts.workers)]
        self.hub.peers = [p for i, p in enumerate(paths) if i != me]
        self.sample_server = await peers.serve(paths[me], self.hub)

    def _sweep(self) -> None:
        self.registry.sweep(self.loop.time())
        self.hub.expire_local()
        if not self.stopping.is_set():
            self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _tick(self) -> None:
        try:
            self.state.check_timeouts()
        except Exception:
            log.exception("timeout sweep failed")
        finally:
            self.loop.call_later(self.state.runtime.tick, self._tick)

    def _watch(self) -> None:
        stamp = file_stamp(self.opts.config_path)
        if stamp is not None and stamp != self.stamp:
            self.stamp = stamp
            log.info("%s changed on disk", self.opts.config_path)
            self.reload()
        if not self.stopping.is_set():
            self.loop.call_later(WATCH_INTERVAL, self._watch)

    def reload(self) -> None:
        task = self.loop.create_task(self._reload())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reload(self) -> None:
        # One at a time, in order: a reload waiting on a JWKS fetch must not
        # swap in its config after a newer one did.
        async with self.reload_lock:
            if self.opts.supervisor_pid is not None and self.opts.run_dir is not None:
                await self._follow_orders(self.opts.run_dir)
            else:
                await self._reload_once()

    async def _reload_once(self) -> None:
        path = self.opts.config_path
        self.stamp = file_stamp(path)
        try:
            text = read_config_file(path)
            config = load_config_text(text, path)
        except ConfigError as exc:
            self.hub.reloads["refused"] += 1
            log.error("reload refused, still serving the previous config:\n%s", exc)
            self.access.reopen()  # (rotated logs are let go of all the same)
            return
        if await self._apply(config, path):
            self._served(self.history.loaded(config, text, path))

    async def _follow_orders(self, run_dir: str) -> None:
        """Every generation the supervisor ordered since the last one applied."""
        todo = orders.read_orders(run_dir, self.applied)
        if not todo:
            self.access.reopen()  # a SIGHUP lets go of rotated logs all the same
        for order in todo:
            number = int(order["generation"])
            self.applied = number
            try:
                config = load_config_text(str(order["text"]), str(order["source"]))
            except ConfigError as exc:
                self.hub.reloads["refused"] += 1
                log.error("generation %d refused, still serving the previous:\n%s", number, exc)
                self.access.reopen()
                continue
            what = (
                f"{order['source']} (generation {number})"
                if order.get("restores") is None
                else f"generation {order['restores']} again (rollback, generation {number})"
            )
            if await self._apply(config, what):
                self._served(self.history.add(Generation.from_order(order, config)))
        orders.mark_applied(run_dir, self.opts.worker_id, self.applied)

    async def _apply(self, config: Config, what: str) -> bool:
        """Build and swap in `config`; False (logged) if it is refused."""
        problem = admin_left_open(self.bound_admin, config)
        try:
            if problem is not None:
                raise ValueError(problem)
            runtime = self._build(config)
        except ConfigError as exc:
            self.hub.reloads["refused"] += 1
            log.error("reload refused, still serving the previous config:\n%s", exc)
            self.access.reopen()
            return False
        except Exception as exc:
            self.hub.reloads["refused"] += 1
            log.error("reload refused, still serving the previous config: %s", exc)
            self.access.reopen()
            return False
        if config.listen != self.config.listen or config.admin != self.config.admin:
            log.warning("listen and admin addresses change only on restart; kept the old ones")
        if config.workers != self.config.workers:
            log.warning("the number of workers changes only on restart")
        if config.limits.rate_limit_slots != self.config.limits.rate_limit_slots:
            log.warning("limits.rate_limit_slots changes only on restart")
        if config.mesh != self.config.mesh:
            log.warning("mesh: changes only on restart")
        await self._swap(config, runtime, what)
        self.hub.reloads["ok"] += 1
        settings = config.access_log_config
        try:
            # Opened again, also when unchanged: a reload is how a rotated
            # file is let go of.
            self.access.apply(settings, self.base_dir)
        except OSError as exc:
            where = settings.path if settings is not None else ""
            log.error("access log: cannot open %s, kept the previous one: %s", where, exc)
            self.access.reopen()
        if config.tracing != self.config_tracing:
            self._retrace(config)
        return True

    def _served(self, gen: Generation) -> None:
        self.hub.generation = gen.number
        self.advanced.set()
        self.advanced = asyncio.Event()

    # -- rollback (POST /config/rollback) ------------------------------------

    async def rollback(self) -> tuple[int, Any]:
        """Serve the previous generation again: in this process, or, under a
        supervisor, in every worker at once (the supervisor orders it)."""
        seen = self.history.number
        target = self.history.rollback_target()
        if isinstance(target, str):
            return 409, {"error": target, "generation": seen}
        if self.opts.supervisor_pid is not None and self.opts.run_dir is not None:
            return await self._ask_supervisor(self.opts.run_dir, self.opts.supervisor_pid, seen)
        async with self.reload_lock:
            if self.history.number != seen:
                return self._raced(seen)
            target = self.history.rollback_target()
            if isinstance(target, str):
                return 409, {"error": target, "generation": seen}
            what = f"generation {target.number} again (rollback)"
            if not await self._apply(target.config, what):
                return 500, {"error": f"generation {target.number} no longer builds: see the log"}
            gen = self.history.rolled_back(target)
            self._served(gen)
        log.warning(
            "rolled back from generation %d to %d's config (now generation %d)",
            seen,
            target.number,
            gen.number,
        )
        return 200, self._rollback_answer(gen, seen)

    async def _ask_supervisor(self, run_dir: str, supervisor: int, seen: int) -> tuple[int, Any]:
        if os.getppid() != supervisor:
            return 503, {"error": "the supervisor is gone: no rollback"}
        orders.ask_rollback(run_dir, self.opts.worker_id, seen)
        os.kill(supervisor, signal.SIGUSR1)
        deadline = self.loop.time() + ROLLBACK_TIMEOUT
        while self.history.number == seen:
            left = deadline - self.loop.time()
            if left <= 0:
                return 503, {"error": "the supervisor did not roll back in time: see its log"}
            try:
                await asyncio.wait_for(self.advanced.wait(), left)
            except TimeoutError:
                continue
        gen = self.history.current
        if gen.restores is None or gen.after != seen:
            return self._raced(seen)
        # Answered when every worker serves it: no request reaches the
        # rolled-back config after the answer.
        behind = orders.applied(run_dir, self.opts.workers)
        while min(behind) < gen.number and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
            behind = orders.applied(run_dir, self.opts.workers)
        answer = self._rollback_answer(gen, seen)
        lagging = [i for i, n in enumerate(behind) if n < gen.number]
        if lagging:
            answer["workers_not_yet_serving_it"] = lagging
        return 200, answer

    def _raced(self, seen: int) -> tuple[int, Any]:
        return 409, {
            "error": f"the config changed while the rollback waited (generation {seen} "
            f"was served, now {self.history.number}): look, then ask again",
            "generation": self.history.number,
        }

    @staticmethod
    def _rollback_answer(gen: Generation, seen: int) -> dict[str, Any]:
        return {
            "rolled_back_from": seen,
            **gen.describe(current=True),
            "worker": os.getpid(),
        }

    async def _swap(self, config: Config, runtime: Runtime, what: str) -> None:
        # New JWKS are fetched before the new runtime takes requests; what
        # only the old runtime used is closed once it is swapped out.
        await self.services.prepare(runtime.filters)
        old = self.state.runtime
        self.state.runtime = runtime
        # Health checks move with the swap: the old runtime's stop before the
        # new one's start (never both at once), and the new ones take over
        # the state of endpoints both check. A draining worker checks nothing.
        old.stop_health()
        if not self.stopping.is_set():
            runtime.start_health(old)
        await self.services.activate(runtime.filters)
        self.hub.configure(config.metrics.idle_expiry, config.metrics.max_identities)
        self._count_requests(config)
        self.config = config
        self.registry.retain_only(runtime.pool_ids())
        await old.close_health()
        log.info(
            "reloaded %s: %d routes, %d upstreams", what, len(config.routes), len(config.upstreams)
        )

    def _retrace(self, config: Config) -> None:
        """A reload changed `tracing:`: requests from now on use the new
        pipeline; the old one sends what it holds once the requests that
        started with it are likely done (after `limits.drain_timeout`)."""
        old = self.state.tracing
        try:
            self.state.tracing = (
                Tracing.from_config(config.tracing, self.hub) if config.tracing else None
            )
        except Exception as exc:
            log.error("tracing: kept the previous settings: %s", exc)
            return
        self.config_tracing = config.tracing
        log.info("tracing %s", "on" if config.tracing else "off")
        if old is not None:
            task = self.loop.create_task(self._close_later(old))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _close_later(self, tracing: Tracing) -> None:
        await asyncio.sleep(self.state.runtime.limits.drain_timeout)
        await self.loop.run_in_executor(None, tracing.close)

    async def wait_and_drain(self) -> None:
        await self.stopping.wait()
        state = self.state
        log.info("worker %d draining", self.opts.worker_id)
        if self.dashboard is not None:
            self.dashboard.stop()
        await state.runtime.close_health()
        for spec, server in self.servers:
            if spec.role != "admin":
                server.close()
        state.drain()
        deadline = self.loop.time() + state.runtime.limits.drain_timeout
        while state.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if state.connections:
            log.warning("drain timeout: closing %d connections", len(state.connections))
            for conn in list(state.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        for spec, server in self.servers:
            if spec.role == "admin":
                server.close()
        if self.sample_server is not None:
            self.sample_server.close()
        self.registry.close_idle()
        await self.services.close()
        if state.tracing is not None:
            await self.loop.run_in_executor(None, state.tracing.close)
        if self.member is not None:
            await self.member.close()
        self.access.stop()
        log.info("worker %d stopped", self.opts.worker_id)


async def _worker_main(config: Config, opts: WorkerOptions) -> None:
    worker = Worker(config, opts)
    await worker.start()
    await worker.wait_and_drain()


def run_worker(config: Config, opts: WorkerOptions) -> int:
    """Run one worker until it is told to stop; the process exit code."""
    uvloop.run(_worker_main(config, opts))
    return 0
