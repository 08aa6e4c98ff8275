"""`ProxyProcess`: the real gateway, `meshgate run -c FILE`, as a subprocess.

The config is written to a file in the test's directory with `listen` and
`admin` on free loopback ports (bind 127.0.0.1:0, read the port, close: the
proxy listens with SO_REUSEPORT). The process's stderr goes to a file that
tests read; readiness is `GET /readyz` answering 200 on the admin listener.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .client import free_port, http_get
from .upstream import UpstreamServer

REPO = Path(__file__).resolve().parents[2]
MESHGATE = Path(sys.executable).parent / "meshgate"
READY_TIMEOUT = 15.0
_counter = itertools.count()


def engine_available() -> bool:
    """The proxy engine exists (its CLI module has landed)."""
    return (REPO / "src" / "meshgate" / "cli.py").exists()


def meshgate_cmd(*args: str) -> list[str]:
    if not MESHGATE.exists():
        raise AssertionError(
            f"{MESHGATE} is missing: install the project into the venv (make test does it)"
        )
    return [str(MESHGATE), *args]


def run_meshgate(
    *args: str, timeout: float = 30.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short meshgate command (check, routes, explain) to completion."""
    return subprocess.run(
        meshgate_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        check=False,
    )


def upstream_block(*servers: UpstreamServer | str, **options: Any) -> dict[str, Any]:
    """An `upstreams:` entry whose endpoints are these servers (or addresses)."""
    endpoints = [s if isinstance(s, str) else s.address for s in servers]
    return {"endpoints": endpoints, **options}


