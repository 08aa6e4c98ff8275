"""The supervisor of several workers (`meshgate run --workers N`).

It forks N workers before any event loop exists, forwards signals to them,
restarts a worker that dies, and watches the config file. It validates a new
config itself before telling workers to reload, so that a bad file is
refused once, with one clear log line, and no worker ever sees it.

It keeps the record of config generations: each load, and each rollback a
worker asks for (SIGUSR1), is numbered here and handed to every worker as an
order with the text validated (`server.orders`); a worker forked later
starts with the current generation and this record.

Port 0 is resolved here: the supervisor binds (without listening) a
SO_REUSEPORT socket to learn the port, keeps it to hold the port, and gives
the number to each worker, which binds its own listening socket to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

from meshgate.config.generations import Generations
from meshgate.config.loader import ConfigError, read_config_file
from meshgate.config.schema import Address, Config, admin_left_open
from meshgate.engine.load import load_config_text
from meshgate.filters.build import compile_check
from meshgate.ratelimit.local import SharedTable
from meshgate.server import orders
from meshgate.server.worker import WATCH_INTERVAL, WorkerOptions, file_stamp, run_worker

log = logging.getLogger("meshgate.supervisor")

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1}
RESTART_BACKOFF = 1.0


def _reserve_port(address: Address) -> tuple[socket.socket, int]:
    infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(sockaddr)
    return sock, sock.getsockname()[1]


class Supervisor:
    def __init__(
        self, config: Config, config_path: str, workers: int, history: Generations | None = None
    ) -> None:
        self.config = config
        self.path = config_path
        if history is None:
            history = Generations()
            history.loaded(config, read_config_file(config_path), config_path)
        self.history = history
        self.count = workers
        self.children: dict[int, int] = {}  # pid -> worker id
        self.stopping = False
        self.stamp = file_stamp(config_path)
        self.held: list[socket.socket] = []
        self.listen_port = config.listen.port
        self.admin_port = config.admin.port if config.admin else None
        self.config_admin = config.admin
        """The admin address the workers listen on until a restart."""
        # Made before any fork, so that every worker maps the same memory:
        # `policy: local` limits are exact per instance, not per worker.
        # Its size changes only on restart.
        self.rate_table = SharedTable(config.limits.rate_limit_slots)
        # Private (0700): each worker's metrics socket (`observability.peers`).
        self.run_dir = tempfile.mkdtemp(prefix="meshgate-")

    def _spawn(self, worker_id: int) -> None:
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # A reload asked for before the worker installs its handler
                # must not kill it (SIGHUP's default action).
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                for sock in self.held:
                    sock.close()
                code = run_worker(
                    self.config,
                    WorkerOptions(
                        config_path=self.path,
                        worker_id=worker_id,
                        watch=False,
                        listen_port=self.listen_port,
                        admin_port=self.admin_port,
                        rate_table=self.rate_table,
                        run_dir=self.run_dir,
                        workers=self.count,
                        history=self.history,
                        supervisor_pid=me,
                    ),
                )
            except BaseException:
                log.exception("worker %d crashed", worker_id)
            finally:
                os._exit(code)
        self.children[pid] = worker_id

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reload(self) -> None:
        self.stamp = file_stamp(self.path)
        try:
            text = read_config_file(self.path)
            config = load_config_text(text, self.path)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config:\n%s", exc)
            return
        problem = compile_check(config, self.path) or admin_left_open(self.config_admin, config)
        if problem:
            log.error("reload refused, still serving the previous config:\n%s", problem)
            return
        self.config = config
        gen = self.history.loaded(config, text, self.path)
        log.info("%s is generation %d", self.path, gen.number)
        self._order()

    def _order(self) -> None:
        orders.write_order(self.run_dir, self.history.current)
        self._signal_all(signal.SIGHUP)

    def _rollback(self) -> None:
        """What workers asked (SIGUSR1): the previous generation, in all of
        them, once for the generation they saw."""
        seen = orders.take_rollback_requests(self.run_dir)
        current = self.history.number
        if current not in seen:
            if seen:
                log.info("rollback of generation %s not done: %d is served now", seen, current)
            return
        target = self.history.rollback_target()
        if isinstance(target, str):
            log.warning("rollback refused: %s", target)
            return
        self.config = target.config
        gen = self.history.rolled_back(target)
        log.warning(
            "rolled back from generation %d to %d's config (now generation %d); "
            "%s is unchanged on disk",
            current,
            target.number,
            gen.number,
            self.path,
        )
        self._order()

    def _reap(self) -> list[int]:
        """Collect exited workers; the ids of those that must be restarted."""
        dead = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker_id = self.children.pop(pid, None)
            if worker_id is None:
                continue
            if not self.stopping:
                log.error(
                    "worker %d (pid %d) exited with status %d; restarting",
                    worker_id,
                    pid,
                    os.waitstatus_to_exitcode(status),
                )
                dead.append(worker_id)
        return dead

    def run(self) -> int:
        if self.listen_port == 0:
            sock, self.listen_port = _reserve_port(self.config.listen)
            self.held.append(sock)
        if self.config.admin is not None and self.admin_port == 0:
            sock, self.admin_port = _reserve_port(self.config.admin)
            self.held.append(sock)
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        log.info("supervisor starting %d workers", self.count)
        for i in range(self.count):
            self._spawn(i)
        deadline = 0.0
        while self.children:
            sig = signal.sigtimedwait(_SIGNALS, WATCH_INTERVAL)
            if sig is None:
                if not self.stopping and file_stamp(self.path) != self.stamp:
                    log.info("%s changed on disk", self.path)
                    self._reload()
                if self.stopping and time.monotonic() > deadline:
                    log.warning("workers did not stop in time; killing them")
                    self._signal_all(signal.SIGKILL)
                continue
            signo = sig.si_signo
            if signo == signal.SIGCHLD:
                for worker_id in self._reap():
                    time.sleep(RESTART_BACKOFF)
                    self._spawn(worker_id)
            elif signo == signal.SIGHUP:
                if not self.stopping:
                    self._reload()
            elif signo == signal.SIGUSR1:
                if not self.stopping:
                    self._rollback()
            elif not self.stopping:
                self.stopping = True
                deadline = time.monotonic() + self.config.limits.drain_timeout + 5.0
                self._signal_all(signal.SIGTERM)
            if self.stopping:
                self._reap()
        for sock in self.held:
            sock.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("supervisor stopped")
        return 0
