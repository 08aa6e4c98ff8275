"""`aggregate:` routes: one client request, several backend calls, one JSON answer.

The plan is compiled at config load. Each backend's path is a template of
literal text and placeholders: `{id}` or `{path.id}` (a path parameter of
the route), `{query.<name>}`, `{header.<name>}`, and `{<group>.<field>...}`,
a field of another backend's result. A backend that names another group waits for it;
the others start at once, so independent calls run concurrently and a chain
`order -> customer` runs in two steps. Cycles, unknown groups and unknown
parameters are refused at load.

Failures follow one policy (what KrakenD's users ask for):

- a required backend that fails (connection, timeout, 5xx, a body that is
  not JSON) fails the whole answer: 502 problem naming it. A required
  backend that answers 4xx passes that status on (an order that does not
  exist is a 404, not a gateway error);
- an optional backend that fails is left out; its RFC 9457 problem object
  goes in the `errors` array (`errors_key`) and the response carries
  `Meshgate-Partial: true`. Backends that depend on it fail the same way.

Every call ends by the aggregation's deadline (`timeout`, or the client's own
deadline when sooner); each has its own `timeout` inside it.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from meshgate.handlers import (
    JSON_TYPE,
    BufferedRequest,
    HandlerResponse,
    is_json,
    problem,
)
from meshgate.handlers.transform import apply_edits
from meshgate.http.headers import phrase
from meshgate.http.paths import route_params
from meshgate.http.problem import PROBLEM_BASE
from meshgate.transform.jsonmap import MISSING, NotJson, encode, lookup, parse_pointer, path_of
from meshgate.upstream.client import UpstreamFailure, send

if TYPE_CHECKING:
    from meshgate.config.schema import AggregateBackend, AggregateConfig
    from meshgate.transform.jsonmap import JsonMap
    from meshgate.upstream.cluster import Cluster

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TARGET_TEXT = re.compile(r"[\x21-\x7e]*")
PARTIAL = (b"meshgate-partial", b"true")
# Pieces of a compiled path template.
_LIT, _PARAM, _QUERY, _HEADER, _REF = range(5)


class _Failed(Exception):
    """One backend call failed; carries its problem object."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


