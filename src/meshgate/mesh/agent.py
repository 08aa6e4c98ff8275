"""The proxy's side of the control plane: identity, registration, snapshots.

A `MeshAgent` runs inside every proxy (the sidecar, or a gateway that joins
the mesh). It

- makes its key in this process and asks for a certificate with a CSR (a join
  token, or the node's attestation socket, the first time; its current
  certificate after that), and renews at about 70% of the remaining life,
  jittered so that proxies started together do not renew together. A renewal
  that fails keeps the old certificate and is tried again with backoff;
- holds one stream to the control plane (`push.py` tells the protocol),
  registers its instance there, heartbeats, and applies each snapshot,
  ACKing or NACKing it (the proxy's callback decides);
- reports, every `REPORT_INTERVAL`, what the proxy's `reporter` returns
  (its metrics and denials, `mesh.report`), while the stream is up and
  keeps up: a report is skipped, never queued, when the last one has not
  gone out yet;
- keeps a state directory: its key (0600), certificate, chain, the trust
  bundle, and the last snapshot it accepted. A proxy restarted while the
  control plane is away serves from it, and reconnects with jittered
  exponential backoff, to any of the control-plane addresses it was given.

If the control plane stays away past the certificate's lifetime, the
certificate expires: peers refuse it, and the proxy can rejoin only with a
join token (a reusable one is kept in the state directory, 0600, when given).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate.mesh.wire import MAX_BODY, ApiError, ClientConnection, control_identity
from meshgate.tls.context import client_context

__all__ = ["AgentState", "MeshAgent", "write_private"]

log = logging.getLogger("meshgate.agent")

RECONNECT_BASE = 0.25
RECONNECT_MAX = 15.0
RENEW_AT = 0.7
REPORT_INTERVAL = 2.0
REPORT_MAX = MAX_BODY - 4096
"""The largest report line: the control plane ends a stream whose line is
longer than `MAX_BODY`."""


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by this user only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class AgentState:
    """What the state directory holds (each file written atomically)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.key_pem: bytes | None = self._read("key.pem")
        self.cert_pem: bytes | None = self._read("cert.pem")
        self.chain_pem: bytes | None = self._read("chain.pem")
        self.bundle_pem: bytes | None = self._read("bundle.pem")
        token = self._read("token")
        self.token = token.decode().strip() if token else None
        snap = self._read("snapshot.json")
        self.snapshot: dict[str, Any] = json.loads(snap) if snap else {}
        pid = self._read("proxy_id")
        if pid is None:
            pid = uuid.uuid4().hex.encode()
            write_private(directory / "proxy_id", pid)
        self.proxy_id = pid.decode().strip()

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.dir / name).read_bytes()
        except FileNotFoundError:
            return None

    def save(self, name: str, data: bytes) -> None:
        write_private(self.dir / name, data)

    def certificate(self) -> x509.Certificate | None:
        if self.cert_pem is None:
            return None
        return x509.load_pem_x509_certificate(self.cert_pem)

    def valid_until(self) -> float:
        cert = self.certificate()
        return cert.not_valid_after_utc.timestamp() if cert is not None else 0.0


