"""One scrape for N workers: the worker that answers asks the others.

Every worker of a supervisor listens on a Unix socket of its own in the
supervisor's private run directory (mode 0700). The kernel hands a scrape
of the shared admin port to any one worker; that worker asks each other
worker for its samples over its socket (`gather`), adds them up
(`exposition.merge`) and answers with the sum, so the figures are exact at
the moment of the scrape, and no worker's counters need to be shared
memory. A worker that does not answer within `PEER_TIMEOUT` is left out of
that scrape (`meshgate_workers_scraped` says how many were in).

Expiry across workers: a group of request rows (the rows that share a
direction, route, upstream, identities, method and transport: what every
request family's series have in common) is dropped once it is idle in
every worker. The answering worker sees each row's last touch in all of
them, leaves the idle groups out of its answer, and tells every worker to
drop them (a group touched meanwhile stays: each worker checks its own
rows).

The request: one line of JSON, `{"drop": [labels, ...], "before": t}`
(each group's labels: direction, route, upstream, source, destination,
method, tls), with `"families": [...]` for only those; the answer: the
worker's samples as one line of JSON. `{"extra": NAME}` asks instead for
what the worker registered as `MetricsHub.extras[NAME]` (a gateway's last
denials, for its dashboard), also as one line (null: none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from typing import Any

import orjson

from meshgate.observability.exposition import SPECS, Samples, merge
from meshgate.observability.hub import HUB, MetricsHub

__all__ = ["PEER_TIMEOUT", "gather", "gather_extra", "serve"]

log = logging.getLogger("meshgate.metrics")

PEER_TIMEOUT = 2.0
_REQUEST_ROWS = "meshgate_requests_total"
_MAX_LINE = 64 * 1024 * 1024


async def serve(path: str, hub: MetricsHub = HUB) -> asyncio.AbstractServer:
    """This worker's sample socket, at `path`, answering with `hub`'s."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer(hub, reader, writer)

    server = await asyncio.start_unix_server(answer, path=path, limit=_MAX_LINE)
    os.chmod(path, 0o600)
    return server


async def _answer(
    hub: MetricsHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), PEER_TIMEOUT)
        request = orjson.loads(line) if line.strip() else {}
        extra = request.get("extra")
        if isinstance(extra, str):
            make = hub.extras.get(extra)
            writer.write(orjson.dumps(make() if make is not None else None) + b"\n")
            await writer.drain()
            return
        _drop(hub, request.get("drop") or [], float(request.get("before") or 0.0))
        if request.get("samples", True):
            families = request.get("families")
            wanted = (
                [f for f in families if isinstance(f, str)] if isinstance(families, list) else None
            )
            writer.write(orjson.dumps(hub.collect(wanted)) + b"\n")
            await writer.drain()
    except (OSError, TimeoutError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        log.debug("metrics peer request failed: %s", exc)
    finally:
        writer.close()


def _drop(hub: MetricsHub, groups: list[Any], before: float) -> None:
    """Drop the groups of request rows another worker found idle everywhere
    (given by their labels: direction, route, upstream, identities, method,
    then tls)."""
    by_store: dict[tuple[str, bool], set[tuple[str, ...]]] = {}
    for labels in groups:
        by_store.setdefault((labels[0], labels[6] == "true"), set()).add(tuple(labels[:6]))
    for key, idle in by_store.items():
        store = hub.stores.get(key)
        if store is not None:
            store.drop_groups(idle, before)


async def _ask(path: str, request: dict[str, Any]) -> Any:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=_MAX_LINE), PEER_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        log.debug("metrics peer %s unreachable: %s", path, exc)
        return None
    try:
        writer.write(orjson.dumps(request) + b"\n")
        if not request.get("samples", True):
            await writer.drain()
            return None
        line = await asyncio.wait_for(reader.readline(), PEER_TIMEOUT)
        return orjson.loads(line)
    except (OSError, TimeoutError, orjson.JSONDecodeError, ValueError) as exc:
        log.warning("metrics peer %s did not answer: %s", path, exc)
        return None
    finally:
        writer.close()


async def gather(hub: MetricsHub = HUB, families: list[str] | None = None) -> Samples:
    """A proxy's samples (`hub`'s) plus every peer's, merged, without the
    groups of rows idle in all of them (which every worker is then told to
    drop); only `families`' when given."""
    own = hub.collect(families)
    if not hub.peers:
        return merge([own])
    ask: dict[str, Any] = {} if families is None else {"families": families}
    got = await asyncio.gather(*(_ask(p, ask) for p in hub.peers))
    parts = [own, *(g for g in got if isinstance(g, dict))]
    merged = merge(parts)
    before = time.monotonic() - hub.idle_expiry
    last: dict[tuple[Any, ...], float] = {}
    for labels, _, touched in merged.get(_REQUEST_ROWS, []):
        g = _group(_REQUEST_ROWS, labels)
        if touched > last.get(g, -math.inf):
            last[g] = touched
    idle = {g for g, t in last.items() if t < before}
    if idle:
        for name in _GROUPED:
            if name in merged:
                merged[name] = [s for s in merged[name] if _group(name, s[0]) not in idle]
        drop = [list(g) for g in idle]
        _drop(hub, drop, before)
        request = {"drop": drop, "before": before, "samples": False}
        await asyncio.gather(*(_ask(p, request) for p in hub.peers))
    return merged


# The request families, and where their tls label is: a group is the
# direction, route, upstream, identities and method, then tls; every
# series of these families belongs to one (`RequestSeries.expire`).
_GROUPED = {
    name: spec.labels.index("tls")
    for name, spec in SPECS.items()
    if spec.labels[:6] == SPECS[_REQUEST_ROWS].labels[:6] and "tls" in spec.labels
}


def _group(name: str, labels: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
    return (*labels[:6], labels[_GROUPED[name]])


async def gather_extra(hub: MetricsHub, name: str) -> list[Any]:
    """`hub.extras[name]()` of this worker and of every peer that answers,
    in worker order (a peer without it, or silent, is left out)."""
    make = hub.extras.get(name)
    out = [make() if make is not None else None]
    if hub.peers:
        out += await asyncio.gather(*(_ask(p, {"extra": name}) for p in hub.peers))
    return [x for x in out if x is not None]
