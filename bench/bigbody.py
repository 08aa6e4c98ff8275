#!/usr/bin/env python3
"""Large-body benchmark: a 1 GiB download and a 1 GiB upload through meshgate.

Starts, as child processes killed at exit:
  upstream   this file with --serve-upstream: a stdlib asyncio HTTP/1.1 server that
             streams SIZE bytes for GET /api/customers/download?size=N&mode=cl|chunked
             and, for POST/PUT, reads the body, counts and sha256s it, and answers
             {"bytes": N, "sha256": "...", "framing": "chunked" | "content-length"}
  meshgate   `meshgate run` with 1 worker, seed-style routes to the upstream
then runs curl for four variants (download/upload x content-length/chunked):
  download   curl -o /dev/null           (upstream sends Content-Length or chunked)
  upload     curl -T sparse-file -X POST (Content-Length)
             head -c N /dev/zero | curl -T - -X POST (chunked)
and after each transfer reads meshgate's peak RSS (VmHWM in /proc/<pid>/status,
reset before each transfer through /proc/<pid>/clear_refs). Each variant also
runs straight against the upstream first (--via meshgate-1w skips it) for a baseline.

Usage: python bench/bigbody.py [--size 1GiB] [--via direct,meshgate-1w]   (smoke: --size 50MiB)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

from _common import (
    RESULTS_DIR,
    Child,
    Children,
    command_line,
    ensure_tools,
    find_meshgate,
    free_port,
    git_describe,
    log,
    machine_info,
    proc_status_kib,
    process_tree,
    run_script,
    start_meshgate,
    wait_http,
)

CHUNK = 1 << 20  # bytes per write / read in the upstream
PATTERN = (bytes(range(256)) * (CHUNK // 256))[:CHUNK]
UPLOAD_PATH = "/api/customers/upload"
DOWNLOAD_PATH = "/api/customers/download"

# ---------------------------------------------------------------- the upstream


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], hash_body: bool
) -> tuple[int, str, str]:
    """Read (and drop) a request body. -> (bytes, sha256 hex, framing)."""
    h = hashlib.sha256()
    total = 0

    async def take(n: int) -> None:
        nonlocal total
        while n > 0:
            data = await reader.read(min(n, CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            if hash_body:
                h.update(data)
            total += len(data)
            n -= len(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            await take(size)
            if await reader.readexactly(2) != b"\r\n":
                raise ValueError("bad chunk terminator")
        framing = "chunked"
    elif "content-length" in headers:
        await take(int(headers["content-length"]))
        framing = "content-length"
    else:
        framing = "none"
    return total, h.hexdigest() if hash_body else "", framing


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hash_body: bool
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            ka = b"keep-alive" if keep_alive else b"close"
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            url = urlsplit(target)
            if method in ("POST", "PUT"):
                t0 = time.perf_counter()
                n, digest, framing = await _read_body(reader, headers, hash_body)
                secs = time.perf_counter() - t0
                body = json.dumps(
                    {"bytes": n, "sha256": digest, "framing": framing, "seconds": secs}
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: %s\r\n\r\n%s" % (len(body), ka, body)
                )
            elif method == "GET" and url.path == DOWNLOAD_PATH:
                q = parse_qs(url.query)
                size = int(q.get("size", ["0"])[0])
                chunked = q.get("mode", ["cl"])[0] == "chunked"
                length = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"%s\r\nConnection: %s\r\n\r\n" % (length, ka)
                )
                left = size
                while left > 0:
                    block = PATTERN if left >= CHUNK else PATTERN[:left]
                    if chunked:
                        writer.writelines([b"%x\r\n" % len(block), block, b"\r\n"])
                    else:
                        writer.write(block)
                    left -= len(block)
                    await writer.drain()
                if chunked:
                    writer.write(b"0\r\n\r\n")
            else:
                # Anything else (health checks): drain a body if any, answer 200 "ok".
                await _read_body(reader, headers, False)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 2\r\nConnection: %s\r\n\r\nok" % ka
                )
            await writer.drain()
            if not keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
        print(f"upstream: connection ended: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def serve_upstream(port: int, hash_body: bool) -> None:
    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, hash_body),
            "127.0.0.1",
            port,
            backlog=1024,
            limit=4 * CHUNK,  # let the reader buffer more than the default 64 KiB
        )
        print(f"upstream listening on 127.0.0.1:{port}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# ---------------------------------------------------------------- measuring

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 50MiB or 1GiB, got {text!r}")
    n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be > 0")
    return n


def zeros_sha256(size: int) -> str:
    h, block = hashlib.sha256(), bytes(CHUNK)
    for _ in range(size // CHUNK):
        h.update(block)
    h.update(bytes(size % CHUNK))
    return h.hexdigest()


class RssWatch:
    """Peak RSS of a process tree during one transfer.

    Resets each process's VmHWM (`echo 5 > /proc/PID/clear_refs`) first, then
    reads VmHWM afterwards; a 50 ms VmRSS sampler runs alongside as a check
    (and as the answer if the reset is not permitted).
    """

    def __init__(self, pid: int) -> None:
        self.root = pid
        self.reset_ok = True
        self.sampled_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.before_kib = self.after_kib = self.hwm_kib = 0
        self.per_pid_hwm_kib: dict[int, int | None] = {}

    def _tree_kib(self, field: str) -> int:
        return sum(proc_status_kib(p, field) or 0 for p in process_tree(self.root))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled_kib = max(self.sampled_kib, self._tree_kib("VmRSS"))
            self._stop.wait(0.05)

    def __enter__(self) -> RssWatch:
        for p in process_tree(self.root):
            try:
                Path(f"/proc/{p}/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
        self.before_kib = self._tree_kib("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled_kib = max(self.sampled_kib, self._tree_kib("VmRSS"))
        self.after_kib = self._tree_kib("VmRSS")
        # Summed over the tree: a master + worker layout counts both.
        self.hwm_kib = self._tree_kib("VmHWM")
        self.per_pid_hwm_kib = {p: proc_status_kib(p, "VmHWM") for p in process_tree(self.root)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_mib": self.hwm_kib / 1024,
            "peak_rss_is_per_transfer": self.reset_ok,
            "sampled_peak_rss_mib": self.sampled_kib / 1024,
            "rss_before_mib": self.before_kib / 1024,
            "rss_after_mib": self.after_kib / 1024,
            "per_pid_vmhwm_kib": self.per_pid_hwm_kib,
        }


CURL_FMT = (
    '{"http_code": "%{http_code}", "size_download": %{size_download}, '
    '"size_upload": %{size_upload}, "time_total": %{time_total}}\\n'
)


def run_curl(
    curl: str,
    direction: str,
    framing: str,
    port: int,
    size: int,
    workdir: Path,
) -> dict[str, Any]:
    """One transfer. -> bytes, seconds, MB/s, framing seen, commands."""
    base = [curl, "-sS", "--max-time", "3600", "-w", CURL_FMT, "-D", str(workdir / "headers")]
    url = f"http://127.0.0.1:{port}"
    feeder: subprocess.Popen[bytes] | None = None
    stdin: IO[bytes] | None = None
    if direction == "download":
        mode = "chunked" if framing == "chunked" else "cl"
        argv = [*base, "-o", "/dev/null", f"{url}{DOWNLOAD_PATH}?size={size}&mode={mode}"]
        shown = shlex.join(argv)
    else:
        resp = workdir / "response.json"
        up = [*base, "-o", str(resp), "-X", "POST", "-H", "Expect:"]
        up += ["-H", "Content-Type: application/octet-stream"]
        if framing == "chunked":
            feed = ["head", "-c", str(size), "/dev/zero"]
            argv = [*up, "-T", "-", f"{url}{UPLOAD_PATH}"]
            shown = f"{shlex.join(feed)} | {shlex.join(argv)}"
            feeder = subprocess.Popen(feed, stdout=subprocess.PIPE)
            stdin = feeder.stdout
        else:
            sparse = workdir / "upload.bin"
            with open(sparse, "wb") as f:
                f.truncate(size)
            argv = [*up, "-T", str(sparse), f"{url}{UPLOAD_PATH}"]
            shown = shlex.join(argv)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            argv, stdin=stdin, capture_output=True, text=True, timeout=3700, check=False
        )
    finally:
        if feeder is not None:
            if feeder.stdout is not None:
                feeder.stdout.close()
            feeder.wait()
    wall = time.perf_counter() - t0
    (workdir / "upload.bin").unlink(missing_ok=True)
    lines = r.stdout.strip().splitlines()
    try:
        stats = json.loads(lines[-1]) if lines else {}
    except ValueError:
        stats = {}
    headers_file = workdir / "headers"
    headers = headers_file.read_text(errors="replace").lower() if headers_file.exists() else ""
    headers_file.unlink(missing_ok=True)
    res: dict[str, Any] = {
        "command": shown,
        "http_code": int(stats.get("http_code") or 0),
        "seconds": stats.get("time_total", wall),
        "wall_seconds": wall,
    }
    if r.returncode != 0:
        res["curl_error"] = f"curl exit {r.returncode}: {r.stderr.strip()}"
    if direction == "download":
        res["bytes"] = stats.get("size_download", 0)
        res["client_saw"] = (
            "chunked"
            if "transfer-encoding: chunked" in headers
            else "content-length"
            if "content-length:" in headers
            else "close-delimited"
            if headers
            else "-"
        )
    else:
        res["wire_bytes"] = stats.get("size_upload", 0)  # chunked: includes the chunk framing
        resp = workdir / "response.json"
        text = resp.read_text(errors="replace") if resp.exists() else ""
        resp.unlink(missing_ok=True)
        try:
            body = json.loads(text)
        except ValueError:
            body = {"bytes": 0, "sha256": "", "framing": f"(response: {text[:200]!r})"}
        res["bytes"] = res["upstream_bytes"] = body.get("bytes", 0)
        res["upstream_sha256"] = body.get("sha256", "")
        res["upstream_saw"] = body.get("framing", "")
    res["mb_per_s"] = res["bytes"] / res["seconds"] / 1e6 if res["seconds"] else float("nan")
    return res


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="1 GiB upload/download through meshgate (1 worker): time, MB/s, peak RSS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default=1 << 30, help="body size: 50MiB, 1GiB, ...")
    p.add_argument(
        "--via",
        default="direct,meshgate-1w",
        help="comma list of paths to measure: direct (curl to the upstream), meshgate-1w",
    )
    p.add_argument("--no-hash", action="store_true", help="upstream counts but does not sha256")
    p.add_argument(
        "--only",
        default="",
        help="comma list of variants to run: download-cl,download-chunked,upload-cl,upload-chunked",
    )
    p.add_argument("--meshgate", default=None, help="command that runs meshgate (default: venv)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


VARIANTS = {
    "download-cl": ("download", "content-length"),
    "download-chunked": ("download", "chunked"),
    "upload-cl": ("upload", "content-length"),
    "upload-chunked": ("upload", "chunked"),
}


def report(result: dict[str, Any]) -> str:
    size = result["size"]
    lines = [
        f"## meshgate large bodies ({result['started']}, commit {result['git']['commit'][:12]}"
        f"{' dirty' if result['git']['dirty'] else ''}, {result['machine']['cpus']} CPUs)",
        "",
        f"Body: {size:,} bytes ({size / 2**20:,.0f} MiB); meshgate 1 worker; "
        f"idle meshgate RSS {result.get('meshgate_idle_rss_mib', float('nan')):.1f} MiB. "
        "MB/s = 10^6 bytes/s (curl time_total). Peak RSS = meshgate VmHWM, reset before "
        "each transfer.",
        "",
        "| variant | via | bytes | seconds | MB/s | framing at other end | peak RSS MiB | check |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for t in result["transfers"]:
        framing = t.get("client_saw") or t.get("upstream_saw") or ""
        rss = f"{t['rss']['peak_rss_mib']:.1f}" if "rss" in t else "-"
        lines.append(
            f"| {t['variant']} | {t['via']} | {t['bytes']:,} | {t['seconds']:.2f} | "
            f"{t['mb_per_s']:,.1f} | {framing} | {rss} | {t['check']} |"
        )
    lines += [
        "",
        "commands:",
        *[f"    {t['command']}" for t in result["transfers"]],
        "",
        f"results: {result['out']}",
        f"command: {result['command']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, not args.no_hash)
        return 0
    variants = [v.strip() for v in args.only.split(",") if v.strip()] or list(VARIANTS)
    if bad := [v for v in variants if v not in VARIANTS]:
        print(f"error: unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
        return 2
    cmdline = command_line()
    log(f"command: {cmdline}")
    tools = ensure_tools(["curl"])
    if shutil.which("head") is None:
        print("error: `head` (coreutils) is needed for the chunked upload", file=sys.stderr)
        return 2
    vias = [v.strip() for v in args.via.split(",") if v.strip()]
    if not vias or (bad := [v for v in vias if v not in ("direct", "meshgate-1w")]):
        print("error: --via takes direct and/or meshgate-1w", file=sys.stderr)
        return 2
    meshgate_cmd = find_meshgate(args.meshgate) if "meshgate-1w" in vias else []
    started = dt.datetime.now(dt.UTC)
    out = args.out or RESULTS_DIR / f"bigbody-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    result: dict[str, Any] = {
        "command": cmdline,
        "started": started.isoformat(timespec="seconds"),
        "git": git_describe(),
        "machine": machine_info(),
        "size": args.size,
        "hash": not args.no_hash,
        "out": str(out),
        "transfers": [],
    }
    expected_sha = ""
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-bigbody-"))
    log(f"temp dir: {tmp}")
    try:
        with Children() as children:
            up_port = free_port()
            (tmp / "upstream").mkdir()
            up_argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-upstream",
                str(up_port),
                *(["--no-hash"] if args.no_hash else []),
            ]
            upstream = children.start("upstream", up_argv, tmp / "upstream" / "upstream.log")
            wait_http(upstream, up_port, "/healthz", timeout=15.0)
            targets: list[tuple[str, int, Child | None]] = []
            if "direct" in vias:
                targets.append(("direct", up_port, None))
            if "meshgate-1w" in vias:
                extra = "    timeouts: {connect: 2s, read: 60s, total: 1h}\n"
                mg, mg_port, mg_argv = start_meshgate(
                    children, meshgate_cmd, tmp, "meshgate-1w", up_port, 1, extra_upstream=extra
                )
                result["meshgate_command"] = shlex.join(mg_argv)
                result["meshgate_idle_rss_mib"] = (
                    sum(proc_status_kib(p, "VmRSS") or 0 for p in process_tree(mg.pid)) / 1024
                )
                targets.append(("meshgate-1w", mg_port, mg))
            for variant in variants:
                direction, framing = VARIANTS[variant]
                if direction == "upload" and not args.no_hash and not expected_sha:
                    log(f"sha256 of {args.size:,} zero bytes (expected upload digest)")
                    expected_sha = zeros_sha256(args.size)
                for via, port, child in targets:
                    for c in [upstream, *(t[2] for t in targets if t[2] is not None)]:
                        if not c.alive():
                            raise RuntimeError(f"{c.name} died; log:\n{c.log_tail()}")
                    log(f"{variant} via {via} ({args.size:,} bytes)")
                    if child is not None:
                        with RssWatch(child.pid) as watch:
                            res = run_curl(tools["curl"], direction, framing, port, args.size, tmp)
                        res["rss"] = watch.as_dict()
                    else:
                        res = run_curl(tools["curl"], direction, framing, port, args.size, tmp)
                    res.update(variant=variant, via=via)
                    problems = [res["curl_error"]] if "curl_error" in res else []
                    if res["http_code"] != 200:
                        problems.append(f"HTTP {res['http_code']}")
                    if res["bytes"] != args.size:
                        where = "upstream got" if direction == "upload" else "curl got"
                        problems.append(f"{where} {res['bytes']} bytes")
                    sha = res.get("upstream_sha256")
                    if direction == "upload" and expected_sha and sha != expected_sha:
                        problems.append("sha256 mismatch")
                    res["check"] = "; ".join(problems) or (
                        "ok, sha256 ok" if direction == "upload" and expected_sha else "ok"
                    )
                    rss = f", peak RSS {res['rss']['peak_rss_mib']:.1f} MiB" if child else ""
                    log(
                        f"  {res['bytes']:,} bytes in {res['seconds']:.2f}s = "
                        f"{res['mb_per_s']:,.1f} MB/s{rss} [{res['check']}]"
                    )
                    result["transfers"].append(res)
    finally:
        if args.keep_tmp:
            log(f"kept temp dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    failed = [t for t in result["transfers"] if not t["check"].startswith("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    run_script(main)
