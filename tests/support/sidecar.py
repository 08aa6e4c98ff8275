"""A real `meshgate sidecar` process for mesh tests.

It joins the control plane of a `ControlProcess` with a join token, serves
its inbound listener over mutual TLS on a free loopback port, and its
outbound ports: the shared one (Host names the service) and one per
service given in `upstreams`. `start` waits for its "ready" line, which
gives the ports it bound.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from support.client import free_port
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.proxy import meshgate_cmd

READY = re.compile(r"meshgate sidecar (\S+) ready: (.*)")


class SidecarProcess:
    """One `meshgate sidecar`; `kill` is SIGKILL, `start` again reuses its state."""

    def __init__(
        self,
        cp: ControlProcess,
        service: str,
        app_port: int,
        directory: Path,
        *,
        upstreams: tuple[str, ...] = (),
        admin: bool = False,
        extra: tuple[str, ...] = (),
        token: str | None = None,
    ) -> None:
        self.cp = cp
        self.service = service
        self.app_port = app_port
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.inbound_port = free_port()
        self.outbound_port = free_port()
        self.ports = {name: free_port() for name in upstreams}
        self.admin_port = free_port() if admin else None
        self.extra = extra
        self.token = token
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / f"sidecar-{service}.log"
        self.starts = 0
        self.identity = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"

    @property
    def state_dir(self) -> Path:
        return self.directory / f"state-{self.service}"

    def command(self) -> list[str]:
        args = [
            "--log-level",
            "debug",
            "sidecar",
            "--service",
            self.service,
            "--app",
            f"127.0.0.1:{self.app_port}",
            "--control",
            f"127.0.0.1:{self.cp.port}",
            "--trust-domain",
            TRUST_DOMAIN,
            "--trust-bundle",
            str(self.cp.state / "ca" / "bundle.pem"),
            "--state-dir",
            str(self.state_dir),
            "--inbound",
            f"127.0.0.1:{self.inbound_port}",
            "--outbound",
            f"127.0.0.1:{self.outbound_port}",
        ]
        for name, port in self.ports.items():
            args += ["--upstream", f"{name}={port}"]
        if self.admin_port is not None:
            args += ["--admin", f"127.0.0.1:{self.admin_port}"]
        return meshgate_cmd(*args, *self.extra)

    def start(self, timeout: float = 30.0, *, fresh_token: bool = True) -> SidecarProcess:
        env = dict(os.environ)
        if self.token is None and fresh_token and not (self.state_dir / "cert.pem").exists():
            self.token = self.cp.token(self.service)
        if self.token is not None:
            env["MESHGATE_TOKEN"] = self.token
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(READY.findall(self.log_text())) >= self.starts:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"meshgate sidecar exited:\n{self.log_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"meshgate sidecar did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0, *, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count(text) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the sidecar's log:\n{self.log_text()[-4000:]}")

    def url(self, path: str, service: str | None = None) -> str:
        """A URL the local app would call: the service's own port, when it
        has one, else the shared outbound port (then Host must name it)."""
        if service is not None and service in self.ports:
            return f"http://127.0.0.1:{self.ports[service]}{path}"
        return f"http://127.0.0.1:{self.outbound_port}{path}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def rss_kib(pid: int) -> int:
    """The resident set of a process, in KiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
