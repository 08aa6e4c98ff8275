"""The dashboard on a gateway's admin listener, for the gateway alone
(`scope: "gateway"`, `docs/dashboard-api.md`): the same page and API as the
control plane's, with the same access rules (`observability.dashboard`).

- `GET /ui` and its files; `GET /ui/api/state` (`admin.gateway_state`);
  `GET /ui/events` (Server-Sent Events: a state at once, then every 2 s;
  at most `MAX_SSE_CLIENTS` per worker, 503 beyond; a client that leaves
  more than 1 MiB unread is dropped; every stream ends when the worker
  drains); `GET /ui/api/explain?method=&path=&host=&source=`: which route
  a request takes (the admin's `/explain`) and, when the route has
  `authz:`, what its policy decides for `source` (a SPIFFE ID, or none:
  plaintext); `GET /ui/api/config/diff?from=N&to=M`: a unified diff of two
  kept generations' configs, redacted as `/config` shows them.
- Access: with `admin_token:` every `/ui` request needs the bearer token,
  as the rest of the admin API (a loopback bind included: the token's
  promise is kept); without one, the listener is on loopback and answers
  loopback names only. A request from another web page (`Origin:`) is 403;
  any method but GET is 405.

The figures: every worker samples, every 2 s, the samples of all workers
added up (`peers.gather`, as `/metrics`), and keeps 16 minutes of them
(`observability.history`). Whichever worker the kernel hands a request to
(the admin port is shared) so has the same windows, and no new protocol
between workers is needed for them; the cost is one small scrape of the
others per worker every 2 s. A sample that misses a worker (it did not
answer in time) is not kept: a sum without one worker's share would read as
a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from meshgate.admin import views
from meshgate.admin.gateway_state import GatewayView, build_gateway_state
from meshgate.admin.hooks import HOOKS
from meshgate.config.authz import PLAINTEXT
from meshgate.config.schema import is_loopback
from meshgate.filters.authz import AuthzPolicy
from meshgate.observability import dashboard
from meshgate.observability.deltas import index
from meshgate.observability.exposition import REPORT_FAMILIES
from meshgate.observability.history import WINDOWS, Snapshots
from meshgate.observability.hub import MetricsHub
from meshgate.observability.peers import gather, gather_extra

if TYPE_CHECKING:
    from meshgate.protocol.h1 import ServerState

__all__ = ["DENIALS", "EventStream", "GatewayDashboard", "Reply", "is_dashboard_path"]

log = logging.getLogger("meshgate.admin")

DENIALS = "denials"
"""The name of a worker's denials among its hub's extras."""
FAMILIES = [*REPORT_FAMILIES, "meshgate_workers_scraped"]


def is_dashboard_path(path: bytes) -> bool:
    return path == b"/ui" or path.startswith(b"/ui/")


@dataclass(slots=True)
class Reply:
    """An answer made whole: its body as it is, its own headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class EventStream:
    """A Server-Sent Events answer: the listener writes its head, then runs
    it until the client leaves or the worker drains, then closes."""

    __slots__ = ("headers", "release", "run")

    def __init__(
        self,
        run: Callable[[asyncio.Transport, asyncio.Event], Awaitable[None]],
        release: Callable[[], None],
    ) -> None:
        self.run = run
        self.release = release
        """Called once, whether it ran or not (the client's slot)."""
        self.headers = tuple((k, v) for k, v in dashboard.HEADERS if k != "cache-control")


