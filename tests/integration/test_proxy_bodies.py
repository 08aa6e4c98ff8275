"""Bodies through the real gateway: content-length and chunked uploads and
downloads up to 50 MB checked by sha256, flow control towards a stalled
client, and upstream truncation made visible to the client."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from support.client import RawConnection, fetch
from support.proxy import ProxyProcess, Stack, single_upstream_config
from support.upstream import UpstreamServer, pattern_sha256, write_pattern_file

pytestmark = pytest.mark.engine

MB50 = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("up")


@pytest.fixture(scope="module")
def proxy(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(single_upstream_config(up))


@pytest.fixture(autouse=True)
def _clear(up: UpstreamServer) -> None:
    up.clear()


@pytest.fixture(scope="module")
def file50(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("bodies") / "50mb.bin"
    return path, write_pattern_file(path, MB50)


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_50mb_download(proxy: ProxyProcess, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "down.bin"
    r = fetch(proxy.url(f"/download?size={MB50}&mode={mode}"), body_file=out, timeout=120)
    assert r.returncode == 0 and r.status == 200, r.describe()
    assert out.stat().st_size == MB50
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == pattern_sha256(MB50)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_50mb_upload(
    proxy: ProxyProcess, up: UpstreamServer, file50: tuple[Path, str], chunked: bool
) -> None:
    path, digest = file50
    args = ["-X", "POST", "-T", str(path), "-H", "Expect:"]
    if chunked:
        args += ["-H", "Transfer-Encoding: chunked"]
    r = fetch(proxy.url("/echo/upload"), *args, timeout=120)
    assert r.returncode == 0 and r.status == 200, r.describe()
    doc = r.json()
    assert (doc["body_len"], doc["body_sha256"]) == (MB50, digest)
    (rec,) = up.requests
    assert rec.body_complete and rec.body_sha256 == digest


def test_small_uploads_both_framings(proxy: ProxyProcess, up: UpstreamServer) -> None:
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        r = fetch(proxy.url("/echo"), "--data-binary", "hello world", *extra)
        assert r.status == 200 and r.json()["body"] == "hello world", r.describe()
    empty = fetch(proxy.url("/echo"), "-X", "POST", "-H", "Content-Length: 0")
    assert empty.status == 200 and empty.json()["body_len"] == 0


def test_stalled_client_applies_backpressure_to_upstream(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    """A client that stops reading must make the proxy stop reading from the
    upstream (watermark flow control), not buffer the whole body in memory.
    Kernel socket buffers on both hops hold at most a few tens of MB here;
    the download is 128 MiB and the bound 96 MiB."""
    size = 128 * 1024 * 1024
    with RawConnection(proxy.port, rcvbuf=64 * 1024) as conn:
        conn.send(f"GET /download?size={size}&mode=length HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        first = conn.recv_some(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        up.wait_for_requests(1)

        def sent() -> int:
            return up.requests[0].response_body_sent

        # Wait until the upstream makes no progress for a second (or 15s pass).
        last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 15
        while time.monotonic() < deadline:
            now = sent()
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since > 1.0:
                break
            time.sleep(0.1)
        stalled_at = sent()
        assert stalled_at < 96 * 1024 * 1024, (
            f"upstream sent {stalled_at} of {size} bytes to a client that stopped reading"
        )
        # Then the client reads on, and receives every byte.
        head_end = first.find(b"\r\n\r\n") + 4
        digest = hashlib.sha256(first[head_end:])
        got = len(first) - head_end
        while got < size:
            block = conn.recv_some(min(1 << 20, size - got), timeout=30)
            assert block, f"connection ended after {got} of {size} bytes"
            digest.update(block)
            got += len(block)
    assert digest.hexdigest() == pattern_sha256(size)


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_upstream_truncation_is_visible_to_client(proxy: ProxyProcess, mode: str) -> None:
    """The upstream promises 100000 bytes and closes after half: the client
    must see a transfer that did not complete (curl exit 18), never a clean end."""
    r = fetch(proxy.url(f"/truncate?size=100000&mode={mode}"))
    assert r.returncode != 0, f"curl saw a complete response: {r.describe()}"
    assert len(r.body) < 100000


def test_client_abort_mid_upload_aborts_upstream_body(
    proxy: ProxyProcess, up: UpstreamServer
) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 50_000
        )
        up.wait_for(lambda s: any(r.body_len > 0 for r in s.requests), what="body bytes")
    (rec,) = up.wait_finished()
    assert not rec.body_complete and rec.body_len < 1_000_000
