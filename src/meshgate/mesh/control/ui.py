"""The dashboard on the control plane's admin listener: the page, its state,
its live updates, `mesh explain`, and diffs between config generations.

- `GET /ui` (and `/ui/app.js`, `/ui/app.css`, `/ui/vendor/*`): the page,
  from the package's `ui/` directory (`observability.dashboard`);
- `GET /ui/api/state`: the state document (`graph.build_state`);
- `GET /ui/events`: Server-Sent Events, `event: state` at once and every
  2 s; at most `MAX_SSE_CLIENTS` at a time (503 beyond), and a client that
  leaves more than 1 MiB unread is dropped;
- `GET /ui/api/explain?source=&destination=&method=&path=`: what `meshgate
  mesh explain` says;
- `GET /ui/api/config/diff?from=N&to=M`: a unified diff of two of the last
  10 generations' mesh.yaml.

Read-only; access as `observability.dashboard.refusal` says (loopback by
default; a non-loopback admin bind needs `control.admin_token_file`'s token).
One state is built per 2 s at most, whoever asks.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from meshgate.config.schema import is_loopback
from meshgate.mesh.explain import ExplainError, explain_request
from meshgate.mesh.wire import ApiError, Request, Response
from meshgate.observability import dashboard

__all__ = ["GENERATIONS_KEPT", "UiApi"]

log = logging.getLogger("meshgate.control")

GENERATIONS_KEPT = 10


class UiApi:
    def __init__(
        self,
        state: Callable[[], dict[str, Any]],
        *,
        mesh: Callable[[], Any],
        generations: Callable[[], list[dict[str, Any]]],
        generation_text: Callable[[int], str | None],
        token: Callable[[], str | None],
        bound: str,
    ) -> None:
        self.state = state
        self.mesh = mesh
        self.generations = generations
        self.generation_text = generation_text
        self.token = token
        self.bound_loopback = is_loopback(bound)
        self.clients = 0
        self.cached: tuple[float, bytes] | None = None

    def encoded_state(self) -> bytes:
        """The state as JSON, built at most once per SSE interval."""
        now = time.monotonic()
        cached = self.cached
        if cached is not None and now - cached[0] < dashboard.SSE_INTERVAL * 0.9:
            return cached[1]
        body = orjson.dumps(self.state())
        self.cached = (now, body)
        return body

    async def handle(self, req: Request) -> Response | None:
        refused = dashboard.refusal(
            req.method, req.headers, bound_loopback=self.bound_loopback, token=self.token()
        )
        if refused is not None:
            resp = Response(refused[0], {"error": refused[1]})
            if refused[0] == 405:
                resp.headers = (("allow", "GET"),)
            elif refused[0] == 401:
                resp.headers = (("www-authenticate", 'Bearer realm="meshgate-control"'),)
            return resp
        path = req.path
        if path == "/ui/api/state":
            resp = Response(200, None)
            resp.body = self.encoded_state()
        elif path == "/ui/events":
            return await self.events(req)
        elif path == "/ui/api/explain":
            resp = Response(200, self.explain(req.query))
        elif path == "/ui/api/config/diff":
            resp = Response(200, self.diff(req.query))
        else:
            found = dashboard.static_file(path)
            if found is None:
                raise ApiError(404, f"no such file: {path}")
            resp = Response(200, None)
            resp.body, resp.content_type = found.body, found.content_type
        resp.headers = (*resp.headers, *dashboard.HEADERS)
        return resp

    async def events(self, req: Request) -> Response | None:
        if self.clients >= dashboard.MAX_SSE_CLIENTS:
            resp = Response(503, {"error": "too many dashboard clients"})
            resp.headers = (("retry-after", "5"),)
            return resp
        self.clients += 1
        try:
            req.start_events(dashboard.HEADERS)
            transport = req.writer.transport
            while not req.writer.is_closing():
                body = self.encoded_state()
                if transport.get_write_buffer_size() > dashboard.MAX_SSE_BUFFER:
                    log.info("a dashboard client stopped reading: dropped")
                    break
                req.writer.write(b"event: state\ndata: " + body + b"\n\n")
                try:
                    await asyncio.wait_for(req.closed.wait(), dashboard.SSE_INTERVAL)
                    break  # the client went away
                except TimeoutError:
                    pass
        finally:
            self.clients -= 1
        return None

    def explain(self, query: dict[str, str]) -> dict[str, Any]:
        source, target = query.get("source", ""), query.get("destination", "")
        if not source or not target:
            raise ApiError(400, "explain needs source= and destination=")
        try:
            doc = explain_request(
                self.mesh(), source, target, query.get("method", "GET"), query.get("path", "/")
            )
        except ExplainError as exc:
            raise ApiError(
                400, str(exc).replace("--from", "source").replace("--to", "destination")
            ) from None
        doc.pop("who", None)
        doc["policy"] = f"inbound/{target}"
        doc["trace"] = doc.pop("rules")
        doc["policy_decision"] = doc["decision"]
        doc["decision"] = "allow" if doc["allowed"] else "deny"
        return doc

    def diff(self, query: dict[str, str]) -> dict[str, Any]:
        kept = [g["generation"] for g in self.generations()[:GENERATIONS_KEPT]]
        try:
            a, b = int(query.get("from", "")), int(query.get("to", ""))
        except ValueError:
            raise ApiError(400, "diff needs from= and to=, generation numbers") from None
        if a not in kept or b not in kept:
            raise ApiError(404, f"the last generations are {', '.join(map(str, kept))}")
        ta = _redacted(self.generation_text(a) or "")
        tb = _redacted(self.generation_text(b) or "")
        lines = difflib.unified_diff(
            ta.splitlines(keepends=True),
            tb.splitlines(keepends=True),
            fromfile=f"generation {a}",
            tofile=f"generation {b}",
        )
        return {"from": a, "to": b, "diff": "".join(lines)}


_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s'\"]*@", re.IGNORECASE)


def _redacted(text: str) -> str:
    """A mesh.yaml with the credentials of its URLs hidden (a Redis password)."""
    return _CREDENTIALS.sub(r"\1<redacted>@", text)
