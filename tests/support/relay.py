"""A recording TCP relay, and a check that a byte stream is only TLS records.

`Relay` listens on an address, connects each client to a target, forwards
bytes both ways (half-closes included) and records every chunk: which
connection, which direction, the bytes. Tests use it as a wire tap between a
client and a server to assert what actually crossed the network: only TLS
(`assert_only_tls`), and never a plaintext marker.

In the test process it runs on a background thread (`with Relay(...) as r:`).
Inside a network namespace it runs as its own process, stdlib only, as a
module or a script (`relay_cmd` builds the command line):

    python -m tests.support.relay --listen 198.18.0.1:9000 \\
        --to 198.18.0.3:15006 --record /tmp/x.bin

It prints `relay listening on HOST:PORT` once it listens, writes every chunk
to the `--record` file as it forwards it (flushed, so the file is complete
even if the relay is SIGKILLed), and exits on SIGTERM/SIGINT.
`Recording.load(path)` reads the file back.

`tls_records(data)` parses a stream as TLS records (5-byte headers: content
type 20-23, version 0x0301-0x0304, length at most 2^14 + 2048) and raises
`NotTls` at the first byte that isn't; `is_tls(data)` says yes or no.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

TO_SERVER = ">"  # client -> target
TO_CLIENT = "<"  # target -> client
_CHUNK = struct.Struct("!cII")  # direction, connection number, length; then the bytes
_READ = 65536

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
_MAX_RECORD = 2**14 + 2048
_CLIENT_HELLO = 1


def relay_cmd(listen: str, to: str, record: str | Path, python: str = sys.executable) -> list[str]:
    """The command line that runs this relay as a process (cwd doesn't matter)."""
    return [python, str(Path(__file__).resolve()), "--listen", listen, "--to", to,
            "--record", str(record)]  # fmt: skip


# ---------------------------------------------------------------------------
# recordings


@dataclass(frozen=True)
class Chunk:
    conn: int  # 1, 2, ... in the order the relay accepted them
    direction: str  # TO_SERVER or TO_CLIENT
    data: bytes


@dataclass
class Recording:
    chunks: list[Chunk] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        raw = Path(path).read_bytes()
        chunks, at = [], 0
        while at + _CHUNK.size <= len(raw):
            direction, conn, length = _CHUNK.unpack_from(raw, at)
            at += _CHUNK.size
            chunks.append(Chunk(conn, direction.decode(), raw[at : at + length]))
            at += length
        return cls(chunks)

    @property
    def connections(self) -> list[int]:
        return sorted({c.conn for c in self.chunks})

    def stream(self, direction: str, conn: int | None = None) -> bytes:
        """Every byte sent one way, on one connection or on all of them."""
        return b"".join(
            c.data
            for c in self.chunks
            if c.direction == direction and (conn is None or c.conn == conn)
        )

    def to_server(self, conn: int | None = None) -> bytes:
        return self.stream(TO_SERVER, conn)

    def to_client(self, conn: int | None = None) -> bytes:
        return self.stream(TO_CLIENT, conn)

    def all_bytes(self) -> bytes:
        return b"".join(c.data for c in self.chunks)


# ---------------------------------------------------------------------------
# TLS records


class NotTls(ValueError):
    """The stream is not (only) TLS records; the message says where and why."""


@dataclass(frozen=True)
class TlsRecord:
    type: int
    version: int
    length: int
    body: bytes


def tls_records(data: bytes, *, partial_tail: bool = False) -> list[TlsRecord]:
    """Parse `data` as back-to-back TLS records. An empty stream, or one that
    stops inside a record (unless `partial_tail`), is not TLS."""
    if not data:
        raise NotTls("no bytes at all")
    records, at = [], 0
    while at < len(data):
        head = data[at : at + 5]
        if len(head) < 5 and partial_tail:
            break
        if len(head) < 5:
            raise NotTls(f"the stream ends inside a record header at byte {at}")
        kind, version, length = head[0], int.from_bytes(head[1:3]), int.from_bytes(head[3:5])
        if not CHANGE_CIPHER_SPEC <= kind <= APPLICATION_DATA:
            raise NotTls(f"byte {at}: content type {kind:#04x} ({head!r}...)")
        if not 0x0301 <= version <= 0x0304:
            raise NotTls(f"byte {at}: record version {version:#06x}")
        if length == 0 or length > _MAX_RECORD:
            raise NotTls(f"byte {at}: record length {length}")
        body = data[at + 5 : at + 5 + length]
        if len(body) < length and not partial_tail:
            raise NotTls(f"the stream ends inside the record at byte {at}")
        records.append(TlsRecord(kind, version, length, body))
        at += 5 + length
    return records


def is_tls(data: bytes, *, partial_tail: bool = False) -> bool:
    try:
        tls_records(data, partial_tail=partial_tail)
    except NotTls:
        return False
    return True


def assert_only_tls(recording: Recording, forbidden: Iterable[bytes] = ()) -> None:
    """Every connection in `recording` is TLS both ways: the client starts
    with a handshake record holding a ClientHello, everything after is TLS
    records, the client sent application data (type 23); and no byte string
    in `forbidden` appears anywhere on the wire."""
    if not recording.connections:
        raise AssertionError("the relay recorded no connection")
    for conn in recording.connections:
        for direction in (TO_SERVER, TO_CLIENT):
            stream = recording.stream(direction, conn)
            try:
                records = tls_records(stream)
            except NotTls as e:
                raise AssertionError(f"connection {conn} {direction}: not TLS: {e}") from None
            if direction == TO_SERVER:
                first = records[0]
                if first.type != HANDSHAKE or first.body[:1] != bytes([_CLIENT_HELLO]):
                    raise AssertionError(f"connection {conn} does not open with a ClientHello")
                if not any(r.type == APPLICATION_DATA for r in records):
                    raise AssertionError(f"connection {conn}: the client sent no application data")
    wire = recording.all_bytes()
    for marker in forbidden:
        if marker in wire:
            raise AssertionError(f"{marker!r} crossed the wire in clear")


# ---------------------------------------------------------------------------
# the relay


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Relay:
    """Forwards `listen` -> `target`, recording to memory and, with `record`,
    to a file. `start()` runs it on a thread; `serve()` is the coroutine."""

    def __init__(self, listen: str, target: str, record: str | Path | None = None) -> None:
        self.listen = _split(listen)
        self.target = _split(target)
        self.port = self.listen[1]  # the real one once listening (for port 0)
        self._record_path = Path(record) if record is not None else None
        self._file: BinaryIO | None = None
        self._chunks: list[Chunk] = []
        self._lock = threading.Lock()
        self._conns = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def recording(self) -> Recording:
        with self._lock:
            return Recording(list(self._chunks))

    def _record(self, conn: int, direction: str, data: bytes) -> None:
        with self._lock:
            self._chunks.append(Chunk(conn, direction, data))
            if self._file is not None:
                self._file.write(_CHUNK.pack(direction.encode(), conn, len(data)) + data)
                self._file.flush()

    async def serve(self, ready: threading.Event | None = None) -> None:
        """Relay until `stop()` (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._record_path is not None:
            self._file = open(self._record_path, "wb")  # noqa: SIM115 - closed below
        server = await asyncio.start_server(self._handle, *self.listen)
        self.port = server.sockets[0].getsockname()[1]
        try:
            if ready is not None:
                ready.set()
            await self._stopping.wait()
        finally:
            server.close()
            with self._lock:
                if self._file is not None:
                    self._file.close()
                    self._file = None

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pump(conn, TO_SERVER, client_r, target_w),
            self._pump(conn, TO_CLIENT, target_r, client_w),
        )
        for w in (client_w, target_w):
            w.close()

    async def _pump(
        self, conn: int, direction: str, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await r.read(_READ):
                self._record(conn, direction, data)
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()  # pass the half-close on
        except OSError:
            w.close()  # a reset on one side resets the other

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def start(self) -> Relay:
        def run() -> None:
            try:
                asyncio.run(self.serve(self._ready))
            except BaseException as e:
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="relay", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"relay failed to start: {self._error!r}") from self._error
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--record", required=True, help="file the chunks are written to")
    args = parser.parse_args(argv)
    relay = Relay(args.listen, args.to, args.record)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)
        ready = threading.Event()
        task = asyncio.create_task(relay.serve(ready))
        while not ready.is_set() and not task.done():
            await asyncio.sleep(0.01)
        if ready.is_set():
            print(f"relay listening on {relay.listen[0]}:{relay.port}", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
