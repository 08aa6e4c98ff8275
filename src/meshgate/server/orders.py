"""How the supervisor and its workers agree on the config generation served.

The supervisor numbers every generation (a load of the file, or a rollback)
and writes it as an order, `order-<n>.json` in its private run directory,
with the exact text it validated; then it sends SIGHUP. A worker applies
every order newer than the last it applied, in sequence, so that all
workers serve the same generation with the same number, and a SIGHUP that
arrives while another is pending loses nothing.

A rollback asked of a worker (`POST /config/rollback`) goes to the
supervisor: the worker writes `rollback-<worker id>.json`, naming the
generation it saw served, and sends SIGUSR1. The supervisor rolls back only
if that generation is still the current one, so that requests that raced
each other roll back once. Each worker notes the newest order it applied in
`applied-<worker id>`: the asking worker answers once every worker serves
the rollback.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import orjson

from meshgate.config.generations import KEEP, Generation

__all__ = [
    "applied",
    "ask_rollback",
    "mark_applied",
    "read_orders",
    "take_rollback_requests",
    "write_order",
]

log = logging.getLogger("meshgate.supervisor")

_ORDER = "order-"
_ASK = "rollback-"
_APPLIED = "applied-"


def _write_private(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_order(run_dir: str, gen: Generation) -> None:
    """The order for `gen`; orders older than the generations kept are removed."""
    _write_private(
        os.path.join(run_dir, f"{_ORDER}{gen.number:08d}.json"), orjson.dumps(gen.order())
    )
    for name in os.listdir(run_dir):
        if name.startswith(_ORDER) and name.endswith(".json"):
            number = name[len(_ORDER) : -5]
            if number.isdigit() and int(number) <= gen.number - 2 * KEEP:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(run_dir, name))


def read_orders(run_dir: str, after: int) -> list[dict[str, Any]]:
    """The orders newer than generation `after`, oldest first."""
    numbers = []
    for name in os.listdir(run_dir):
        if name.startswith(_ORDER) and name.endswith(".json"):
            digits = name[len(_ORDER) : -5]
            if digits.isdigit() and int(digits) > after:
                numbers.append(int(digits))
    out = []
    for number in sorted(numbers):
        try:
            with open(os.path.join(run_dir, f"{_ORDER}{number:08d}.json"), "rb") as f:
                out.append(orjson.loads(f.read()))
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("cannot read the order for generation %d: %s", number, exc)
    return out


def ask_rollback(run_dir: str, worker_id: int, seen: int) -> None:
    _write_private(os.path.join(run_dir, f"{_ASK}{worker_id}.json"), orjson.dumps({"seen": seen}))


def take_rollback_requests(run_dir: str) -> set[int]:
    """The generations the asking workers saw served (each request is removed)."""
    seen: set[int] = set()
    for name in os.listdir(run_dir):
        if not (name.startswith(_ASK) and name.endswith(".json")):
            continue
        path = os.path.join(run_dir, name)
        try:
            with open(path, "rb") as f:
                seen.add(int(orjson.loads(f.read())["seen"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("a rollback request could not be read: %s", exc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return seen


def mark_applied(run_dir: str, worker_id: int, number: int) -> None:
    """The newest order this worker has applied (or refused)."""
    _write_private(os.path.join(run_dir, f"{_APPLIED}{worker_id}"), str(number).encode())


def applied(run_dir: str, workers: int) -> list[int]:
    """Each worker's newest order applied (0: not known)."""
    out = []
    for i in range(workers):
        try:
            with open(os.path.join(run_dir, f"{_APPLIED}{i}"), "rb") as f:
                out.append(int(f.read() or 0))
        except (OSError, ValueError):
            out.append(0)
    return out
