"""RFC 9457 problem details, serialised into complete HTTP/1.1 responses.

Local replies (a refused request, an upstream failure) are rare compared with
proxied traffic, so they are built on demand rather than cached.
"""

from __future__ import annotations

import orjson

from meshgate.http.headers import phrase, status_line

PROBLEM_BASE = "https://meshgate.dev/problems/"


class ProblemDetail(str):
    """A `detail` text that carries extension members (RFC 9457 section 3.2)
    to the body it is rendered in: a filter passes one as its LocalReply's
    detail, and every path that renders a local reply gets the members
    without a field of its own for them. The standard members win a clash."""

    extensions: dict[str, object]

    def __new__(cls, text: str, extensions: dict[str, object]) -> ProblemDetail:
        self = super().__new__(cls, text)
        self.extensions = extensions
        return self


def problem_body(
    status: int, kind: str, detail: str, *, request_id: str | None = None, **extra: object
) -> bytes:
    doc: dict[str, object] = {
        "type": PROBLEM_BASE + kind,
        "title": phrase(status),
        "status": status,
        "detail": str(detail),
    }
    if isinstance(detail, ProblemDetail):
        for name, value in detail.extensions.items():
            doc.setdefault(name, value)
    if request_id:
        doc["request_id"] = request_id
    doc.update(extra)
    return orjson.dumps(doc)


def problem_response(
    status: int,
    kind: str,
    detail: str,
    *,
    request_id: str | None = None,
    close: bool = False,
    head_only: bool = False,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A whole response: status line, headers and an `application/problem+json` body."""
    body = problem_body(status, kind, detail, request_id=request_id)
    parts = [
        status_line(status),
        b"content-type: application/problem+json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"cache-control: no-store\r\n",
    ]
    if request_id:
        parts.append(b"x-request-id: " + request_id.encode("latin-1") + b"\r\n")
    for name, value in extra_headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"connection: close\r\n\r\n" if close else b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)
