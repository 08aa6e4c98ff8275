"""A multi-host network made of Linux network namespaces, for mesh tests.

`Network(["cp", "a", "b"])` is a context manager that creates, per host, a
namespace `mg-<6 hex>-<host>` with `lo` up and one interface, `eth0`, holding
198.18.<subnet>.<n>/24 (hosts numbered 1, 2, ... in the order given). Every
`eth0` is one end of a veth pair whose other end is a port of the bridge
`br0`, which lives in a namespace of its own, `mg-<6 hex>-sw`: the root
namespace is never touched, and no namespace has a default route, so
nothing in a test can reach the outside world or the machine's own services.

    with Network(["a", "b"]) as net:
        a, b = net["a"], net["b"]
        server = b.popen(python_cmd("-m", "http.server", "8000", "--bind", b.addr))
        b.wait_port(8000, proc=server)
        assert a.run(["curl", "-sS", f"http://{b.addr}:8000/"]).returncode == 0

On exit, whatever happened in the body: every process started with
`Host.popen` is killed by its pid (SIGTERM, then SIGKILL), as is anything
else still inside the namespaces; the iptables rules added with
`Host.iptables` are deleted; every namespace is deleted (which takes the
veths and the bridge with it); then `ip netns list` must no longer show the
prefix, or exiting raises. A `weakref.finalize` (run at interpreter exit
too) does the same for a network that was never closed.

`skip_unless_netns()`, or the `netns_required` fixture, skips a test with
the reason when this machine cannot do all that (not root, no `ip` or
`iptables`, no CAP_NET_ADMIN, no veth/bridge support).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SETPRIV = shutil.which("setpriv")
NOBODY = 65534
_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
_SWITCH = "sw"

Cmd = Sequence[str] | str


def python_cmd(*args: str) -> list[str]:
    """This interpreter (the venv's) with `args`: `python_cmd("-m", "http.server")`.
    Run it with the default cwd (the repo), `-m tests.support.relay` works too."""
    return [sys.executable, *args]


def as_uid(cmd: Sequence[str], uid: int = NOBODY, gid: int | None = None) -> list[str]:
    """`cmd` wrapped to run as `uid`/`gid` (gid defaults to uid) with no
    supplementary groups: `setpriv` when it exists, else a tiny Python
    trampoline that drops them and execs `cmd`. It comes after `ip netns
    exec` (which needs root), so a `preexec_fn` could not do it."""
    gid = uid if gid is None else gid
    if SETPRIV is not None:
        return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *cmd]
    # The program is looked up while still root: after the drop, this
    # interpreter may not be able to import anything more (a stdlib under /root).
    drop = (
        "import os, shutil, sys; exe = shutil.which(sys.argv[3]) or sys.argv[3]; "
        "os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1])); "
        "os.execv(exe, sys.argv[3:])"
    )
    return [sys.executable, "-c", drop, str(uid), str(gid), *cmd]


def unprivileged_python() -> str:
    """A Python interpreter that another uid may execute. The venv's often
    resolves under /root (mode 0700); then fall back on the system's python3
    (stdlib only: the venv's packages are not on its path)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if _world_executable(Path(candidate)):
            return candidate
    raise AssertionError("no python that uid 65534 can execute (the venv's is under /root)")


def _world_executable(path: Path) -> bool:
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    dirs_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    return dirs_ok and bool(real.stat().st_mode & stat.S_IXOTH)


def _argv(cmd: Cmd) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# skipping


@functools.cache
def netns_problem() -> str | None:
    """Why this machine cannot run `Network`, or None when it can. Probed
    once: a scratch namespace with a veth pair, a bridge and iptables in it."""
    if os.geteuid() != 0:
        return "network namespace tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "iptables", "ss"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` (install iproute2 / iptables)"
    probe = f"mg-probe-{secrets.token_hex(3)}"
    add = _ip("netns", "add", probe, check=False)
    if add.returncode != 0:
        return f"cannot create a network namespace (`ip netns add`): {add.stderr.strip()}"
    try:
        steps = [
            ["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
            ["ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-S", "OUTPUT"],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=30, check=False)
            if proc.returncode != 0:
                return f"`{' '.join(step)}` fails in a namespace: {proc.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def skip_unless_netns() -> None:
    """Skip the calling test, with the reason, when namespaces can't be used."""
    problem = netns_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture
def netns_required() -> None:
    skip_unless_netns()


# ---------------------------------------------------------------------------
# cleanup state (kept apart from Network so the finalizer holds no reference to it)


@dataclass
class _Resources:
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    rules: list[tuple[str, list[str]]] = field(default_factory=list)  # (netns, iptables -D args)

    def cleanup(self, grace: float = 3.0) -> list[str]:
        """Undo everything; return what could not be undone."""
        problems: list[str] = []
        self._kill(grace)
        for ns, rule in reversed(self.rules):
            with contextlib.suppress(Exception):  # the namespace's deletion drops it anyway
                subprocess.run(
                    ["ip", "netns", "exec", ns, "iptables", "-w", *rule],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
        self.rules.clear()
        # Processes that were not ours to track (a daemonized grandchild) but
        # live in our namespaces would keep them alive: end those too.
        for ns in self.namespaces:
            self._kill_pids(self._netns_pids(ns), grace)
        for ns in reversed(self.namespaces):  # the host ends first, then the switch
            proc = _ip("netns", "del", ns, check=False)
            if proc.returncode != 0 and "No such file" not in proc.stderr:
                problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
        self.namespaces.clear()
        left = leftover_namespaces(self.prefix)
        if left:
            problems.append(f"namespaces left behind: {left}")
        return problems

    def _kill(self, grace: float) -> None:
        live = [p for p in self.processes if p.poll() is None]
        for p in live:
            self._signal(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.poll() is None:
                self._signal(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self.processes.clear()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        """Signal an unreaped child (so its pid can't have been reused) and its
        process group (it leads a session of its own): a shell's children too."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    @staticmethod
    def _netns_pids(ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(pid) for pid in out.split() if pid.isdigit() and int(pid) != os.getpid()]

    @staticmethod
    def _kill_pids(pids: list[int], grace: float) -> None:
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------------------
# hosts and the network


class Host:
    """One host: namespace `netns`, address `addr` on its `eth0`."""

    def __init__(self, name: str, netns: str, addr: str, resources: _Resources) -> None:
        self.name = name  # "a"
        self.netns = netns  # "mg-1a2b3c-a"
        self.addr = addr  # "198.18.0.1"
        self._resources = resources

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, addr={self.addr!r})"

    def command(self, cmd: Cmd, *, uid: int | None = None, gid: int | None = None) -> list[str]:
        """`cmd` (a list, or a string for `sh -c`) as run inside this namespace."""
        argv = _argv(cmd)
        if uid is not None:
            argv = as_uid(argv, uid, gid)
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, cmd: Cmd, *, uid: int | None = None, gid: int | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` inside the namespace. Defaults: text output captured,
        cwd the repo, a 30 s timeout, no check."""
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        kw.setdefault("cwd", REPO)
        kw.setdefault("check", False)
        return subprocess.run(self.command(cmd, uid=uid, gid=gid), **kw)

    def popen(
        self, cmd: Cmd, *, uid: int | None = None, gid: int | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """`subprocess.Popen` inside the namespace, in a session of its own,
        stdin from /dev/null, cwd the repo. The network kills it on exit;
        stdout/stderr are inherited (pytest shows them for a failed test)
        unless given."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("cwd", REPO)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(cmd, uid=uid, gid=gid), **kw)
        self._resources.processes.append(proc)
        return proc

    def iptables(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`iptables -w ARGS` in this namespace only; raises if it fails. An
        added rule (-A / -I) is recorded and deleted (-D) on exit."""
        proc = self.run(["iptables", "-w", *args])
        if proc.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)} in {self.name}: {proc.stderr.strip()}")
        undo = _undo_rule(list(args))
        if undo is not None:
            self._resources.rules.append((self.netns, undo))
        return proc

    def listening(self, port: int) -> bool:
        """Some socket in this namespace listens on TCP `port`."""
        out = self.run(["ss", "-Hltn"]).stdout
        return any(
            len(f := line.split()) >= 4 and f[3].rpartition(":")[2] == str(port)
            for line in out.splitlines()
        )

    def wait_port(
        self, port: int, *, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None
    ) -> None:
        """Wait until TCP `port` listens in this namespace; fail sooner if
        `proc` (the server expected to open it) exits."""
        deadline = time.monotonic() + timeout
        while not self.listening(port):
            if proc is not None and proc.poll() is not None:
                raise AssertionError(
                    f"{proc.args!r} exited with {proc.returncode} before listening on "
                    f"{self.name}:{port}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"nothing listens on {self.name}:{port} after {timeout}s")
            time.sleep(0.05)


def _undo_rule(args: list[str]) -> list[str] | None:
    """The `iptables -D` arguments that delete the rule `args` adds, or None."""
    for i, arg in enumerate(args):
        if arg in ("-A", "--append"):
            return [*args[:i], "-D", *args[i + 1 :]]
        if arg in ("-I", "--insert"):
            rest = args[i + 2 :]
            if rest and rest[0].isdigit():  # -I CHAIN NUM rule...
                rest = rest[1:]
            return [*args[:i], "-D", args[i + 1], *rest]
    return None


class Network:
    """Hosts on one bridge; see the module's docstring."""

    def __init__(self, hosts: Sequence[str], *, subnet: int = 0, prefix: str | None = None) -> None:
        """`subnet`: the third octet, 198.18.<subnet>.0/24. `prefix`: the
        namespaces' prefix (default `mg-<6 random hex>`)."""
        if not hosts or len(set(hosts)) != len(hosts) or len(hosts) > 250:
            raise ValueError(f"hosts must be 1 to 250 distinct names: {hosts!r}")
        for name in hosts:
            if not _HOST_NAME.fullmatch(name) or name == _SWITCH:
                raise ValueError(f"host name {name!r}: [a-z][a-z0-9]{{0,11}}, not {_SWITCH!r}")
        if not 0 <= subnet <= 255:
            raise ValueError(f"subnet {subnet} is not 0-255")
        self.prefix = prefix or f"mg-{secrets.token_hex(3)}"
        self.network = f"198.18.{subnet}.0/24"
        self._resources = _Resources(self.prefix)
        self._finalizer = weakref.finalize(self, self._resources.cleanup)
        self.switch = f"{self.prefix}-{_SWITCH}"
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{self.prefix}-{name}", f"198.18.{subnet}.{i}", self._resources)
            for i, name in enumerate(hosts, start=1)
        }
        self._started = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network made (hosts and the switch)."""
        return [self.switch, *(h.netns for h in self)]

    def start(self) -> Network:
        if self._started:
            raise RuntimeError("a Network starts once")
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch
        self._add_netns(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for host in self:
            self._add_netns(host.netns)
            port = f"p-{host.name}"
            # Created from inside the switch namespace with the peer placed
            # straight into the host's: neither end ever exists in the root one.
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)  # fmt: skip
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def _add_netns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._resources.namespaces.append(ns)

    def close(self) -> list[str]:
        """Kill, delete, verify; idempotent. Returns the problems (also raised
        by `__exit__`)."""
        problems: list[str] = self._finalizer() or []
        return problems

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.close()
        if not problems:
            return
        message = f"network {self.prefix} cleanup: " + "; ".join(problems)
        if exc is not None:
            exc.add_note(message)  # don't hide the test's own failure
            return
        raise RuntimeError(message)


def leftover_namespaces(prefix: str) -> list[str]:
    """The namespaces named `<prefix>-...` that still exist."""
    return [ns for ns in _list_netns() if ns.startswith(prefix + "-")]