class _Step:
    """One backend, compiled."""

    __slots__ = (
        "calls_failed",
        "calls_ok",
        "cluster",
        "deps",
        "encoding",
        "group",
        "index",
        "method",
        "name",
        "pieces",
        "required",
        "target",
        "timeout",
    )

    def __init__(
        self,
        index: int,
        cfg: AggregateBackend,
        cluster: Cluster | None,
        params: frozenset[str],
        where: str,
    ) -> None:
        self.index = index
        self.cluster = cluster
        self.calls_ok = self.calls_failed = 0
        self.method = cfg.method.encode("ascii")
        self.group = cfg.group
        self.name = cfg.group or f"{cfg.upstream}#{index}"
        self.required = cfg.required
        self.timeout = cfg.timeout
        self.encoding = cfg.encoding
        self.target = parse_pointer(cfg.target, where, "target") if cfg.target is not None else None
        self.deps: set[int] = set()
        pieces: list[tuple[int, Any]] = []
        pos = 0
        text = cfg.path
        for m in _PLACEHOLDER.finditer(text):
            if m.start() > pos:
                pieces.append((_LIT, text[pos : m.start()]))
            pos = m.end()
            name = m.group(1).strip()
            head, dot, rest = name.partition(".")
            if head == "path" and dot:
                name, dot = rest, ""  # `{path.id}`, as transform templates write it
            if not dot:
                if name not in params:
                    known = ", ".join(sorted(params)) or "none"
                    raise ValueError(
                        f"{where}.path: {{{name}}} is not a parameter of the route's path "
                        f"(its parameters: {known})"
                    )
                pieces.append((_PARAM, name))
            elif not rest:
                raise ValueError(f"{where}.path: {{{name}}} names no field")
            elif head == "query":
                pieces.append((_QUERY, rest))
            elif head == "header":
                pieces.append((_HEADER, rest.lower().encode("latin-1")))
            else:
                pieces.append((_REF, (head, path_of(tuple(rest.split("."))))))
        if pos < len(text):
            pieces.append((_LIT, text[pos:]))
        literal = "".join(p for k, p in pieces if k == _LIT)
        if "{" in literal or "}" in literal:
            raise ValueError(f"{where}.path: unbalanced '{{' or '}}' in {text!r}")
        if not _TARGET_TEXT.fullmatch(literal):
            raise ValueError(
                f"{where}.path: {text!r} has characters a request target cannot hold "
                "(spaces, controls or non-ASCII: percent-encode them)"
            )
        self.pieces = tuple(pieces)

    def refs(self) -> list[str]:
        return [p[1][0] for p in self.pieces if p[0] == _REF]

    def render(self, req: BufferedRequest, query: dict[str, str], results: dict[str, Any]) -> bytes:
        out: list[str] = []
        for kind, value in self.pieces:
            if kind == _LIT:
                out.append(value)
                continue
            if kind == _PARAM:
                got = (req.params or {}).get(value)
                if got is None:
                    raise _Failed(502, "aggregate-template", f"no path parameter {value!r}")
                out.append(got)
                continue
            if kind == _QUERY:
                qv = query.get(value)
                if qv is None:
                    raise _Failed(
                        400, "aggregate-missing-input", f"the query parameter {value!r} is missing"
                    )
                out.append(urllib.parse.quote(qv, safe=""))
                continue
            if kind == _HEADER:
                hv = req.header(value)
                if hv is None:
                    raise _Failed(
                        400,
                        "aggregate-missing-input",
                        f"the header {value.decode('latin-1')!r} is missing",
                    )
                out.append(urllib.parse.quote_from_bytes(hv, safe=""))
                continue
            group, fields = value
            field = lookup(results.get(group), fields)
            if field is MISSING or isinstance(field, dict | list | bool) or field is None:
                where = group + "." + ".".join(name for name, _ in fields)
                raise _Failed(
                    502,
                    "aggregate-missing-field",
                    f"{where} is not a string or number in the {group!r} result",
                )
            out.append(urllib.parse.quote(str(field), safe=""))
        target = "".join(out)
        if "." in target and any(seg in (".", "..") for seg in target.partition("?")[0].split("/")):
            # quote() keeps dots: a value `..` would climb the backend's tree.
            raise _Failed(
                400, "aggregate-bad-input", "a value would make a '.' or '..' path segment"
            )
        return target.encode("latin-1")


def check_plan(cfg: AggregateConfig, route_path: str) -> None:
    """Refuse a plan that cannot run (unknown parameters or groups, a cycle):
    ValueError naming the field. Called after the config's validation, by
    `meshgate.engine.load`."""
    Aggregator(cfg, None, route_path, "")


