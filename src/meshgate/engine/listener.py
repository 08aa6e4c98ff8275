"""Listeners: a role, an address, a transport, and the state they serve.

One engine plays every role. A listener is what tells them apart:

- `gateway`: the edge, plain TCP (TLS termination arrives with issue 16);
- `sidecar-inbound`: TLS 1.3 with the proxy's mesh certificate; a client
  certificate is required (`mtls: strict`), or optional with plaintext
  accepted on the same port (`permissive`, for migration);
- `sidecar-outbound`: plain TCP on loopback, where the local app's calls
  arrive (a port per service, one port routed by Host, or connections
  captured by iptables);
- `admin`: the admin API.

Each listener has its own `ServerState`: its own runtime (routes, filters),
so no listener is ever found by its position in a list. The peer's identity
is read once per connection, from the transport (`ServerProtocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from meshgate.config.schema import Address
from meshgate.observability.hub import HUB, MetricsHub

__all__ = [
    "ROLES",
    "ListenerSpec",
    "Role",
    "Serving",
    "address_in_use",
    "bind_socket",
    "start_listener",
]

log = logging.getLogger("meshgate.server")

Role = Literal["gateway", "sidecar-inbound", "sidecar-outbound", "admin"]
ROLES: tuple[Role, ...] = ("gateway", "sidecar-inbound", "sidecar-outbound", "admin")

TLS_HANDSHAKE = 0x16
"""The first byte of a TLS record carrying a handshake (a ClientHello)."""
SNIFF_TIMEOUT = 5.0
SNIFF_PENDING = 1024
"""Connections accepted and not yet told apart, at most: past it, the
oldest waits no longer (a client that sends nothing holds no slot long)."""


def _tcp_socket(address: Address) -> tuple[socket.socket, Any]:
    """A TCP socket for `address`, with the options every listener's has
    (SO_REUSEADDR, dual-stack IPv6), and the address to bind it to."""
    infos = socket.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except BaseException:
        sock.close()
        raise
    return sock, sockaddr


def bind_socket(address: Address, *, reuse_port: bool = True) -> socket.socket:
    """A listening TCP socket for `address`, shared with SO_REUSEPORT."""
    sock, sockaddr = _tcp_socket(address)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def address_in_use(address: Address) -> bool:
    """Another socket already listens on `address` (never for port 0).

    A gateway's workers share their port with SO_REUSEPORT, which would
    let a second `meshgate run` on the same address join the first: the
    kernel would split the connections between two gateways, each with its
    own config. So, before anything binds, one socket without
    SO_REUSEPORT tries the address: only a free one (or one held by
    connections in TIME_WAIT) takes it. Other bind errors are not judged
    here: the listener's own bind reports them."""
    if not address.port:
        return False
    try:
        probe, sockaddr = _tcp_socket(address)
    except OSError:
        return False
    with probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class Serving(Protocol):
    """A listener being served: it stops accepting on `close()`."""

    def close(self) -> None: ...


@dataclass
class ListenerSpec:
    """What one listener is: its role, address, transport and protocol."""

    role: Role
    name: str
    """Unique within the process (`inbound`, `outbound`, `port:customers`)."""
    address: Address
    factory: Callable[[], asyncio.Protocol]
    tls: Callable[[], ssl.SSLContext] | None = None
    """The TLS context to serve with (None: plain TCP)."""
    plaintext_too: bool = False
    """With `tls`: accept plain connections on the same port too, told apart
    by their first byte (permissive mTLS)."""
    reuse_port: bool = True
    sock: socket.socket | None = field(default=None, repr=False)
    hub: MetricsHub = field(default=HUB, repr=False)
    """Where its TLS handshakes are counted: its proxy's metrics."""


