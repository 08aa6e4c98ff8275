"""Routes answered from whole messages rather than streamed bytes.

Most routes stream: bytes go from the client to one upstream and back as they
arrive. Two kinds of route need whole bodies instead (DESIGN.md: "a body is
buffered only when a filter asks for it"):

- `aggregate:` calls several backends and composes one JSON answer
  (`handlers.aggregate`);
- `transform:` with a JSON body mapping edits the request's or the
  response's body (`handlers.transform`).

The request's stream (`stream.ProxyStream`) reads the request body (up to the handler's `max_body`,
413 past it), runs the route's filters as usual, then hands a
`BufferedRequest` to the route's `Handler` and writes the `HandlerResponse`
it returns. Upstream calls go through `upstream.client.send`: the same
pools, balancers, breakers, retries and outlier detection as streamed
requests.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from meshgate.http.problem import problem_body

__all__ = ["BufferedRequest", "Handler", "HandlerResponse", "problem"]


class BufferedRequest:
    """A whole request, after the route's filters, as a handler sees it."""

    __slots__ = (
        "body",
        "claims",
        "client",
        "cluster",
        "consumer",
        "forward",
        "headers",
        "host",
        "method",
        "params",
        "request_id",
        "response_edits",
        "target",
    )

    def __init__(
        self,
        *,
        method: bytes,
        target: bytes,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        forward: list[tuple[bytes, bytes]],
        body: bytes,
        client: bytes,
        request_id: bytes,
        params: dict[str, str] | None,
        consumer: str | None,
        claims: dict[str, Any] | None,
        response_edits: Any,
        cluster: Any,
    ) -> None:
        self.method = method
        self.target = target
        """The upstream request target the route and its filters chose."""
        self.host = host
        self.headers = headers
        """The client's header lines, minus hop-by-hop and the headers the
        filters removed, plus the lines they added (identity headers)."""
        self.forward = forward
        """What the gateway adds to every upstream request: X-Forwarded-*,
        X-Request-Id and Via."""
        self.body = body
        self.client = client
        self.request_id = request_id
        self.params = params
        self.consumer = consumer
        self.claims = claims
        self.response_edits = response_edits
        """The response phase of the route's filters (a `filters.ResponseHook`,
        such as `filters.transform.ResponseEdits`), or None."""
        self.cluster = cluster
        """The upstream the route picked (after `split:`), for a proxied
        route; None for an aggregation."""

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class HandlerResponse:
    """A whole response; framing headers are the protocol layer's."""

    __slots__ = ("body", "headers", "local", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        local: bool = False,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.local = local
        """The gateway's own answer (a problem), not an upstream's: the
        route's status and header edits do not apply to it."""


class Handler(Protocol):
    max_body: int
    """The largest request body the handler takes (413 past it)."""

    async def handle(self, req: BufferedRequest, deadline: float) -> HandlerResponse:
        """Answer `req`; `deadline` is the loop time by which to be done."""
        ...


PROBLEM_TYPE = (b"content-type", b"application/problem+json")
JSON_TYPE = (b"content-type", b"application/json")
NO_STORE = (b"cache-control", b"no-store")


def problem(
    status: int, kind: str, detail: str, request_id: bytes, **extra: Any
) -> HandlerResponse:
    """An RFC 9457 answer from the gateway."""
    body = problem_body(status, kind, detail, request_id=request_id.decode("latin-1"), **extra)
    return HandlerResponse(status, [PROBLEM_TYPE, NO_STORE], body, local=True)


def is_json(content_type: bytes | None) -> bool:
    """`application/json`, `application/problem+json`, `text/json`, with any parameters."""
    if content_type is None:
        return False
    mime = content_type.partition(b";")[0].strip().lower()
    return mime.endswith(b"/json") or mime.endswith(b"+json")


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)
