"""`ScriptedUpstream`: a raw-socket upstream that answers with exact bytes.

`UpstreamServer` (support/upstream.py) is a well-behaved server that closes a
connection after each of its malformed answers. This one is for the other
question, whether the proxy itself drops a connection whose framing went
wrong: after an answer it keeps the connection open and goes on reading, as a
desynchronised server would, and it records when the proxy closes it.

The answer is chosen by the request's path:

    /bad/<kind>    the bytes `answers[kind]` (given to the constructor), as they
                   are, in one write; the connection stays open, unless `kind`
                   is in `resets`: then it is reset (closed with SO_LINGER 0,
                   an RST) right after the write.
    anything else  `200 OK` with a content-length and the body
                   `conn=<id> seq=<n> target=<target>`, so a client can tell
                   which connection answered it and that the answer is its own.

Requests are read up to their blank line (a body with a content-length is
skipped); nothing is validated. It runs on plain threads and shares no code
with meshgate.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ScriptedConnection:
    conn_id: int
    heads: list[bytes] = field(default_factory=list)
    """Every request head received on this connection, in order."""
    targets: list[str] = field(default_factory=list)
    answered_bad: bool = False
    """A `/bad/<kind>` answer went out on this connection."""
    reset: bool = False
    """This server reset the connection (a kind in `resets`)."""
    closed_by_peer: bool = False
    """The proxy closed (or reset) this connection."""
    closed_at: float = 0.0


class ScriptedUpstream:
    """A loopback upstream on an ephemeral port; `close()` stops it."""

    def __init__(self, answers: dict[str, bytes], *, resets: frozenset[str] = frozenset()) -> None:
        self.answers = answers
        self.resets = resets
        self._lock = threading.Condition()
        self._conns: list[ScriptedConnection] = []
        self._socks: list[socket.socket] = []
        self._stopped = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="scripted-upstream", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- what tests read -------------------------------------------------------

    @property
    def connections(self) -> list[ScriptedConnection]:
        with self._lock:
            return [
                ScriptedConnection(
                    c.conn_id,
                    list(c.heads),
                    list(c.targets),
                    c.answered_bad,
                    c.reset,
                    c.closed_by_peer,
                    c.closed_at,
                )
                for c in self._conns
            ]

    def requests_for(self, prefix: str) -> list[tuple[int, str]]:
        """(connection id, target) of every request whose target starts with `prefix`."""
        return [(c.conn_id, t) for c in self.connections for t in c.targets if t.startswith(prefix)]

    def wait_for(self, predicate: object, timeout: float = 5.0, what: str = "") -> None:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"scripted upstream: timed out after {timeout}s waiting for "
                        f"{what or predicate}; connections: {self.connections}"
                    )
                self._lock.wait(min(left, 0.1))

    def wait_bad_closed(self, timeout: float = 5.0) -> None:
        """Every connection that carried a bad answer has been closed by the proxy."""
        self.wait_for(
            lambda s: all(c.closed_by_peer for c in s._conns if c.answered_bad),
            timeout,
            "the proxy to close every connection that carried a bad answer",
        )

    def send_on(self, conn_id: int, data: bytes) -> None:
        """Write `data` on connection `conn_id` (the rest of a broken answer)."""
        with self._lock:
            sock = self._socks[conn_id]
        sock.sendall(data)

    # -- serving ---------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                conn = ScriptedConnection(len(self._conns))
                self._conns.append(conn)
                self._socks.append(sock)
                self._lock.notify_all()
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: ScriptedConnection) -> None:
        buf = b""
        skip = 0
        try:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    with self._lock:
                        if not self._stopped:
                            conn.closed_by_peer = True
                            conn.closed_at = time.monotonic()
                        self._lock.notify_all()
                    return
                buf += data
                while True:
                    if skip:
                        taken = min(skip, len(buf))
                        buf, skip = buf[taken:], skip - taken
                        if skip:
                            break
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, buf = buf[:end], buf[end + 4 :]
                    skip = _content_length(head)
                    if self._answer(sock, conn, head):
                        return
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _answer(self, sock: socket.socket, conn: ScriptedConnection, head: bytes) -> bool:
        """Send the answer to `head`; True if the connection is to be reset."""
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        target = parts[1] if len(parts) > 1 else ""
        with self._lock:
            seq = len(conn.heads)
            conn.heads.append(head)
            conn.targets.append(target)
            bad = target.startswith("/bad/")
            if bad:
                conn.answered_bad = True
            self._lock.notify_all()
        kind = target[len("/bad/") :].split("?")[0] if bad else ""
        if bad:
            answer = self.answers[kind]
        else:
            body = f"conn={conn.conn_id} seq={seq} target={target}".encode()
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        with contextlib.suppress(OSError):
            sock.sendall(answer)
        if kind not in self.resets:
            return False
        with self._lock:
            conn.reset = True
            self._lock.notify_all()
        # Long enough for the proxy to pass the bytes sent on; then, with
        # linger 0, the close (in _serve) sends an RST instead of a FIN.
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            socks = list(self._socks)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(5)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return 0
