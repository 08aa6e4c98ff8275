"""Shared plumbing for the benchmark scripts: child processes, ports, configs.

Stdlib only. Every server is a child process started in its own session
(process group), so one `killpg` ends it together with anything it forked
(nginx workers, meshgate workers), and nothing else. `Children` kills them
all on exit, on an exception and on Ctrl-C; on Linux each child also gets
`PR_SET_PDEATHSIG` so it is told to stop even if this script is killed -9.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# apt package that provides each tool (Debian/Ubuntu).
TOOL_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "hey": "hey", "curl": "curl"}


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def find_tool(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin dirs a non-root PATH lacks."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def ensure_tools(names: Sequence[str]) -> dict[str, str]:
    """Return {tool: path}. Install missing ones via apt when root, else exit 2."""
    missing = [n for n in names if find_tool(n) is None]
    if missing:
        pkgs = [TOOL_PACKAGES.get(n, n) for n in missing]
        install = ["apt-get", "install", "-y", *pkgs]
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log(f"missing {', '.join(missing)}; installing: {shlex.join(install)}")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update"], check=True, env=env)
            subprocess.run(install, check=True, env=env)
        else:
            print(
                f"error: missing required tool(s): {', '.join(missing)}\n"
                "install them with (Debian/Ubuntu):\n"
                f"    sudo apt-get update && sudo {shlex.join(install)}\n"
                "or run this script as root and it will install them itself.",
                file=sys.stderr,
            )
            sys.exit(2)
    paths: dict[str, str] = {}
    for n in names:
        p = find_tool(n)
        if p is None:
            print(f"error: {n} still not found after installing it", file=sys.stderr)
            sys.exit(2)
        paths[n] = p
    return paths


def find_meshgate(override: str | None) -> list[str]:
    """The command that runs meshgate: --meshgate, the venv's script, or PATH."""
    if override:
        return shlex.split(override)
    for cand in (Path(sys.executable).parent / "meshgate", REPO_DIR / ".venv" / "bin" / "meshgate"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return [str(cand)]
    found = shutil.which("meshgate")
    if found:
        return [found]
    print(
        "error: meshgate is not installed; run `make bench` (it installs the venv) "
        "or pass --meshgate 'CMD'",
        file=sys.stderr,
    )
    sys.exit(2)


def free_port() -> int:
    """An unused loopback TCP port (the kernel picks it; small race, fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


class Child:
    """A started server: its Popen, name and log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """Context manager that owns every server process and kills them at exit."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._old_handlers: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def __enter__(self) -> Children:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    @staticmethod
    def _on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def start(
        self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None
    ) -> Child:
        log(f"start {name}: {shlex.join(argv)}")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL it if it lingers."""
        if child not in self.children:
            return
        self.children.remove(child)
        pgid = child.proc.pid  # start_new_session: the group id is the child's pid
        if child.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{child.name} ignored SIGTERM for {timeout:.0f}s; SIGKILL")
        # The leader may be gone while forked workers of its group linger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5.0)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            try:
                self.stop(child)
            except KeyboardInterrupt:  # a second Ctrl-C: still kill the rest
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench.local"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(
    child: Child, port: int, path: str, timeout: float = 30.0, want_status: int = 200
) -> None:
    """Poll GET path until it answers want_status; fail early if the child died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(
                f"{child.name} exited with code {child.proc.returncode} before it was ready; "
                f"its log ({child.log_path}):\n{child.log_tail()}"
            )
        try:
            status, _ = http_get(port, path, timeout=1.0)
            if status == want_status:
                return
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    raise RuntimeError(
        f"{child.name} not ready on 127.0.0.1:{port}{path} after {timeout:.0f}s ({last}); "
        f"its log ({child.log_path}):\n{child.log_tail()}"
    )


def meshgate_config(
    listen_port: int,
    admin_port: int,
    upstream_port: int,
    workers: int,
    extra_upstream: str = "",
) -> str:
    """The seed's shape (examples/seed.yaml) on loopback ports.

    `auth:` and `rate_limit:` of the seed's orders route are left out: the
    benchmark measures the proxy path of /api/customers/**, and the orders
    route is kept so that routing has more than one entry to match against.
    """
    ups = f"""\
    endpoints: [127.0.0.1:{upstream_port}]
{extra_upstream}"""
    return f"""\
# Written by bench/ for one benchmark run.
listen: 127.0.0.1:{listen_port}
admin: 127.0.0.1:{admin_port}
workers: {workers}
access_log: false
limits:
  drain_timeout: 1s
upstreams:
  order-service:
{ups}
  customer-service:
{ups}
routes:
- path: /api/orders/**
  upstream: order-service
- path: /api/customers/**
  upstream: customer-service
"""


def start_meshgate(
    children: Children,
    meshgate_cmd: Sequence[str],
    workdir: Path,
    name: str,
    upstream_port: int,
    workers: int,
    extra_upstream: str = "",
    ready_timeout: float = 30.0,
) -> tuple[Child, int, list[str]]:
    """Write the config, start `meshgate run`, wait for /readyz. -> (child, port, argv)."""
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), free_port()
    while admin == port:
        admin = free_port()
    cfg = d / "meshgate.yaml"
    cfg.write_text(meshgate_config(port, admin, upstream_port, workers, extra_upstream))
    argv = [*meshgate_cmd, "run", "-c", str(cfg)]
    if workers != 1:
        argv += ["--workers", str(workers)]
    child = children.start(name, argv, d / "meshgate.log", cwd=d)
    wait_http(child, admin, "/readyz", timeout=ready_timeout)
    return child, port, argv


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat ppid fields)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces/parens, split after the last ')'
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def start_redis(children: Children, redis_server: str, workdir: Path) -> tuple[Child, int]:
    """A redis-server on a free loopback port, no persistence, in
    workdir/redis; returned once it answers PING."""
    port = free_port()
    d = workdir / "redis"
    d.mkdir()
    argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(d)]  # fmt: skip
    child = children.start("redis", argv, d / "redis.log", cwd=d)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return child, port
        time.sleep(0.1)
    raise RuntimeError(f"redis-server did not answer:\n{child.log_tail()}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of pid and its descendants, all their
    threads (from /proc/<pid>/stat; a process gone counts 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / ticks


def proc_status_kib(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def git_describe() -> dict[str, str | bool]:
    def git(*args: str) -> str:
        r = subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=False
        )
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def command_line() -> str:
    """The exact command that ran this script."""
    return shlex.join([sys.executable, *sys.argv])


def run_script(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status; Ctrl-C and setup errors end cleanly
    (the servers are stopped by `Children` on its way out)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
