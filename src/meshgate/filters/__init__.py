"""The filter chain a route runs before its request goes upstream.

Each route holds a tuple of filters, compiled at config load (DESIGN.md,
"FilterManager"). A filter is called with the request's `FilterRequest` and
returns one of three things:

- `None`: carry on with the next filter;
- a `LocalReply`: answer from the gateway, nothing goes upstream;
- a coroutine: the filter must wait (Redis, a JWKS refetch); the chain goes
  on once it resolves.

Unlike a fixed "sync or async" flag per filter, the choice is made per
request: a JWT filter with a JWKS verifies synchronously from its cached
keys, and awaits only for a token whose key id it has never seen. A request
on a route whose filters all answer synchronously never touches the event
loop's task machinery.

What filters change is collected on the request (headers to add and remove,
a new request target, response header lines) and applied once, when the chain is
done, by the request's stream (`stream.ProxyStream`).

The response phase: a filter that edits the response registers a
`ResponseHook` on the request (`FilterRequest.on_response`). The stream runs
the hooks on the upstream's response head in reverse order of registration
(Envoy's encoder filters: request hooks A, B, C; response hooks C, B, A), on
a streamed head (`apply_parts`) or a whole response (`apply_pairs`), never on
the gateway's own answers. `FilterRequest.response_edits` is that phase as
one hook. Header lines a filter adds to every answer, the gateway's own
included (CORS), go on `response_extra`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

__all__ = [
    "Chain",
    "Filter",
    "FilterRequest",
    "FilterResult",
    "LocalReply",
    "ResponseHook",
    "ResponsePhase",
]


class ResponseHook(Protocol):
    """A filter's response phase, for one request (`filters.header_edits.ResponseEdits`)."""

    def status(self, status: int) -> int:
        """The status the client gets for `status`."""
        ...

    def apply_parts(self, parts: list[bytes]) -> list[bytes]:
        """A streamed response head edited: parts[0] is the status line, then
        (name, b": ", value, b"\\r\\n") quads with lower-case names; `parts`
        itself when nothing changes."""
        ...

    def apply_pairs(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """A whole response's (name, value) headers edited."""
        ...


class ResponsePhase:
    """Several filters' response hooks as one, run in reverse order of
    registration (the last request hook's response hook first)."""

    __slots__ = ("hooks",)

    def __init__(self, hooks: Sequence[ResponseHook]) -> None:
        self.hooks = tuple(reversed(hooks))

    def status(self, status: int) -> int:
        for hook in self.hooks:
            status = hook.status(status)
        return status

    def apply_parts(self, parts: list[bytes]) -> list[bytes]:
        for hook in self.hooks:
            parts = hook.apply_parts(parts)
        return parts

    def apply_pairs(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        for hook in self.hooks:
            headers = hook.apply_pairs(headers)
        return headers


class LocalReply:
    """An answer from the gateway itself (a problem+json body unless `kind` is empty)."""

    __slots__ = ("close", "detail", "headers", "kind", "status")

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        close: bool = False,
    ) -> None:
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = tuple(headers)
        self.close = close

    def __repr__(self) -> str:
        return f"LocalReply({self.status}, {self.kind!r})"


class FilterRequest:
    """One request as filters see it, and what they decided about it."""

    __slots__ = (
        "add",
        "api_key",
        "claims",
        "client",
        "consumer",
        "drop",
        "headers",
        "method",
        "params",
        "peer",
        "query_credentials",
        "request_id",
        "response_extra",
        "response_hooks",
        "subject",
        "target",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        client: bytes,
        params: dict[str, str] | None = None,
        request_id: bytes = b"",
    ) -> None:
        self.method = method
        self.params = params
        """The route's path parameters (`{id}` -> value), or None."""
        self.request_id = request_id
        """The request's X-Request-Id, as sent upstream."""
        self.response_hooks: list[ResponseHook] | None = None
        """The response phase's hooks, in the order the filters registered
        them (`on_response`); None when no filter edits the response."""
        self.target = target
        """The upstream request target; a filter may replace it."""
        self.headers = headers
        """The client's header lines, names lower-cased (read only)."""
        self.client = client
        """The client's address, as sent in X-Forwarded-For."""
        self.consumer: str | None = None
        """The name of the authenticated consumer, when one is known."""
        self.subject: str | None = None
        """The authenticated token's subject (its consumer claim)."""
        self.api_key: str | None = None
        """The digest of the API key that authenticated the request."""
        self.claims: dict[str, Any] | None = None
        self.add: list[tuple[bytes, bytes]] = []
        """Header lines to send upstream, after `drop` is applied."""
        self.drop: set[bytes] = set()
        """Lower-cased header names removed before the request goes upstream."""
        self.response_extra = b""
        """Header lines (each ending in CRLF) added to the upstream's response."""
        self.query_credentials: dict[bytes, bytes] | None = None
        """Query parameters that carry credentials, taken out of `target`."""
        self.peer: str | None = None
        """The SPIFFE ID of the peer's verified client certificate (read once
        per connection from the TLS transport), or None for plaintext."""

    def on_response(self, hook: ResponseHook) -> None:
        """Run `hook` on this request's response (in reverse order of the
        filters that registered one)."""
        hooks = self.response_hooks
        if hooks is None:
            self.response_hooks = [hook]
        else:
            hooks.append(hook)

    @property
    def response_edits(self) -> ResponseHook | None:
        """The response phase as one hook (the only one itself, when a
        single filter registered one), or None."""
        hooks = self.response_hooks
        if not hooks:
            return None
        return hooks[0] if len(hooks) == 1 else ResponsePhase(hooks)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a (lower-case) header, or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def header_count(self, name: bytes) -> int:
        n = 0
        for h, _ in self.headers:
            if h == name:
                n += 1
        return n


FilterResult = (
    LocalReply | None | Coroutine[Any, Any, LocalReply | None] | asyncio.Future[LocalReply | None]
)
"""A filter's verdict: go on (None), a reply, or one to wait for: a
coroutine (run in a task), or a future another party settles (a Redis rate
limit's decision: no task)."""
Filter = Callable[[FilterRequest], FilterResult]


class Chain:
    """A route's filters, in order."""

    __slots__ = ("filters", "names")

    def __init__(self, filters: Sequence[tuple[str, Filter]]) -> None:
        self.names = tuple(name for name, _ in filters)
        self.filters = tuple(f for _, f in filters)

    def run(self, req: FilterRequest) -> FilterResult:
        filters = self.filters
        for i, f in enumerate(filters):
            result = f(req)
            if result is None:
                continue
            if isinstance(result, LocalReply):
                return result
            if i + 1 == len(filters):
                return result  # the last filter: nothing to resume after it
            return self._resume(req, result, i + 1)
        return None

    async def _resume(
        self,
        req: FilterRequest,
        pending: Coroutine[Any, Any, LocalReply | None] | asyncio.Future[LocalReply | None],
        start: int,
    ) -> LocalReply | None:
        reply = await pending
        if reply is not None:
            return reply
        for f in self.filters[start:]:
            result = f(req)
            if result is None:
                continue
            if isinstance(result, LocalReply):
                return result
            reply = await result
            if reply is not None:
                return reply
        return None