async def start_listener(
    spec: ListenerSpec,
    loop: asyncio.AbstractEventLoop,
    *,
    plain_factory: Callable[[], asyncio.Protocol] | None = None,
) -> tuple[Serving, int]:
    """Bind and serve `spec`; the server and the port it got. With
    `plaintext_too`, plain connections are served by `plain_factory` (the
    same protocol on a listener state that says the scheme is http)."""
    sock = spec.sock or bind_socket(spec.address, reuse_port=spec.reuse_port)
    spec.sock = sock
    port = int(sock.getsockname()[1])
    if spec.tls is not None:
        # TLS listeners accept their connections themselves: each handshake's
        # outcome, and a failure's reason, is then known (/metrics), where
        # the event loop's own TLS server only logs it at debug level.
        plain = (plain_factory or spec.factory) if spec.plaintext_too else None
        sniffing = _SniffingServer(spec, sock, loop, plain)
        sniffing.start()
        log.info(
            "%s (%s) on %s:%d, TLS%s",
            spec.name,
            spec.role,
            spec.address.host,
            port,
            " and plaintext" if spec.plaintext_too else "",
        )
        return sniffing, port
    server = await loop.create_server(spec.factory, sock=sock)
    log.info("%s (%s) on %s:%d", spec.name, spec.role, spec.address.host, port)
    return server, port


def handshake_failure(exc: BaseException) -> str:
    """The reason label of a failed handshake: OpenSSL's reason (a fixed
    set of names, lowercased), `timeout`, or the error's class."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower()
    if isinstance(exc, ConnectionError):
        return "connection_reset"
    return type(exc).__name__.lower()


class _SniffingServer:
    """Accepts connections itself, peeks at the first byte without reading
    it, and hands each socket to the event loop with TLS (a handshake) or
    without (anything else: refused unless `plain_factory` serves it)."""

    def __init__(
        self,
        spec: ListenerSpec,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        plain_factory: Callable[[], asyncio.Protocol] | None,
    ) -> None:
        self.spec = spec
        self.hub = spec.hub
        self.sock = sock
        self.loop = loop
        self.plain_factory = plain_factory
        self.pending: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.spec.name, exc)
                return
            conn.setblocking(False)
            if len(self.pending) >= SNIFF_PENDING:
                self._expire(next(iter(self.pending)))
            fd = conn.fileno()
            timer = self.loop.call_later(SNIFF_TIMEOUT, self._expire, fd)
            self.pending[fd] = (conn, timer)
            self.loop.add_reader(fd, self._sniff, fd)

    def _expire(self, fd: int) -> None:
        entry = self.pending.pop(fd, None)
        if entry is not None:
            self.loop.remove_reader(fd)
            entry[0].close()

    def _sniff(self, fd: int) -> None:
        entry = self.pending.pop(fd, None)
        if entry is None:
            return
        conn, timer = entry
        timer.cancel()
        self.loop.remove_reader(fd)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self.pending[fd] = (conn, self.loop.call_later(SNIFF_TIMEOUT, self._expire, fd))
            self.loop.add_reader(fd, self._sniff, fd)
            return
        except OSError:
            conn.close()
            return
        if not first:
            conn.close()
            return
        tls = first[0] == TLS_HANDSHAKE
        if not tls and self.plain_factory is None:
            self.hub.handshake(self.spec.role, "not_tls")
            conn.close()
            return
        task = self.loop.create_task(self._hand_over(conn, tls))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _hand_over(self, conn: socket.socket, tls: bool) -> None:
        spec = self.spec
        try:
            if tls:
                assert spec.tls is not None
                await self.loop.connect_accepted_socket(
                    spec.factory, conn, ssl=spec.tls(), ssl_handshake_timeout=SNIFF_TIMEOUT
                )
                self.hub.handshake(spec.role, "ok")
            else:
                assert self.plain_factory is not None
                await self.loop.connect_accepted_socket(self.plain_factory, conn)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            if tls:
                self.hub.handshake(spec.role, handshake_failure(exc))
            log.debug("%s: handshake failed: %s", spec.name, exc)
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        for fd, (conn, timer) in list(self.pending.items()):
            timer.cancel()
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)
            conn.close()
        self.pending.clear()
        self.sock.close()

    async def wait_closed(self) -> None:
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
