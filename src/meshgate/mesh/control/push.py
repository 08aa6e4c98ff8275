"""The push: one long-lived stream per proxy, versioned snapshots, ACK/NACK.

The proxy opens `POST /v1/stream` over mutual TLS and sends, one JSON line
each:

- `hello`: its proxy id, the instance it registers (address, port, version,
  zone, metadata; the service is its certificate's, never its word), the
  version and section digests it holds (from its state directory), and its
  certificate's serial and expiry;
- `ack` / `nack` (`{version, reason}`) for each snapshot it is sent;
- `heartbeat` every third of the lease, which renews its instance's lease;
- `report` every 2 s: its metrics and its last denials
  (docs/dashboard-api.md). The latest one it sent is kept on its stream
  (`ProxyStream.report`) and handed to `Push.on_report`; one that is not
  what the contract says, or that speaks for another proxy, is ignored and
  counted (`Push.reports`), and the stream goes on (`control.reports`).

The control plane answers with `snapshot` lines: `{version, base, sections,
digests, changed_at}`. `sections` holds only what differs from what the proxy
has (`null`: drop it); `base` is the version the delta applies to, `None` for
a whole snapshot. A proxy whose version is not `base` NACKs with
`base-mismatch` and is sent everything.

Changes (a registration, a lease lost, a new generation) are debounced, as
istiod does: those within `debounce` go out as one version. `changed_at` is
when the first of them happened, so a proxy's ACK gives the propagation
time, which the control plane records per version.

Leases: an instance is healthy while its lease is live; one lease missed, it
leaves the snapshots; three, it is removed from the registry. A restarted
control plane gives every known instance one lease of grace before counting,
so its own downtime never empties the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from meshgate.mesh.control.reports import Malformed, clean
from meshgate.mesh.control.snapshot import build_sections, delta, digest
from meshgate.mesh.control.state import PushState
from meshgate.mesh.control.store import Instance
from meshgate.mesh.wire import ApiError, Request

__all__ = ["Push"]

log = logging.getLogger("meshgate.control")

_SPIFFE_PREFIX = "spiffe://"
FLUSH_DELAY = 0.25  # ACKs and heartbeats reach the store within this
MAX_FIELD = 256
"""Characters kept of an instance's version, zone, and metadata keys and values."""
MAX_METADATA = 32
REPORT_MIN_GAP = 0.5
"""Seconds between two reports of a stream that are looked at (they come
every 2 s): the ones in between are dropped unread, and counted."""


class ProxyStream:
    """One connected proxy."""

    __slots__ = (
        "acked",
        "acked_digests",
        "cert",
        "identity",
        "instance_id",
        "malformed",
        "nack",
        "proxy_id",
        "report",
        "report_at",
        "report_seen",
        "req",
        "sent",
        "sent_digests",
        "service",
    )

    def __init__(self, req: Request, identity: str, service: str, proxy_id: str) -> None:
        self.req = req
        self.identity = identity
        self.service = service
        self.proxy_id = proxy_id
        self.instance_id: str | None = None
        self.acked = 0
        self.acked_digests: dict[str, str] = {}
        self.sent = 0
        self.sent_digests: dict[str, str] = {}
        self.cert: dict[str, Any] = {}
        self.nack: dict[str, Any] | None = None
        self.report: dict[str, Any] | None = None
        """The latest report taken (`control.reports.clean`), or None."""
        self.report_at = 0.0
        """When it came, by this control plane's clock (monotonic seconds;
        the report's `at` is the proxy's clock, its word)."""
        self.report_seen = 0.0
        """When the last report was looked at, taken or not."""
        self.malformed = 0
        """Reports of this stream ignored as malformed."""


def _ignore_report(stream: ProxyStream, report: dict[str, Any]) -> None:
    return None


