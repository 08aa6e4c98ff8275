"""Transparent capture: iptables REDIRECT in the service's network namespace.

`meshgate sidecar --capture` writes two chains of its own in the `nat`
table, and removes them on exit (and, first, any left by a sidecar of the
same service that was killed):

- outbound: every TCP connection the app opens to another host goes to the
  sidecar's outbound port, except the sidecar's own (its uid is exempt, as
  Istio's 1337 is) and loopback. The sidecar finds where the app wanted to
  go with `SO_ORIGINAL_DST`, and routes to the mesh service whose instance
  that address is;
- inbound: connections from other hosts to the app's port go to the
  sidecar's inbound port, so the app cannot be reached around its policy.

The sidecar must run under a uid of its own, not the app's: connections of
that uid are never captured.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import socket
import struct
import subprocess
from collections.abc import Mapping
from typing import Any

__all__ = ["Capture", "original_destination"]

log = logging.getLogger("meshgate.sidecar")

SO_ORIGINAL_DST = 80


def original_destination(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """Where a redirected connection was going (IPv4), or None."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), int(port)


def destinations(sections: Mapping[str, Any]) -> dict[tuple[str, int], bytes]:
    """(address, port) of every instance in the snapshot -> its service: both
    its sidecar's port and its app's port (`app_port`), as apps address
    each other by the app's."""
    out: dict[tuple[str, int], bytes] = {}
    for key, section in sections.items():
        if not key.startswith("service/") or not isinstance(section, dict):
            continue
        name = key[len("service/") :].encode()
        for ep in section.get("endpoints") or ():
            address = str(ep.get("address"))
            out[(address, int(ep["port"]))] = name
            app_port = (ep.get("metadata") or {}).get("app_port")
            if app_port and str(app_port).isdigit():
                out[(address, int(app_port))] = name
    return out


class Capture:
    """The iptables rules of one sidecar, written and removed as a whole."""

    def __init__(
        self,
        service: str,
        *,
        outbound_port: int,
        inbound_port: int | None,
        app_port: int | None,
        uid: int,
        exclude_ports: tuple[int, ...] = (),
    ) -> None:
        tag = hashlib.sha256(service.encode()).hexdigest()[:8]
        self.out_chain = f"MESHGATE-OUT-{tag}"
        self.in_chain = f"MESHGATE-IN-{tag}"
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self.app_port = app_port
        self.uid = uid
        self.exclude_ports = exclude_ports
        self.installed = False

    @staticmethod
    def _iptables(*args: str, check: bool = True) -> bool:
        exe = shutil.which("iptables")
        if exe is None:
            raise RuntimeError("--capture needs iptables")
        proc = subprocess.run(
            [exe, "-w", "-t", "nat", *args], capture_output=True, text=True, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
        return proc.returncode == 0

    def install(self) -> None:
        self.remove()  # what a killed sidecar of this service left
        ipt = self._iptables
        ipt("-N", self.out_chain)
        ipt("-A", self.out_chain, "-m", "owner", "--uid-owner", str(self.uid), "-j", "RETURN")
        ipt("-A", self.out_chain, "-d", "127.0.0.0/8", "-j", "RETURN")
        for port in self.exclude_ports:
            ipt("-A", self.out_chain, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        ipt(
            "-A",
            self.out_chain,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            str(self.outbound_port),
        )
        ipt("-A", "OUTPUT", "-p", "tcp", "-j", self.out_chain)
        if self.inbound_port is not None and self.app_port is not None:
            ipt("-N", self.in_chain)
            ipt(
                "-A",
                self.in_chain,
                "-p",
                "tcp",
                "--dport",
                str(self.app_port),
                "-j",
                "REDIRECT",
                "--to-ports",
                str(self.inbound_port),
            )
            ipt("-A", "PREROUTING", "-p", "tcp", "-j", self.in_chain)
        self.installed = True
        log.info(
            "capture on: outbound TCP to port %d (uid %d exempt)%s",
            self.outbound_port,
            self.uid,
            f", inbound port {self.app_port} to {self.inbound_port}"
            if self.inbound_port is not None and self.app_port is not None
            else "",
        )

    def remove(self) -> None:
        ipt = self._iptables
        for parent, chain in (("OUTPUT", self.out_chain), ("PREROUTING", self.in_chain)):
            while ipt("-D", parent, "-p", "tcp", "-j", chain, check=False):
                pass
            if ipt("-F", chain, check=False):
                ipt("-X", chain, check=False)
        if self.installed:
            log.info("capture rules removed")
        self.installed = False
