"""The mesh across hosts (network namespaces) and at ten services (loopback).

Multi-host: namespaces `cp` (the control plane), `gw` (a gateway that joins
the mesh), `a` (`orders`) and `b` (`customers`) on one bridge. The apps are
`mesh_app.py`, plain stdlib HTTP servers run as uid 65534 that know nothing
of the mesh; each has a sidecar (root) with `--capture`, so `orders` calls
`http://<b>:<customers' port>/` as if there were no mesh, and nothing but
the sidecars' mTLS may reach an app from another host. tcpdump on a's and
b's eth0 shows what crossed the wire.

Ten services: ten sidecars on loopback in a chain (s0 -> s1 -> ... -> s9)
and a fan-out (s0 -> s1..s9), each app calling its sidecar's port for the
next service; the sidecars' RSS and CPU time are measured and printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.client import free_port, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess, mesh_yaml
from support.netns import (
    NOBODY,
    Host,
    Network,
    leftover_namespaces,
    skip_unless_netns,
    unprivileged_python,
)
from support.proxy import meshgate_cmd, run_meshgate
from support.relay import APPLICATION_DATA, HANDSHAKE, NotTls, tls_records
from support.sidecar import SidecarProcess, cpu_seconds, rss_kib

pytestmark = [pytest.mark.mesh, pytest.mark.slow]

APP = Path(__file__).with_name("mesh_app.py")
MARKER = "cleartext-marker-5b1e9c"

ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/orders"
CUSTOMERS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/customers"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"

CONTROL_PORT = 15012
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
GATEWAY_PORT = 8080
GATEWAY_ADMIN = 9901
ORDERS_PORT = 9001
CUSTOMERS_PORT = 9002

SERVICES: dict[str, Any] = {
    "orders": {"calls": ["customers"]},
    "customers": {
        "authz": {
            "default": "deny",
            "rules": [{"name": "orders-only", "action": "allow", "from": [ORDERS]}],
        }
    },
    "gateway": {"namespace": "edge"},
}


# ---------------------------------------------------------------------------
# a pcap reader (pure Python): TCP payloads of an Ethernet capture, per connection


@dataclass
class TcpConn:
    client: tuple[str, int]
    server: tuple[str, int]
    syn_seen: bool = False
    isn: dict[tuple[str, int], int] = field(default_factory=dict)
    segments: dict[tuple[str, int], dict[int, bytes]] = field(default_factory=dict)

    def stream(self, sender: tuple[str, int]) -> tuple[bytes, bool]:
        """The bytes `sender` sent in order, and whether any are missing."""
        segs = self.segments.get(sender, {})
        if not segs:
            return b"", False
        base = self.isn[sender] + 1 if sender in self.isn else min(segs)
        out, nxt, gap = bytearray(), 0, False
        for off, data in sorted(((seq - base) % 2**32, d) for seq, d in segs.items()):
            if off + len(data) <= nxt:
                continue  # a retransmission
            if off < nxt:
                data, off = data[nxt - off :], nxt
            gap |= off > nxt
            out += data
            nxt = off + len(data)
        return bytes(out), gap

    def describe(self) -> str:
        return f"{self.client[0]}:{self.client[1]} -> {self.server[0]}:{self.server[1]}"


def read_pcap(path: Path) -> list[TcpConn]:
    raw = path.read_bytes()
    if raw[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif raw[:4] in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise AssertionError(f"{path} is not a pcap file: {raw[:4]!r}")
    (linktype,) = struct.unpack_from(endian + "I", raw, 20)
    assert linktype == 1, f"link type {linktype}, expected Ethernet"
    conns: dict[frozenset[tuple[str, int]], TcpConn] = {}
    at = 24
    while at + 16 <= len(raw):
        incl = struct.unpack_from(endian + "IIII", raw, at)[2]
        frame = raw[at + 16 : at + 16 + incl]
        at += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue  # not IPv4 (ARP, IPv6)
        ip = frame[14:]
        ihl, total, proto = (ip[0] & 0x0F) * 4, int.from_bytes(ip[2:4]), ip[9]
        if proto != 6:
            continue
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from("!HHI", tcp)
        doff, flags = (tcp[12] >> 4) * 4, tcp[13]
        me, peer = (src, sport), (dst, dport)
        key = frozenset((me, peer))
        conn = conns.get(key)
        syn, ack = flags & 0x02, flags & 0x10
        if conn is None:
            # Without its SYN, the side with the lower port is the likelier server.
            client, server = (me, peer) if (syn and not ack) or sport > dport else (peer, me)
            conn = conns[key] = TcpConn(client, server)
        if syn:
            conn.isn[me] = seq
            if not ack:
                conn.client, conn.server, conn.syn_seen = me, peer, True
        payload = tcp[doff:]
        if payload:
            segs = conn.segments.setdefault(me, {})
            if len(payload) > len(segs.get(seq, b"")):
                segs[seq] = payload
    return list(conns.values())


@dataclass(frozen=True)
class TlsConn:
    client: tuple[str, int]
    server: tuple[str, int]
    out: int  # application data records client -> server
    back: int

    def __str__(self) -> str:
        return (
            f"{self.client[0]}:{self.client[1]} -> {self.server[0]}:{self.server[1]}: TLS, "
            f"application data records {self.out} out / {self.back} back"
        )


def check_only_tls(pcap: Path, marker: bytes, port: int | None = None) -> list[TlsConn]:
    """Every TCP connection in `pcap` that carried data (to server `port`
    only, if given) is TLS both ways from its first byte (the client's a
    ClientHello), and `marker` is nowhere in the file. Returns the
    connections."""
    raw = pcap.read_bytes()
    assert marker not in raw, f"{marker!r} crossed the wire in clear ({pcap.name})"
    lines = []
    for conn in read_pcap(pcap):
        if not conn.segments or (port is not None and conn.server[1] != port):
            continue
        assert conn.syn_seen, f"{conn.describe()} began before the capture ({pcap.name})"
        kinds = []
        for sender in (conn.client, conn.server):
            data, gap = conn.stream(sender)
            assert not gap, f"{conn.describe()}: the capture lost bytes ({pcap.name})"
            if not data and sender == conn.server:
                kinds.append(0)  # the server never answered: nothing in clear either
                continue
            try:
                records = tls_records(data, partial_tail=True)
            except NotTls as e:
                raise AssertionError(
                    f"{conn.describe()} from {sender}: not TLS ({pcap.name}): {e}; "
                    f"starts {data[:80]!r}"
                ) from None
            if sender == conn.client:
                assert records[0].type == HANDSHAKE and records[0].body[:1] == b"\x01", (
                    f"{conn.describe()} does not open with a ClientHello"
                )
            kinds.append(sum(r.type == APPLICATION_DATA for r in records))
        lines.append(TlsConn(conn.client, conn.server, kinds[0], kinds[1]))
    return lines


# ---------------------------------------------------------------------------
# the multi-host mesh


def curl(host: Host, url: str, *args: str, uid: int | None = None) -> tuple[int, str, str]:
    """(curl's exit code, HTTP status or '000', body) for a GET from `host`."""
    out = host.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "10", "-w", "\n%{http_code}", *args, url],
        uid=uid,
    )
    body, _, status = out.stdout.rpartition("\n")
    return out.returncode, status or "000", body + out.stderr