class Push:
    def __init__(self, cp: PushState) -> None:
        self.cp = cp
        self.streams: set[ProxyStream] = set()
        self.version = 0
        self.changed_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.healthy: set[str] = set()
        self.nacks = 0
        self.warned: set[str] = set()  # certificate serials warned about
        self.dirty: dict[str, ProxyStream] = {}
        self.flush_timer: asyncio.TimerHandle | None = None
        self.propagation: list[float] = []
        """Seconds from a change to each proxy's ACK of it (recent ones)."""
        self.reports = {"accepted": 0, "malformed": 0, "too_often": 0}
        self.on_report: Callable[[ProxyStream, dict[str, Any]], None] = _ignore_report
        """Called with each report taken, after `stream.report` is set."""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        store = self.cp.store
        now = time.time()
        grace = now + self.cp.mesh.control.lease
        for inst in store.instances():
            if inst.lease_expires < grace:
                store.renew_lease(inst.instance_id, grace)
        self.healthy = {i.instance_id for i in store.instances() if i.lease_expires > now}
        self.version = store.next_version()
        self.changed_at = now
        self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self._flush()
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self.sweeper
        for stream in list(self.streams):
            with contextlib.suppress(Exception):
                stream.req.writer.close()

    # -- changes ---------------------------------------------------------------------

    def changed(self, why: str) -> None:
        """Something every proxy may need changed: push once the burst is over."""
        if self.timer is None:
            self.changed_at = time.time()
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.cp.mesh.control.debounce, self._publish)
            log.debug("change (%s): pushing in %gs", why, self.cp.mesh.control.debounce)

    def _publish(self) -> None:
        self.timer = None
        self.version = self.cp.store.next_version()
        cache: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        encoded: dict[tuple[str, int, tuple[tuple[str, str], ...]], bytes] = {}
        for stream in list(self.streams):
            self._send(stream, cache, encoded)

    def _sections(
        self, service: str, cache: dict[str, tuple[dict[str, Any], dict[str, str]]]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        hit = cache.get(service)
        if hit is None:
            sections = build_sections(
                self.cp.mesh,
                self.cp.generation,
                service,
                self.cp.store.instances(),
                time.time(),
                self.cp.ca.bundle_pem.decode(),
            )
            hit = sections, {name: digest(doc) for name, doc in sections.items()}
            cache[service] = hit
        return hit

    def _send(
        self,
        stream: ProxyStream,
        cache: dict[str, tuple[dict[str, Any], dict[str, str]]],
        encoded: dict[tuple[str, int, tuple[tuple[str, str], ...]], bytes] | None = None,
        *,
        full: bool = False,
    ) -> None:
        sections, digests = self._sections(stream.service, cache)
        have = None if full else stream.sent_digests
        if have is not None and have == digests:
            return  # nothing this proxy holds changed
        key = (stream.service, stream.sent, tuple(sorted((have or {}).items())))
        data = encoded.get(key) if encoded is not None else None
        if data is None:
            data = (
                orjson.dumps(
                    {
                        "type": "snapshot",
                        "version": self.version,
                        "base": None if not have else stream.sent,
                        "sections": delta(sections, digests, have),
                        "digests": digests,
                        "changed_at": self.changed_at,
                    }
                )
                + b"\n"
            )
            if encoded is not None:
                encoded[key] = data
        stream.sent = self.version
        stream.sent_digests = digests
        stream.req.send_raw(data)

    # -- one proxy's stream ----------------------------------------------------------------

    async def serve(self, req: Request) -> None:
        identity = req.identity
        if identity is None:
            raise ApiError(401, "the stream needs a client certificate (mutual TLS)")
        service = _service_of(identity, self.cp.mesh.trust_domain)
        if service is None or identity != self.cp.mesh.identity(service):
            raise ApiError(403, f"{identity} is not an identity of this mesh")
        messages = req.lines()
        hello = await anext(messages, None)
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            raise ApiError(400, "a stream starts with a hello")
        proxy_id = str(hello.get("proxy_id") or "")
        if not proxy_id or len(proxy_id) > 128:
            raise ApiError(400, "the hello carries no proxy_id")
        stream = ProxyStream(req, identity, service, proxy_id)
        inst = hello.get("instance")
        if inst is not None:
            stream.instance_id = self._register(stream, inst)
        have = hello.get("digests")
        if isinstance(have, dict) and isinstance(hello.get("version"), int):
            stream.sent = stream.acked = hello["version"]
            stream.sent_digests = stream.acked_digests = {str(k): str(v) for k, v in have.items()}
        stream.cert = hello.get("cert") or {}
        req.start_stream()
        self.streams.add(stream)
        self._record(stream, connected=True)
        log.info("proxy %s (%s) connected", proxy_id, identity)
        try:
            self._send(stream, {})
            async for msg in messages:
                if isinstance(msg, dict):
                    self._on_message(stream, msg)
        except (ApiError, ConnectionError, OSError):
            pass
        finally:
            self.streams.discard(stream)
            self._record(stream, connected=False)
            log.info("proxy %s (%s) disconnected", proxy_id, identity)

    def _register(self, stream: ProxyStream, inst: Any) -> str:
        if not isinstance(inst, dict):
            raise ApiError(400, "instance must be an object")
        claimed = inst.get("service")
        if claimed is not None and claimed != stream.service:
            self.cp.store.audit(
                "refused", caller=stream.identity, reason=f"registration as {claimed}"
            )
            raise ApiError(403, f"{stream.identity} cannot register an instance of {claimed!r}")
        address, port = inst.get("address"), inst.get("port")
        if not isinstance(address, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ApiError(400, "instance needs an address and a port")
        meta = inst.get("metadata") or {}
        if isinstance(meta, dict):
            meta = dict(list(meta.items())[:MAX_METADATA])
        now = time.time()
        record = Instance(
            instance_id=stream.proxy_id,
            service=stream.service,
            address=address,
            port=port,
            identity=stream.identity,
            version=str(inst.get("version") or "")[:MAX_FIELD],
            zone=str(inst.get("zone") or "")[:MAX_FIELD],
            metadata={str(k)[:MAX_FIELD]: str(v)[:MAX_FIELD] for k, v in meta.items()}
            if isinstance(meta, dict)
            else {},
            lease_expires=now + self.cp.mesh.control.lease,
            registered=now,
        )
        self.cp.store.put_instance(record)
        if record.instance_id not in self.healthy:
            self.healthy.add(record.instance_id)
            self.changed("registration")
        return record.instance_id

    def _on_message(self, stream: ProxyStream, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "heartbeat":
            if stream.instance_id is not None:
                expires = time.time() + self.cp.mesh.control.lease
                self.cp.store.renew_lease(stream.instance_id, expires)
                if stream.instance_id not in self.healthy:
                    self.healthy.add(stream.instance_id)
                    self.changed("lease renewed")
            if isinstance(msg.get("cert"), dict):
                stream.cert = msg["cert"]
            self._record(stream, connected=True, soon=True)
        elif kind == "ack":
            version = msg.get("version")
            if version == stream.sent:
                stream.acked = stream.sent
                stream.acked_digests = stream.sent_digests
                changed_at = msg.get("changed_at")
                if isinstance(changed_at, int | float):
                    self.propagation.append(time.time() - changed_at)
                    del self.propagation[:-5000]
                self._record(stream, connected=True, soon=True)
        elif kind == "report":
            self._report(stream, msg)
        elif kind == "nack":
            reason = str(msg.get("reason") or "no reason given")[:500]
            self.nacks += 1
            log.warning(
                "proxy %s (%s) refused version %s: %s",
                stream.proxy_id,
                stream.identity,
                msg.get("version"),
                reason,
            )
            self._record(
                stream,
                connected=True,
                nack={"version": msg.get("version"), "reason": reason, "at": time.time()},
            )
            # What it holds is what it last accepted.
            stream.sent = stream.acked
            stream.sent_digests = stream.acked_digests
            if reason.startswith("base-mismatch"):
                self._send(stream, {}, full=True)

    def _report(self, stream: ProxyStream, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        if stream.report_seen and now - stream.report_seen < REPORT_MIN_GAP:
            self.reports["too_often"] += 1
            return
        stream.report_seen = now
        try:
            report = clean(msg, stream.identity, stream.service)
        except Malformed as exc:
            self.reports["malformed"] += 1
            stream.malformed += 1
            log.log(
                logging.WARNING if stream.malformed == 1 else logging.DEBUG,
                "proxy %s (%s): report ignored: %s",
                stream.proxy_id,
                stream.identity,
                exc,
            )
            return
        self.reports["accepted"] += 1
        stream.report = report
        stream.report_at = now
        try:
            self.on_report(stream, report)
        except Exception:
            log.exception("taking the report of proxy %s failed", stream.proxy_id)

    def _record(
        self, stream: ProxyStream, *, connected: bool, nack: Any = None, soon: bool = False
    ) -> None:
        """Write what the operator sees of a proxy: at once for a connect, a
        disconnect or a NACK; `soon` (ACKs, heartbeats) in one batch a little
        later, so a push to a thousand proxies is not a thousand writes."""
        if nack is not None:
            stream.nack = nack
        if soon:
            self.dirty[stream.proxy_id] = stream
            if self.flush_timer is None:
                loop = asyncio.get_running_loop()
                self.flush_timer = loop.call_later(FLUSH_DELAY, self._flush)
            return
        self.dirty.pop(stream.proxy_id, None)
        self.cp.store.put_proxies({stream.proxy_id: self._state(stream, connected)})

    def _flush(self) -> None:
        self.flush_timer = None
        dirty, self.dirty = self.dirty, {}
        if dirty:
            self.cp.store.put_proxies(
                {pid: self._state(s, s in self.streams) for pid, s in dirty.items()}
            )

    def _state(self, stream: ProxyStream, connected: bool) -> dict[str, Any]:
        return {
            "identity": stream.identity,
            "service": stream.service,
            "instance_id": stream.instance_id,
            "connected": connected,
            "acked_version": stream.acked,
            "sent_version": stream.sent,
            "cert": stream.cert,
            "last_seen": time.time(),
            "nack": stream.nack,
        }

    # -- leases ------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        lease = self.cp.mesh.control.lease
        while True:
            await asyncio.sleep(max(lease / 3, 0.05))
            now = time.time()
            store = self.cp.store
            healthy = set()
            for inst in store.instances():
                if inst.lease_expires > now:
                    healthy.add(inst.instance_id)
                elif inst.lease_expires < now - 2 * lease:
                    store.remove_instance(inst.instance_id)
                    log.info(
                        "instance %s of %s removed (lease lost)", inst.instance_id, inst.service
                    )
            lost = self.healthy - healthy
            for instance_id in lost:
                log.warning("instance %s missed its lease: out of the snapshots", instance_id)
            if lost or healthy - self.healthy:
                self.healthy = healthy
                self.changed("lease")
            self._warn_expiry(now)

    def _warn_expiry(self, now: float) -> None:
        for stream in self.streams:
            not_after = stream.cert.get("not_after")
            not_before = stream.cert.get("not_before")
            if isinstance(not_after, int | float) and isinstance(not_before, int | float):
                life = not_after - not_before
                serial = str(stream.cert.get("serial"))
                if life > 0 and not_after - now < 0.2 * life and serial not in self.warned:
                    self.warned.add(serial)
                    log.warning(
                        "proxy %s (%s): its certificate expires in %.0fs and is not renewed",
                        stream.proxy_id,
                        stream.identity,
                        not_after - now,
                    )


def _service_of(identity: str, trust_domain: str) -> str | None:
    prefix = f"{_SPIFFE_PREFIX}{trust_domain}/ns/"
    if not identity.startswith(prefix):
        return None
    parts = identity[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != "sa":
        return None
    return parts[2]
