"""A real Prometheus server (Debian's `prometheus`, which `.ci/run`
installs) scraping the test's processes.

It listens on a free loopback port, keeps its TSDB in the test's tmp dir,
and scrapes every target each second (one job per target, named by the
test). `wait_scraped` waits for a scrape that began after a given time
(all the test's requests are then in it); `query` is the HTTP API's
instant query. `stop` ends it by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.client import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def prometheus_available() -> bool:
    return os.access(PROMETHEUS, os.X_OK)


def require_prometheus() -> None:
    """Skip without a `prometheus` binary, except under CI (which installs it)."""
    if prometheus_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{PROMETHEUS} is missing: .ci/run installs Debian's prometheus package")
    pytest.skip("no prometheus binary (apt-get install prometheus)")


def _get(url: str, timeout: float = 5.0) -> Any:
    with _OPENER.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _timestamp(text: str) -> float:
    """An RFC 3339 time of the API (nanoseconds and all) -> Unix seconds."""
    if text.startswith("0001-01-01"):
        return 0.0
    text = text.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        frac = "".join(c for c in rest if c.isdigit())
        zone = rest[len(frac) :]
        text = f"{head}.{frac[:6]}{zone}"
    return datetime.fromisoformat(text).timestamp()


class PrometheusServer:
    """One `prometheus` process scraping `targets` (job name -> host:port)."""

    def __init__(self, directory: Path, targets: dict[str, str], interval: str = "1s") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.config_path = directory / "prometheus.yml"
        self.log_path = directory / "prometheus.log"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_text()[-4000:]}")
            with (
                contextlib.suppress(OSError),
                _OPENER.open(f"{self.url}/-/ready", timeout=1.0) as resp,
            ):
                if resp.status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it lingers."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    # -- the HTTP API ------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        doc = _get(f"{self.url}/api/v1/targets?state=active")
        active: list[dict[str, Any]] = doc["data"]["activeTargets"]
        return active

    def wait_scraped(self, job: str, after: float, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until `job`'s target was scraped, healthy, by a scrape that
        began after `after` (Unix time); its target document."""
        deadline = time.monotonic() + timeout
        seen: Any = None
        while time.monotonic() < deadline:
            for target in self.targets():
                if target["labels"].get("job") != job:
                    continue
                seen = target
                if target["health"] == "up" and _timestamp(target["lastScrape"]) > after:
                    return target
            time.sleep(0.2)
        raise AssertionError(f"no healthy scrape of {job} after {after}: {seen}")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (each: `metric` labels, `value`)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        doc = _get(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        if doc.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {doc}")
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def values(self, promql: str, by: tuple[str, ...], at: float | None = None) -> dict[Any, float]:
        """A query's result as {labels (the `by` ones, a tuple): value}."""
        out: dict[Any, float] = {}
        for r in self.query(promql, at):
            key = tuple(r["metric"].get(b, "") for b in by)
            out[key if len(by) != 1 else key[0]] = float(r["value"][1])
        return out
