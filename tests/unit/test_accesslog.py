"""`observability.accesslog` and `logline` on their own: the line's fields
from an ended exchange's, sampling, the queue's bound, whole-line writes
within PIPE_BUF, and the access log's real process (`offload_main`) writing
to a real pipe, flushing what is queued when it stops, and started again
when it is killed."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshgate.config.schema import AccessLogConfig
from meshgate.observability.accesslog import FIELDS, AccessLog
from meshgate.observability.logline import LineFormatter, LineWriter


def _exchange(status: int = 200, **fields: Any) -> SimpleNamespace:
    """The fields `AccessLog.log` reads of a `stream.ProxyExchange`."""
    base: dict[str, Any] = {
        "status": status,
        "trace": None,
        "cluster": SimpleNamespace(name="orders"),
        "last_ep": SimpleNamespace(pool=SimpleNamespace(address="10.0.0.5:8080")),
        "proto": SimpleNamespace(
            state=SimpleNamespace(direction="inbound"), client=b"10.1.2.3", peer=None
        ),
        "t_start": 100.0,
        "started": 100.001,
        "try_t0": 100.0015,
        "request_id": b"abc",
        "consumer": "acme",
        "method": b"GET",
        "authority": b"api.example.com",
        "route_path": "/api/orders/{id}",
        "route_label": "orders-by-id",
        "sent_body": 7,
        "bytes_out": 99,
        "attempt": 2,
    }
    base.update(fields)
    return SimpleNamespace(**base)


def _formatted(log: AccessLog) -> list[dict[str, Any]]:
    fmt = LineFormatter(log.offset)
    return [json.loads(fmt.format(row)) for row in log.rows()]


def test_a_line_has_every_field_from_the_exchange() -> None:
    log = AccessLog(lambda: 100.0)
    log.offset = 1_700_000_000.0
    log.log(_exchange(t_start=100.25, started=100.251, try_t0=100.2515), 100.2545, "")
    (line,) = _formatted(log)
    assert tuple(line) == FIELDS
    assert line == {
        "time": "2023-11-14T22:15:00.250Z",
        "request_id": "abc",
        "trace_id": None,
        "direction": "inbound",
        "client": "10.1.2.3",
        "consumer": "acme",
        "peer": None,
        "method": "GET",
        "authority": "api.example.com",
        "path": "/api/orders/{id}",
        "route": "orders-by-id",
        "upstream": "orders",
        "endpoint": "10.0.0.5:8080",
        "status": 200,
        "duration_ms": 4.5,
        "upstream_ms": 3.0,
        "bytes_in": 7,
        "bytes_out": 99,
        "retries": 1,
        "reason": None,
    }


def test_a_local_answer_and_the_trace_id_forms() -> None:
    log = AccessLog(lambda: 0.0)
    local = {"cluster": None, "last_ep": None, "started": 0.0, "route_path": "", "route_label": ""}
    log.log(_exchange(404, **local), 100.0, "no_route")
    log.log(_exchange(trace=SimpleNamespace(trace_id=0xABC)), 100.0, "")
    log.log(_exchange(trace=SimpleNamespace(trace_id=b"\x01\x02")), 100.0, "")
    log.log(_exchange(trace=SimpleNamespace(trace_id="4bf92f35")), 100.0, "")
    log.log(_exchange(trace=object()), 100.0, "")  # a trace without an id yet
    missing, *traced = _formatted(log)
    assert missing["reason"] == "no_route" and missing["retries"] == 0
    assert missing["path"] is missing["route"] is missing["upstream"] is None
    assert missing["upstream_ms"] is None and missing["endpoint"] is None
    assert [t["trace_id"] for t in traced] == ["0" * 29 + "abc", "0102", "4bf92f35", None]


def test_sampling_applies_to_2xx_only_and_the_bound_drops() -> None:
    log = AccessLog(lambda: 0.0)
    log.sample = 0.0
    for status in (200, 204, 299, 301, 404, 503):
        log.log(_exchange(status), 100.0, "")
    assert [row[16] for row in log.rows()] == [301, 404, 503]
    log.queue.clear()
    log.lines = 0
    log.sample = 0.25
    for _ in range(4000):
        log.log(_exchange(), 100.0, "")
    assert 800 < log.lines < 1200 and len(log.rows()) == log.lines
    log.queue.clear()
    log.lines = 0
    log.sample, log.bound = 1.0, 16
    for _ in range(20):
        log.log(_exchange(), 100.0, "")
    assert log.lines == 16 and log.dropped == 4
    assert log.samples() == {"meshgate_access_log_dropped_total": [[(), 4]]}


def _fifo_reader(path: str) -> tuple[threading.Thread, bytearray]:
    """A reader of the named pipe at `path` (the access log's process
    opens it by name, as it opens a file), until its writers are gone."""
    os.mkfifo(path)
    got = bytearray()

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1 << 20):
                got.extend(chunk)
        finally:
            os.close(fd)

    reader = threading.Thread(target=read)
    reader.start()
    return reader, got


def test_the_process_writes_whole_lines_to_a_pipe_and_flushes_at_stop(tmp_path: Any) -> None:
    path = str(tmp_path / "log.fifo")
    reader, got = _fifo_reader(path)
    log = AccessLog(time.monotonic)
    log.configure(AccessLogConfig(path=path))
    log.start()
    try:
        for i in range(3000):
            log.log(_exchange(request_id=b"%d" % i), 100.0, "")
            if i % 700 == 0:
                log.flush()
    finally:
        log.stop()
    reader.join(10)
    lines = got.decode().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [str(i) for i in range(3000)]
    assert log.written == 3000 and log.unwritten == 0 and log.dropped == 0


def test_a_killed_process_is_started_again_and_its_losses_counted(tmp_path: Any) -> None:
    target = tmp_path / "access.log"
    log = AccessLog(time.monotonic)
    log.configure(AccessLogConfig(path=str(target)))
    log.start()
    try:
        log.log(_exchange(request_id=b"before"), 100.0, "")
        log.flush()
        _wait(lambda: b"before" in target.read_bytes())
        _wait(lambda: log.written == 1)  # (its report: what a killed one did not say is not known)
        first = log.offload.proc
        assert first is not None
        first.kill()
        first.wait(5)
        _wait(lambda: log.offload.proc is not None and log.offload.proc is not first)
        log.log(_exchange(request_id=b"after"), 100.0, "")
        log.flush()
        _wait(lambda: b"after" in target.read_bytes())
    finally:
        log.stop()
    ids = [json.loads(x)["request_id"] for x in target.read_text().splitlines()]
    assert ids == ["before", "after"]
    assert log.written == 2 and log.unwritten == 0


def test_a_path_that_cannot_be_opened_is_refused_at_configure(tmp_path: Any) -> None:
    log = AccessLog(time.monotonic)
    with pytest.raises(OSError):
        log.configure(AccessLogConfig(path=str(tmp_path / "no" / "such" / "dir.log")))
    assert not log.offload.running


def test_a_stuck_process_makes_new_lines_drop_not_wait(tmp_path: Any) -> None:
    """A target nobody reads: the process blocks, its pipe fills, and what
    waits for it stays within `buffer_lines` (the rest dropped, counted)."""
    path = str(tmp_path / "nobody.fifo")
    os.mkfifo(path)
    # Held open for reading, never read: the process's writes block once
    # the pipe is full.
    held = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    log = AccessLog(time.monotonic)
    log.configure(AccessLogConfig(path=path, buffer_lines=2000))
    log.start()
    try:
        ex = _exchange(authority=b"x" * 2000)
        for _ in range(200):
            for _ in range(1000):
                log.log(ex, 100.0, "")
            log.flush()
            time.sleep(0.002)
        assert log.dropped > 0
        assert log.offload.backlog <= 2000 + 1000
    finally:
        log.stop(timeout=0.5)
        os.close(held)
    counted = log.samples()["meshgate_access_log_dropped_total"][0][1]
    assert counted >= log.dropped > 0


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_hostile_host_stays_one_json_string() -> None:
    """The Host is the client's: quotes, backslashes and non-ASCII bytes
    must not end the string or break the line."""
    log = AccessLog(lambda: 100.0)
    hostile = b'evil"},"status":500,"x":"\\\xff'
    for _ in range(2):  # the second time from the cache
        log.log(_exchange(authority=hostile, consumer='a"b'), 100.01, "")
    lines = _formatted(log)
    assert [line["authority"] for line in lines] == [hostile.decode("latin-1")] * 2
    assert [line["status"] for line in lines] == [200, 200]
    assert lines[0]["consumer"] == 'a"b'


def test_a_block_goes_to_a_pipe_in_writes_of_whole_lines_within_pipe_buf() -> None:
    """What keeps several workers' lines apart on one pipe: every write is
    whole lines of at most PIPE_BUF bytes (a line longer than that alone)."""
    from select import PIPE_BUF

    sent: list[bytes] = []

    class Recording(LineWriter):
        def _send(self, fd: int, data: bytes) -> bool:
            sent.append(bytes(data))
            return super()._send(fd, data)

    lines = [b"%d:%s\n" % (i, b"x" * (i * 37 % 900)) for i in range(300)]
    lines.insert(150, b"long:" + b"y" * (PIPE_BUF * 2) + b"\n")
    block = b"".join(lines)
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: _drain(r, got, len(block)))
    reader.start()
    try:
        Recording(w).write(block)
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert bytes(got) == block
    assert b"".join(sent) == block
    for chunk in sent:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= PIPE_BUF or chunk.count(b"\n") == 1, len(chunk)
    assert len(sent) > len(block) // PIPE_BUF


def _drain(fd: int, into: bytearray, size: int) -> None:
    while len(into) < size:
        data = os.read(fd, 65536)
        if not data:
            return
        into += data


def test_the_process_ends_when_its_proxy_is_killed_even_stuck_on_its_target(
    tmp_path: Any,
) -> None:
    """The target is a named pipe nobody opens for reading: the access log's
    process blocks opening it, where the end of its input cannot reach it.
    Its proxy is killed (-9): it must not outlive it."""
    import signal
    import subprocess
    import sys

    fifo = tmp_path / "nobody.fifo"
    os.mkfifo(fifo)
    script = (
        "import sys, time\n"
        "from meshgate.config.schema import AccessLogConfig\n"
        "from meshgate.observability.accesslog import AccessLog\n"
        "log = AccessLog(time.monotonic)\n"
        f"log.configure(AccessLogConfig(path={str(fifo)!r}))\n"
        "log.start()\n"
        "print(log.offload.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proxy = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proxy.stdout is not None
        child = int(proxy.stdout.readline())
        _wait(lambda: Path(f"/proc/{child}/wchan").read_text() == "wait_for_partner")
    finally:
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(5)
    _wait(lambda: not _alive(child), timeout=5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_processes_started_again_leak_no_descriptor(tmp_path: Any) -> None:
    log = AccessLog(time.monotonic)
    log.configure(AccessLogConfig(path=str(tmp_path / "access.log")))
    log.start()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            proc = log.offload.proc
            assert proc is not None
            proc.kill()
            proc.wait(5)
            _wait(lambda p=proc: log.offload.proc not in (None, p))  # type: ignore[misc]
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        log.stop()


def test_a_block_of_rows_is_the_same_lines_as_each_row_alone_and_a_bad_row_is_skipped() -> None:
    """`LineFormatter.lines` makes a block by columns; a block must hold
    exactly each row's own line, whatever its ids (meshgate's, a client's
    with a quote, none), trace id, try or reason, and a row it cannot read
    must cost that row only."""
    log = AccessLog(lambda: 100.0)
    log.offset = 1_700_000_000.0
    variants: list[dict[str, Any]] = [
        {},
        {"request_id": b'id"with\\quote'},
        {"request_id": None, "trace": SimpleNamespace(trace_id=0x4BF92F35)},
        {"started": 0.0, "cluster": None, "last_ep": None, "attempt": 0},
        {"request_id": b"0af7651916cd43dd8448eb211c80319c", "consumer": None},
        {"t_start": 101.9999, "started": 102.0, "try_t0": 102.0001},  # the next second
    ]
    for i, extra in enumerate(variants * 3):
        log.log(_exchange(200 + i, **extra), 102.5, "" if i % 2 else "ratelimit")
    fmt = LineFormatter(log.offset)
    rows = log.rows()
    alone = b"".join(fmt.format(row) for row in rows)
    flat = [v for row in rows for v in row]
    assert fmt.lines(flat) == alone == fmt._rows(flat)  # (by columns; row by row)
    assert [json.loads(x)["status"] for x in alone.splitlines()] == list(range(200, 218))
    bad = list(flat)
    bad[4 * len(rows[0]) + 16] = "not a status"  # the fifth row's
    got = [json.loads(x)["status"] for x in fmt.lines(bad).splitlines()]
    assert got == [s for s in range(200, 218) if s != 204]
    with pytest.raises(ValueError, match="could not be formatted"):
        fmt.format(bad[4 * len(rows[0]) : 5 * len(rows[0])])
    with pytest.raises(ValueError, match="21 values"):
        fmt.format(flat[:20])
