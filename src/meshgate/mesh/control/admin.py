"""The control plane's admin listener: `/metrics`, `/status`, `PUT /config`.

Plain HTTP, meant for loopback (`control.admin`). `/metrics` is the
Prometheus text format: proxies connected, config generation, NACKs,
proxies' reports taken and ignored, the metrics source's health and
failed polls (`control.metrics_source`), certificates issued and refused,
the propagation time of pushes, and each connected proxy's certificate
expiry, with `meshgate_identity_cert_expiring` at 1 when a certificate is
within 20% of its life and not yet renewed (a warning is logged once per
certificate, too). Labels are identities and proxy ids, both bounded by
what joined.

`PUT /config` takes a whole mesh.yaml as its body and makes it the next
generation, with the same validation as the file (a refusal names the line);
it needs `Authorization: Bearer <token>` from `control.admin_token_file`.
The file stays the source: its next edit makes the generation after that.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any

from meshgate.config.loader import ConfigError
from meshgate.engine.load import load_mesh_text
from meshgate.mesh.control.graph import MeshView, build_state
from meshgate.mesh.control.push import Push
from meshgate.mesh.control.state import AdminState
from meshgate.mesh.control.ui import GENERATIONS_KEPT, UiApi
from meshgate.mesh.wire import ApiError, Request, Response

__all__ = ["AdminApi", "render_metrics"]

EXPIRING_SHARE = 0.2


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render_metrics(cp: AdminState, push: Push, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        "# HELP meshgate_control_proxies_connected Proxies with a stream to this instance.",
        "# TYPE meshgate_control_proxies_connected gauge",
        f"meshgate_control_proxies_connected {len(push.streams)}",
        "# HELP meshgate_control_config_generation The mesh.yaml generation served.",
        "# TYPE meshgate_control_config_generation gauge",
        f"meshgate_control_config_generation {cp.generation}",
        "# HELP meshgate_control_snapshot_version The latest snapshot version pushed.",
        "# TYPE meshgate_control_snapshot_version gauge",
        f"meshgate_control_snapshot_version {push.version}",
        "# HELP meshgate_control_nacks_total Snapshot versions proxies refused.",
        "# TYPE meshgate_control_nacks_total counter",
        f"meshgate_control_nacks_total {push.nacks}",
        "# HELP meshgate_control_reports_total Proxies' reports: accepted, malformed (ignored),"
        " too_often (dropped unread).",
        "# TYPE meshgate_control_reports_total counter",
        *(f'meshgate_control_reports_total{{outcome="{k}"}} {n}' for k, n in push.reports.items()),
        "# HELP meshgate_control_certificates_total Certificate requests, by outcome.",
        "# TYPE meshgate_control_certificates_total counter",
        f'meshgate_control_certificates_total{{outcome="issued"}} {cp.issued}',
        f'meshgate_control_certificates_total{{outcome="refused"}} {cp.refused}',
    ]
    source = cp.metrics_source_state()
    kind = _label(str(source.get("kind")))
    up = 1 if source.get("healthy", True) else 0  # None: not asked yet
    lines += [
        "# HELP meshgate_control_metrics_source_up 1 while the dashboard's metrics source answers"
        " (the reports always do).",
        "# TYPE meshgate_control_metrics_source_up gauge",
        f'meshgate_control_metrics_source_up{{kind="{kind}"}} {up}',
        "# HELP meshgate_control_metrics_source_errors_total Polls of the metrics source that"
        " failed (Prometheus unreachable, slow, or not answering an instant vector).",
        "# TYPE meshgate_control_metrics_source_errors_total counter",
        f'meshgate_control_metrics_source_errors_total{{kind="{kind}"}} {source.get("errors", 0)}',
    ]
    lines += [
        "# HELP meshgate_control_propagation_seconds From a change to a proxy's ACK of it.",
        "# TYPE meshgate_control_propagation_seconds summary",
    ]
    recent = push.propagation[-1000:]
    for q in (0.5, 0.9, 0.99):
        lines.append(
            f'meshgate_control_propagation_seconds{{quantile="{q}"}} {_quantile(recent, q)}'
        )
    lines += [
        f"meshgate_control_propagation_seconds_sum {sum(push.propagation)}",
        f"meshgate_control_propagation_seconds_count {len(push.propagation)}",
        "# HELP meshgate_identity_cert_expiration_timestamp_seconds A proxy's certificate expiry.",
        "# TYPE meshgate_identity_cert_expiration_timestamp_seconds gauge",
    ]
    expiring = []
    for stream in sorted(push.streams, key=lambda s: s.proxy_id):
        not_after = stream.cert.get("not_after")
        not_before = stream.cert.get("not_before")
        if not isinstance(not_after, int | float):
            continue
        labels = f'identity="{_label(stream.identity)}",proxy="{_label(stream.proxy_id)}"'
        lines.append(f"meshgate_identity_cert_expiration_timestamp_seconds{{{labels}}} {not_after}")
        soon = 0
        if isinstance(not_before, int | float) and not_after > not_before:
            soon = int(not_after - now < EXPIRING_SHARE * (not_after - not_before))
        expiring.append(f"meshgate_identity_cert_expiring{{{labels}}} {soon}")
    lines += [
        "# HELP meshgate_identity_cert_expiring 1: within 20% of its life and not renewed.",
        "# TYPE meshgate_identity_cert_expiring gauge",
        *expiring,
    ]
    return "\n".join(lines) + "\n"


class AdminApi:
    def __init__(self, cp: AdminState, push: Push, bound: str = "127.0.0.1") -> None:
        self.cp = cp
        self.push = push
        self.ui = UiApi(
            self.state,
            mesh=lambda: self.cp.mesh,
            generations=lambda: self.cp.store.generations(GENERATIONS_KEPT),
            generation_text=self.cp.store.generation_text,
            token=self.token,
            bound=bound,
        )

    def token(self) -> str | None:
        """The admin token (None: no `control.admin_token_file`, or unreadable)."""
        token_file = self.cp.mesh.control.admin_token_file
        if token_file is None:
            return None
        try:
            return (
                Path(self.cp.mesh_path).resolve().parent / token_file
            ).read_text().strip() or None
        except OSError:
            return None

    def state(self) -> dict[str, Any]:
        """The dashboard's state document (`graph.build_state`)."""
        cp, store = self.cp, self.cp.store
        return build_state(
            MeshView(
                mesh=cp.mesh,
                generation=cp.generation,
                instances=store.instances(),
                streams=list(self.push.streams),
                healthy=set(self.push.healthy),
                proxies=store.proxies(),
                generations=store.generations(GENERATIONS_KEPT),
                telemetry=cp.telemetry,
                metrics_source=cp.metrics_source_state(),
            )
        )

    async def handle(self, req: Request) -> Response | None:
        if req.path == "/ui" or req.path.startswith("/ui/"):
            return await self.ui.handle(req)
        if (req.method, req.path) == ("GET", "/metrics"):
            return Response.text(
                200, render_metrics(self.cp, self.push), "text/plain; version=0.0.4"
            )
        if (req.method, req.path) == ("GET", "/status"):
            return Response(200, self._status("reports" in req.query))
        if (req.method, req.path) == ("PUT", "/config"):
            return await self._put_config(req)
        raise ApiError(404, f"no such endpoint: {req.method} {req.path}")

    def _status(self, reports: bool = False) -> dict[str, Any]:
        """`?reports`: with each proxy's latest report (large)."""
        cp, push = self.cp, self.push
        return {
            "generation": cp.generation,
            "version": push.version,
            "reports": push.reports,
            "proxies": {
                s.proxy_id: {
                    "identity": s.identity,
                    "acked_version": s.acked,
                    "cert": s.cert,
                    "nack": s.nack,
                    "reports_malformed": s.malformed,
                    **({"report": s.report} if reports else {}),
                }
                for s in push.streams
            },
        }

    async def _put_config(self, req: Request) -> Response:
        cp = self.cp
        token_file = cp.mesh.control.admin_token_file
        if token_file is None:
            raise ApiError(403, "no control.admin_token_file: the config API is off")
        path = Path(cp.mesh_path).resolve().parent / token_file
        try:
            expected = path.read_text().strip()
        except OSError:
            raise ApiError(403, "the admin token file cannot be read") from None
        given = req.headers.get("authorization", "")
        if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            raise ApiError(401, "a bearer token is needed")
        body = await req.read()
        try:
            text = body.decode("utf-8")
            mesh = load_mesh_text(text, "PUT /config", keys="'services'")
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not UTF-8 YAML") from None
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        generation = cp.apply(mesh, text, "api")
        if generation is None:
            raise ApiError(400, "refused: the trust domain changes only with a new CA")
        return Response(200, {"generation": generation})
