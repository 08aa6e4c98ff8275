"""What the gateway writes itself: the forwarding headers of an upstream
request, the tail of every response head, local replies and handlers'
whole responses. Built once per message, as bytes ready to write."""

from __future__ import annotations

from meshgate.handlers import HandlerResponse
from meshgate.http.headers import HOP_BY_HOP, status_line
from meshgate.http.problem import problem_response

__all__ = [
    "CHUNK_END",
    "COLON_SP",
    "CONTINUE_100",
    "CRLF",
    "NO_BODY_STATUS",
    "REQUEST_TAIL",
    "REQUEST_TAIL_NO_HOST",
    "RESPONSE_TAIL",
    "VIA_TOKEN",
    "forward_pairs",
    "header_pairs",
    "local_reply",
    "whole_response",
]

CRLF = b"\r\n"
COLON_SP = b": "
# What meshgate adds to every forwarded request and response, as one format.
REQUEST_TAIL = (
    b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n"
    b"x-request-id: %s\r\nvia: %s\r\n%s"
)
REQUEST_TAIL_NO_HOST = (
    b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\n%sx-request-id: %s\r\nvia: %s\r\n%s"
)
RESPONSE_TAIL = b"x-request-id: %s\r\nvia: 1.1 meshgate\r\n%s"
# Response headers a whole response does not copy from a handler's answer.
_NOT_FORWARDED_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-request-id", b"via"}
CHUNK_END = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
VIA_TOKEN = b"1.1 meshgate"
NO_BODY_STATUS = frozenset({204, 304})


def header_pairs(raw: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """Header lines filters added for the response (CORS), for a local reply."""
    if not raw:
        return ()
    pairs = []
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep:
            pairs.append((name, value))
    return tuple(pairs)


def forward_pairs(
    client: bytes,
    scheme: bytes,
    host: bytes,
    request_id: bytes,
    xff: bytes | None,
    via: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """What a streamed upstream request's head gets (`REQUEST_TAIL`), as
    header pairs."""
    pairs = [
        (b"x-forwarded-for", client if xff is None else xff + b", " + client),
        (b"x-forwarded-proto", scheme),
    ]
    if host:
        pairs.append((b"x-forwarded-host", host))
    pairs.append((b"x-request-id", request_id))
    pairs.append((b"via", VIA_TOKEN if via is None else via + b", " + VIA_TOKEN))
    return pairs


def local_reply(
    status: int,
    kind: str,
    detail: str,
    *,
    keep_alive: bool,
    method: bytes,
    request_id: bytes,
    extra: tuple[tuple[bytes, bytes], ...],
) -> bytes:
    """An answer from the gateway itself: a problem+json body, or an empty
    success (`kind` empty and a 1xx or 2xx status)."""
    if status < 300 and not kind:
        head = [status_line(status)]
        for name, value in extra:
            head.append(name + b": " + value + CRLF)
        if status != 204:  # a 204 has no Content-Length (RFC 9110 8.6)
            head.append(b"content-length: 0\r\n")
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(CRLF)
        return b"".join(head)
    return problem_response(
        status,
        kind,
        detail,
        request_id=request_id.decode("latin-1"),
        close=not keep_alive,
        head_only=method == b"HEAD",
        extra_headers=extra,
    )


def response_tail(request_id: bytes, keep_alive: bool, http10: bool) -> bytes:
    """What meshgate adds to every response head, and its blank line."""
    return RESPONSE_TAIL % (
        request_id,
        b"connection: close\r\n\r\n"
        if not keep_alive
        else b"connection: keep-alive\r\n\r\n"
        if http10
        else CRLF,
    )


def whole_response(
    resp: HandlerResponse,
    *,
    method: bytes,
    request_id: bytes,
    keep_alive: bool,
    http10: bool,
    response_extra: bytes,
    response_drop: frozenset[bytes] | None,
) -> bytes:
    """A handler's answer, framed as a whole response."""
    status = resp.status
    parts = [status_line(status)]
    skip = _NOT_FORWARDED_RESPONSE
    if response_drop is not None:
        skip = skip | response_drop
    for name, value in resp.headers:
        if name not in skip:
            parts += (name, COLON_SP, value, CRLF)
    body = resp.body
    if status in NO_BODY_STATUS:
        body = b""
    elif body or method != b"HEAD":
        # A HEAD answered from upstream has no body to count: its length
        # is unknown here, and a Content-Length must be the GET's or none
        # (RFC 9110 section 8.6).
        parts.append(b"content-length: %d\r\n" % len(body))
    if method == b"HEAD":
        body = b""
    if response_extra:
        parts.append(response_extra)
    parts.append(response_tail(request_id, keep_alive, http10))
    parts.append(body)
    return b"".join(parts)
