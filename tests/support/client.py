"""Real clients for the integration tests: curl, raw sockets, plain HTTP/1.1.

`curl` and `fetch` run the curl binary. `raw_request` and `RawConnection`
speak bytes over a socket, for requests no well-behaved client would send.
`parse_response` is a small, strict HTTP/1.1 response parser for what comes
back over those sockets.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PROXY_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def free_port() -> int:
    """A port that was free a moment ago: bind 127.0.0.1:0, read it, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# curl


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}


def curl(
    *args: str, timeout: float = 60.0, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `curl -sS --noproxy '*' ARGS...` and return what it did (bytes)."""
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", *args],
        capture_output=True,
        timeout=timeout,
        input=input,
        env=_clean_env(),
        check=False,
    )


def curl_popen(*args: str) -> subprocess.Popen[bytes]:
    """Start curl in the background (stdout and stderr piped)."""
    return subprocess.Popen(
        ["curl", "-sS", "--noproxy", "*", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_clean_env(),
    )


class _Headers:
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def header_names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


@dataclass
class CurlResponse(_Headers):
    """One transfer made by curl: the final response and curl's own account."""

    returncode: int
    status: int
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    stderr: str
    info: dict[str, Any]
    """curl's `-w '%{json}'` variables (num_connects, time_total, ...)."""
    interim: list[int] = field(default_factory=list)
    """Status codes of 1xx responses seen before the final one."""

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        return (
            f"curl rc={self.returncode} status={self.status} headers={self.headers} "
            f"body={self.body[:500]!r} stderr={self.stderr[-1000:]}"
        )


def _parse_header_blocks(raw: bytes) -> list[tuple[str, int, list[tuple[str, str]]]]:
    blocks = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln.decode("latin-1") for ln in block.split(b"\n") if ln]
        if not lines or not lines[0].startswith("HTTP/"):
            continue
        parts = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k, v.strip()))
        blocks.append((parts[0], int(parts[1]), headers))
    return blocks


def fetch(
    url: str, *args: str, timeout: float = 60.0, body_file: Path | None = None
) -> CurlResponse:
    """One request with curl; the body is read back unless `body_file` is given."""
    with tempfile.TemporaryDirectory(prefix="curl-") as tmp:
        head_path = Path(tmp) / "head"
        out_path = body_file or Path(tmp) / "body"
        cp = curl(
            "-D", str(head_path), "-o", str(out_path), "-w", "%{json}", *args, url, timeout=timeout
        )
        raw_head = head_path.read_bytes() if head_path.exists() else b""
        body = b"" if body_file or not out_path.exists() else out_path.read_bytes()
    blocks = _parse_header_blocks(raw_head)
    info: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        info = json.loads(cp.stdout.decode() or "{}")
    version, status, headers = blocks[-1] if blocks else ("", 0, [])
    return CurlResponse(
        returncode=cp.returncode,
        status=status,
        version=version,
        headers=headers,
        body=body,
        stderr=cp.stderr.decode(errors="replace"),
        info=info,
        interim=[b[1] for b in blocks[:-1] if 100 <= b[1] < 200],
    )


# ---------------------------------------------------------------------------
# Raw HTTP/1.1 responses


@dataclass
class RawResponse(_Headers):
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str
    """`length`, `chunked`, `close` (delimited by the close) or `none`."""
    interim: list[int] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


class IncompleteResponse(Exception):
    pass


def _parse_chunked(data: bytes, pos: int) -> tuple[bytes, list[tuple[str, str]], int] | None:
    body = bytearray()
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size_text = data[pos:end].split(b";", 1)[0].strip()
        size = int(size_text, 16)
        pos = end + 2
        if size == 0:
            trailers = []
            while True:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    return None
                line = data[pos:end]
                pos = end + 2
                if not line:
                    return bytes(body), trailers, pos
                k, _, v = line.decode("latin-1").partition(":")
                trailers.append((k, v.strip()))
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        pos += size + 2


