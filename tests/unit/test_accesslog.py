"""`observability.accesslog` on its own: the line's fields from an ended
exchange's, sampling, the queue's bound, and the writer thread writing to a
real pipe, and flushing what is queued when it stops."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace
from typing import Any

from meshgate.config.schema import AccessLogConfig
from meshgate.observability.accesslog import FIELDS, AccessLog


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
    return [json.loads(log.format(row)) for row in log.queue]


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
    assert [row[16] for row in log.queue] == [301, 404, 503]
    log.queue.clear()
    log.sample = 0.25
    for _ in range(4000):
        log.log(_exchange(), 100.0, "")
    assert 800 < len(log.queue) < 1200
    log.queue.clear()
    log.sample, log.bound = 1.0, 16
    for _ in range(20):
        log.log(_exchange(), 100.0, "")
    assert len(log.queue) == 16 and log.dropped == 4
    assert log.samples() == {"meshgate_access_log_dropped_total": [[(), 4]]}


def test_the_writer_writes_whole_lines_to_a_pipe_and_flushes_at_stop() -> None:
    r, w = os.pipe()
    got = bytearray()
    sizes: list[int] = []

    def read() -> None:
        while chunk := os.read(r, 1 << 20):
            sizes.append(len(chunk))
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    log = AccessLog(time.monotonic)
    log.configure(AccessLogConfig(path="-"))
    log.fd = os.dup(w)  # (the "-" target, on a pipe of the test's)
    os.close(w)
    log.start()
    for i in range(3000):
        log.log(_exchange(request_id=b"%d" % i), 100.0, "")
    log.stop()
    reader.join(10)
    lines = got.decode().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [str(i) for i in range(3000)]
    assert log.written == 3000 and log.unwritten == 0 and log.fd == -1
    assert sum(sizes) == len(got)
    os.close(r)


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

    class Recording(AccessLog):
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
        Recording(time.monotonic)._write(w, block)
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