class GatewayDashboard:
    """One worker's dashboard: its sampler, its state, its SSE clients."""

    def __init__(
        self,
        hub: MetricsHub,
        *,
        bound: str,
        service: str = "gateway",
        workers: Callable[[], list[dict[str, Any]]] = list,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.bound_loopback = is_loopback(bound)
        self.service = service
        self.workers = workers
        self.clock = clock
        self.snapshots = Snapshots()
        self.clients = 0
        self.streams: set[asyncio.Event] = set()
        """Each SSE client's wake-up: set when it must end (the worker drains)."""
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self.cached: tuple[float, bytes] | None = None
        self.building: asyncio.Future[bytes] | None = None
        self.samples_skipped = 0

    # -- the sampler ----------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._sample_forever())

    def stop(self) -> None:
        """The worker drains: the sampler stops, every stream ends."""
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
        for wake in self.streams:
            wake.set()

    async def _sample_forever(self) -> None:
        while not self.stopping:
            started = self.clock()
            try:
                await self.sample()
            except Exception:
                log.exception("dashboard: a sample failed")
            await asyncio.sleep(max(dashboard.SSE_INTERVAL - (self.clock() - started), 0.1))

    async def sample(self) -> bool:
        """One snapshot of every worker's samples; False (not kept) when a
        worker did not answer."""
        samples = await gather(self.hub, FAMILIES)
        scraped = sum(row[1] for row in samples.get("meshgate_workers_scraped", []))
        if scraped < 1 + len(self.hub.peers):
            self.samples_skipped += 1
            return False
        self.snapshots.add(self.clock(), index(samples, families=REPORT_FAMILIES))
        return True

    # -- the state ------------------------------------------------------------------

    async def state(self, server: ServerState) -> dict[str, Any]:
        now = self.clock()
        windows = {name: self.snapshots.window(sec, now) for name, sec in WINDOWS.items()}
        denials: list[dict[str, Any]] = []
        for part in await gather_extra(self.hub, DENIALS):
            if isinstance(part, list):
                denials += [d for d in part if isinstance(d, dict)]
        source = HOOKS.identity
        return build_gateway_state(
            GatewayView(
                runtime=server.runtime,
                windows=windows,
                denials=denials,
                identity=source.identity if source is not None else None,
                service=self.service,
                generations=HOOKS.generations,
                workers=self.workers(),
                draining=server.draining,
            )
        )

    async def encoded_state(self, server: ServerState) -> bytes:
        """The state as JSON, built at most once per SSE interval, whoever asks."""
        cached = self.cached
        if cached is not None and self.clock() - cached[0] < dashboard.SSE_INTERVAL * 0.9:
            return cached[1]
        if self.building is not None:
            return await asyncio.shield(self.building)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.building = fut
        try:
            body = orjson.dumps(await self.state(server))
            self.cached = (self.clock(), body)
            fut.set_result(body)
            return body
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: those waiting get it, nobody else
            raise
        finally:
            self.building = None

    # -- requests -------------------------------------------------------------------

    def handle(
        self,
        server: ServerState,
        method: bytes,
        path: bytes,
        query: dict[str, list[str]],
        headers: dict[bytes, bytes],
        token: str | None,
        matches: Callable[[str | None, str], bool],
    ) -> Reply | EventStream | Awaitable[Reply]:
        """`token` is the admin token's digest in force (None: none), which
        `matches(authorization, digest)` checks."""
        text = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        refused = dashboard.refusal(
            method.decode("latin-1"),
            text,
            # The admin token, once configured, guards every path (a
            # loopback bind too), as the rest of the admin API.
            bound_loopback=self.bound_loopback and token is None,
            token=token,
            matches=matches,
        )
        if refused is not None:
            extra: tuple[tuple[str, str], ...] = ()
            if refused[0] == 405:
                extra = (("allow", "GET"),)
            elif refused[0] == 401:
                extra = (("www-authenticate", 'Bearer realm="meshgate-admin"'),)
            return _json(refused[0], {"error": refused[1]}, extra)
        arg = {k: v[0] for k, v in query.items() if v}
        name = path.decode("latin-1")
        if name == "/ui/api/state":
            return self._state_reply(server)
        if name == "/ui/events":
            return self.events(server)
        if name == "/ui/api/explain":
            return _json(*explain(server, arg))
        if name == "/ui/api/config/diff":
            return _json(*diff(arg))
        found = dashboard.static_file(name)
        if found is None:
            return _json(404, {"error": f"no such file: {name}"})
        return Reply(200, found.body, found.content_type, dashboard.HEADERS)

    async def _state_reply(self, server: ServerState) -> Reply:
        return Reply(200, await self.encoded_state(server), headers=dashboard.HEADERS)

    def events(self, server: ServerState) -> Reply | EventStream:
        if self.clients >= dashboard.MAX_SSE_CLIENTS or self.stopping:
            return _json(503, {"error": "too many dashboard clients"}, (("retry-after", "5"),))
        self.clients += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.clients -= 1

        async def run(transport: asyncio.Transport, closed: asyncio.Event) -> None:
            self.streams.add(closed)
            try:
                while not closed.is_set() and not self.stopping:
                    if transport.get_write_buffer_size() > dashboard.MAX_SSE_BUFFER:
                        log.info("a dashboard client stopped reading: dropped")
                        break
                    body = await self.encoded_state(server)
                    if closed.is_set() or transport.is_closing():
                        break
                    transport.write(b"event: state\ndata: " + body + b"\n\n")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), dashboard.SSE_INTERVAL)
            finally:
                self.streams.discard(closed)

        return EventStream(run, release)


