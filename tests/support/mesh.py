"""A real `meshgate control` process for mesh tests, and its commands.

The control plane runs as its own process (`meshgate control -c mesh.yaml`)
on a free loopback port, with its state directory under the test's tmp dir.
Tests talk to it with the real protocol: `MeshAgent`s in the test process,
or `meshgate agent` processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from support.client import free_port
from support.proxy import meshgate_cmd, run_meshgate

TRUST_DOMAIN = "mesh.test"


def mesh_yaml(port: int, *, services: dict[str, Any] | None = None, **control: Any) -> str:
    doc: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "control": {
            "listen": f"127.0.0.1:{port}",
            "state_dir": "state",
            "lease": "3s",
            "debounce": "10ms",
            **control,
        },
        "services": services
        if services is not None
        else {
            "orders": {"calls": ["customers"]},
            "customers": {},
            "payments": {},
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


class ControlProcess:
    """One `meshgate control`; `kill` is SIGKILL, `start` again reuses its state."""

    def __init__(
        self,
        directory: Path,
        text: str | None = None,
        *,
        path: Path | None = None,
        state: Path | None = None,
        **kwargs: Any,
    ) -> None:
        """`path`: a mesh.yaml shared with other instances (then `state` is
        this instance's own state directory, and it listens on its own port)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.extra: list[str] = []
        if path is not None:
            self.path = path
            self.extra = ["--listen", f"127.0.0.1:{self.port}"]
            if state is not None:
                self.extra += ["--state-dir", str(state)]
        else:
            self.path = directory / "mesh.yaml"
            self.path.write_text(text if text is not None else mesh_yaml(self.port, **kwargs))
        self._state = state
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "control.log"
        self.starts = 0

    @property
    def state(self) -> Path:
        return self._state or self.directory / "state"

    @property
    def bundle(self) -> bytes:
        return (self.state / "ca" / "bundle.pem").read_bytes()

    def start(self, timeout: float = 20.0) -> ControlProcess:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            meshgate_cmd("--log-level", "debug", "control", "-c", str(self.path), *self.extra),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        marker = "meshgate control listening on"
        while time.monotonic() < deadline:
            if self.log_text().count(marker) >= self.starts:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"meshgate control exited:\n{self.log_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"meshgate control did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def token(self, service: str, *args: str) -> str:
        proc = run_meshgate("token", "create", "-c", str(self.path), "--service", service, *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_meshgate(*args, "-c", str(self.path))

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the control plane's log:\n{self.log_text()}")


@contextlib.contextmanager
def running(directory: Path, **kwargs: Any) -> Any:
    cp = ControlProcess(directory, **kwargs).start()
    try:
        yield cp
    finally:
        cp.stop()