def parse_response(
    data: bytes, method: str = "GET", *, eof: bool = True
) -> tuple[RawResponse, int]:
    """Parse one response from the start of `data`; return it and its length.

    Raises IncompleteResponse if `data` does not hold a whole response yet
    (`eof` says whether more can come: a close-delimited body ends at eof).
    """
    pos = 0
    interim: list[int] = []
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise IncompleteResponse(f"no complete head in {data[pos : pos + 200]!r}")
        lines = data[pos:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ValueError(f"not a status line: {lines[0]!r}")
        version, status = parts[0], int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k, v.strip()))
        pos = end + 4
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    resp = RawResponse(version, status, reason, headers, b"", "none", interim)
    te = [t.strip().lower() for v in resp.header_all("transfer-encoding") for t in v.split(",")]
    if method == "HEAD" or status in (204, 304):
        return resp, pos
    if te:
        parsed = _parse_chunked(data, pos)
        if parsed is None:
            raise IncompleteResponse("chunked body not complete")
        resp.body, resp.trailers, pos = parsed
        resp.framing = "chunked"
        return resp, pos
    cl = resp.header("content-length")
    if cl is not None:
        n = int(cl)
        if len(data) < pos + n:
            raise IncompleteResponse(f"body has {len(data) - pos} of {n} bytes")
        resp.body = data[pos : pos + n]
        resp.framing = "length"
        return resp, pos + n
    if not eof:
        raise IncompleteResponse("close-delimited body, connection still open")
    resp.body = data[pos:]
    resp.framing = "close"
    return resp, len(data)


def parse_responses(data: bytes, methods: Iterable[str] | None = None) -> list[RawResponse]:
    """Every response in `data` (a whole conversation, read until close)."""
    out = []
    pos = 0
    method_iter = iter(methods or [])
    while pos < len(data):
        resp, used = parse_response(data[pos:], next(method_iter, "GET"), eof=True)
        out.append(resp)
        pos += used
    return out


# ---------------------------------------------------------------------------
# Raw sockets


class RawReply(bytes):
    """Everything a server sent on one connection, and how the connection ended."""

    closed: bool
    """The server closed (or reset) the connection before the read timeout."""
    reset: bool
    elapsed: float
    """Seconds from the end of sending to the close or the timeout."""

    @property
    def status(self) -> int | None:
        if not self.startswith(b"HTTP/"):
            return None
        try:
            return int(self.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None

    def responses(self, methods: Iterable[str] | None = None) -> list[RawResponse]:
        return parse_responses(bytes(self), methods)

    def describe(self) -> str:
        how = "reset" if self.reset else "closed" if self.closed else "still open"
        return f"{how} after {self.elapsed:.2f}s, received {bytes(self[:600])!r}"


class RawConnection:
    """A client socket that sends exactly the bytes it is given."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, timeout: float) -> bool:
        """Receive once; return False on timeout. Sets eof/reset on close."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(1024 * 1024)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            self.eof = self.reset = True
            return True
        if not data:
            self.eof = True
        self.buf += data
        return True

    def read_until_closed(self, timeout: float = 5.0) -> RawReply:
        """Read until the server closes or `timeout` seconds have passed."""
        start = time.monotonic()
        deadline = start + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._recv(left)
        reply = RawReply(bytes(self.buf))
        reply.closed = self.eof
        reply.reset = self.reset
        reply.elapsed = time.monotonic() - start
        self.buf.clear()
        return reply

    def read_response(self, method: str = "GET", timeout: float = 10.0) -> RawResponse:
        """Read exactly one response (a close-delimited one reads until close)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp, used = parse_response(bytes(self.buf), method, eof=self.eof)
            except IncompleteResponse:
                if self.eof:
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                self._recv(left)
                continue
            del self.buf[:used]
            return resp

    def recv_some(self, n: int, timeout: float = 10.0) -> bytes:
        """Read until at least `n` bytes are buffered; return and drop them."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < n and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._recv(left)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_request(
    port: int, data: bytes | Iterable[bytes], read_timeout: float = 5.0, *, pause: float = 0.0
) -> RawReply:
    """Send `data` (or each part of it, `pause` seconds apart) on a new
    connection; return everything the server sent until it closed or
    `read_timeout` seconds after the last byte was sent."""
    parts = [data] if isinstance(data, bytes) else list(data)
    with RawConnection(port) as conn:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            try:
                conn.send(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        return conn.read_until_closed(read_timeout)


# ---------------------------------------------------------------------------
# Small HTTP helpers


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET with the standard library (used for polling, not as the client under test)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_problem(resp: CurlResponse | RawResponse, status: int) -> dict[str, Any]:
    """Assert an RFC 9457 problem answer with this status; return its document."""
    where = resp.describe() if isinstance(resp, CurlResponse) else repr(resp)
    assert resp.status == status, f"expected {status}, got {where}"
    ctype = (resp.header("content-type") or "").split(";")[0].strip().lower()
    assert ctype == "application/problem+json", f"content-type {ctype!r}: {where}"
    doc = json.loads(resp.body)
    assert isinstance(doc, dict), where
    for key in ("type", "title", "detail"):
        assert isinstance(doc.get(key), str) and doc[key], f"problem without {key}: {doc}"
    assert doc.get("status") == status, f"problem status {doc.get('status')} != {status}"
    return doc