def app_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


class MultiHost:
    def __init__(self, net: Network, tmp: Path) -> None:
        self.net, self.tmp = net, tmp
        self.cp, self.gw, self.a, self.b = net["cp"], net["gw"], net["a"], net["b"]
        self.control = f"{self.cp.addr}:{CONTROL_PORT}"
        self.mesh_path = tmp / "cp" / "mesh.yaml"
        self.bundle = tmp / "cp" / "state" / "ca" / "bundle.pem"
        self.logs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        path = self.logs[name] = self.tmp / f"{name}.log"
        return path

    def dump_logs(self) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ---\n{text[-3000:]}")
        return "\n".join(parts)

    def spawn(self, name: str, host: Host, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        with open(self.log(name), "wb") as out:
            proc = host.popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs[name] = proc
        return proc

    def wait_log(self, name: str, text: str, timeout: float = 30.0) -> None:
        proc = self.procs[name]

        def seen() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}")
            return text in self.logs[name].read_text(errors="replace")

        wait_until(seen, timeout=timeout, interval=0.1, what=f"{text!r} in {name}'s log")

    def start_control(self) -> None:
        self.mesh_path.parent.mkdir()
        self.mesh_path.write_text(
            mesh_yaml(CONTROL_PORT, services=SERVICES, listen=self.control, lease="5s")
        )
        self.spawn(
            "control",
            self.cp,
            meshgate_cmd("control", "-c", str(self.mesh_path)),
            cwd=self.mesh_path.parent,
        )
        self.wait_log("control", "meshgate control listening on")

    def token(self, service: str) -> str:
        proc = run_meshgate("token", "create", "-c", str(self.mesh_path), "--service", service)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def start_app(self, name: str, host: Host, port: int, *calls: str) -> None:
        cmd = [unprivileged_python(), str(APP), name, str(port), "--bind", "0.0.0.0"]
        for call in calls:
            cmd += ["--call", call]
        with open(self.tmp / f"app-{name}.jsonl", "wb") as out:
            proc = host.popen(cmd, uid=NOBODY, stdout=out, stderr=subprocess.DEVNULL)
        self.procs[f"app-{name}"] = proc
        host.wait_port(port, proc=proc)

    def requests(self, name: str) -> list[dict[str, Any]]:
        return app_log(self.tmp / f"app-{name}.jsonl")

    def start_sidecar(self, service: str, host: Host, app_port: int) -> None:
        cmd = meshgate_cmd(
            "sidecar",
            "--service", service,
            "--app", f"127.0.0.1:{app_port}",
            "--control", self.control,
            "--trust-domain", TRUST_DOMAIN,
            "--trust-bundle", str(self.bundle),
            "--state-dir", str(self.tmp / f"state-{service}"),
            "--inbound", f"0.0.0.0:{INBOUND_PORT}",
            "--advertise", host.addr,
            "--outbound", f"127.0.0.1:{OUTBOUND_PORT}",
            "--capture",
        )  # fmt: skip
        self.spawn(
            f"sidecar-{service}",
            host,
            cmd,
            env={**os.environ, "MESHGATE_TOKEN": self.token(service)},
        )

    def start_gateway(self) -> None:
        token = self.tmp / "gateway.token"
        token.write_text(self.token("gateway"))
        config = {
            "listen": f"0.0.0.0:{GATEWAY_PORT}",
            "admin": f"127.0.0.1:{GATEWAY_ADMIN}",
            "mesh": {
                "control": self.control,
                "trust_domain": TRUST_DOMAIN,
                "token_file": str(token),
                "trust_bundle": str(self.bundle),
                "state_dir": str(self.tmp / "gateway-state"),
            },
            "routes": [
                {"path": "/orders/**", "upstream": "orders", "strip_prefix": True},
                {"path": "/customers/**", "upstream": "customers", "strip_prefix": True},
            ],
            "upstreams": {"orders": {"service": "orders"}, "customers": {"service": "customers"}},
        }
        path = self.tmp / "gateway.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.spawn("gateway", self.gw, meshgate_cmd("run", "-c", str(path)))

        def ready() -> bool:
            if self.procs["gateway"].poll() is not None:
                raise AssertionError("the gateway exited")
            return curl(self.gw, f"http://127.0.0.1:{GATEWAY_ADMIN}/readyz")[1] == "200"

        wait_until(ready, timeout=30, interval=0.2, what="the gateway's /readyz")

    def start_tcpdump(self, host: Host, tag: str = "") -> subprocess.Popen[bytes]:
        name = f"{host.name}{tag}"
        pcap = self.tmp / f"wire-{name}.pcap"
        # --immediate-mode: each packet as it comes (a ring-buffer block not yet
        # handed over when SIGINT arrives would be lost); -U: flushed as written.
        cmd = ["tcpdump", "-i", "eth0", "-n", "--immediate-mode", "-U", "-s", "0", "-Z", "root",
               "-w", str(pcap), "tcp"]  # fmt: skip
        proc = self.spawn(f"tcpdump-{name}", host, cmd)
        self.wait_log(f"tcpdump-{name}", "listening on", timeout=15)
        return proc

    def stop_tcpdump(self, proc: subprocess.Popen[bytes]) -> None:
        time.sleep(0.5)  # the last packets (FINs, the last ACKs)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0

    def nat_rules(self, host: Host) -> str:
        out = host.run(["iptables", "-w", "-t", "nat", "-S"])
        assert out.returncode == 0, out.stderr
        return str(out.stdout)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs[name]
        proc.send_signal(sig)
        return proc.wait(20)


