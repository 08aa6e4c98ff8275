"""`meshgate control`: the certificate authority, the registry and the push.

One process, one mesh.yaml, an embedded store by default. Its API, over TLS
(mutual TLS for everything but joining):

- `POST /v1/join` `{token, csr}`: a join token proves the service; the CSR's
  SAN must be that service's SPIFFE ID. On the attestation socket (a unix
  socket), `{csr}` alone: the caller's uid or executable, read with
  SO_PEERCRED, proves it (SPIRE's unix workload attestor).
- `POST /v1/certificate` `{csr}`: a renewal, proven by the current
  certificate (mTLS): nothing on disk but the certificate has to outlive a
  reboot.
- `POST /v1/stream`: the proxy's long-lived stream (see `push.py`).
- `GET /v1/bundle`: the trust bundle.

Every issuance and every refusal goes to the audit log, with who asked,
for which identity, and the serial and expiry or the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshgate.config.loader import ConfigError, read_config_file
from meshgate.config.mesh import MeshConfig
from meshgate.engine.load import load_mesh, load_mesh_text
from meshgate.mesh.ca import CertificateAuthority, CsrRefused
from meshgate.mesh.control.admin import AdminApi
from meshgate.mesh.control.promsource import PrometheusSource
from meshgate.mesh.control.push import ProxyStream, Push
from meshgate.mesh.control.store import SqliteStore, Store, TokenError
from meshgate.mesh.control.telemetry import History, Telemetry
from meshgate.mesh.identity import SpiffeId
from meshgate.mesh.wire import ApiError, Request, Response, control_identity, serve_connection
from meshgate.tls.context import load_cert_chain

__all__ = ["ControlPlane"]

log = logging.getLogger("meshgate.control")


class _CallerRate:
    """Certificate requests per caller over a sliding window."""

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period
        self.seen: dict[str, collections.deque[float]] = {}

    def allow(self, caller: str, now: float) -> bool:
        q = self.seen.setdefault(caller, collections.deque())
        while q and q[0] <= now - self.period:
            q.popleft()
        if len(q) >= self.limit:
            return False
        q.append(now)
        if len(self.seen) > 10000:
            self.seen = {k: v for k, v in self.seen.items() if v}
        return True


class ControlPlane:
    """The control plane's state and API; `start` serves, `close` stops."""

    def __init__(
        self,
        mesh_path: str,
        mesh: MeshConfig,
        *,
        store: Store | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.mesh_path = mesh_path
        self.overrides = overrides or {}
        """`control:` fields the command line set (one mesh.yaml, several instances)."""
        mesh = self._override(mesh)
        self.mesh = mesh
        base = Path(mesh_path).resolve().parent
        self.state_dir = (base / mesh.control.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store: Store = store or SqliteStore(self.state_dir / "store.db")
        self.ca_dir = self.state_dir / "ca"
        self.ca = CertificateAuthority.create_embedded(self.ca_dir, mesh.trust_domain)
        self.generation = self.store.save_generation(read_config_file(mesh_path), "file")
        self.rate = _CallerRate(mesh.control.csr_rate.limit, mesh.control.csr_rate.period)
        self.push = Push(self)
        self.telemetry = Telemetry()
        """What the proxies report, for the dashboard (`/ui` on the admin listener)."""
        self.push.on_report = self._report
        self.metrics_source: PrometheusSource | None = None
        """The poller of `control.metrics_source: {prometheus: URL}`, or None
        (the reports' samples are kept)."""
        self.servers: list[asyncio.base_events.Server] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.mtime = os.stat(mesh_path).st_mtime_ns
        self.ctx: ssl.SSLContext | None = None
        self.current: ssl.SSLContext | None = None
        self.ca_stamp: tuple[int, ...] = ()
        self.cert_renew_at = 0.0
        self.port = 0
        self.admin_port = 0
        self.issued = 0
        self.refused = 0

    def _override(self, mesh: MeshConfig) -> MeshConfig:
        if not self.overrides:
            return mesh
        control = mesh.control.model_copy(update=self.overrides)
        return mesh.model_copy(update={"control": control})

    # -- serving --------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ctx = self.current = self._server_context()
        # Each handshake switches to the current context (a new trust bundle,
        # a new certificate of its own): new connections get it, and the
        # listener never restarts.
        self.ctx.sni_callback = self._pick_context
        self.ca_stamp = self._ca_stamp()
        listen = self.mesh.control.listen
        server = await asyncio.start_server(
            self._tls_client, listen.host, listen.port, ssl=self.ctx, backlog=1024
        )
        self.port = server.sockets[0].getsockname()[1]
        self.servers.append(server)
        att = self.mesh.attestation
        if att is not None:
            path = Path(att.socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            unix = await asyncio.start_unix_server(self._unix_client, str(path))
            os.chmod(path, 0o666)  # any local process may ask; SO_PEERCRED says who it is
            self.servers.append(unix)
        self.push.start()
        self._sync_metrics_source()
        admin = self.mesh.control.admin
        if admin is not None:
            api = AdminApi(self, self.push, admin.host)
            adm = await asyncio.start_server(
                lambda r, w: serve_connection(r, w, api.handle), admin.host, admin.port
            )
            self.admin_port = adm.sockets[0].getsockname()[1]
            self.servers.append(adm)
            log.info("control plane admin on %s:%d", admin.host, self.admin_port)

        def notify(what: str) -> None:
            loop.call_soon_threadsafe(self._remote_change, what)

        self.store.subscribe(notify)
        self.tasks.append(loop.create_task(self._watch_config()))
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info(
            "control plane for %s on %s:%d (generation %d, %d services, store %s)",
            self.mesh.trust_domain,
            listen.host,
            self.port,
            self.generation,
            len(self.mesh.services),
            self.mesh.control.store,
        )

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        await self.push.close()
        if self.metrics_source is not None:
            await self.metrics_source.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.store.close()

    def _server_context(self) -> ssl.SSLContext:
        """TLS 1.3; a client certificate is verified against the bundle when
        given (joining needs none)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=self.ca.bundle_pem.decode())
        self._load_own_certificate(ctx)
        return ctx

    def _load_own_certificate(self, ctx: ssl.SSLContext) -> None:
        """The control plane's own certificate, issued here from a key made
        in this process; new handshakes use it, streams keep theirs."""
        key = ec.generate_private_key(ec.SECP256R1())
        identity = control_identity(self.mesh.trust_domain)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate")]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        issued = self.ca.sign_workload(
            csr.public_bytes(serialization.Encoding.PEM),
            SpiffeId.parse(identity),
            lifetime=self.mesh.control.certificate_lifetime,
        )
        lifetime = (issued.not_after - issued.not_before).total_seconds()
        self.cert_renew_at = time.time() + lifetime / 2
        load_cert_chain(
            ctx,
            issued.cert_pem + issued.chain_pem,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    async def _tls_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(reader, writer, self._handle)

    async def _unix_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        await serve_connection(reader, writer, self._handle_attested, peer=(pid, uid, gid))

    async def _handle(self, req: Request) -> Response | None:
        route = (req.method, req.path)
        if route == ("POST", "/v1/join"):
            return await self._join(req)
        if route == ("POST", "/v1/certificate"):
            return await self._renew(req)
        if route == ("POST", "/v1/stream"):
            await self.push.serve(req)
            return None
        if route == ("GET", "/v1/bundle"):
            return Response(200, {"bundle": self.ca.bundle_pem.decode()})
        raise ApiError(404, f"no such endpoint: {req.method} {req.path}")

    async def _handle_attested(self, req: Request) -> Response | None:
        if (req.method, req.path) != ("POST", "/v1/join"):
            raise ApiError(404, "the attestation socket answers POST /v1/join only")
        pid, uid, _ = req.peer
        service = self._attest(pid, uid)
        doc = await req.json()
        caller = f"uid:{uid} pid:{pid}"
        if service is None:
            self.store.audit("refused", caller=caller, method="attestation", reason="no rule")
            raise ApiError(403, f"no attestation rule matches uid {uid} (pid {pid})")
        return self._issue(doc, self.mesh.identity(service), caller, "attestation")

    def _attest(self, pid: int, uid: int) -> str | None:
        att = self.mesh.attestation
        if att is None:
            return None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        for rule in att.rules:
            if rule.uid is not None and rule.uid == uid:
                return rule.service
            if rule.exe is not None and exe is not None and os.path.realpath(rule.exe) == exe:
                return rule.service
        return None

    # -- certificates ------------------------------------------------------------------

    async def _join(self, req: Request) -> Response:
        doc = await req.json()
        token = doc.get("token") if isinstance(doc, dict) else None
        caller = f"{req.peer[0] if req.peer else '?'}"
        if not isinstance(token, str):
            raise ApiError(400, "a join needs {token, csr}")
        try:
            record = self.store.check_token(token)
        except TokenError as exc:
            self.store.audit("refused", caller=caller, method="token", reason=str(exc))
            raise ApiError(401, str(exc)) from None
        caller = f"token:{record.token_id}"
        response = self._issue(doc, self.mesh.identity(record.service), caller, "token")
        if record.single_use:
            self.store.use_token(record.token_id)
        return response

    async def _renew(self, req: Request) -> Response:
        if req.identity is None:
            raise ApiError(401, "a renewal is proven by a current certificate (mutual TLS)")
        doc = await req.json()
        return self._issue(doc, req.identity, f"cert:{req.identity}", "renewal")

    def _issue(self, doc: Any, identity: str, caller: str, method: str) -> Response:
        csr = doc.get("csr") if isinstance(doc, dict) else None
        if not isinstance(csr, str):
            raise ApiError(400, "the request carries no csr")
        if not self.rate.allow(caller, time.monotonic()):
            self.store.audit("refused", caller=caller, identity=identity, reason="rate limited")
            raise ApiError(429, "too many certificate requests from this caller")
        try:
            issued = self.ca.sign_workload(
                csr.encode(),
                SpiffeId.parse(identity),
                lifetime=self.mesh.control.certificate_lifetime,
            )
        except CsrRefused as exc:
            self.store.audit(
                "refused", caller=caller, identity=identity, method=method, reason=exc.reason
            )
            self.refused += 1
            log.warning("refused a CSR from %s for %s: %s", caller, identity, exc.reason)
            raise ApiError(400, exc.reason) from None
        self.issued += 1
        self.store.audit(
            "issued",
            caller=caller,
            identity=identity,
            method=method,
            serial=format(issued.serial, "x"),
            not_after=issued.not_after.timestamp(),
        )
        return Response(
            200,
            {
                "identity": identity,
                "certificate": issued.cert_pem.decode(),
                "chain": issued.chain_pem.decode(),
                "bundle": self.ca.bundle_pem.decode(),
                "serial": format(issued.serial, "x"),
                "not_after": issued.not_after.timestamp(),
            },
        )

    # -- config generations ---------------------------------------------------------------

    def _pick_context(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        current = self.current
        if current is not None and current is not ctx:
            sslobj.context = current

    def _ca_stamp(self) -> tuple[int, ...]:
        stamps = []
        for name in ("bundle.pem", "intermediate.pem"):
            try:
                stamps.append(os.stat(self.ca_dir / name).st_mtime_ns)
            except OSError:
                stamps.append(0)
        return tuple(stamps)

    def _trust_changed(self, why: str) -> None:
        """The bundle or the signing intermediate changed: new handshakes use
        them, and every proxy is pushed the bundle."""
        self.current = self._server_context()
        self.ca_stamp = self._ca_stamp()
        log.info(
            "trust bundle (%s): %d root(s), signing with %s",
            why,
            len(self.ca.roots),
            self.ca.intermediate.subject.rfc4514_string(),
        )
        self.push.changed(why)

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._tick()
            except Exception:
                log.exception("the control plane's periodic checks failed")

    def _tick(self) -> None:
        with contextlib.suppress(OSError):
            mtime = os.stat(self.mesh_path).st_mtime_ns
            if mtime != self.mtime:
                self.mtime = mtime
                self.reload()
        stamp = self._ca_stamp()
        if stamp != self.ca_stamp:
            # `meshgate trust` changed the CA's files: load them.
            self.ca = CertificateAuthority.load(self.ca_dir)
            self._trust_changed("trust bundle changed")
        dropped = self.ca.retire_roots()
        if dropped:
            self._trust_changed(f"retired root(s) {', '.join(fp[:16] for fp in dropped)}")
        if self.cert_renew_at and time.time() >= self.cert_renew_at:
            self.current = self._server_context()
        self._sync_metrics_source()
        if self.telemetry.proxies:
            self._forget_gone()

    def _sync_metrics_source(self) -> None:
        """Run the poller `control.metrics_source` asks for (a reload may
        change it). A change of source starts the windows afresh: the
        histories of one are not those of the other (a gateway's workers
        report one by one, and are one Prometheus target)."""
        cfg = self.mesh.control.metrics_source
        running = self.metrics_source
        if (running.cfg if running is not None else None) == cfg:
            return
        if running is not None and running.task is not None:
            running.task.cancel()
        if running is not None or self.telemetry.proxies:
            self.telemetry.proxies.clear()
        self.metrics_source = None
        if cfg is not None:
            self.metrics_source = PrometheusSource(cfg, self.telemetry, lambda: self.push.streams)
            self.metrics_source.start()
        else:
            log.info("metrics source: the proxies' reports")

    def metrics_source_state(self) -> dict[str, Any]:
        """The state's `metrics_source`: where the numbers come from, and
        whether that works."""
        if self.metrics_source is None:
            return {"kind": "reports"}
        return self.metrics_source.doc()

    def _report(self, stream: ProxyStream, msg: dict[str, Any]) -> None:
        try:
            if self.metrics_source is not None:
                # The numbers are Prometheus's; the denials only the proxy has.
                self.telemetry.add_denials(stream.proxy_id, stream.service, msg.get("denials"))
                return
            self.telemetry.add(
                stream.proxy_id,
                stream.service,
                stream.identity,
                msg,
                instance=stream.instance_id is not None,
            )
        except Exception:
            log.exception("a report of proxy %s could not be read", stream.proxy_id)

    def _forget_gone(self) -> None:
        """Drop the reports of proxies gone for good: a proxy's history stays
        while it streams or its instance is registered (the registry removes
        an instance three leases after its last heartbeat); a proxy without
        an instance (a gateway), for three leases after its last report."""
        live = {s.proxy_id for s in self.push.streams}
        registered = {i.instance_id for i in self.store.instances()}
        now, grace = self.telemetry.clock(), 3 * self.mesh.control.lease

        def keep(hist: History) -> bool:
            if hist.proxy_id in live:
                return True
            if hist.instance:
                return hist.proxy_id in registered
            return now - hist.last < grace

        self.telemetry.forget(keep)

    def _remote_change(self, what: str) -> None:
        """Another control-plane instance changed the shared store."""
        if what == "generation":
            latest = self.store.generations(1)
            if latest and latest[0]["generation"] != self.generation:
                text = self.store.generation_text(latest[0]["generation"])
                if text is not None:
                    try:
                        mesh = load_mesh_text(text, self.mesh_path, keys="'services'")
                    except ConfigError as exc:
                        log.error("a generation from the store is refused: %s", exc)
                        return
                    self.mesh = self._override(mesh)
                    self.generation = latest[0]["generation"]
        self.push.changed(f"remote {what}")

    def reload(self) -> bool:
        """Load mesh.yaml again: a new generation, or the running one kept."""
        try:
            mesh = self._override(load_mesh(self.mesh_path))
            text = read_config_file(self.mesh_path)
        except ConfigError as exc:
            log.error(
                "%s: refused, generation %d keeps serving\n%s", self.mesh_path, self.generation, exc
            )
            self.store.audit("generation-refused", reason=str(exc))
            return False
        return self.apply(mesh, text, "file") is not None

    def apply(self, mesh: MeshConfig, text: str, source: str) -> int | None:
        """Serve a validated mesh config as the next generation (None: refused)."""
        mesh = self._override(mesh)
        if mesh.trust_domain != self.mesh.trust_domain:
            log.error(
                "%s: refused: the trust domain changes only with a new CA (%s -> %s)",
                source,
                self.mesh.trust_domain,
                mesh.trust_domain,
            )
            return None
        generation = self.store.save_generation(text, source)
        if generation == self.generation:
            return generation
        self.mesh = mesh
        self.generation = generation
        log.info("%s: generation %d", self.mesh_path if source == "file" else source, generation)
        self.push.changed("generation")
        return generation