def _new_csr(identity_hint: str | None) -> tuple[bytes, bytes]:
    """A new P-256 key and a CSR for it; the SAN is the identity to prove
    (the control plane checks it against what the credential proves)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate")])
    )
    if identity_hint:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity_hint)]),
            critical=True,
        )
    csr = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


class MeshAgent:
    """One proxy's membership in the mesh."""

    def __init__(
        self,
        *,
        identity: str,
        controls: list[tuple[str, int]],
        state_dir: Path,
        token: str | None = None,
        attest_socket: str | None = None,
        bundle_pem: bytes | None = None,
        instance: dict[str, Any] | None = None,
        on_snapshot: Callable[[dict[str, Any]], None] | None = None,
        on_certificate: Callable[[], None] | None = None,
        reporter: Callable[[], dict[str, Any]] | None = None,
        keep_token: bool = True,
        shuffle: bool = True,
    ) -> None:
        self.identity = identity
        """The SPIFFE ID this proxy is (the control plane's word is final)."""
        self.controls = controls
        self.shuffle = shuffle
        """Try the control-plane addresses in a random order (spreading
        proxies), or in the order given (the first is preferred)."""
        self.state = AgentState(state_dir)
        if token is not None:
            self.state.token = token
            if keep_token:
                self.state.save("token", token.encode())
        self.attest_socket = attest_socket
        if bundle_pem is not None and self.state.bundle_pem is None:
            self.state.bundle_pem = bundle_pem
            self.state.save("bundle.pem", bundle_pem)
        self.instance = instance
        self.on_snapshot = on_snapshot
        self.on_certificate = on_certificate
        """Called after a new certificate or trust bundle is in `state`."""
        self.reporter = reporter
        """The proxy's report (`mesh.report`), or None: it reports nothing."""
        self.reports = {"sent": 0, "skipped": 0, "too_large": 0}
        self.report_interval = REPORT_INTERVAL
        self.tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.version = int(self.state.snapshot.get("version", 0))
        self.stream_conn: ClientConnection | None = None
        self.renewals = 0
        self.received: list[tuple[int, float, float]] = []
        """(version, changed_at, received_at) of each snapshot applied."""
        self.lease = 15.0

    @property
    def sections(self) -> dict[str, Any]:
        return dict(self.state.snapshot.get("sections", {}))

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Have a certificate (from disk, or by joining), then keep it and the
        stream up in the background. Returns once the proxy can serve: from
        its state directory when the control plane is away."""
        if self.state.valid_until() <= time.time() + 30:
            await self._join()
        if self.state.snapshot and self.on_snapshot is not None:
            self.on_snapshot(self.sections)
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._stream_forever()))
        self.tasks.append(loop.create_task(self._renew_forever()))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.stream_conn is not None:
            self.stream_conn.close()

    # -- certificates ------------------------------------------------------------------

    def _tls(self, *, with_cert: bool) -> Any:
        bundle = self.state.bundle_pem
        if bundle is None:
            raise RuntimeError("no trust bundle: give one to join the mesh the first time")
        if with_cert:
            assert self.state.cert_pem and self.state.chain_pem and self.state.key_pem
            return client_context(
                bundle, self.state.cert_pem + self.state.chain_pem, self.state.key_pem
            )
        return client_context(bundle)

    async def _connect(self, *, with_cert: bool) -> ClientConnection:
        last: Exception | None = None
        order = random.sample(self.controls, len(self.controls)) if self.shuffle else self.controls
        for host, port in order:
            try:
                conn = await ClientConnection.open(host, port, self._tls(with_cert=with_cert))
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            expected = control_identity(self.identity.split("/")[2])
            if conn.peer_identity() != expected:
                conn.close()
                last = ConnectionError(
                    f"{host}:{port} is {conn.peer_identity()}, not the control plane ({expected})"
                )
                continue
            return conn
        raise ConnectionError(f"no control plane reachable: {last}")

    def _store(self, answer: dict[str, Any], key_pem: bytes) -> None:
        self.state.save("key.pem", key_pem)
        self.state.save("cert.pem", answer["certificate"].encode())
        self.state.save("chain.pem", answer["chain"].encode())
        self.state.save("bundle.pem", answer["bundle"].encode())
        self.state.key_pem = key_pem
        self.state.cert_pem = answer["certificate"].encode()
        self.state.chain_pem = answer["chain"].encode()
        self.state.bundle_pem = answer["bundle"].encode()
        self._certificate_changed()
        log.info(
            "certificate for %s, serial %s, valid until %s",
            answer["identity"],
            answer["serial"],
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(answer["not_after"])),
        )

    def credentials(self) -> tuple[bytes, bytes, bytes] | None:
        """(certificate and chain, key, trust bundle) as PEM, or None before
        the first certificate: what this proxy's TLS contexts are made of."""
        st = self.state
        if st.cert_pem and st.chain_pem and st.key_pem and st.bundle_pem:
            return st.cert_pem + st.chain_pem, st.key_pem, st.bundle_pem
        return None

    def _certificate_changed(self) -> None:
        if self.on_certificate is not None:
            try:
                self.on_certificate()
            except Exception:
                log.exception("applying the new certificate failed; the previous one stays")

    async def _join(self) -> None:
        key_pem, csr = _new_csr(self.identity)
        if self.attest_socket is not None:
            conn = await ClientConnection.open("", 0, None, unix=self.attest_socket)
            doc: dict[str, Any] = {"csr": csr.decode()}
        else:
            if self.state.token is None:
                raise RuntimeError(
                    "no valid certificate in the state directory and no join token: "
                    "create one with `meshgate token create`"
                )
            conn = await self._connect(with_cert=False)
            doc = {"token": self.state.token, "csr": csr.decode()}
        try:
            answer = await conn.request("POST", "/v1/join", doc)
        finally:
            conn.close()
        self._store(answer, key_pem)

    async def renew(self) -> None:
        """A new key and certificate, proven by the current certificate."""
        key_pem, csr = _new_csr(self.identity)
        conn = await self._connect(with_cert=True)
        try:
            answer = await conn.request("POST", "/v1/certificate", {"csr": csr.decode()})
        finally:
            conn.close()
        self._store(answer, key_pem)
        self.renewals += 1

    def next_renewal(self, now: float) -> float:
        cert = self.state.certificate()
        if cert is None:
            return now
        remaining = cert.not_valid_after_utc.timestamp() - now
        return now + max(remaining * RENEW_AT * random.uniform(0.9, 1.0), 1.0)

    async def _renew_forever(self) -> None:
        backoff = RECONNECT_BASE
        while True:
            now = time.time()
            await asyncio.sleep(max(self.next_renewal(now) - now, 0.0))
            while True:
                try:
                    if self.state.valid_until() > time.time():
                        await self.renew()
                    else:
                        await self._join()  # expired: only a token (or attestation) helps
                    backoff = RECONNECT_BASE
                    break
                except (ApiError, OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
                    log.warning("renewing the certificate failed (keeping the old one): %s", exc)
                    await asyncio.sleep(random.uniform(backoff / 2, backoff))
                    backoff = min(backoff * 2, RECONNECT_MAX)

    # -- the stream ------------------------------------------------------------------------

    def _cert_info(self) -> dict[str, Any]:
        cert = self.state.certificate()
        if cert is None:
            return {}
        return {
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": cert.not_valid_after_utc.timestamp(),
        }

    async def _stream_forever(self) -> None:
        backoff = RECONNECT_BASE
        while True:
            started = time.monotonic()
            try:
                await self._stream_once()
            except asyncio.CancelledError:
                raise
            except (ApiError, OSError, ConnectionError, TimeoutError, ValueError) as exc:
                log.warning("control plane stream: %s", exc)
            self.connected.clear()
            if time.monotonic() - started > 10:
                backoff = RECONNECT_BASE  # it was up for a while: start over
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _stream_once(self) -> None:
        conn = await self._connect(with_cert=True)
        self.stream_conn = conn
        heart: asyncio.Task[None] | None = None
        report: asyncio.Task[None] | None = None
        try:
            hello: dict[str, Any] = {
                "type": "hello",
                "proxy_id": self.state.proxy_id,
                "instance": self.instance,
                "cert": self._cert_info(),
            }
            if self.state.snapshot:
                hello["version"] = self.version
                hello["digests"] = self.state.snapshot.get("digests", {})
            stream = await conn.open_stream("/v1/stream", hello)
            self.connected.set()
            loop = asyncio.get_running_loop()
            heart = loop.create_task(self._heartbeat(stream))
            if self.reporter is not None:
                report = loop.create_task(self._report(stream, self.reporter))
            async for msg in stream.messages():
                if isinstance(msg, dict) and msg.get("type") == "snapshot":
                    self._apply(stream, msg)
            raise ConnectionError("the control plane ended the stream")
        finally:
            if heart is not None:
                heart.cancel()
            if report is not None:
                report.cancel()
            conn.close()
            self.stream_conn = None

    async def _heartbeat(self, stream: Any) -> None:
        last = time.monotonic()
        while True:
            # Every third of the current lease: the first snapshot, which comes
            # just after the hello, may shorten the default one (15 s) that
            # this stream began with, and the instance must not miss it.
            await asyncio.sleep(min(max(self.lease / 3, 0.05), 0.5))
            if time.monotonic() - last >= max(self.lease / 3, 0.05):
                stream.send({"type": "heartbeat", "cert": self._cert_info()})
                last = time.monotonic()

    async def _report(self, stream: Any, reporter: Callable[[], dict[str, Any]]) -> None:
        """Every `report_interval`, the reporter's report, on this stream
        only (it ends with the stream: nothing waits for the next one)."""
        transport = stream.conn.writer.transport
        while True:
            await asyncio.sleep(self.report_interval)
            if transport.is_closing():
                return  # the stream is going: the next one reports
            if transport.get_write_buffer_size() > 0:
                # The control plane is not reading (or the link is slow):
                # skip this one rather than queue it; the denials it would
                # have carried wait in the ring for the next one.
                self.reports["skipped"] += 1
                continue
            try:
                doc = {"type": "report", **reporter()}
                data = orjson.dumps(doc)
            except Exception:
                log.exception("making the report failed")
                continue
            if len(data) > REPORT_MAX:
                self.reports["too_large"] += 1
                if self.reports["too_large"] == 1:
                    log.warning(
                        "the report is %d bytes, past %d: sent without its samples",
                        len(data),
                        REPORT_MAX,
                    )
                data = orjson.dumps({**doc, "samples": {}})
            stream.send_encoded(data)
            self.reports["sent"] += 1

    def _apply(self, stream: Any, msg: dict[str, Any]) -> None:
        received = time.time()
        version = int(msg["version"])
        base = msg.get("base")
        if base is not None and base != self.version:
            stream.send(
                {
                    "type": "nack",
                    "version": version,
                    "reason": f"base-mismatch: have {self.version}, delta is on {base}",
                }
            )
            return
        sections = {} if base is None else self.sections
        for name, doc in msg["sections"].items():
            if doc is None:
                sections.pop(name, None)
            else:
                sections[name] = doc
        try:
            if self.on_snapshot is not None:
                self.on_snapshot(sections)
        except ValueError as exc:
            stream.send({"type": "nack", "version": version, "reason": str(exc)})
            return
        mesh = sections.get("mesh") or {}
        if isinstance(mesh.get("lease"), int | float):
            self.lease = float(mesh["lease"])
        bundle = mesh.get("bundle")
        if isinstance(bundle, str) and bundle and bundle.encode() != self.state.bundle_pem:
            # A rotation: new roots are trusted before anything they sign is
            # met, and old ones dropped only once nothing they signed lives.
            self.state.bundle_pem = bundle.encode()
            self.state.save("bundle.pem", self.state.bundle_pem)
            log.info("trust bundle updated by the control plane")
            self._certificate_changed()
        snapshot = {"version": version, "sections": sections, "digests": msg["digests"]}
        self.state.snapshot = snapshot
        self.state.save("snapshot.json", json.dumps(snapshot).encode())
        self.version = version
        changed_at = float(msg.get("changed_at") or 0.0)
        self.received.append((version, changed_at, received))
        del self.received[:-1000]
        stream.send({"type": "ack", "version": version, "changed_at": changed_at})