@pytest.fixture
def multihost(tmp_path: Path) -> Iterator[MultiHost]:
    skip_unless_netns()  # with the reason: not root, no iptables, no namespaces...
    with Network(["cp", "gw", "a", "b"]) as net:
        mh = MultiHost(net, tmp_path)
        try:
            yield mh
        except BaseException as e:
            e.add_note(mh.dump_logs())
            raise
    assert leftover_namespaces(net.prefix) == []


@pytest.mark.timeout(150)
def test_a_mesh_across_hosts_is_mtls_only_and_captured(multihost: MultiHost) -> None:
    mh = multihost
    a, b, gw = mh.a, mh.b, mh.gw
    mh.start_control()
    mh.start_app("customers", b, CUSTOMERS_PORT)
    mh.start_app("orders", a, ORDERS_PORT, f"/chain=http://{b.addr}:{CUSTOMERS_PORT}/from-orders")

    # Before the sidecars, b's app is open to anyone: what capture closes.
    rc, status, body = curl(gw, f"http://{b.addr}:{CUSTOMERS_PORT}/baseline")
    assert (rc, status) == (0, "200"), body
    assert json.loads(body)["xfcc"] is None

    dumps = {h.name: mh.start_tcpdump(h) for h in (a, b)}
    mh.start_sidecar("orders", a, ORDERS_PORT)
    mh.start_sidecar("customers", b, CUSTOMERS_PORT)
    for service in ("orders", "customers"):
        mh.wait_log(f"sidecar-{service}", "ready:")
        assert "capture on" in mh.logs[f"sidecar-{service}"].read_text()
    for host in (a, b):
        assert "MESHGATE-OUT-" in mh.nat_rules(host)
        assert "MESHGATE-IN-" in mh.nat_rules(host)
    mh.start_gateway()

    # North/south then east/west: gw -> gateway -> orders (a) -> customers (b).
    url = f"http://{gw.addr}:{GATEWAY_PORT}/orders/chain?m={MARKER}"

    def chain_ok() -> Any:
        _, status, body = curl(gw, url)
        return json.loads(body) if status == "200" else None

    doc = wait_until(chain_ok, timeout=30, interval=0.3, what="the chain through the mesh")
    assert doc["service"] == "orders"
    assert doc["path"] == f"/chain?m={MARKER}"
    assert doc["xfcc"] == f"By={ORDERS};URI={GATEWAY}"
    (downstream,) = doc["calls"]
    assert downstream["service"] == "customers"
    assert downstream["path"] == f"/from-orders?m={MARKER}"
    assert downstream["xfcc"] == f"By={CUSTOMERS};URI={ORDERS}"
    seen = [r for r in mh.requests("customers") if r["path"].startswith("/from-orders")]
    assert seen and all(r["xfcc"] == f"By={CUSTOMERS};URI={ORDERS}" for r in seen)

    # The app's own plain call, straight at b's app port: captured in a,
    # through both sidecars (customers sees orders' identity).
    rc, status, body = curl(a, f"http://{b.addr}:{CUSTOMERS_PORT}/direct?m={MARKER}", uid=NOBODY)
    assert (rc, status) == (0, "200"), body
    direct = json.loads(body)
    assert direct["path"] == f"/direct?m={MARKER}"
    assert direct["xfcc"] == f"By={CUSTOMERS};URI={ORDERS}"

    # customers allows orders only: the gateway's identity is refused.
    rc, status, body = curl(gw, f"http://{gw.addr}:{GATEWAY_PORT}/customers/list")
    assert status == "403", body
    assert json.loads(body)["source"] == GATEWAY

    # Only TLS crossed a's and b's wires, from the first join on.
    wire: dict[str, list[TlsConn]] = {}
    for name, proc in dumps.items():
        mh.stop_tcpdump(proc)
        wire[name] = check_only_tls(mh.tmp / f"wire-{name}.pcap", MARKER.encode())
        print(f"\nwire ({name}):", *wire[name], sep="\n  ")

    def meshed(conns: list[TlsConn], server: tuple[str, int]) -> bool:
        return any(c.server == server and c.out > 0 and c.back > 0 for c in conns)

    assert meshed(wire["a"], (a.addr, INBOUND_PORT)), wire["a"]  # gateway -> orders
    assert meshed(wire["a"], (b.addr, INBOUND_PORT)), wire["a"]  # orders -> customers
    assert meshed(wire["b"], (b.addr, INBOUND_PORT)), wire["b"]
    assert meshed(wire["b"], (mh.cp.addr, CONTROL_PORT)), wire["b"]  # the join, the snapshots

    # Plaintext straight at b's app port, from gw (not meshed) and from a's
    # sidecar uid (never captured): b's capture sends it to the strict mTLS
    # listener, which answers no HTTP, and the app sees nothing. A capture of
    # b's wire meanwhile holds that cleartext: the check above would catch it.
    before = len(mh.requests("customers"))
    sneak_dump = mh.start_tcpdump(b, "-sneak")
    for host in (gw, a):
        rc, status, body = curl(host, f"http://{b.addr}:{CUSTOMERS_PORT}/sneak?m={MARKER}")
        assert rc != 0 and status == "000", (host.name, rc, status, body)
    mh.stop_tcpdump(sneak_dump)
    assert len(mh.requests("customers")) == before
    assert not any(r["path"].startswith("/sneak") for r in mh.requests("customers"))
    with pytest.raises(AssertionError, match="crossed the wire in clear"):
        check_only_tls(mh.tmp / "wire-b-sneak.pcap", MARKER.encode())
    # (Only the sneaking connections: a report on b's push stream, open since
    # before this capture, may cross the wire meanwhile.)
    with pytest.raises(AssertionError, match="not TLS"):
        check_only_tls(mh.tmp / "wire-b-sneak.pcap", b"no such marker", port=CUSTOMERS_PORT)

    # SIGTERM: each sidecar takes its rules away, the namespaces still there.
    for service, host in (("orders", a), ("customers", b)):
        assert mh.stop(f"sidecar-{service}") == 0
        rules = mh.nat_rules(host)
        assert "MESHGATE" not in rules, rules
    # ... and b's app is reachable again as it was before the mesh.
    rc, status, body = curl(gw, f"http://{b.addr}:{CUSTOMERS_PORT}/after")
    assert (rc, status) == (0, "200"), body