class Aggregator:
    """A compiled `aggregate:` route; a `Handler`."""

    def __init__(
        self,
        cfg: AggregateConfig,
        clusters: Mapping[str, Cluster] | None,
        route_path: str,
        where: str,
        *,
        max_body: int = 64 * 1024,
        response_map: JsonMap | None = None,
        always: frozenset[bytes] = frozenset(),
    ) -> None:
        self.max_body = max_body
        self.response_map = response_map
        self.label = where.rstrip(".")
        # Counters for /metrics: answers by outcome, calls per backend.
        self.complete = self.partial = self.failed = 0
        self.timeout = cfg.timeout
        self.errors_key = cfg.errors_key
        # Headers the gateway itself sets (auth's X-Consumer and claim
        # headers, the route's transform) always go: a client's own copies
        # were dropped before.
        self.forward = frozenset(h.encode("latin-1") for h in cfg.forward_headers) | always
        params = route_params(route_path)
        steps = [
            _Step(
                i,
                b,
                clusters[b.upstream] if clusters is not None else None,
                params,
                f"{where}aggregate.backends[{i}]",
            )
            for i, b in enumerate(cfg.backends)
        ]
        by_group = {s.group: s for s in steps if s.group is not None}
        for s in steps:
            for g in s.refs():
                dep = by_group.get(g)
                if dep is None:
                    known = ", ".join(sorted(by_group)) or "none"
                    raise ValueError(
                        f"{where}aggregate.backends[{s.index}].path: {{{g}.…}} names no "
                        f"backend's group (groups: {known})"
                    )
                if dep is s:
                    raise ValueError(
                        f"{where}aggregate.backends[{s.index}].path: a backend cannot use "
                        "its own result"
                    )
                s.deps.add(dep.index)
        # Refuse cycles: peel off steps whose dependencies are all placed.
        placed: set[int] = set()
        while len(placed) < len(steps):
            ready = [s.index for s in steps if s.index not in placed and s.deps <= placed]
            if not ready:
                names = ", ".join(s.name for s in steps if s.index not in placed)
                raise ValueError(
                    f"{where}aggregate.backends: these backends depend on each other "
                    f"in a cycle: {names}"
                )
            placed.update(ready)
        self.steps = tuple(steps)
        self.dependents: dict[int, tuple[_Step, ...]] = {
            s.index: tuple(t for t in steps if s.index in t.deps) for s in steps
        }
        self.roots = tuple(s for s in steps if not s.deps)

    # -- per request ------------------------------------------------------------

    async def handle(self, req: BufferedRequest, deadline: float) -> HandlerResponse:
        resp = await self._aggregate(req, deadline)
        if self.response_map is not None and resp.status == 200:
            resp.body = self.response_map.map_bytes(resp.body)
        return apply_edits(resp, req.response_edits)

    async def _aggregate(self, req: BufferedRequest, deadline: float) -> HandlerResponse:
        loop = asyncio.get_running_loop()
        end = min(deadline, loop.time() + self.timeout)
        _, _, query_s = req.target.partition(b"?")
        query = (
            dict(urllib.parse.parse_qsl(query_s.decode("latin-1"), keep_blank_values=True))
            if query_s
            else {}
        )
        forward = self.forward
        headers = [h for h in req.headers if h[0] in forward]
        headers += req.forward
        headers.append((b"accept", b"application/json"))
        results: dict[str, Any] = {}
        values: dict[int, Any] = {}
        failures: dict[int, _Failed] = {}
        running: dict[asyncio.Task[Any], _Step] = {}

        def launch(step: _Step) -> None:
            for d in step.deps:
                if d in failures:
                    dep = self.steps[d]
                    failures[step.index] = _Failed(
                        502,
                        "aggregate-dependency-failed",
                        f"it needs the {dep.name!r} result, which failed",
                    )
                    return
            try:
                target = step.render(req, query, results)
            except _Failed as exc:
                failures[step.index] = exc
                return
            task = loop.create_task(self._call(step, target, headers, req, end))
            running[task] = step

        def settle(step: _Step) -> None:
            # Start what now has all it needs; propagate failures.
            for t in self.dependents[step.index]:
                if t.index in values or t.index in failures:
                    continue
                if any(d in failures for d in t.deps) or all(d in values for d in t.deps):
                    launch(t)
                    if t.index in failures:
                        settle(t)

        for step in self.roots:
            launch(step)
            if step.index in failures:
                settle(step)
        try:
            failed = self._required_failure(failures)
            if failed is not None:
                return self._required_failed(failed, failures[failed.index], req)
            while running:
                left = end - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait(
                    running, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
                for task in done:
                    step = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        step.calls_ok += 1
                        values[step.index] = task.result()
                        if step.group is not None:
                            results[step.group] = values[step.index]
                    elif isinstance(exc, _Failed):
                        step.calls_failed += 1
                        failures[step.index] = exc
                    else:
                        raise exc
                    settle(step)
                    failed = self._required_failure(failures)
                    if failed is not None:
                        return self._required_failed(failed, failures[failed.index], req)
        finally:
            for task in running:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # read, so asyncio does not log it as lost
        late = _Failed(
            504, "aggregate-timeout", f"no answer within the aggregation's {self.timeout:g}s"
        )
        for step in self.steps:
            if step.index not in values and step.index not in failures:
                failures[step.index] = late
        for step in self.steps:
            if step.required and step.index in failures:
                return self._required_failed(step, failures[step.index], req)
        return self._compose(values, failures, req)

    async def _call(
        self,
        step: _Step,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        req: BufferedRequest,
        end: float,
    ) -> Any:
        cluster = step.cluster
        assert cluster is not None
        loop = asyncio.get_running_loop()
        left = end - loop.time()
        timeout = min(left, step.timeout) if step.timeout is not None else left
        if timeout <= 0:
            raise _Failed(504, "aggregate-timeout", "no time was left for this call")
        try:
            resp = await send(cluster, step.method, target, headers, host=req.host, timeout=timeout)
        except UpstreamFailure as exc:
            raise _Failed(exc.status, exc.kind, exc.detail) from None
        except ValueError as exc:  # a header or target the client made unsendable
            raise _Failed(400, "bad-request", str(exc)) from None
        if resp.status >= 300:
            raise _Failed(
                resp.status if resp.status < 500 else 502,
                "backend-status",
                f"{cluster.name} answered {resp.status}",
            )
        if step.encoding == "string":
            value: Any = resp.body.decode("utf-8", "replace")
        else:
            ctype = resp.header(b"content-type")
            if resp.body and ctype is not None and not is_json(ctype):
                raise _Failed(
                    502,
                    "backend-not-json",
                    f"{cluster.name} answered {ctype.decode('latin-1')!r}, not JSON "
                    "(set encoding: string to use it as text)",
                )
            try:
                value = orjson.loads(resp.body) if resp.body else None
            except orjson.JSONDecodeError:
                raise _Failed(
                    502, "backend-not-json", f"{cluster.name} answered invalid JSON"
                ) from None
        if step.target is not None:
            value = lookup(value, step.target)
            if value is MISSING:
                raise _Failed(
                    502,
                    "aggregate-missing-field",
                    f"{cluster.name}'s answer has nothing at the target pointer",
                )
        if step.group is None and not isinstance(value, dict):
            raise _Failed(
                502,
                "aggregate-not-object",
                f"{cluster.name}'s answer is merged at the top level but is not an object",
            )
        return value

    def _required_failure(self, failures: dict[int, _Failed]) -> _Step | None:
        for index in failures:
            step = self.steps[index]
            if step.required:
                return step
        return None

    def _required_failed(
        self, step: _Step, failure: _Failed, req: BufferedRequest
    ) -> HandlerResponse:
        self.failed += 1
        status = failure.status if 400 <= failure.status < 500 else 502
        return problem(
            status,
            failure.kind if status < 500 else "aggregate-backend-failed",
            f"required backend {step.name!r} failed: {failure.detail}",
            req.request_id,
            backend=step.name,
        )

    def _compose(
        self, values: dict[int, Any], failures: dict[int, _Failed], req: BufferedRequest
    ) -> HandlerResponse:
        doc: dict[str, Any] = {}
        for step in self.steps:
            if step.index not in values:
                continue
            value = values[step.index]
            if step.group is None:
                doc.update(value)
            else:
                doc[step.group] = value
        headers = [JSON_TYPE]
        if failures:
            doc[self.errors_key] = [
                {
                    "type": PROBLEM_BASE + f.kind,
                    "title": phrase(f.status),
                    "status": f.status,
                    "detail": f.detail,
                    "backend": self.steps[i].name,
                }
                for i, f in sorted(failures.items())
            ]
            headers.append(PARTIAL)
            self.partial += 1
        else:
            self.complete += 1
        try:
            body = encode(doc)  # a backend's document may nest deeper than orjson encodes
        except NotJson as exc:
            return problem(502, "backend-not-json", str(exc), req.request_id)
        return HandlerResponse(200, headers, body)