def _json(status: int, doc: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, orjson.dumps(doc), headers=(*headers, *dashboard.HEADERS))


def explain(server: ServerState, arg: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """The admin's `/explain` as the dashboard's form asks it: which route
    `method path` (at `host`) takes, and what the route's `authz:` decides
    for `source` (a SPIFFE ID; anything else, or none, is plaintext)."""
    method = arg.get("method", "GET").upper()[:16]
    path = arg.get("path", "/")
    if not method.isascii() or not method.isalpha():
        return 400, {"error": "method= is an HTTP method: GET, POST..."}
    request = views.AdminRequest(
        b"GET",
        b"/explain",
        {"method": [method], "path": [path], "host": [arg.get("host", "")]},
    )
    status, doc = views.explain(server, request)
    if status != 200:
        return status, doc
    trace = [
        {"name": r["route"], "action": "route", "matches": r["matches"], "why": r["reason"]}
        for r in doc["routes"]
    ]
    match = doc["match"]
    source = arg.get("source", "")
    peer = source if source.startswith("spiffe://") else None
    out: dict[str, Any] = {
        "request": doc["request"],
        "generation": doc["generation"],
        "source": peer or PLAINTEXT,
        "route": match,
        "routes": trace,
        "notes": [],
        "rate_limits": match["rate_limits"] if match is not None else [],
    }
    if match is None:
        return 200, {
            **out,
            "decision": "deny",
            "policy_decision": None,
            "policy": None,
            "rule": None,
            "reason": "no route matches: the gateway answers 404",
            "trace": trace,
        }
    label = match["route"]
    route = next((r for r in server.runtime.router.routes if r.target.label == label), None)
    authz = route.config.authz if route is not None else None
    if authz is None:
        return 200, {
            **out,
            "decision": "allow",
            "policy_decision": None,
            "policy": None,
            "rule": None,
            "reason": f"route {label!r} matches; it has no authz:",
            "trace": trace,
        }
    policy = AuthzPolicy(authz, label)
    normalized = doc["request"]["path"]
    decided = policy.decide(peer, method.encode("latin-1"), normalized, ())
    rules = [
        {"name": t.name, "action": t.action, "matches": t.matched, "why": t.why}
        for t in policy.trace(peer, method.encode("latin-1"), normalized, ())
    ]
    if authz.mode == "audit":
        out["notes"].append("the policy is in audit mode: a denial is logged, not enforced")
    return 200, {
        **out,
        "decision": "allow" if decided.allowed else "deny",
        "policy_decision": decided.decision,
        "policy": label,
        "rule": decided.rule,
        "reason": decided.reason,
        "trace": rules,
    }


def _config_text(number: int) -> str | None:
    gens = HOOKS.generations
    gen = gens.find(number) if gens is not None else None
    if gen is None:
        return None
    doc = views.redact(gen.config.model_dump(mode="json"))
    return str(yaml.safe_dump(doc, sort_keys=False))


def diff(arg: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Two kept generations' configs, redacted as `/config` shows them (the
    file's own text holds the secrets `/config` hides), as a unified diff."""
    try:
        a, b = int(arg.get("from", "")), int(arg.get("to", ""))
    except ValueError:
        return 400, {"error": "diff needs from= and to=, generation numbers"}
    ta, tb = _config_text(a), _config_text(b)
    if ta is None or tb is None:
        gens = HOOKS.generations
        kept = [g.number for g in gens.kept] if gens is not None else []
        return 404, {"error": f"the kept generations are {', '.join(map(str, kept)) or 'none'}"}
    lines = difflib.unified_diff(
        ta.splitlines(keepends=True),
        tb.splitlines(keepends=True),
        fromfile=f"generation {a}",
        tofile=f"generation {b}",
    )
    return 200, {"from": a, "to": b, "diff": "".join(lines)}