# ---------------------------------------------------------------------------
# ten services on loopback

TEN = [f"s{i}" for i in range(10)]
CHAIN_REQUESTS = 200


def wait_tcp(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, timeout=timeout, what=f"127.0.0.1:{port}")


def get_json(url: str) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, repr(e)


def sidecar_figures(sidecars: list[SidecarProcess]) -> dict[str, Any]:
    rss = {sc.service: rss_kib(sc.pid) for sc in sidecars}
    cpu = {sc.service: round(cpu_seconds(sc.pid), 3) for sc in sidecars}
    return {
        "rss_kib": rss,
        "cpu_seconds": cpu,
        "total_rss_kib": sum(rss.values()),
        "total_cpu_seconds": round(sum(cpu.values()), 3),
    }


@pytest.mark.timeout(150)
def test_ten_services_chain_and_fan_out(tmp_path: Path) -> None:
    services: dict[str, Any] = {name: {} for name in TEN}
    services["s0"] = {"calls": TEN[1:]}
    for i in range(1, 9):
        services[TEN[i]] = {"calls": [TEN[i + 1]]}
    cp = ControlProcess(tmp_path / "cp", services=services)
    app_ports = {name: free_port() for name in TEN}
    sidecars = [
        SidecarProcess(
            cp,
            name,
            app_ports[name],
            tmp_path / name,
            upstreams=tuple(TEN[1:]) if i == 0 else tuple(TEN[i + 1 : i + 2]),
        )
        for i, name in enumerate(TEN)
    ]
    apps: list[subprocess.Popen[bytes]] = []
    try:
        cp.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda sc: sc.start(), sidecars))
        for i, (name, sc) in enumerate(zip(TEN, sidecars, strict=True)):
            calls = []
            if i < 9:
                calls.append(f"/chain={sc.url('/chain', TEN[i + 1])}")
            if i == 0:
                calls += [f"/fanout={sc.url('/leaf', other)}" for other in TEN[1:]]
            cmd = [sys.executable, str(APP), name, str(app_ports[name]), "--bind", "127.0.0.1"]
            for call in calls:
                cmd += ["--call", call]
            with open(tmp_path / f"app-{name}.jsonl", "wb") as out:
                apps.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL))
            wait_tcp(app_ports[name], apps[-1])
        s0 = f"http://127.0.0.1:{app_ports['s0']}"

        def chain_ok() -> Any:
            status, doc = get_json(f"{s0}/chain")
            return doc if status == 200 else None

        doc = wait_until(chain_ok, timeout=30, interval=0.3, what="the ten-service chain")
        hop, depth = doc, 0
        while hop["calls"]:
            (nxt,) = hop["calls"]
            depth += 1
            assert nxt["service"] == TEN[depth]
            assert nxt["xfcc"] == (
                f"By={sidecars[depth].identity};URI={sidecars[depth - 1].identity}"
            )
            hop = nxt
        assert depth == 9

        status, fan = get_json(f"{s0}/fanout")
        assert status == 200, fan
        assert [c["service"] for c in fan["calls"]] == TEN[1:]
        assert all(c["xfcc"] == f"By={sc.identity};URI={sidecars[0].identity}"
                   for c, sc in zip(fan["calls"], sidecars[1:], strict=True))  # fmt: skip

        time.sleep(1.0)
        idle = sidecar_figures(sidecars)
        started = time.monotonic()
        for _ in range(CHAIN_REQUESTS):
            status, doc = get_json(f"{s0}/chain")
            assert status == 200, doc
        elapsed = time.monotonic() - started
        loaded = sidecar_figures(sidecars)
        assert all(sc.alive for sc in sidecars)
        for figures in (idle, loaded):
            assert all(v > 0 for v in figures["rss_kib"].values()), figures
            assert len(figures["cpu_seconds"]) == 10
        report = {
            "sidecars": 10,
            "chain_requests": CHAIN_REQUESTS,
            "chain_hops": 9,
            "chain_seconds": round(elapsed, 2),
            "idle": idle,
            "after_chain": loaded,
            "cpu_seconds_for_the_chain": round(
                loaded["total_cpu_seconds"] - idle["total_cpu_seconds"], 3
            ),
        }
        report_path = tmp_path / "ten-sidecars.json"
        report_path.write_text(json.dumps(report, indent=2))
        print(
            f"\nten sidecars: idle RSS {idle['total_rss_kib'] / 1024:.1f} MiB "
            f"(CPU {idle['total_cpu_seconds']:.2f} s since start); after {CHAIN_REQUESTS} "
            f"chain requests in {elapsed:.1f} s: RSS {loaded['total_rss_kib'] / 1024:.1f} MiB, "
            f"CPU {loaded['total_cpu_seconds']:.2f} s "
            f"(+{report['cpu_seconds_for_the_chain']:.2f} s); written to {report_path}"
        )
        print(json.dumps(report, indent=2))
    finally:
        for app in apps:
            app.terminate()
        for app in apps:
            app.wait(10)
        for sc in sidecars:
            sc.stop()
        cp.stop()
