"""The network-namespace harness (support.netns) and the recording relay
(support.relay) that the mesh's multi-host tests are built on."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
from pathlib import Path

import pytest

from support.netns import (
    NOBODY,
    Host,
    Network,
    leftover_namespaces,
    netns_required,  # noqa: F401 - a fixture
    python_cmd,
    unprivileged_python,
)
from support.relay import (
    APPLICATION_DATA,
    HANDSHAKE,
    NotTls,
    Recording,
    assert_only_tls,
    is_tls,
    relay_cmd,
    tls_records,
)

pytestmark = pytest.mark.mesh
needs_netns = pytest.mark.usefixtures("netns_required")
MARKER = b"plaintext-marker-7f3a"


def http_server(host: Host, directory: Path, port: int, bind: str) -> subprocess.Popen[bytes]:
    proc = host.popen(
        python_cmd("-m", "http.server", str(port), "--bind", bind, "--directory", str(directory)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host.wait_port(port, proc=proc)
    return proc


def curl(host: Host, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run(["curl", "-sS", "--noproxy", "*", "--max-time", "10", *args, url])


def site(tmp_path: Path, name: str, text: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "hello.txt").write_text(text)
    return directory


@needs_netns
def test_hosts_talk_over_the_bridge_and_nothing_else(tmp_path: Path) -> None:
    with Network(["a", "b", "gw"]) as net:
        a, b = net["a"], net["b"]
        assert [h.addr for h in net] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        assert all(ns.startswith(net.prefix + "-") for ns in net.namespaces)
        http_server(b, site(tmp_path, "b", "hello from b\n"), 8000, b.addr)

        got = curl(a, f"http://{b.addr}:8000/hello.txt")
        assert got.returncode == 0, got.stderr
        assert got.stdout == "hello from b\n"

        for host in net:
            assert host.run(["ip", "route", "show", "default"]).stdout == ""
            links = host.run(["ip", "-o", "link", "show"]).stdout
            assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == [
                "lo",
                "eth0",
            ]
        # Nothing in the root namespace: no bridge or veth of ours there.
        root = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "p-a" not in root and "br0" not in root
    assert leftover_namespaces(net.prefix) == []


@needs_netns
def test_iptables_redirect_applies_in_one_namespace_only(tmp_path: Path) -> None:
    with Network(["a", "b", "gw"]) as net:
        a, b, gw = net["a"], net["b"], net["gw"]
        http_server(b, site(tmp_path, "b", "from b\n"), 8000, b.addr)
        http_server(a, site(tmp_path, "a", "from a\n"), 8001, "0.0.0.0")
        url = f"http://{b.addr}:8000/hello.txt"
        assert curl(a, url).stdout == "from b\n"

        rule = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", b.addr, "--dport", "8000"]
        a.iptables(*rule, "-j", "REDIRECT", "--to-ports", "8001")
        assert curl(a, url).stdout == "from a\n"
        assert curl(gw, url).stdout == "from b\n"  # gw's own tables are untouched
        assert "REDIRECT" not in gw.run(["iptables", "-t", "nat", "-S"]).stdout

        root = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True)
        assert "--to-ports 8001" not in root.stdout
    assert leftover_namespaces(net.prefix) == []
    assert not any(Path("/run/netns", ns).exists() for ns in net.namespaces)


@needs_netns
def test_cleanup_runs_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Network(["a", "b"]) as net:
        sleeper = net["a"].popen(["sleep", "300"])
        # A grandchild in its own session, not tracked: the namespace sweep ends it.
        net["b"].popen("setsid sleep 301 & sleep 302")
        net["a"].iptables("-A", "OUTPUT", "-p", "tcp", "--dport", "1", "-j", "DROP")
        raise RuntimeError("the test failed")
    assert leftover_namespaces(net.prefix) == []
    assert sleeper.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper.pid, 0)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 301" not in ps and "sleep 302" not in ps


@needs_netns
def test_processes_run_as_another_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    import support.netns as netns

    with Network(["a"]) as net:
        a = net["a"]
        assert a.run(["id", "-u"], uid=NOBODY).stdout.strip() == str(NOBODY)
        assert a.run(["id", "-G"], uid=NOBODY).stdout.split() == [str(NOBODY)]
        proc = a.popen(["id", "-u"], uid=NOBODY, stdout=subprocess.PIPE, text=True)
        assert proc.communicate(timeout=10)[0].strip() == str(NOBODY)
        monkeypatch.setattr(netns, "SETPRIV", None)  # the fallback without setpriv
        assert a.run(["id", "-u"], uid=NOBODY).stdout.strip() == str(NOBODY)
        assert a.run(["id", "-u"]).stdout.strip() == "0"
        # The venv's interpreter may live under /root, out of nobody's reach.
        who = a.run([unprivileged_python(), "-c", "import os; print(os.getuid())"], uid=NOBODY)
        assert who.stdout.strip() == str(NOBODY), who.stderr


@needs_netns
def test_a_network_never_closed_is_cleaned_up_anyway(tmp_path: Path) -> None:
    net = Network(["a"]).start()
    sleeper = net["a"].popen(["sleep", "300"])
    prefix = net.prefix
    del net
    gc.collect()  # the finalizer
    assert leftover_namespaces(prefix) == []
    assert sleeper.returncode is not None
    # ... and at interpreter exit (atexit), in a process that just leaves.
    script = (
        "from support.netns import Network\n"
        "net = Network(['a']).start()\n"
        "pid = net['a'].popen(['sleep', '300']).pid\n"
        "print(net.prefix, pid, flush=True)\n"
    )
    proc = subprocess.run(
        python_cmd("-c", script),
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    prefix, pid = proc.stdout.split()
    assert leftover_namespaces(prefix) == []
    with contextlib.suppress(OSError):  # the sleeper was killed, not left to init
        assert b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()


@needs_netns
def test_wait_port_fails_fast_when_the_server_dies() -> None:
    with Network(["a"]) as net:
        proc = net["a"].popen(["sh", "-c", "exit 3"])
        with pytest.raises(AssertionError, match="exited with 3"):
            net["a"].wait_port(8000, proc=proc, timeout=5)
        with pytest.raises(AssertionError, match="nothing listens"):
            net["a"].wait_port(8000, timeout=0.3)


@needs_netns
def test_relay_records_plaintext(tmp_path: Path) -> None:
    record = tmp_path / "wire.bin"
    with Network(["a", "b", "gw"]) as net:
        a, b, gw = net["a"], net["b"], net["gw"]
        http_server(b, site(tmp_path, "b", "hello from b\n"), 8000, b.addr)
        relay = gw.popen(relay_cmd(f"{gw.addr}:9000", f"{b.addr}:8000", record))
        gw.wait_port(9000, proc=relay)
        got = curl(a, f"http://{gw.addr}:9000/hello.txt?{MARKER.decode()}")
        assert got.stdout == "hello from b\n"
        relay.terminate()
        assert relay.wait(10) == 0
    wire = Recording.load(record)
    assert wire.connections == [1]
    assert wire.to_server().startswith(b"GET /hello.txt?" + MARKER)
    assert b"hello from b\n" in wire.to_client()
    assert not is_tls(wire.to_server()) and not is_tls(wire.to_client())
    with pytest.raises(AssertionError, match="not TLS"):
        assert_only_tls(wire, [MARKER])


@needs_netns
def test_relay_sees_only_tls_for_a_tls_connection(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=b"],
        check=True, capture_output=True,
    )  # fmt: skip
    record = tmp_path / "wire.bin"
    with Network(["a", "b", "gw"]) as net:
        a, b, gw = net["a"], net["b"], net["gw"]
        server = b.popen(
            ["openssl", "s_server", "-quiet", "-accept", f"{b.addr}:8443", "-www",
             "-key", str(key), "-cert", str(cert)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        b.wait_port(8443, proc=server)
        relay = gw.popen(relay_cmd(f"{gw.addr}:9443", f"{b.addr}:8443", record))
        gw.wait_port(9443, proc=relay)
        got = curl(a, f"https://{gw.addr}:9443/{MARKER.decode()}", "-k")
        assert got.returncode == 0, got.stderr
        assert "Ciphers" in got.stdout  # s_server's -www status page
        relay.terminate()
        relay.wait(10)
    wire = Recording.load(record)
    assert wire.to_server()[0] == 0x16
    assert_only_tls(wire, [MARKER, b"GET /", b"Ciphers"])
    records = tls_records(wire.to_server())
    assert records[0].type == HANDSHAKE
    assert {r.type for r in records[1:]} & {APPLICATION_DATA}


def test_tls_record_detector() -> None:
    hello = bytes([22, 3, 1, 0, 4]) + b"\x01\x00\x00\x00"
    data = bytes([23, 3, 3, 0, 2]) + b"xy"
    assert [r.type for r in tls_records(hello + data)] == [22, 23]
    assert is_tls(hello + data)
    assert not is_tls(b"GET / HTTP/1.1\r\nhost: b\r\n\r\n")
    assert not is_tls(b"")
    assert not is_tls(hello + data[:-1])  # ends inside a record
    assert is_tls(hello + data[:-1], partial_tail=True)
    assert not is_tls(bytes([22, 3, 9, 0, 1, 0]))  # no such version
    assert not is_tls(bytes([23, 3, 3, 0xFF, 0xFF]) + b"x" * 0xFFFF)  # too long
    with pytest.raises(NotTls, match="content type 0x47"):
        tls_records(b"GET /")