def single_upstream_config(
    *servers: UpstreamServer | str, limits: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    """Every path (`/**`) to one upstream named `up` made of these servers."""
    config: dict[str, Any] = {
        "upstreams": {"up": upstream_block(*servers, **options)},
        "routes": [{"path": "/**", "upstream": "up"}],
    }
    if limits:
        config["limits"] = limits
    return config


class ProxyProcess:
    """One `meshgate run` process (and whatever workers it forks)."""

    def __init__(
        self,
        config: dict[str, Any] | str,
        directory: Path,
        *,
        workers: int | None = None,
        extra_args: Iterable[str] = (),
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        n = next(_counter)
        self.directory = directory
        self.config_path = directory / f"meshgate-{n}.yaml"
        self.stderr_path = directory / f"meshgate-{n}.stderr.log"
        self.stdout_path = directory / f"meshgate-{n}.stdout.log"
        self.port = free_port()
        self.admin_port = free_port()
        self.workers = workers
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped_on_purpose = False
        self.write_config(config)

    # -- config --------------------------------------------------------------

    def render(self, config: dict[str, Any] | str) -> str:
        """The file text for `config`, with this proxy's listen/admin ports.

        A dict gets `listen`/`admin` unless it has them. A string is written
        as given, and `listen:`/`admin:` lines are appended at the end when it
        has none, so that its own line numbers stay what the test wrote.
        """
        if isinstance(config, str):
            text = config if config.endswith("\n") else config + "\n"
            if not re.search(r"(?m)^listen:", text):
                text += f"listen: 127.0.0.1:{self.port}\n"
            if not re.search(r"(?m)^admin:", text):
                text += f"admin: 127.0.0.1:{self.admin_port}\n"
            return text
        data = copy.deepcopy(config)
        data.setdefault("listen", f"127.0.0.1:{self.port}")
        data.setdefault("admin", f"127.0.0.1:{self.admin_port}")
        return yaml.safe_dump(data, sort_keys=False)

    def write_config(self, config: dict[str, Any] | str, *, atomic: bool = False) -> None:
        text = self.render(config)
        if atomic:
            tmp = self.config_path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.config_path)
        else:
            # In place, as `cat > file` or an editor saving without a rename.
            with open(self.config_path, "w") as f:
                f.write(text)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> ProxyProcess:
        args = ["run", "-c", str(self.config_path)]
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                meshgate_cmd(*args, *self.extra_args),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                start_new_session=True,
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"meshgate exited with {self.process.returncode} before it was ready; "
                    f"stderr:\n{self.stderr_text()}"
                )
            try:
                status, _ = http_get(self.admin_port, "/readyz", timeout=0.5)
                last = f"/readyz answered {status}"
                if status == 200:
                    return
            except OSError as exc:
                last = f"/readyz: {exc!r}"
            time.sleep(0.05)
        self.kill()
        raise AssertionError(
            f"meshgate not ready after {timeout or self.ready_timeout}s ({last}); "
            f"config:\n{self.config_path.read_text()}\nstderr:\n{self.stderr_text()}"
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            self.stopped_on_purpose = True
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"meshgate still running after {timeout}s; stderr:\n{self.stderr_text()}"
            ) from None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit, return the exit code."""
        assert self.process is not None
        self.stopped_on_purpose = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL this process group (the proxy and its workers)."""
        if self.process is None:
            return
        self.stopped_on_purpose = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def reload(
        self, config: dict[str, Any] | str, via: str = "sighup", *, atomic: bool = False
    ) -> None:
        """Write a new config, then SIGHUP (via="sighup") or nothing (via="edit",
        the watcher must notice the file changed). Returns at once: callers
        poll for the effect."""
        if via not in ("sighup", "edit"):
            raise ValueError(via)
        self.write_config(config, atomic=atomic)
        if via == "sighup":
            self.signal(signal.SIGHUP)

    # -- observation ---------------------------------------------------------

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait for a stderr line matching the regex `pattern`; return it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stderr_text().splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no stderr line matching {pattern!r} after {timeout}s; "
                    f"stderr:\n{self.stderr_text()}"
                )
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The proxy's pid and its descendants' (workers)."""
        return [self.pid, *descendants(self.pid)]

    def rss_bytes(self) -> int:
        """Resident memory of the proxy and its workers, added up."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The comm field may hold spaces; the ppid is the 2nd field after ')'.
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def children(pid: int) -> list[int]:
    """The live direct children of `pid` (a supervisor's workers), from
    /proc/<pid>/task/*/children."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out.update(int(c) for c in text.split())
    return sorted(out)


def socket_owners(
    local_ports: Iterable[int], pids: Iterable[int], *, accepted_on: int | None = None
) -> dict[int, int]:
    """Map each TCP local port (on this host) to the pid, among `pids`, owning it.

    With `accepted_on`, the ports are the peers' instead: each maps to the pid
    owning the socket it has with local port `accepted_on` (which of a
    server's processes accepted that client)."""
    inode_pid: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inode_pid[target[8:-1]] = pid
    wanted = set(local_ports)
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                port = int(fields[1].rpartition(":")[2], 16)
                if accepted_on is not None:
                    if port != accepted_on:
                        continue
                    port = int(fields[2].rpartition(":")[2], 16)
                if port in wanted and fields[9] in inode_pid:
                    owners[port] = inode_pid[fields[9]]
    return owners


class Stack:
    """The processes and servers one test (or module) started; `close` ends them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.upstreams: list[UpstreamServer] = []
        self.proxies: list[ProxyProcess] = []

    def upstream(self, name: str = "up", **options: Any) -> UpstreamServer:
        server = UpstreamServer(name, **options).start()
        self.upstreams.append(server)
        return server

    def proxy(
        self,
        config: dict[str, Any] | str,
        *,
        workers: int | None = None,
        extra_args: Iterable[str] = (),
        start: bool = True,
    ) -> ProxyProcess:
        proxy = ProxyProcess(config, self.directory, workers=workers, extra_args=extra_args)
        self.proxies.append(proxy)
        return proxy.start() if start else proxy

    def close(self) -> list[str]:
        """Stop everything; return problems seen (a proxy that died or logged
        a traceback), for the fixture to report."""
        problems = []
        for proxy in self.proxies:
            if proxy.process is None:
                continue
            died = proxy.process.poll() is not None and not proxy.stopped_on_purpose
            if proxy.alive:
                proxy.stopped_on_purpose = True
                proxy.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proxy.process.wait(10)
            proxy.kill()  # the workers too, whatever happened above
            text = proxy.stderr_text()
            if died:
                problems.append(
                    f"meshgate (pid {proxy.pid}) died during the test with "
                    f"{proxy.process.returncode}; stderr:\n{text[-4000:]}"
                )
            elif "Traceback (most recent call last)" in text:
                problems.append(f"meshgate (pid {proxy.pid}) logged a traceback:\n{text[-4000:]}")
        for server in self.upstreams:
            server.stop()
        return problems
